//! Register-only peak calibration loops (`shared/spec/kernels.md` §5.2): the int8 dot-product
//! instruction the selected GEMM kernel is built on, and f32 FMA, with 12 independent accumulators
//! and no memory operands. Rates are wall clock over all threads of the pool running at once.

use crate::kernels::KernelKind;
use std::hint::black_box;
use std::time::Instant;

/// Which instruction sequence a calibration measures, and its ops per iteration per accumulator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeakLoop {
    /// `vpdpbusd zmm`: 64 int8 MACs = 128 ops.
    Avx512Vnni,
    /// `vpmaddubsw` + `vpmaddwd` + `vpaddd` on ymm: 32 MACs = 64 ops.
    Avx2,
    /// `vpdpbusd ymm`, VEX-encoded (AVX-VNNI): 32 MACs = 64 ops.
    AvxVnni,
    /// `vpdpbusd ymm`, EVEX-encoded (AVX-512 VNNI + VL): 32 MACs = 64 ops.
    Avx512VnniYmm,
    /// `sdot v.4s`: 16 MACs = 32 ops.
    NeonDot,
    /// `vfmadd zmm` (f32): 32 flops; `ymm` on AVX2-only machines: 16.
    F32Fma,
    /// AMX `tdpbusd` on 16x64-byte tiles: 16x16x64 int8 MACs = 32768 ops per instruction (the
    /// AMX kernel's `tdpbssd` has the same throughput).
    AmxInt8,
    /// The same four `tdpbusd` per step, each step first loading its two A and two B tiles
    /// from L1-resident memory: the ceiling of any 2x2-blocked AMX GEMM (8 tile registers allow
    /// no more reuse), which is bound by `tileloadd` where a tile load costs more than a
    /// `tdpbusd`.
    AmxInt8Streaming,
}

impl PeakLoop {
    /// The int8 loop matching a GEMM kernel (None for the scalar kernel).
    pub fn for_kernel(kind: KernelKind) -> Option<Self> {
        match kind {
            KernelKind::AmxInt8 => Some(PeakLoop::AmxInt8),
            KernelKind::Avx512Vnni => Some(PeakLoop::Avx512Vnni),
            KernelKind::Avx2 => Some(PeakLoop::Avx2),
            KernelKind::AvxVnni => Some(PeakLoop::AvxVnni),
            KernelKind::Avx512VnniYmm => Some(PeakLoop::Avx512VnniYmm),
            KernelKind::NeonDot | KernelKind::NeonMull => {
                cfg!(target_arch = "aarch64").then_some(PeakLoop::NeonDot)
            }
            KernelKind::Scalar => None,
        }
    }
}

impl PeakLoop {
    /// The register-only vector int8 loop (VNNI, AVX2 or NEON) the efficiency targets of the
    /// kernel issues are defined against: the kernel's own loop, except for the AMX kernel,
    /// whose tiles are a different execution unit with its own, far higher peak.
    pub fn vector_for_kernel(kind: KernelKind) -> Option<Self> {
        match kind {
            KernelKind::AmxInt8 => Some(PeakLoop::Avx512Vnni),
            other => Self::for_kernel(other),
        }
    }
}

const ACCUMULATORS: usize = 12;

/// Runs `iters` iterations of the loop on the current thread; returns the ops performed.
fn run_loop(which: PeakLoop, iters: u64) -> f64 {
    match which {
        #[cfg(target_arch = "x86_64")]
        PeakLoop::Avx512Vnni if KernelKind::Avx512Vnni.is_supported() => {
            // SAFETY: feature checked on the line above.
            unsafe { x86::vnni(iters) };
            iters as f64 * ACCUMULATORS as f64 * 128.0
        }
        #[cfg(target_arch = "x86_64")]
        PeakLoop::Avx2 if std::arch::is_x86_feature_detected!("avx2") => {
            // SAFETY: feature checked.
            unsafe { x86::avx2(iters) };
            iters as f64 * ACCUMULATORS as f64 * 64.0
        }
        #[cfg(target_arch = "x86_64")]
        PeakLoop::AvxVnni if KernelKind::AvxVnni.is_supported() => {
            // SAFETY: feature checked.
            unsafe { x86::vnni_ymm_vex(iters) };
            iters as f64 * ACCUMULATORS as f64 * 64.0
        }
        #[cfg(target_arch = "x86_64")]
        PeakLoop::Avx512VnniYmm if KernelKind::Avx512VnniYmm.is_supported() => {
            // SAFETY: feature checked.
            unsafe { x86::vnni_ymm_evex(iters) };
            iters as f64 * ACCUMULATORS as f64 * 64.0
        }
        #[cfg(target_arch = "x86_64")]
        PeakLoop::F32Fma if std::arch::is_x86_feature_detected!("avx512f") => {
            // SAFETY: feature checked.
            unsafe { x86::fma512(iters) };
            iters as f64 * ACCUMULATORS as f64 * 32.0
        }
        #[cfg(target_arch = "x86_64")]
        PeakLoop::F32Fma if std::arch::is_x86_feature_detected!("fma") => {
            // SAFETY: feature checked.
            unsafe { x86::fma256(iters) };
            iters as f64 * ACCUMULATORS as f64 * 16.0
        }
        #[cfg(target_arch = "x86_64")]
        PeakLoop::AmxInt8 if KernelKind::AmxInt8.is_supported() => {
            // SAFETY: CPU support and the kernel's permission for the tile state checked.
            unsafe { x86::amx(iters, false) };
            iters as f64 * 4.0 * 32768.0
        }
        #[cfg(target_arch = "x86_64")]
        PeakLoop::AmxInt8Streaming if KernelKind::AmxInt8.is_supported() => {
            // SAFETY: as above.
            unsafe { x86::amx(iters, true) };
            iters as f64 * 4.0 * 32768.0
        }
        #[cfg(target_arch = "aarch64")]
        PeakLoop::NeonDot if std::arch::is_aarch64_feature_detected!("dotprod") => {
            // SAFETY: feature checked.
            unsafe { arm::sdot(iters) };
            iters as f64 * ACCUMULATORS as f64 * 32.0
        }
        _ => 0.0,
    }
}

/// Peak rate in GOP/s of `which` with every thread of `pool` running the loop simultaneously,
/// over roughly `seconds`. None when the loop cannot run on this CPU.
pub fn calibrate(which: PeakLoop, pool: &rayon::ThreadPool, seconds: f64) -> Option<f64> {
    rate_on_pool(pool, seconds, &|iters| run_loop(which, iters))
}

/// Rate in GOP/s of `run` (which does `count` units of work and returns their ops, or 0 when it
/// cannot run here) with every thread of `pool` running it at once, over roughly `seconds`. The
/// count is sized on one thread first, doubling a probe until it takes 2 ms. None when `run`
/// returns 0.
pub fn rate_on_pool(
    pool: &rayon::ThreadPool,
    seconds: f64,
    run: &(impl Fn(u64) -> f64 + Sync),
) -> Option<f64> {
    let mut probe = 1u64;
    let per_unit = loop {
        let t = Instant::now();
        if run(probe) == 0.0 {
            return None;
        }
        let elapsed = t.elapsed().as_secs_f64();
        if elapsed > 2e-3 || probe >= 1 << 40 {
            break elapsed / probe as f64;
        }
        probe *= 2;
    };
    let count = ((seconds / per_unit.max(1e-12)) as u64).max(1);
    let start = Instant::now();
    let total: f64 = pool.broadcast(|_| run(count)).into_iter().sum();
    Some(total / start.elapsed().as_secs_f64() / 1e9)
}

/// AMX-INT8 is usable here: the CPU has it and the OS grants the tile data state.
pub fn amx_int8_available() -> bool {
    KernelKind::AmxInt8.is_supported()
}

/// `bitvla bench peaks`: every calibration loop of this CPU (the GEMM kernel's int8 loop, f32
/// FMA, AMX where the OS grants it) at 1 thread and at all threads, `reps` interleaved
/// repetitions of `seconds` each: medians and spreads, as one JSON object.
pub fn report(reps: usize, seconds: f64) -> anyhow::Result<serde_json::Value> {
    use super::kernels::median;

    let kernel = KernelKind::best();
    let all = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut loops: Vec<(&str, PeakLoop)> = Vec::new();
    if let Some(l) = PeakLoop::for_kernel(kernel) {
        loops.push(("int8 (GEMM kernel's loop)", l));
    }
    loops.push(("f32 fma", PeakLoop::F32Fma));
    if amx_int8_available() {
        loops.push(("amx-int8 tdpbusd", PeakLoop::AmxInt8));
        loops.push((
            "amx-int8 tdpbusd, 2x2 tiles loaded from L1 each step",
            PeakLoop::AmxInt8Streaming,
        ));
    }
    let mut results = Vec::new();
    for threads in [1, all] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()?;
        let mut samples = vec![Vec::new(); loops.len()];
        for _ in 0..reps {
            for (i, (_, l)) in loops.iter().enumerate() {
                if let Some(g) = calibrate(*l, &pool, seconds) {
                    samples[i].push(g);
                }
            }
        }
        for ((name, _), mut s) in loops.iter().zip(samples) {
            if !s.is_empty() {
                let spread = (s.iter().copied().fold(f64::MIN, f64::max)
                    - s.iter().copied().fold(f64::MAX, f64::min))
                    / median(&mut s.clone());
                results.push(serde_json::json!({
                    "loop": name, "threads": threads, "median_gops": median(&mut s), "spread": spread,
                }));
            }
        }
    }
    Ok(serde_json::json!({
        "bench": "peaks",
        "cpu": super::machine::cpu_model(),
        "kernel": format!("{kernel:?}"),
        "amx_int8_available": amx_int8_available(),
        "reps": reps,
        "results": results,
    }))
}

/// [`report`] as lines for a terminal.
pub fn print_report(
    out: &mut impl std::io::Write,
    report: &serde_json::Value,
) -> std::io::Result<()> {
    let results = report["results"].as_array().cloned().unwrap_or_default();
    writeln!(
        out,
        "{} (GEMM kernel {}), medians of {} interleaved reps:",
        report["cpu"], report["kernel"], report["reps"]
    )?;
    for r in &results {
        writeln!(
            out,
            "  {:<28} {} thread(s): {:>7.0} GOP/s (spread {:.1}%)",
            r["loop"].as_str().unwrap_or(""),
            r["threads"],
            r["median_gops"].as_f64().unwrap_or(0.0),
            r["spread"].as_f64().unwrap_or(0.0) * 100.0
        )?;
    }
    if report["amx_int8_available"] != true {
        writeln!(out, "  amx-int8: not available on this CPU/OS")?;
    }
    Ok(())
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{ACCUMULATORS, black_box};
    use std::arch::asm;
    use std::arch::x86_64::*;

    #[repr(C, align(64))]
    struct TileConfig([u8; 64]);

    /// `iters` x 4 `tdpbusd` into four independent accumulator tiles (tmm0-3) from two A
    /// (tmm4-5) and two B (tmm6-7) tiles, all 16 rows x 64 bytes; with `streaming`, each
    /// iteration reloads the four operand tiles from (L1-resident) memory first.
    ///
    /// # Safety
    /// `KernelKind::AmxInt8.is_supported()` must have returned true.
    pub(super) unsafe fn amx(iters: u64, streaming: bool) {
        let mut cfg = TileConfig([0; 64]);
        cfg.0[0] = 1; // palette 1
        for t in 0..8 {
            cfg.0[16 + 2 * t..18 + 2 * t].copy_from_slice(&64u16.to_le_bytes());
            cfg.0[48 + t] = 16;
        }
        let a = black_box(vec![1u8; 2 * 16 * 64]);
        let b = black_box(vec![1u8; 2 * 16 * 64]);
        let mut c = vec![0i32; 16 * 16];
        // SAFETY: the configuration describes eight 16x64-byte tiles; every load reads 1 KiB
        // inside `a` or `b` (stride 64), the store writes 1 KiB into `c`; tiles are released.
        unsafe {
            asm!("ldtilecfg [{}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly));
            asm!(
                "tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3",
                "tileloadd tmm4, [{a} + {s}*1]", "tileloadd tmm5, [{a2} + {s}*1]",
                "tileloadd tmm6, [{b} + {s}*1]", "tileloadd tmm7, [{b2} + {s}*1]",
                a = in(reg) a.as_ptr(), a2 = in(reg) a.as_ptr().add(1024),
                b = in(reg) b.as_ptr(), b2 = in(reg) b.as_ptr().add(1024), s = in(reg) 64usize,
                options(nostack, readonly),
            );
            if streaming {
                asm!(
                    "2:",
                    "tileloadd tmm4, [{a} + {s}*1]",
                    "tileloadd tmm6, [{b} + {s}*1]",
                    "tdpbusd tmm0, tmm4, tmm6",
                    "tileloadd tmm7, [{b2} + {s}*1]",
                    "tdpbusd tmm1, tmm4, tmm7",
                    "tileloadd tmm5, [{a2} + {s}*1]",
                    "tdpbusd tmm2, tmm5, tmm6",
                    "tdpbusd tmm3, tmm5, tmm7",
                    "dec {n}",
                    "jnz 2b",
                    a = in(reg) a.as_ptr(), a2 = in(reg) a.as_ptr().add(1024),
                    b = in(reg) b.as_ptr(), b2 = in(reg) b.as_ptr().add(1024),
                    s = in(reg) 64usize,
                    n = inout(reg) iters.max(1) => _,
                    options(nostack, readonly),
                );
            } else {
                asm!(
                    "2:",
                    "tdpbusd tmm0, tmm4, tmm6",
                    "tdpbusd tmm1, tmm4, tmm7",
                    "tdpbusd tmm2, tmm5, tmm6",
                    "tdpbusd tmm3, tmm5, tmm7",
                    "dec {n}",
                    "jnz 2b",
                    n = inout(reg) iters.max(1) => _,
                    options(nostack, nomem),
                );
            }
            asm!("tilestored [{c} + {s}*1], tmm0", c = in(reg) c.as_mut_ptr(), s = in(reg) 64usize,
                 options(nostack));
            asm!("tilerelease", options(nostack, nomem));
        }
        black_box(c);
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn vnni(iters: u64) {
        let a = black_box(_mm512_set1_epi8(1));
        let b = black_box(_mm512_set1_epi8(-1));
        let mut acc = [_mm512_setzero_si512(); ACCUMULATORS];
        for _ in 0..iters {
            for r in acc.iter_mut() {
                *r = _mm512_dpbusd_epi32(*r, a, b);
            }
        }
        black_box(acc);
    }

    /// `vpdpbusd ymm` in one encoding: the same loop for VEX (AVX-VNNI) and EVEX (AVX-512
    /// VNNI + VL), as the kernel's body is compiled for both.
    macro_rules! vnni_ymm_loop {
        ($name:ident, $features:literal, $dpbusd:ident) => {
            #[target_feature(enable = $features)]
            pub(super) unsafe fn $name(iters: u64) {
                let a = black_box(_mm256_set1_epi8(1));
                let b = black_box(_mm256_set1_epi8(-1));
                let mut acc = [_mm256_setzero_si256(); ACCUMULATORS];
                for _ in 0..iters {
                    for r in acc.iter_mut() {
                        *r = $dpbusd(*r, a, b);
                    }
                }
                black_box(acc);
            }
        };
    }
    vnni_ymm_loop!(vnni_ymm_vex, "avxvnni", _mm256_dpbusd_avx_epi32);
    vnni_ymm_loop!(vnni_ymm_evex, "avx512vnni,avx512vl", _mm256_dpbusd_epi32);

    /// 12 independent `vpmaddubsw` + `vpmaddwd` (by ones) + `vpaddd` chains, the AVX2 kernel's
    /// step, in `asm!`: written with intrinsics on constant operands, the product is
    /// loop-invariant and LLVM hoisted it, leaving a loop of `vpaddd` that "measured" 1.6 TOP/s on
    /// one core, so every AVX2 efficiency came out about 7x too low. The temporary (ymm12) is
    /// renamed per step, as in the kernel.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn avx2(iters: u64) {
        // SAFETY: register-only instructions on registers declared clobbered; AVX2 is enabled.
        unsafe {
            asm!(
                "vpcmpeqw ymm15, ymm15, ymm15",
                "vpsrlw ymm15, ymm15, 15",
                "vpcmpeqb ymm14, ymm14, ymm14",
                "vpabsb ymm13, ymm14",
                "vpxor ymm0, ymm0, ymm0",
                "vpxor ymm1, ymm1, ymm1",
                "vpxor ymm2, ymm2, ymm2",
                "vpxor ymm3, ymm3, ymm3",
                "vpxor ymm4, ymm4, ymm4",
                "vpxor ymm5, ymm5, ymm5",
                "vpxor ymm6, ymm6, ymm6",
                "vpxor ymm7, ymm7, ymm7",
                "vpxor ymm8, ymm8, ymm8",
                "vpxor ymm9, ymm9, ymm9",
                "vpxor ymm10, ymm10, ymm10",
                "vpxor ymm11, ymm11, ymm11",
                "2:",
                "vpmaddubsw ymm12, ymm13, ymm14",
                "vpmaddwd ymm12, ymm12, ymm15",
                "vpaddd ymm0, ymm0, ymm12",
                "vpmaddubsw ymm12, ymm13, ymm14",
                "vpmaddwd ymm12, ymm12, ymm15",
                "vpaddd ymm1, ymm1, ymm12",
                "vpmaddubsw ymm12, ymm13, ymm14",
                "vpmaddwd ymm12, ymm12, ymm15",
                "vpaddd ymm2, ymm2, ymm12",
                "vpmaddubsw ymm12, ymm13, ymm14",
                "vpmaddwd ymm12, ymm12, ymm15",
                "vpaddd ymm3, ymm3, ymm12",
                "vpmaddubsw ymm12, ymm13, ymm14",
                "vpmaddwd ymm12, ymm12, ymm15",
                "vpaddd ymm4, ymm4, ymm12",
                "vpmaddubsw ymm12, ymm13, ymm14",
                "vpmaddwd ymm12, ymm12, ymm15",
                "vpaddd ymm5, ymm5, ymm12",
                "vpmaddubsw ymm12, ymm13, ymm14",
                "vpmaddwd ymm12, ymm12, ymm15",
                "vpaddd ymm6, ymm6, ymm12",
                "vpmaddubsw ymm12, ymm13, ymm14",
                "vpmaddwd ymm12, ymm12, ymm15",
                "vpaddd ymm7, ymm7, ymm12",
                "vpmaddubsw ymm12, ymm13, ymm14",
                "vpmaddwd ymm12, ymm12, ymm15",
                "vpaddd ymm8, ymm8, ymm12",
                "vpmaddubsw ymm12, ymm13, ymm14",
                "vpmaddwd ymm12, ymm12, ymm15",
                "vpaddd ymm9, ymm9, ymm12",
                "vpmaddubsw ymm12, ymm13, ymm14",
                "vpmaddwd ymm12, ymm12, ymm15",
                "vpaddd ymm10, ymm10, ymm12",
                "vpmaddubsw ymm12, ymm13, ymm14",
                "vpmaddwd ymm12, ymm12, ymm15",
                "vpaddd ymm11, ymm11, ymm12",
                "dec {n}",
                "jnz 2b",
                n = inout(reg) iters.max(1) => _,
                out("ymm0") _, out("ymm1") _, out("ymm2") _, out("ymm3") _,
                out("ymm4") _, out("ymm5") _, out("ymm6") _, out("ymm7") _,
                out("ymm8") _, out("ymm9") _, out("ymm10") _, out("ymm11") _,
                out("ymm12") _, out("ymm13") _, out("ymm14") _, out("ymm15") _,
                options(nostack, nomem),
            );
        }
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn fma512(iters: u64) {
        let a = black_box(_mm512_set1_ps(0.999));
        let b = black_box(_mm512_set1_ps(1e-3));
        let mut acc = [_mm512_setzero_ps(); ACCUMULATORS];
        for _ in 0..iters {
            for r in acc.iter_mut() {
                *r = _mm512_fmadd_ps(*r, a, b);
            }
        }
        black_box(acc);
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn fma256(iters: u64) {
        let a = black_box(_mm256_set1_ps(0.999));
        let b = black_box(_mm256_set1_ps(1e-3));
        let mut acc = [_mm256_setzero_ps(); ACCUMULATORS];
        for _ in 0..iters {
            for r in acc.iter_mut() {
                *r = _mm256_fmadd_ps(*r, a, b);
            }
        }
        black_box(acc);
    }
}

#[cfg(target_arch = "aarch64")]
mod arm {
    use super::{ACCUMULATORS, black_box};
    use std::arch::aarch64::*;
    use std::arch::asm;

    #[target_feature(enable = "neon,dotprod")]
    pub(super) unsafe fn sdot(iters: u64) {
        let a = black_box(vdupq_n_s8(1));
        let b = black_box(vdupq_n_s8(-1));
        let mut acc = [vdupq_n_s32(0); ACCUMULATORS];
        for _ in 0..iters {
            for r in acc.iter_mut() {
                // SAFETY: register-only instruction; dotprod is enabled for this function.
                unsafe {
                    asm!("sdot {0:v}.4s, {1:v}.16b, {2:v}.16b", inout(vreg) *r, in(vreg) a, in(vreg) b,
                         options(pure, nomem, nostack));
                }
            }
        }
        black_box(acc);
    }
}
