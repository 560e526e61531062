//! Full-precision matrix products through the `gemm` crate (the maintained f32 GEMM of the Rust
//! ecosystem and the benchmark baseline): linear layers in PyTorch layout and strided products for
//! attention.
//!
//! Determinism: a product is split by us into column ranges of fixed width (independent of the
//! thread count), and each range runs single-threaded inside `gemm`, so the result of every
//! element is the same for any number of threads.

use super::{KernelError, Result, check_matrix};
use gemm::Parallelism;
use rayon::prelude::*;

/// Output columns per parallel task: fixed, so task boundaries never depend on the pool size.
const COLUMN_BLOCK: usize = 256;

/// Inputs per product of a task: a task runs its K in chunks of this many, accumulating into
/// its output columns, so a bf16 weight block is widened 1 MiB at a time into a buffer that stays
/// resident (widening a whole 256 × 17920 block of the action head took a fresh 18 MB mapping,
/// and its page faults, on every call). f32 and bf16 weights take the same chunks, so their
/// results stay identical.
const K_CHUNK: usize = 1024;

/// A strided matrix view: element (i, j) at `ptr + i·row_stride + j·col_stride`.
#[derive(Clone, Copy)]
pub struct View {
    pub ptr: *const f32,
    pub row_stride: isize,
    pub col_stride: isize,
}

/// `dst(m × n, row-major, leading dimension ldd) = scale · lhs(m × k) · rhs(k × n)`
/// (or `dst + scale · lhs · rhs` with `accumulate`), single-threaded.
///
/// # Safety
/// `lhs`, `rhs` must be valid for reads of the given extents and strides, `dst` for writes of
/// `m` rows of `n` at stride `ldd`, and `dst` must not overlap the inputs.
#[allow(clippy::too_many_arguments)]
pub unsafe fn matmul_strided(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    ldd: usize,
    lhs: View,
    rhs: View,
    scale: f32,
    accumulate: bool,
) {
    // SAFETY: forwarded from the caller. gemm computes dst = alpha·dst + beta·lhs·rhs.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            ldd as isize,
            accumulate,
            lhs.ptr,
            lhs.col_stride,
            lhs.row_stride,
            rhs.ptr,
            rhs.col_stride,
            rhs.row_stride,
            1.0,
            scale,
            false,
            false,
            false,
            Parallelism::None,
        );
    }
}

/// An output pointer shared by parallel tasks that each write a disjoint part of it.
pub(crate) struct SendPtr(pub(crate) *mut f32);
// SAFETY: users write disjoint regions only, one task each (column ranges here, heads in
// attention).
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// `out(m × n) = x(m × k) · Wᵀ (+ b)` with `W` in PyTorch layout (`n × k`, row-major), on the
/// current rayon pool. Deterministic for any thread count (see the module docs).
pub fn linear(
    x: &[f32],
    m: usize,
    k: usize,
    weight: &[f32],
    n: usize,
    bias: Option<&[f32]>,
    out: &mut [f32],
) -> Result<()> {
    linear_weights(x, m, k, WeightRef::F32(weight), n, bias, out)
}

/// Full-precision weights as stored: f32, or bf16 (kept at half the memory and widened to f32
/// block by block, exactly, inside each task).
#[derive(Clone, Copy)]
pub enum WeightRef<'a> {
    F32(&'a [f32]),
    Bf16(&'a [half::bf16]),
}

impl WeightRef<'_> {
    fn len(&self) -> usize {
        match self {
            WeightRef::F32(w) => w.len(),
            WeightRef::Bf16(w) => w.len(),
        }
    }
}

thread_local! {
    static WIDENED: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// [`linear`] for f32 or bf16 weights; the same result for both when the bf16 values widen to
/// the f32 ones.
pub fn linear_weights(
    x: &[f32],
    m: usize,
    k: usize,
    weight: WeightRef<'_>,
    n: usize,
    bias: Option<&[f32]>,
    out: &mut [f32],
) -> Result<()> {
    check_matrix("linear input", x.len(), m, k)?;
    check_matrix("linear weight", weight.len(), n, k)?;
    check_matrix("linear output", out.len(), m, n)?;
    if let Some(b) = bias
        && b.len() != n
    {
        return Err(KernelError::LengthMismatch {
            what: "linear bias",
            expected: n,
            got: b.len(),
        });
    }
    if let Some(b) = bias {
        for row in out.chunks_exact_mut(n) {
            row.copy_from_slice(b);
        }
    }
    let dst = SendPtr(out.as_mut_ptr());
    let blocks = n.div_ceil(COLUMN_BLOCK);
    let block = |i: usize| {
        let col0 = i * COLUMN_BLOCK;
        let cols = COLUMN_BLOCK.min(n - col0);
        let dst = &dst;
        for k0 in (0..k).step_by(K_CHUNK) {
            let kc = K_CHUNK.min(k - k0);
            // The chunk's k × cols slice of Wᵀ: `w[j·stride + kk]` is W[col0 + j, k0 + kk].
            let product = |w: &[f32], stride: usize| {
                // SAFETY: x is m × k row-major, read from column k0 for kc columns; w holds
                // `cols` rows of kc values at `stride`; the destination columns
                // col0..col0+cols of the m × n output belong to this block only.
                unsafe {
                    matmul_strided(
                        m,
                        cols,
                        kc,
                        dst.0.add(col0),
                        n,
                        View {
                            ptr: x.as_ptr().add(k0),
                            row_stride: k as isize,
                            col_stride: 1,
                        },
                        View {
                            ptr: w.as_ptr(),
                            row_stride: 1,
                            col_stride: stride as isize,
                        },
                        1.0,
                        bias.is_some() || k0 > 0,
                    )
                }
            };
            match weight {
                WeightRef::F32(w) => product(&w[col0 * k + k0..(col0 + cols - 1) * k + k0 + kc], k),
                WeightRef::Bf16(w) => WIDENED.with_borrow_mut(|buf| {
                    buf.clear();
                    for j in 0..cols {
                        let row = (col0 + j) * k + k0;
                        buf.extend(w[row..row + kc].iter().map(|v| v.to_f32()));
                    }
                    product(buf, kc);
                }),
            }
        }
    };
    if blocks == 1 || rayon::current_num_threads() == 1 {
        (0..blocks).for_each(block);
    } else {
        (0..blocks).into_par_iter().for_each(block);
    }
    Ok(())
}

/// The f32 baseline of the benchmark: the same product with `gemm`'s own rayon parallelism (how
/// a user of the crate would call it), no bias.
pub fn linear_gemm_parallel(
    x: &[f32],
    m: usize,
    k: usize,
    weight: &[f32],
    n: usize,
    out: &mut [f32],
) -> Result<()> {
    check_matrix("linear input", x.len(), m, k)?;
    check_matrix("linear weight", weight.len(), n, k)?;
    check_matrix("linear output", out.len(), m, n)?;
    let threads = rayon::current_num_threads();
    let parallelism = if threads > 1 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    // SAFETY: extents checked above; out does not alias the inputs.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            false,
            x.as_ptr(),
            1,
            k as isize,
            weight.as_ptr(),
            k as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize, seed: u64) -> Vec<f32> {
        crate::kernels::pseudo_random(len, seed, 0.5)
    }

    #[test]
    fn linear_matches_f64_and_is_thread_count_independent() {
        for &(m, k, n) in &[(1, 1, 1), (8, 17920, 7), (5, 33, 300), (37, 64, 513)] {
            let x = data(m * k, 1);
            let w = data(n * k, 2);
            let b = data(n, 3);
            let mut outs = Vec::new();
            for threads in [1, 2, 3] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let mut y = vec![0.0; m * n];
                pool.install(|| linear(&x, m, k, &w, n, Some(&b), &mut y))
                    .unwrap();
                outs.push(y);
            }
            assert!(outs.iter().all(|o| {
                o.iter()
                    .zip(&outs[0])
                    .all(|(a, b)| a.to_bits() == b.to_bits())
            }));
            for i in 0..m {
                for j in 0..n {
                    let exact: f64 = (0..k)
                        .map(|t| f64::from(x[i * k + t]) * f64::from(w[j * k + t]))
                        .sum::<f64>()
                        + f64::from(b[j]);
                    let got = f64::from(outs[0][i * n + j]);
                    assert!(
                        (got - exact).abs() <= 1e-5 * (k as f64).sqrt(),
                        "({i},{j}) {got} vs {exact}"
                    );
                }
            }
            let mut y2 = vec![0.0; m * n];
            linear_gemm_parallel(&x, m, k, &w, n, &mut y2).unwrap();
            for (a, (y, bias)) in y2.iter().zip(outs[0].iter().zip(b.iter().cycle())) {
                assert!((a + bias - y).abs() <= 1e-4);
            }
        }
    }

    #[test]
    fn bf16_weights_equal_their_f32_widening_bit_for_bit() {
        // K spans two whole chunks and a tail; N a whole column block and a tail.
        let (m, k, n) = (9, 2 * K_CHUNK + 52, 300);
        let x = data(m * k, 4);
        let w16: Vec<half::bf16> = data(n * k, 5)
            .iter()
            .map(|&v| half::bf16::from_f32(v))
            .collect();
        let w32: Vec<f32> = w16.iter().map(|v| v.to_f32()).collect();
        let b = data(n, 6);
        for bias in [Some(b.as_slice()), None] {
            let (mut a, mut c) = (vec![f32::NAN; m * n], vec![f32::NAN; m * n]);
            linear(&x, m, k, &w32, n, bias, &mut a).unwrap();
            linear_weights(&x, m, k, WeightRef::Bf16(&w16), n, bias, &mut c).unwrap();
            assert!(a.iter().zip(&c).all(|(p, q)| p.to_bits() == q.to_bits()));
            assert!(a.iter().all(|v| v.is_finite()));
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        let mut y = vec![0.0; 4];
        assert!(linear(&[1.0; 4], 2, 2, &[1.0; 4], 2, Some(&[0.0; 3]), &mut y).is_err());
        assert!(linear(&[1.0; 3], 2, 2, &[1.0; 4], 2, None, &mut y).is_err());
        assert!(linear(&[], 0, 2, &[1.0; 4], 2, None, &mut y).is_err());
    }
}
