//! Every GEMM kernel this CPU supports reproduces the scalar reference bit for bit: the exact int32
//! sums, the f32 outputs and the fused FFN gate, on shapes with K, N and M tails, for 1, 2 and
//! 3 threads.

use bitvla_ros::kernels::{
    ActLayout, KernelKind, QuantizedActivations, TernaryMatrix, ops, quantize_activations,
    quantize_activations_for, reference, ternary_matmul, ternary_matmul_add_with,
    ternary_matmul_i32, ternary_matmul_relu2_mul_with, ternary_matmul_with,
};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        // splitmix64
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn uniform(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Same length and the same f32 bit patterns (NaN payloads and signed zeros included).
fn bit_identical(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

fn pool(threads: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("thread pool")
}

struct Case {
    /// In the selected kernel's layout.
    q: QuantizedActivations,
    /// In both layouts, quantized directly.
    by_layout: [QuantizedActivations; 2],
    w: TernaryMatrix,
    bias: Vec<f32>,
}

impl Case {
    /// The activations as `kind` reads them natively, or (`native == false`) in the other layout,
    /// which the driver converts.
    fn act_for(&self, kind: KernelKind, native: bool) -> &QuantizedActivations {
        let blocked = (kind.act_layout() == ActLayout::Blocked) == native;
        &self.by_layout[if blocked { 0 } else { 1 }]
    }
}

fn case(rng: &mut Rng, m: usize, k: usize, n: usize) -> Case {
    // Activations with occasional extreme values and exact zeros, so codes hit ±127 and 0.
    let x: Vec<f32> = (0..m * k)
        .map(|_| match rng.below(16) {
            0 => 0.0,
            1 => rng.uniform() * 100.0,
            _ => rng.uniform(),
        })
        .collect();
    let w: Vec<f32> = (0..n * k).map(|_| rng.uniform()).collect();
    let weights = TernaryMatrix::from_f32(&w, n, k).unwrap();
    let mut q = QuantizedActivations::new();
    quantize_activations(&x, m, k, weights.k_padded(), &mut q).unwrap();
    let by_layout = [ActLayout::Blocked, ActLayout::Tiles].map(|layout| {
        let mut q = QuantizedActivations::new();
        quantize_activations_for(layout, &x, m, k, weights.k_padded(), &mut q).unwrap();
        q
    });
    let bias: Vec<f32> = (0..n).map(|_| rng.uniform()).collect();
    Case {
        q,
        by_layout,
        w: weights,
        bias,
    }
}

#[test]
fn all_kernels_match_the_reference_on_random_shapes_with_tails() {
    let kernels = KernelKind::supported();
    eprintln!("kernels under test: {kernels:?}");
    let mut rng = Rng(2024);
    let mut shapes = vec![
        (1, 16, 32),
        (8, 16, 32),
        (9, 17, 33),
        (7, 4, 1),
        (1, 1, 1),
        (13, 48, 64),
        (25, 1152 + 16, 47),
        (17, 4304, 40),  // ViT fc2's K (16·269)
        (3, 6912, 33),   // the LLM down_proj K
        (33, 640, 64),   // AMX: one row past a 32-row block, K = 10 tile steps
        (64, 2560, 96),  // AMX: whole blocks, several K chunks
        (40, 1040, 70),  // AMX: K chunk ending inside a 64-k step
        (600, 1792, 24), // 50 row blocks of 21 KiB: the vector kernels sweep them in 2 groups
    ];
    // A full row block and then every partial one (1 to 12 rows: the vector kernels run the
    // real rows only), over two K chunks so that the partial tiles carry accumulators too.
    for rows in 1..=12 {
        shapes.push((12 + rows, 1200, 40));
    }
    for _ in 0..12 {
        shapes.push((1 + rng.below(40), 1 + rng.below(300), 1 + rng.below(100)));
    }
    for (i, &(m, k, n)) in shapes.iter().enumerate() {
        let c = case(&mut rng, m, k, n);
        let (w, bias) = (&c.w, &c.bias);
        let expect_i32 = reference::matmul_i32(&c.q, w);
        let expect_f32 = reference::matmul_f32(&c.q, w, Some(bias));
        let expect_f32_nobias = reference::matmul_f32(&c.q, w, None);
        // The fused FFN gate: relu(gate)² · up, as the separate element-wise op computes it.
        let up: Vec<f32> = (0..m * n).map(|_| 4.0 * rng.uniform() - 2.0).collect();
        let mut expect_gated = expect_f32.clone();
        ops::relu_squared_mul(&mut expect_gated, &up).unwrap();
        // The fused residual connection: the stream plus the output, as the separate add does.
        let mut expect_residual = up.clone();
        ops::add_in_place(&mut expect_residual, &expect_f32).unwrap();
        for &kind in &kernels {
            // Every third shape hands the kernel the other layout (converted by the driver).
            let q = c.act_for(kind, i % 3 != 2);
            for threads in [1, 2, 3] {
                pool(threads).install(|| {
                    let mut got = vec![0i32; m * n];
                    ternary_matmul_i32(kind, q, w, &mut got).unwrap();
                    assert_eq!(
                        got, expect_i32,
                        "{kind} i32, m={m} k={k} n={n} threads={threads}"
                    );
                    let mut y = vec![f32::NAN; m * n];
                    ternary_matmul_with(kind, q, w, Some(bias), &mut y).unwrap();
                    assert!(
                        bit_identical(&y, &expect_f32),
                        "{kind} f32+bias, m={m} k={k} n={n} threads={threads}"
                    );
                    ternary_matmul_with(kind, q, w, None, &mut y).unwrap();
                    assert!(
                        bit_identical(&y, &expect_f32_nobias),
                        "{kind} f32, m={m} k={k} n={n} threads={threads}"
                    );
                    let mut gated = up.clone();
                    ternary_matmul_relu2_mul_with(kind, q, w, Some(bias), &mut gated).unwrap();
                    assert!(
                        bit_identical(&gated, &expect_gated),
                        "{kind} relu²·up, m={m} k={k} n={n} threads={threads}"
                    );
                    let mut stream = up.clone();
                    ternary_matmul_add_with(kind, q, w, Some(bias), &mut stream).unwrap();
                    assert!(
                        bit_identical(&stream, &expect_residual),
                        "{kind} residual add, m={m} k={k} n={n} threads={threads}"
                    );
                });
            }
        }
    }
}

#[test]
fn extreme_codes_do_not_overflow() {
    // All weights +1 or -1 and all activations at ±127/-128 bounds: the largest sums the model can
    // produce (K = 6912), where any int16 accumulation path would overflow.
    let (m, k, n) = (9, 6912, 33);
    for sign in [1i8, -1] {
        let codes = vec![sign; n * k];
        let w = TernaryMatrix::from_codes(&codes, n, k, 1.0).unwrap();
        let x: Vec<f32> = (0..m * k)
            .map(|i| {
                if i % 2 == 0 {
                    1.0
                } else {
                    1.0 - (i % 3) as f32
                }
            })
            .collect();
        let mut q = QuantizedActivations::new();
        quantize_activations(&x, m, k, w.k_padded(), &mut q).unwrap();
        let expect = reference::matmul_i32(&q, &w);
        assert!(expect.iter().any(|v| v.abs() > 100_000));
        for kind in KernelKind::supported() {
            let mut q = QuantizedActivations::new();
            quantize_activations_for(kind.act_layout(), &x, m, k, w.k_padded(), &mut q).unwrap();
            let mut got = vec![0i32; m * n];
            ternary_matmul_i32(kind, &q, &w, &mut got).unwrap();
            assert_eq!(got, expect, "{kind} sign={sign}");
        }
    }
}

#[test]
fn fused_matrices_keep_per_part_scales() {
    let mut rng = Rng(7);
    let (m, k) = (10, 64);
    let parts: Vec<TernaryMatrix> = [64usize, 32, 20]
        .iter()
        .map(|&n| {
            let w: Vec<f32> = (0..n * k)
                .map(|_| rng.uniform() * (1.0 + n as f32))
                .collect();
            TernaryMatrix::from_f32(&w, n, k).unwrap()
        })
        .collect();
    let fused = TernaryMatrix::concat(&parts.iter().collect::<Vec<_>>()).unwrap();
    let x: Vec<f32> = (0..m * k).map(|_| rng.uniform()).collect();
    let mut q = QuantizedActivations::new();
    quantize_activations(&x, m, k, fused.k_padded(), &mut q).unwrap();
    let mut y = vec![0.0; m * fused.rows()];
    ternary_matmul(&q, &fused, None, &mut y).unwrap();
    let mut col = 0;
    for part in &parts {
        let mut yp = vec![0.0; m * part.rows()];
        ternary_matmul(&q, part, None, &mut yp).unwrap();
        for r in 0..m {
            for c in 0..part.rows() {
                assert_eq!(
                    y[r * fused.rows() + col + c].to_bits(),
                    yp[r * part.rows() + c].to_bits()
                );
            }
        }
        col += part.rows();
    }
}

#[test]
fn mismatched_shapes_are_errors() {
    let mut rng = Rng(3);
    let Case { q, w, .. } = case(&mut rng, 4, 32, 16);
    let mut out = vec![0.0; 4 * 15];
    assert!(ternary_matmul(&q, &w, None, &mut out).is_err());
    let mut out = vec![0.0; 4 * 16];
    assert!(ternary_matmul(&q, &w, Some(&[0.0; 3]), &mut out).is_err());
    let w_other = case(&mut rng, 4, 48, 16).w;
    assert!(ternary_matmul(&q, &w_other, None, &mut out).is_err());
    let empty = QuantizedActivations::new();
    assert!(ternary_matmul(&empty, &w, None, &mut out).is_err());
}

#[test]
fn the_best_kernel_is_selected_and_supported() {
    let best = KernelKind::best();
    assert!(best.is_supported());
    #[cfg(target_arch = "x86_64")]
    if KernelKind::AmxInt8.is_supported() {
        assert_eq!(best, KernelKind::AmxInt8);
    } else if std::arch::is_x86_feature_detected!("avx512vnni")
        && std::arch::is_x86_feature_detected!("avx512bw")
    {
        assert_eq!(best, KernelKind::Avx512Vnni);
    } else if std::arch::is_x86_feature_detected!("avxvnni") {
        assert_eq!(best, KernelKind::AvxVnni);
    }
    assert!(KernelKind::supported().contains(&KernelKind::Scalar));
}

/// The 256-bit VNNI body runs in two encodings: VEX (AVX-VNNI: Intel client CPUs, Sapphire
/// Rapids, Zen 5) and EVEX (AVX-512 VNNI + VL: every AVX-512 VNNI CPU, Zen 4 included). The
/// exactness tests above cover each one this CPU runs; this one says which did not run here,
/// and fails if the CPU reports the features of one whose kernel is not offered.
#[test]
fn both_encodings_of_the_256_bit_vnni_body_run_where_the_cpu_allows() {
    #[cfg(target_arch = "x86_64")]
    {
        let has = |f: &[bool]| f.iter().all(|&x| x);
        use std::arch::is_x86_feature_detected as has_feature;
        let variants = [
            (
                KernelKind::AvxVnni,
                "VEX (avxvnni)",
                has(&[has_feature!("avx2"), has_feature!("avxvnni")]),
            ),
            (
                KernelKind::Avx512VnniYmm,
                "EVEX (avx512vnni + avx512vl)",
                has(&[
                    has_feature!("avx2"),
                    has_feature!("avx512f"),
                    has_feature!("avx512vl"),
                    has_feature!("avx512vnni"),
                ]),
            ),
        ];
        let mut ran = 0;
        for (kind, encoding, cpu_has) in variants {
            assert_eq!(kind.is_supported(), cpu_has, "{kind}: {encoding}");
            if cpu_has {
                ran += 1;
                eprintln!("{kind}: the {encoding} encoding is tested on this CPU");
            } else {
                eprintln!("{kind}: SKIPPED, this CPU lacks {encoding}; not tested here");
            }
        }
        eprintln!("256-bit VNNI body: {ran} of 2 encodings tested");
    }
    #[cfg(not(target_arch = "x86_64"))]
    eprintln!("256-bit VNNI body: SKIPPED, not an x86-64 CPU");
}
