//! Multi-head attention with grouped KV heads and a full (bidirectional) mask, in f32:
//! `softmax(Q_h K_gᵀ / √d) V_g` per query head h with KV head g = h / (heads / kv_heads).
//!
//! Two implementations ([`AttentionImpl`]): on x86-64 with AVX-512, K and V packed once per KV
//! head and 12 × 32 FMA register tiles per block of queries; elsewhere, per head, the `gemm`
//! crate. Heads run in parallel on the current rayon pool and every output row is computed by one
//! task in a fixed order, so results are identical for any thread count.

use super::f32_linear::{SendPtr, View, matmul_strided};
use super::ops::softmax_rows;
use super::{KernelError, Result};
use rayon::prelude::*;

/// Shape of one attention call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionShape {
    /// Tokens (queries = keys).
    pub tokens: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl AttentionShape {
    fn validate(&self) -> Result<()> {
        let s = self;
        if s.tokens == 0
            || s.heads == 0
            || s.kv_heads == 0
            || s.head_dim == 0
            || !s.heads.is_multiple_of(s.kv_heads)
        {
            return Err(KernelError::Invalid(format!(
                "attention: invalid shape {s:?} (all non-zero, heads a multiple of kv_heads)"
            )));
        }
        Ok(())
    }
}

/// `q`: tokens × (heads·d), `k`, `v`: tokens × (kv_heads·d), `out`: tokens × (heads·d), all
/// row-major (the layout of the projections), with the best implementation for this CPU.
/// `scratch` is a buffer the caller keeps across calls (packed K and V, or the score matrix of
/// the single-threaded `gemm` path).
pub fn attention(
    shape: AttentionShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    scratch: &mut Vec<f32>,
) -> Result<()> {
    attention_with(AttentionImpl::best(), shape, false, q, k, v, out, scratch)
}

/// How the two products of attention are computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionImpl {
    /// Per head, the `gemm` crate for Q·Kᵀ and P·V with the softmax in between (portable).
    Gemm,
    /// x86-64 AVX-512: K and V packed once per KV head, then per block of 12 queries a 12 × 32
    /// FMA register tile for the scores, the softmax while the block's scores sit in L1, and
    /// the same tile for P·V.
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl AttentionImpl {
    pub fn best() -> Self {
        #[cfg(target_arch = "x86_64")]
        if avx512::supported() {
            return AttentionImpl::Avx512;
        }
        AttentionImpl::Gemm
    }

    /// Every implementation this CPU runs, the portable one first.
    pub fn supported() -> Vec<Self> {
        #[allow(unused_mut)]
        let mut all = vec![AttentionImpl::Gemm];
        #[cfg(target_arch = "x86_64")]
        if avx512::supported() {
            all.push(AttentionImpl::Avx512);
        }
        all
    }
}

/// [`attention`] with an explicit implementation and an optional causal mask (query i sees
/// keys 0..=i). BitVLA itself is bidirectional; the causal form exists to show that tests can
/// tell the two apart.
#[allow(clippy::too_many_arguments)]
pub fn attention_with(
    imp: AttentionImpl,
    shape: AttentionShape,
    causal: bool,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    scratch: &mut Vec<f32>,
) -> Result<()> {
    shape.validate()?;
    let AttentionShape {
        tokens: l,
        heads,
        kv_heads,
        head_dim: d,
    } = shape;
    let (q_width, kv_width) = (heads * d, kv_heads * d);
    for (what, len, expected) in [
        ("attention q", q.len(), l * q_width),
        ("attention k", k.len(), l * kv_width),
        ("attention v", v.len(), l * kv_width),
        ("attention out", out.len(), l * q_width),
    ] {
        if len != expected {
            return Err(KernelError::LengthMismatch {
                what,
                expected,
                got: len,
            });
        }
    }
    let scale = 1.0 / (d as f32).sqrt();
    match imp {
        AttentionImpl::Gemm => attention_gemm(shape, causal, scale, q, k, v, out, scratch),
        #[cfg(target_arch = "x86_64")]
        AttentionImpl::Avx512 => {
            avx512::attention(shape, causal, scale, q, k, v, out, scratch);
            Ok(())
        }
    }
}

/// The portable path: per head, Q·Kᵀ and P·V in the `gemm` crate with the softmax in between.
/// Shapes and lengths are checked by [`attention_with`].
#[allow(clippy::too_many_arguments)]
fn attention_gemm(
    shape: AttentionShape,
    causal: bool,
    scale: f32,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    scratch: &mut Vec<f32>,
) -> Result<()> {
    let AttentionShape {
        tokens: l,
        heads,
        kv_heads,
        head_dim: d,
    } = shape;
    let (q_width, kv_width) = (heads * d, kv_heads * d);
    let group = heads / kv_heads;
    let dst = SendPtr(out.as_mut_ptr());
    // One l × l score buffer per worker, not per head: the LLM's 20 heads × 625² scores would
    // be 31 MB at once.
    let head = |scores: &mut Vec<f32>, h: usize| -> Result<()> {
        // Sized once per worker, never zeroed: the Q·Kᵀ product overwrites every element (gemm
        // with read_dst = false), and zeroing 1.5 MB per head cost 1% of a forward.
        if scores.len() < l * l {
            scores.resize(l * l, 0.0);
        }
        let scores = &mut scores[..l * l];
        let g = h / group;
        let dst = &dst;
        // SAFETY: Q_h is the l × d block at column h·d (row stride heads·d); K_gᵀ is d × l read
        // from the l × d block at column g·d of k; scores is this head's own l × l buffer.
        unsafe {
            matmul_strided(
                l,
                l,
                d,
                scores.as_mut_ptr(),
                l,
                View {
                    ptr: q.as_ptr().add(h * d),
                    row_stride: q_width as isize,
                    col_stride: 1,
                },
                View {
                    ptr: k.as_ptr().add(g * d),
                    row_stride: 1,
                    col_stride: kv_width as isize,
                },
                scale,
                false,
            );
        }
        if causal {
            for (i, row) in scores.chunks_exact_mut(l).enumerate() {
                row[i + 1..].fill(f32::NEG_INFINITY);
            }
        }
        softmax_rows(scores, l)?;
        // SAFETY: V_g is the l × d block at column g·d of v; the destination is the l × d block
        // at column h·d of out, written by this head only.
        unsafe {
            matmul_strided(
                l,
                d,
                l,
                dst.0.add(h * d),
                q_width,
                View {
                    ptr: scores.as_ptr(),
                    row_stride: l as isize,
                    col_stride: 1,
                },
                View {
                    ptr: v.as_ptr().add(g * d),
                    row_stride: kv_width as isize,
                    col_stride: 1,
                },
                1.0,
                false,
            );
        }
        Ok(())
    };
    if rayon::current_num_threads() == 1 {
        (0..heads).try_for_each(|h| head(scratch, h))
    } else {
        // One buffer per worker thread that lives across calls: `try_for_each_init` would
        // allocate (and fault in) a fresh 1.5 MB buffer for every split of the head range.
        thread_local! {
            static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        (0..heads)
            .into_par_iter()
            .try_for_each(|h| SCORES.with_borrow_mut(|scores| head(scores, h)))
    }
}

/// The AVX-512 path. Per call, K and V of every KV head are packed into 32-column panels (keys
/// for Kᵀ, head dimensions for V, zero-padded). Heads run in parallel; per head, blocks of
/// [`avx512::ROWS`] queries: scores `scale · Q_blk · Kᵀ` into an L1-resident buffer, the softmax
/// rows there, then `P_blk · V` into the output. Every output row is computed by one task in a
/// fixed order, so results do not depend on the thread count.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::AttentionShape;
    use crate::kernels::f32_linear::SendPtr;
    use crate::kernels::ops::{EXP_LN2_HI, EXP_LN2_LO, EXP_MIN, EXP_POLY};
    use rayon::prelude::*;
    use std::arch::x86_64::*;
    use std::cell::RefCell;

    /// Query rows per register tile (12 × 32: 24 accumulators, 2 operand and 1 broadcast
    /// register).
    pub(super) const ROWS: usize = 12;
    const COLS: usize = 32;
    const PF: usize = 1024;

    pub(super) fn supported() -> bool {
        is_x86_feature_detected!("avx512f")
    }

    thread_local! {
        /// A block's scores, `ROWS × keys` (padded to whole panels), per worker and across calls.
        static BLOCK: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn attention(
        shape: AttentionShape,
        causal: bool,
        scale: f32,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        out: &mut [f32],
        packed: &mut Vec<f32>,
    ) {
        let AttentionShape {
            tokens: l,
            heads,
            kv_heads,
            head_dim: d,
        } = shape;
        let (q_width, kv_width) = (heads * d, kv_heads * d);
        let key_panels = l.div_ceil(COLS);
        let l_pad = key_panels * COLS;
        let d_panels = d.div_ceil(COLS);
        // Per KV head: Kᵀ as key panels [panel][dim][32 keys], then V as dim panels
        // [panel][key][32 dims]; zeros in the padding.
        let kt_len = l_pad * d;
        let v_len = d_panels * COLS * l;
        let per_group = kt_len + v_len;
        if packed.len() < kv_heads * per_group {
            packed.resize(kv_heads * per_group, 0.0);
        }
        let packed = &mut packed[..kv_heads * per_group];
        let pack = |(g, dst): (usize, &mut [f32])| {
            let (kt, vp) = dst.split_at_mut(kt_len);
            // Kᵀ key by key: contiguous reads, and the writes stay in the panel (L1).
            for (p, panel) in kt.chunks_exact_mut(d * COLS).enumerate() {
                for j in 0..COLS {
                    let key = p * COLS + j;
                    if key < l {
                        let row = &k[key * kv_width + g * d..][..d];
                        for (t, &x) in row.iter().enumerate() {
                            panel[t * COLS + j] = x;
                        }
                    } else {
                        for t in 0..d {
                            panel[t * COLS + j] = 0.0;
                        }
                    }
                }
            }
            // V: each key's row of a panel is a contiguous piece of its row of v.
            for (c, panel) in vp.chunks_exact_mut(l * COLS).enumerate() {
                let width = (d - c * COLS).min(COLS);
                for (key, lanes) in panel.chunks_exact_mut(COLS).enumerate() {
                    let at = key * kv_width + g * d + c * COLS;
                    lanes[..width].copy_from_slice(&v[at..at + width]);
                    lanes[width..].fill(0.0);
                }
            }
        };
        let group = heads / kv_heads;
        let dst = SendPtr(out.as_mut_ptr());
        let packed = &*{
            if rayon::current_num_threads() == 1 {
                packed
                    .chunks_exact_mut(per_group)
                    .enumerate()
                    .for_each(pack);
            } else {
                packed
                    .par_chunks_exact_mut(per_group)
                    .enumerate()
                    .for_each(pack);
            }
            packed
        };
        let head = |h: usize| {
            // The whole SendPtr (Sync), not its raw pointer field.
            let dst = &dst;
            let g = h / group;
            let (kt, vp) = packed[g * per_group..(g + 1) * per_group].split_at(kt_len);
            BLOCK.with_borrow_mut(|block| {
                if block.len() < ROWS * l_pad {
                    block.resize(ROWS * l_pad, 0.0);
                }
                for i0 in (0..l).step_by(ROWS) {
                    let rows = ROWS.min(l - i0);
                    // Rows past the end repeat the last row: always valid memory, never stored.
                    let q_rows: [*const f32; ROWS] = std::array::from_fn(|r| {
                        q[(i0 + r.min(rows - 1)) * q_width + h * d..].as_ptr()
                    });
                    // SAFETY: the CPU supports AVX-512 F (`supported`); each q row has d values;
                    // kt holds key_panels · d · 32 values; block holds ROWS · l_pad.
                    unsafe { scores(&q_rows, d, kt, key_panels, scale, block.as_mut_ptr(), l_pad) };
                    for r in 0..rows {
                        let row = &mut block[r * l_pad..r * l_pad + l];
                        if causal {
                            row[i0 + r + 1..].fill(f32::NEG_INFINITY);
                        }
                        // SAFETY: AVX-512 F (`supported`).
                        unsafe { softmax_row(row) };
                    }
                    let p_rows: [*const f32; ROWS] =
                        std::array::from_fn(|r| block[r.min(rows - 1) * l_pad..].as_ptr());
                    // SAFETY: the output rows i0..i0+rows, columns h·d..h·d+d are this task's;
                    // p rows hold l values; vp holds d_panels · l · 32 values.
                    unsafe {
                        let out_rows: [*mut f32; ROWS] = std::array::from_fn(|r| {
                            dst.0.add((i0 + r.min(rows - 1)) * q_width + h * d)
                        });
                        values(&p_rows, l, vp, d, &out_rows, rows);
                    }
                }
            });
        };
        if rayon::current_num_threads() == 1 {
            (0..heads).for_each(head);
        } else {
            (0..heads).into_par_iter().for_each(head);
        }
    }

    /// Mask of the first `n` (≤ 16) lanes.
    fn lanes(n: usize) -> __mmask16 {
        ((1u32 << n) - 1) as __mmask16
    }

    /// e^x for x ≤ 0 (a score minus its row's maximum): the reduction and polynomial of
    /// `ops::exp` with fused multiply-adds, scaled by 2^n with `vscalefps`; exactly 0 below
    /// `EXP_MIN` (so -∞, a masked score, gives 0), NaN stays NaN.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn exp_nonpositive(x: __m512) -> __m512 {
        let low = _mm512_set1_ps(EXP_MIN);
        let underflow = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, low);
        // max(low, x) returns x when x is NaN (the second operand), so NaN propagates.
        let xc = _mm512_max_ps(low, x);
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(xc, _mm512_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(EXP_LN2_HI), xc);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(EXP_LN2_LO), r);
        let mut p = _mm512_set1_ps(EXP_POLY[0]);
        for &c in &EXP_POLY[1..] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        let y = _mm512_add_ps(
            _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r),
            _mm512_set1_ps(1.0),
        );
        _mm512_maskz_mov_ps(!underflow, _mm512_scalef_ps(y, n))
    }

    /// Softmax of one row in place: max, then e^(x − max) and its sum in one pass, then the
    /// scaling. A NaN anywhere makes the whole row NaN (as in `ops::softmax_rows`), so a broken
    /// activation is reported downstream instead of hidden.
    ///
    /// # Safety
    /// AVX-512 F.
    #[target_feature(enable = "avx512f")]
    unsafe fn softmax_row(row: &mut [f32]) {
        let (full, tail) = (row.len() / 16, row.len() % 16);
        let ptr = row.as_mut_ptr();
        let neg_inf = _mm512_set1_ps(f32::NEG_INFINITY);
        let mut max = neg_inf;
        // SAFETY (all loads and stores): chunks i < full are 16 values of the row; the tail is
        // masked to its `tail` values.
        for i in 0..full {
            max = _mm512_max_ps(max, unsafe { _mm512_loadu_ps(ptr.add(16 * i)) });
        }
        if tail > 0 {
            let v = unsafe { _mm512_mask_loadu_ps(neg_inf, lanes(tail), ptr.add(16 * full)) };
            max = _mm512_max_ps(max, v);
        }
        let max = _mm512_set1_ps(_mm512_reduce_max_ps(max));
        let mut sum = _mm512_setzero_ps();
        for i in 0..full {
            let at = unsafe { ptr.add(16 * i) };
            let e = exp_nonpositive(_mm512_sub_ps(unsafe { _mm512_loadu_ps(at) }, max));
            sum = _mm512_add_ps(sum, e);
            unsafe { _mm512_storeu_ps(at, e) };
        }
        if tail > 0 {
            let (m, at) = (lanes(tail), unsafe { ptr.add(16 * full) });
            let x = unsafe { _mm512_maskz_loadu_ps(m, at) };
            let e = _mm512_maskz_mov_ps(m, exp_nonpositive(_mm512_sub_ps(x, max)));
            sum = _mm512_add_ps(sum, e);
            unsafe { _mm512_mask_storeu_ps(at, m, e) };
        }
        let inv = _mm512_set1_ps(1.0 / _mm512_reduce_add_ps(sum));
        for i in 0..full {
            let at = unsafe { ptr.add(16 * i) };
            unsafe { _mm512_storeu_ps(at, _mm512_mul_ps(_mm512_loadu_ps(at), inv)) };
        }
        if tail > 0 {
            let (m, at) = (lanes(tail), unsafe { ptr.add(16 * full) });
            unsafe {
                _mm512_mask_storeu_ps(at, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, at), inv))
            };
        }
    }

    /// `block[r][key] = scale · Σ_t q_rows[r][t] · Kᵀ[t][key]` for every key panel.
    ///
    /// # Safety
    /// AVX-512 F; `q_rows` point at d readable values each; `kt` holds `panels · d · 32`
    /// values; `block` holds `ROWS · ld` writable values, `ld ≥ panels · 32`.
    #[target_feature(enable = "avx512f")]
    unsafe fn scores(
        q_rows: &[*const f32; ROWS],
        d: usize,
        kt: &[f32],
        panels: usize,
        scale: f32,
        block: *mut f32,
        ld: usize,
    ) {
        for p in 0..panels {
            let out_at: [*mut f32; ROWS] =
                std::array::from_fn(|r| block.wrapping_add(r * ld + p * COLS));
            // SAFETY: forwarded; panel p holds d rows of 32 values; every row of the block
            // has the panel's 32 columns.
            unsafe {
                tile::<2>(
                    q_rows,
                    d,
                    kt[p * d * COLS..].as_ptr(),
                    &out_at,
                    ROWS,
                    COLS,
                    scale,
                )
            };
        }
    }

    /// `out_rows[r][t] = Σ_key p_rows[r][key] · V[key][t]` for r < rows, t < d.
    ///
    /// # Safety
    /// AVX-512 F; `p_rows` point at `keys` readable values each; `vp` holds
    /// `⌈d/32⌉ · keys · 32` values; `out_rows[r]` for r < rows point at d writable values.
    #[target_feature(enable = "avx512f")]
    unsafe fn values(
        p_rows: &[*const f32; ROWS],
        keys: usize,
        vp: &[f32],
        d: usize,
        out_rows: &[*mut f32; ROWS],
        rows: usize,
    ) {
        for c in 0..d.div_ceil(COLS) {
            let width = (d - c * COLS).min(COLS);
            let panel = vp[c * keys * COLS..].as_ptr();
            let out_at: [*mut f32; ROWS] =
                std::array::from_fn(|r| out_rows[r].wrapping_add(c * COLS));
            // SAFETY: forwarded; a last panel of at most 16 dimensions needs one vector per
            // row. Scaling by 1 is exact.
            unsafe {
                if width > 16 {
                    tile::<2>(p_rows, keys, panel, &out_at, rows, width, 1.0);
                } else {
                    tile::<1>(p_rows, keys, panel, &out_at, rows, width, 1.0);
                }
            }
        }
    }

    /// The register tile of both products: `out_at[r][j] = scale · Σ_i a_rows[r][i] ·
    /// panel[i][j]` for r < rows and j < width, over `len` rows of a 32-wide panel, of which
    /// the first `H` × 16 columns are computed (12 × 16·H accumulators).
    ///
    /// # Safety
    /// AVX-512 F; `a_rows` point at `len` readable values each; `panel` at `len · 32`;
    /// `out_at[r]` for r < rows at `width` (≤ 16·H) writable values.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn tile<const H: usize>(
        a_rows: &[*const f32; ROWS],
        len: usize,
        panel: *const f32,
        out_at: &[*mut f32; ROWS],
        rows: usize,
        width: usize,
        scale: f32,
    ) {
        let mut acc = [[_mm512_setzero_ps(); H]; ROWS];
        let mut b = panel;
        for i in 0..len {
            // SAFETY: the panel's row i of 32 values; a row r's value i.
            unsafe {
                for h in 0..H {
                    _mm_prefetch::<_MM_HINT_T0>((b as *const i8).wrapping_add(PF + 64 * h));
                }
                let bv: [__m512; H] = std::array::from_fn(|h| _mm512_loadu_ps(b.add(16 * h)));
                for r in 0..ROWS {
                    let a = _mm512_set1_ps(*a_rows[r].add(i));
                    for h in 0..H {
                        acc[r][h] = _mm512_fmadd_ps(a, bv[h], acc[r][h]);
                    }
                }
                b = b.add(COLS);
            }
        }
        let s = _mm512_set1_ps(scale);
        for (r, acc) in acc.iter().enumerate().take(rows) {
            for (h, &v) in acc.iter().enumerate() {
                let lanes = width.saturating_sub(16 * h).min(16);
                // SAFETY: the row's columns 16h .. 16h + lanes (masked).
                unsafe {
                    _mm512_mask_storeu_ps(
                        out_at[r].add(16 * h),
                        super::avx512::lanes(lanes),
                        _mm512_mul_ps(v, s),
                    )
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize, seed: u64) -> Vec<f32> {
        crate::kernels::pseudo_random(len, seed, 2.0)
    }

    fn reference(shape: AttentionShape, q: &[f32], k: &[f32], v: &[f32]) -> Vec<f64> {
        reference_masked(shape, false, q, k, v)
    }

    fn reference_masked(
        shape: AttentionShape,
        causal: bool,
        q: &[f32],
        k: &[f32],
        v: &[f32],
    ) -> Vec<f64> {
        let AttentionShape {
            tokens: l,
            heads,
            kv_heads,
            head_dim: d,
        } = shape;
        let mut out = vec![0f64; l * heads * d];
        for h in 0..heads {
            let g = h / (heads / kv_heads);
            for i in 0..l {
                let s: Vec<f64> = (0..l)
                    .map(|j| {
                        if causal && j > i {
                            return f64::NEG_INFINITY;
                        }
                        (0..d)
                            .map(|t| {
                                f64::from(q[i * heads * d + h * d + t])
                                    * f64::from(k[j * kv_heads * d + g * d + t])
                            })
                            .sum::<f64>()
                            / (d as f64).sqrt()
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for t in 0..d {
                    out[i * heads * d + h * d + t] = (0..l)
                        .map(|j| e[j] / z * f64::from(v[j * kv_heads * d + g * d + t]))
                        .sum();
                }
            }
        }
        out
    }

    #[test]
    fn matches_f64_reference_and_thread_counts_agree() {
        for shape in [
            AttentionShape {
                tokens: 1,
                heads: 1,
                kv_heads: 1,
                head_dim: 1,
            },
            AttentionShape {
                tokens: 37,
                heads: 4,
                kv_heads: 1,
                head_dim: 16,
            },
            AttentionShape {
                tokens: 21,
                heads: 20,
                kv_heads: 5,
                head_dim: 128,
            },
            AttentionShape {
                tokens: 50,
                heads: 16,
                kv_heads: 16,
                head_dim: 72,
            },
        ] {
            let (l, hd, kvd) = (
                shape.tokens,
                shape.heads * shape.head_dim,
                shape.kv_heads * shape.head_dim,
            );
            let (q, k, v) = (data(l * hd, 1), data(l * kvd, 2), data(l * kvd, 3));
            let expect = reference(shape, &q, &k, &v);
            for imp in AttentionImpl::supported() {
                let mut first: Option<Vec<f32>> = None;
                // A scratch buffer reused across calls, as the model does.
                let mut scratch = Vec::new();
                for threads in [1, 2, 3] {
                    let pool = rayon::ThreadPoolBuilder::new()
                        .num_threads(threads)
                        .build()
                        .unwrap();
                    let mut out = vec![f32::NAN; l * hd];
                    pool.install(|| {
                        attention_with(imp, shape, false, &q, &k, &v, &mut out, &mut scratch)
                    })
                    .unwrap();
                    for (a, b) in out.iter().zip(&expect) {
                        assert!(
                            (f64::from(*a) - b).abs() < 2e-5,
                            "{imp:?} {shape:?}: {a} vs {b}"
                        );
                    }
                    match &first {
                        None => first = Some(out),
                        Some(f) => assert!(
                            f.iter().zip(&out).all(|(a, b)| a.to_bits() == b.to_bits()),
                            "{imp:?} {shape:?}: {threads} threads differ from 1"
                        ),
                    }
                }
            }
        }
    }

    #[test]
    fn causal_mask_matches_f64_reference() {
        let shape = AttentionShape {
            tokens: 41,
            heads: 4,
            kv_heads: 2,
            head_dim: 40,
        };
        let (l, hd, kvd) = (41, 4 * 40, 2 * 40);
        let (q, k, v) = (data(l * hd, 4), data(l * kvd, 5), data(l * kvd, 6));
        let expect = reference_masked(shape, true, &q, &k, &v);
        let unmasked = reference(shape, &q, &k, &v);
        for imp in AttentionImpl::supported() {
            let mut out = vec![f32::NAN; l * hd];
            attention_with(imp, shape, true, &q, &k, &v, &mut out, &mut Vec::new()).unwrap();
            for (a, b) in out.iter().zip(&expect) {
                assert!((f64::from(*a) - b).abs() < 2e-5, "{imp:?}: {a} vs {b}");
            }
            // The mask matters: the first query's row sees only itself.
            assert!((f64::from(out[0]) - unmasked[0]).abs() > 1e-3, "{imp:?}");
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        let shape = AttentionShape {
            tokens: 2,
            heads: 3,
            kv_heads: 2,
            head_dim: 4,
        };
        let mut s = Vec::new();
        assert!(
            attention(
                shape,
                &[0.0; 24],
                &[0.0; 16],
                &[0.0; 16],
                &mut [0.0; 24],
                &mut s
            )
            .is_err()
        );
        let shape = AttentionShape {
            tokens: 2,
            heads: 2,
            kv_heads: 1,
            head_dim: 4,
        };
        assert!(
            attention(
                shape,
                &[0.0; 16],
                &[0.0; 7],
                &[0.0; 8],
                &mut [0.0; 16],
                &mut s
            )
            .is_err()
        );
    }
}
