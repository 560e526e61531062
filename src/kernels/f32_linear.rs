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
    if m <= SMALL_M {
        small_m(x, m, k, weight, n, bias, out);
        return Ok(());
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

/// Up to this many rows, a product streams its weights once through [`small_m`] instead of
/// `gemm`. The action head multiplies 8 rows by 92 MB of bf16 weights (17920 × 2560, plus two
/// 2560 × 2560 blocks): a weight-streaming, memory-bound product, where widening bf16 blocks
/// for `gemm` and its packing took 88 ms at 1 thread (1 GB/s of weights) on the development
/// machine, and the streaming kernel takes 5.4 ms (AVX-512; 12 ms with AVX2, 29 ms in the
/// portable code). With f32 weights the two meet at about 64 rows (58 ms streaming at 64 rows
/// against 61 ms for `gemm` at 65, 17920 × 2560, 1 thread).
const SMALL_M: usize = 64;
/// Rows × columns of the streaming kernel's register block: 24 accumulators of 16 lanes. At 8
/// rows of 17920 × 2560 bf16, 1 thread: 4 × 6 took 5.6 ms, 4 × 4 5.5, 8 × 2 6.8, 6 × 4 7.4,
/// 2 × 8 6.7; at 32 rows 4 × 6 was the fastest (20 ms, against 24–35).
// On aarch64 only the tests run the portable code (the NEON version always applies).
#[cfg_attr(target_arch = "aarch64", allow(dead_code))]
const SMALL_ROWS: usize = 4;
#[cfg_attr(target_arch = "aarch64", allow(dead_code))]
const SMALL_COLS: usize = 6;
/// The AVX2 version's block: 8 accumulators of two ymm registers each. At 8 rows of
/// 17920 × 2560 bf16, 1 thread: 2 × 2 took 12.2 ms, 4 × 1 12.5, 3 × 1 14.0, 1 × 4 14.3 (the
/// AVX-512 version 5.2, the portable code 29).
#[cfg(target_arch = "x86_64")]
const AVX2_ROWS: usize = 2;
#[cfg(target_arch = "x86_64")]
const AVX2_COLS: usize = 2;
/// The NEON version's block: 8 accumulators of four q registers each, with 8 registers of
/// weights and 4 of inputs (32 in all). Chosen like the AVX2 block (half the AVX-512 block's
/// registers); not timed on ARM hardware.
#[cfg(target_arch = "aarch64")]
const NEON_ROWS: usize = 2;
#[cfg(target_arch = "aarch64")]
const NEON_COLS: usize = 2;
/// Output columns per parallel task of the streaming kernel: fixed, as [`COLUMN_BLOCK`].
const SMALL_COLUMN_BLOCK: usize = 48;
const LANES: usize = 16;

/// Weights the streaming kernel reads 16 at a time, widened to f32.
trait WeightRow: Sync {
    #[cfg_attr(target_arch = "aarch64", allow(dead_code))]
    fn lanes(&self, at: usize) -> [f32; LANES];
    fn get(&self, at: usize) -> f32;
    /// The 16 weights from `at` in a zmm register.
    ///
    /// # Safety
    /// AVX-512 F; `at + 16` within the weights.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load(&self, at: usize) -> std::arch::x86_64::__m512;
    /// The 16 weights from `at` in two ymm registers.
    ///
    /// # Safety
    /// AVX2; `at + 16` within the weights.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load_avx2(&self, at: usize) -> [std::arch::x86_64::__m256; 2];
    /// The 16 weights from `at` in four q registers.
    ///
    /// # Safety
    /// `at + 16` within the weights (NEON is part of every aarch64 CPU).
    #[cfg(target_arch = "aarch64")]
    unsafe fn load_neon(&self, at: usize) -> [std::arch::aarch64::float32x4_t; 4];
    /// Asks for the cache line holding weight `at` (a hint: never faults, even past the end).
    fn prefetch(&self, at: usize);
}

impl WeightRow for &[f32] {
    #[inline(always)]
    fn lanes(&self, at: usize) -> [f32; LANES] {
        let mut v = [0.0; LANES];
        v.copy_from_slice(&self[at..at + LANES]);
        v
    }
    #[inline(always)]
    fn get(&self, at: usize) -> f32 {
        self[at]
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load(&self, at: usize) -> std::arch::x86_64::__m512 {
        debug_assert!(at + LANES <= self.len());
        // SAFETY: the caller's contract.
        unsafe { std::arch::x86_64::_mm512_loadu_ps(self.as_ptr().add(at)) }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load_avx2(&self, at: usize) -> [std::arch::x86_64::__m256; 2] {
        use std::arch::x86_64::_mm256_loadu_ps;
        debug_assert!(at + LANES <= self.len());
        // SAFETY: the caller's contract.
        unsafe {
            let p = self.as_ptr().add(at);
            [_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8))]
        }
    }
    #[cfg(target_arch = "aarch64")]
    #[inline(always)]
    unsafe fn load_neon(&self, at: usize) -> [std::arch::aarch64::float32x4_t; 4] {
        debug_assert!(at + LANES <= self.len());
        // SAFETY: the caller's contract.
        unsafe {
            let p = self.as_ptr().add(at);
            std::array::from_fn(|i| std::arch::aarch64::vld1q_f32(p.add(4 * i)))
        }
    }
    #[inline(always)]
    fn prefetch(&self, at: usize) {
        super::prefetch(self.as_ptr().wrapping_add(at).cast(), super::CacheLevel::L1);
    }
}

impl WeightRow for &[half::bf16] {
    #[inline(always)]
    fn lanes(&self, at: usize) -> [f32; LANES] {
        let mut v = [0.0; LANES];
        for (d, s) in v.iter_mut().zip(&self[at..at + LANES]) {
            // bf16 is the top half of an f32: exact (`bf16::to_f32` computes the same bits).
            *d = f32::from_bits(u32::from(s.to_bits()) << 16);
        }
        v
    }
    #[inline(always)]
    fn get(&self, at: usize) -> f32 {
        f32::from_bits(u32::from(self[at].to_bits()) << 16)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load(&self, at: usize) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        debug_assert!(at + LANES <= self.len());
        // SAFETY: the caller's contract; 16 bf16 are 32 bytes. Zero-extended and shifted into
        // the top half: the exact f32 value, as `lanes`.
        unsafe {
            let raw = _mm256_loadu_si256(self.as_ptr().add(at).cast());
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(raw)))
        }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load_avx2(&self, at: usize) -> [std::arch::x86_64::__m256; 2] {
        use std::arch::x86_64::*;
        debug_assert!(at + LANES <= self.len());
        // SAFETY: the caller's contract; 8 bf16 are 16 bytes. Widened as in `load`.
        unsafe {
            let p = self.as_ptr().add(at);
            let widen = |raw: __m128i| {
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(raw)))
            };
            [
                widen(_mm_loadu_si128(p.cast())),
                widen(_mm_loadu_si128(p.add(8).cast())),
            ]
        }
    }
    #[cfg(target_arch = "aarch64")]
    #[inline(always)]
    unsafe fn load_neon(&self, at: usize) -> [std::arch::aarch64::float32x4_t; 4] {
        use std::arch::aarch64::*;
        debug_assert!(at + LANES <= self.len());
        // SAFETY: the caller's contract; 16 bf16 are two loads of 8. Each half widened and
        // shifted into the top half of its f32 (`shll`): the exact value, as `lanes`.
        unsafe {
            let p = self.as_ptr().add(at).cast::<u16>();
            let (lo, hi) = (vld1q_u16(p), vld1q_u16(p.add(8)));
            [
                vreinterpretq_f32_u32(vshll_n_u16::<16>(vget_low_u16(lo))),
                vreinterpretq_f32_u32(vshll_high_n_u16::<16>(lo)),
                vreinterpretq_f32_u32(vshll_n_u16::<16>(vget_low_u16(hi))),
                vreinterpretq_f32_u32(vshll_high_n_u16::<16>(hi)),
            ]
        }
    }
    #[inline(always)]
    fn prefetch(&self, at: usize) {
        super::prefetch(self.as_ptr().wrapping_add(at).cast(), super::CacheLevel::L1);
    }
}

/// `out = x · Wᵀ (+ b)` for at most [`SMALL_M`] rows: each task streams the weight rows of its
/// [`SMALL_COLUMN_BLOCK`] output columns once, in blocks of [`SMALL_COLS`] against
/// [`SMALL_ROWS`] input rows (the input, at most 64 rows, is read again from cache for every
/// block of columns). Every output is a sum of 16 lane sums over k (lane `l` takes k ≡ l mod
/// 16, in order; then the lanes in order), plus the bias: the same for any thread count, and
/// for f32 or bf16 weights of equal value.
fn small_m(
    x: &[f32],
    m: usize,
    k: usize,
    weight: WeightRef<'_>,
    n: usize,
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    let dst = SendPtr(out.as_mut_ptr());
    let blocks = n.div_ceil(SMALL_COLUMN_BLOCK);
    let block = |i: usize| {
        let cols = i * SMALL_COLUMN_BLOCK..((i + 1) * SMALL_COLUMN_BLOCK).min(n);
        let mut sums = [0.0f32; SMALL_M * SMALL_COLUMN_BLOCK];
        let sums = &mut sums[..m * cols.len()];
        match weight {
            WeightRef::F32(w) => small_m_block(x, m, k, w, cols.clone(), sums),
            WeightRef::Bf16(w) => small_m_block(x, m, k, w, cols.clone(), sums),
        }
        let dst = &dst;
        for (r, row) in sums.chunks_exact(cols.len()).enumerate() {
            for (j, &v) in row.iter().enumerate() {
                let c = cols.start + j;
                let y = match bias {
                    Some(b) => v + b[c],
                    None => v,
                };
                // SAFETY: r < m, c < n; the columns `cols` of the m × n output belong to this
                // task only.
                unsafe { *dst.0.add(r * n + c) = y };
            }
        }
    };
    if blocks == 1 || rayon::current_num_threads() == 1 {
        (0..blocks).for_each(block);
    } else {
        (0..blocks).into_par_iter().for_each(block);
    }
}

/// The sums of [`small_m`] for the output columns `cols`: AVX-512 or else AVX2 where the CPU
/// has them, NEON on aarch64, else the portable code (the same bits every way).
fn small_m_block<W: WeightRow>(
    x: &[f32],
    m: usize,
    k: usize,
    w: W,
    cols: std::ops::Range<usize>,
    sums: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU supports AVX-512 F.
        return unsafe { small_m_avx512(x, m, k, w, cols, sums) };
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2.
        return unsafe { small_m_avx2(x, m, k, w, cols, sums) };
    }
    #[cfg(target_arch = "aarch64")]
    // SAFETY: NEON is part of every aarch64 CPU.
    return unsafe { small_m_neon(x, m, k, w, cols, sums) };
    #[cfg(not(target_arch = "aarch64"))]
    small_m_generic(x, m, k, w, cols, sums)
}

/// How many weights ahead of its loads the SIMD streaming kernels prefetch each weight row:
/// at 8 rows of 17920 × 2560 bf16, 2 threads, AVX-512, the weights stream at 17 GB/s without,
/// 21 / 25 / 26.5 / 26 GB/s with 256 / 512 / 1024 / 2048. The NEON version uses the same
/// distance (not measured on ARM hardware).
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
const WEIGHT_PREFETCH: usize = 1024;

/// The walk over blocks shared by every version of the streaming kernel: the output columns
/// `cols` in blocks of `C` against the `m` input rows in blocks of `R`. Blocks at the edges
/// repeat their last row or column and drop the copies, so that every block runs the same fully
/// unrolled code. `lanes` computes a block's 16 lane sums over the whole 16s of k (lane `l`
/// takes k ≡ l mod 16, in order); the tail of k then goes into the first lanes, in order, and
/// each real output is its lanes summed in order, into `sums` (`m × cols.len()`, row-major).
#[inline(always)]
fn for_each_block<W: WeightRow, const R: usize, const C: usize>(
    x: &[f32],
    m: usize,
    k: usize,
    w: &W,
    cols: std::ops::Range<usize>,
    sums: &mut [f32],
    mut lanes: impl FnMut(&[&[f32]; R], &[usize; C], usize) -> [[[f32; LANES]; C]; R],
) {
    let width = cols.len();
    let whole = k / LANES * LANES;
    for c0 in (0..width).step_by(C) {
        let w_at: [usize; C] = std::array::from_fn(|j| (cols.start + (c0 + j).min(width - 1)) * k);
        for r0 in (0..m).step_by(R) {
            let rows: [&[f32]; R] = std::array::from_fn(|i| &x[(r0 + i).min(m - 1) * k..][..k]);
            let mut acc = lanes(&rows, &w_at, whole);
            for kk in whole..k {
                let l = kk - whole;
                for (acc_row, row) in acc.iter_mut().zip(&rows) {
                    for (a, &at) in acc_row.iter_mut().zip(&w_at) {
                        a[l] += row[kk] * w.get(at + kk);
                    }
                }
            }
            for (i, acc_row) in acc.iter().enumerate().take(m - r0) {
                for (j, a) in acc_row.iter().enumerate().take(width - c0) {
                    sums[(r0 + i) * width + c0 + j] = a.iter().fold(0.0, |s, &v| s + v);
                }
            }
        }
    }
}

/// The sums of [`small_m`] for the output columns `cols`, in portable code. Plain multiplies and
/// adds, no fused multiply-add: every build computes the same bits.
#[inline(always)]
#[cfg_attr(target_arch = "aarch64", allow(dead_code))]
fn small_m_generic<W: WeightRow>(
    x: &[f32],
    m: usize,
    k: usize,
    w: W,
    cols: std::ops::Range<usize>,
    sums: &mut [f32],
) {
    for_each_block::<W, SMALL_ROWS, SMALL_COLS>(x, m, k, &w, cols, sums, |rows, w_at, whole| {
        let mut acc = [[[0.0f32; LANES]; SMALL_COLS]; SMALL_ROWS];
        for kk in (0..whole).step_by(LANES) {
            let wv: [[f32; LANES]; SMALL_COLS] = std::array::from_fn(|j| w.lanes(w_at[j] + kk));
            for (acc_row, row) in acc.iter_mut().zip(rows) {
                let mut xv = [0.0; LANES];
                xv.copy_from_slice(&row[kk..kk + LANES]);
                for (a, wj) in acc_row.iter_mut().zip(&wv) {
                    for ((a, &x), &w) in a.iter_mut().zip(&xv).zip(wj) {
                        *a += x * w;
                    }
                }
            }
        }
        acc
    })
}

/// [`small_m_generic`] with the 16 lanes in one zmm register: the same multiplies and adds in
/// the same order (no fused multiply-add), so the same bits.
///
/// # Safety
/// The CPU supports AVX-512 F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn small_m_avx512<W: WeightRow>(
    x: &[f32],
    m: usize,
    k: usize,
    w: W,
    cols: std::ops::Range<usize>,
    sums: &mut [f32],
) {
    use std::arch::x86_64::*;
    for_each_block::<W, SMALL_ROWS, SMALL_COLS>(x, m, k, &w, cols, sums, |rows, w_at, whole| {
        let mut acc = [[_mm512_setzero_ps(); SMALL_COLS]; SMALL_ROWS];
        for kk in (0..whole).step_by(LANES) {
            // SAFETY: kk + 16 <= k within each weight row and input row; AVX-512 F.
            unsafe {
                for &at in w_at {
                    w.prefetch(at + kk + WEIGHT_PREFETCH);
                }
                let wv: [__m512; SMALL_COLS] = std::array::from_fn(|j| w.load(w_at[j] + kk));
                for (acc_row, row) in acc.iter_mut().zip(rows) {
                    let xv = _mm512_loadu_ps(row.as_ptr().add(kk));
                    for (a, &wj) in acc_row.iter_mut().zip(&wv) {
                        *a = _mm512_add_ps(*a, _mm512_mul_ps(xv, wj));
                    }
                }
            }
        }
        let mut lanes = [[[0.0f32; LANES]; SMALL_COLS]; SMALL_ROWS];
        for (dst, src) in lanes.iter_mut().zip(&acc) {
            for (d, &v) in dst.iter_mut().zip(src) {
                // SAFETY: 16 f32 into a 16-element array; AVX-512 F.
                unsafe { _mm512_storeu_ps(d.as_mut_ptr(), v) };
            }
        }
        lanes
    })
}

/// [`small_m_generic`] with the 16 lanes in two ymm registers, on blocks of
/// [`AVX2_ROWS`] × [`AVX2_COLS`] (16 registers in all): the same multiplies and adds in the
/// same order, so the same bits.
///
/// # Safety
/// The CPU supports AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn small_m_avx2<W: WeightRow>(
    x: &[f32],
    m: usize,
    k: usize,
    w: W,
    cols: std::ops::Range<usize>,
    sums: &mut [f32],
) {
    use std::arch::x86_64::*;
    for_each_block::<W, AVX2_ROWS, AVX2_COLS>(x, m, k, &w, cols, sums, |rows, w_at, whole| {
        let mut acc = [[[_mm256_setzero_ps(); 2]; AVX2_COLS]; AVX2_ROWS];
        for kk in (0..whole).step_by(LANES) {
            // SAFETY: kk + 16 <= k within each weight row and input row; AVX2.
            unsafe {
                for &at in w_at {
                    w.prefetch(at + kk + WEIGHT_PREFETCH);
                }
                let wv: [[__m256; 2]; AVX2_COLS] =
                    std::array::from_fn(|j| w.load_avx2(w_at[j] + kk));
                for (acc_row, row) in acc.iter_mut().zip(rows) {
                    let p = row.as_ptr().add(kk);
                    let xv = [_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8))];
                    for (a, wj) in acc_row.iter_mut().zip(&wv) {
                        for h in 0..2 {
                            a[h] = _mm256_add_ps(a[h], _mm256_mul_ps(xv[h], wj[h]));
                        }
                    }
                }
            }
        }
        let mut lanes = [[[0.0f32; LANES]; AVX2_COLS]; AVX2_ROWS];
        for (dst, src) in lanes.iter_mut().zip(&acc) {
            for (d, v) in dst.iter_mut().zip(src) {
                // SAFETY: 2 × 8 f32 into a 16-element array; AVX2.
                unsafe {
                    _mm256_storeu_ps(d.as_mut_ptr(), v[0]);
                    _mm256_storeu_ps(d.as_mut_ptr().add(8), v[1]);
                }
            }
        }
        lanes
    })
}

/// [`small_m_generic`] with the 16 lanes in four q registers, on blocks of [`NEON_ROWS`] ×
/// [`NEON_COLS`] (16 accumulator registers of 32): the same multiplies and adds in the same
/// order (`fmul` then `fadd`, never `fmla`), so the same bits.
///
/// # Safety
/// None beyond the arguments' (NEON is part of every aarch64 CPU); `unsafe` for symmetry with
/// the x86 versions.
#[cfg(target_arch = "aarch64")]
unsafe fn small_m_neon<W: WeightRow>(
    x: &[f32],
    m: usize,
    k: usize,
    w: W,
    cols: std::ops::Range<usize>,
    sums: &mut [f32],
) {
    use std::arch::aarch64::*;
    for_each_block::<W, NEON_ROWS, NEON_COLS>(x, m, k, &w, cols, sums, |rows, w_at, whole| {
        // SAFETY: NEON; zeroed registers.
        let mut acc = [[[unsafe { vdupq_n_f32(0.0) }; 4]; NEON_COLS]; NEON_ROWS];
        for kk in (0..whole).step_by(LANES) {
            // SAFETY: kk + 16 <= k within each weight row and input row; NEON.
            unsafe {
                for &at in w_at {
                    w.prefetch(at + kk + WEIGHT_PREFETCH);
                }
                let wv: [[float32x4_t; 4]; NEON_COLS] =
                    std::array::from_fn(|j| w.load_neon(w_at[j] + kk));
                for (acc_row, row) in acc.iter_mut().zip(rows) {
                    let p = row.as_ptr().add(kk);
                    let xv: [float32x4_t; 4] = std::array::from_fn(|q| vld1q_f32(p.add(4 * q)));
                    for (a, wj) in acc_row.iter_mut().zip(&wv) {
                        for q in 0..4 {
                            a[q] = vaddq_f32(a[q], vmulq_f32(xv[q], wj[q]));
                        }
                    }
                }
            }
        }
        let mut lanes = [[[0.0f32; LANES]; NEON_COLS]; NEON_ROWS];
        for (dst, src) in lanes.iter_mut().zip(&acc) {
            for (d, v) in dst.iter_mut().zip(src) {
                for (q, &part) in v.iter().enumerate() {
                    // SAFETY: 4 f32 into the 16-element array at 4·q; NEON.
                    unsafe { vst1q_f32(d.as_mut_ptr().add(4 * q), part) };
                }
            }
        }
        lanes
    })
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
        // Up to SMALL_M rows the streaming kernel (K tails, column blocks with edges, rows
        // past a register block), above it `gemm`.
        for &(m, k, n) in &[
            (1, 1, 1),
            (8, 17920, 7),
            (5, 33, 300),
            (37, 64, 513),
            (SMALL_M + 3, 70, 300),
        ] {
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
        for m in [9, SMALL_M + 1] {
            bf16_matches_f32(m);
        }
    }

    fn bf16_matches_f32(m: usize) {
        let (k, n) = (2 * K_CHUNK + 52, 300);
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

    /// The SIMD streaming kernels this CPU has compute the portable code's bits, for f32 and
    /// bf16 weights, on blocks with row, column and K tails.
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    #[test]
    fn the_simd_streaming_kernels_equal_the_portable_one_bit_for_bit() {
        #[cfg(target_arch = "x86_64")]
        let kernels: Vec<&str> = [
            ("avx512", std::arch::is_x86_feature_detected!("avx512f")),
            ("avx2", std::arch::is_x86_feature_detected!("avx2")),
        ]
        .into_iter()
        .filter_map(|(name, present)| present.then_some(name))
        .collect();
        // NEON is part of every aarch64 CPU.
        #[cfg(target_arch = "aarch64")]
        let kernels = vec!["neon"];
        eprintln!("streaming kernels under test: {kernels:?}");
        for &(m, k, n) in &[(1, 16, 6), (7, 1000, 47), (SMALL_M, 35, 13)] {
            let x = data(m * k, 7);
            let w32: Vec<f32> = data(n * k, 8)
                .iter()
                .map(|&v| half::bf16::from_f32(v).to_f32())
                .collect();
            let w16: Vec<half::bf16> = w32.iter().map(|&v| half::bf16::from_f32(v)).collect();
            for cols in [0..n, 1..n.min(5)] {
                let len = m * cols.len();
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                let (mut a, mut b) = (vec![0.0; len], vec![0.0; len]);
                small_m_generic(&x, m, k, w32.as_slice(), cols.clone(), &mut a);
                small_m_generic(&x, m, k, w16.as_slice(), cols.clone(), &mut b);
                assert_eq!(bits(&a), bits(&b), "generic f32 vs bf16, {m}x{k}x{n}");
                assert!(a.iter().any(|&v| v != 0.0));
                for &name in &kernels {
                    let (mut c, mut d) = (vec![0.0; len], vec![0.0; len]);
                    let (w32, w16, cols) = (w32.as_slice(), w16.as_slice(), cols.clone());
                    // SAFETY: the CPU has the kernel's features (detected above).
                    unsafe {
                        #[cfg(target_arch = "x86_64")]
                        if name == "avx512" {
                            small_m_avx512(&x, m, k, w32, cols.clone(), &mut c);
                            small_m_avx512(&x, m, k, w16, cols, &mut d);
                        } else {
                            small_m_avx2(&x, m, k, w32, cols.clone(), &mut c);
                            small_m_avx2(&x, m, k, w16, cols, &mut d);
                        }
                        #[cfg(target_arch = "aarch64")]
                        {
                            small_m_neon(&x, m, k, w32, cols.clone(), &mut c);
                            small_m_neon(&x, m, k, w16, cols, &mut d);
                        }
                    }
                    assert_eq!(bits(&a), bits(&c), "generic vs {name} f32, {m}x{k}x{n}");
                    assert_eq!(bits(&a), bits(&d), "generic vs {name} bf16, {m}x{k}x{n}");
                }
            }
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
