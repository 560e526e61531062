//! Per-token int8 activation quantization (the reference `activation_quant`) into the blocked
//! layout the GEMM kernels read.
//!
//! Per row m: `s = 127 / max(max_k |x|, 1e-5)`, `q = clamp(round_half_even(x · s), -128, 127)`,
//! plus `Σ_k q` (the kernels multiply unsigned codes `c = t + 1`, so they subtract it) and the
//! dequantization factor `d = 1 / s` used by the epilogue.
//!
//! # Blocked layout
//! Rows are grouped in blocks of [`ROWS_PER_BLOCK`] (M padded with zero rows), K is padded with
//! zeros to the weight's `K_p`. Within a block, the 4-byte groups of all rows are interleaved:
//!
//! ```text
//! byte (mb · 12 · K_p) + (g · 48) + (r · 4) + e  =  q[12·mb + r, 4·g + e]
//! ```
//!
//! so 48 consecutive bytes hold the next 4 k of all 12 rows of the register block.
//!
//! # Tile layout (AMX)
//! The AMX kernel loads 16 rows × 64 bytes per tile, two tiles (32 rows) per 64-k step. Rows are
//! grouped in blocks of [`AMX_ROWS`] (M padded with zero rows), K is padded with zeros to
//! `K_64 = round_up(K_p, 64)`, and each step's 32 rows × 64 bytes are contiguous, so a block's
//! steps are one sequential stream:
//!
//! ```text
//! byte (mb · 32 · K_64) + (s · 2048) + (r · 64) + e  =  q[32·mb + r, 64·s + e]
//! ```

use super::{AlignedBytes, KernelError, Result, check_matrix};
use rayon::prelude::*;
use std::cell::RefCell;

/// Rows per register block of the vector GEMM kernels (the M of their microkernel).
pub const ROWS_PER_BLOCK: usize = 12;

/// Rows per block of the AMX kernel: two 16-row tiles.
pub const AMX_ROWS: usize = 32;

/// How the int8 codes are laid out; each kernel reads one (`KernelKind::act_layout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ActLayout {
    /// Blocks of 12 rows with their 4-byte k groups interleaved (vector kernels).
    #[default]
    Blocked,
    /// Blocks of 32 rows, 64-k steps of 32 × 64 bytes (AMX tiles).
    Tiles,
}

impl ActLayout {
    /// Rows per block: M is padded with zero rows to a multiple of it.
    pub fn block_rows(self) -> usize {
        match self {
            ActLayout::Blocked => ROWS_PER_BLOCK,
            ActLayout::Tiles => AMX_ROWS,
        }
    }
    /// Where one row's codes go: the offset of 4-k group `g` from the row's first byte is
    /// `(g / 16) · step + (g % 16) · group` with `(group, step)` returned here.
    fn group_strides(self) -> (usize, usize) {
        match self {
            ActLayout::Blocked => (GROUP_STRIDE, 16 * GROUP_STRIDE),
            ActLayout::Tiles => (4, AMX_ROWS * 64),
        }
    }
    /// A row's share of its block in bytes: `K_p`, rounded up to 64 for the tiles.
    fn row_bytes(self, k_padded: usize) -> usize {
        match self {
            ActLayout::Blocked => k_padded,
            ActLayout::Tiles => k_padded.div_ceil(64) * 64,
        }
    }
    /// Byte offset of q[row, col].
    fn offset(self, k_padded: usize, row: usize, col: usize) -> usize {
        let rows = self.block_rows();
        let (group, step) = self.group_strides();
        let lane = match self {
            ActLayout::Blocked => 4,
            ActLayout::Tiles => 64,
        };
        let g = col / 4;
        (row / rows) * rows * self.row_bytes(k_padded)
            + (row % rows) * lane
            + (g / 16) * step
            + (g % 16) * group
            + col % 4
    }
}

/// Quantized activations of an `m × k` matrix, ready for [`super::ternary_matmul`].
#[derive(Debug, Clone, Default)]
pub struct QuantizedActivations {
    m: usize,
    k: usize,
    k_padded: usize,
    layout: ActLayout,
    data: Option<AlignedBytes>,
    row_sums: Vec<i32>,
    row_dequant: Vec<f32>,
}

impl QuantizedActivations {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn rows(&self) -> usize {
        self.m
    }
    pub fn cols(&self) -> usize {
        self.k
    }
    pub fn k_padded(&self) -> usize {
        self.k_padded
    }
    pub fn layout(&self) -> ActLayout {
        self.layout
    }
    /// Row blocks of `layout().block_rows()` rows.
    pub fn blocks(&self) -> usize {
        self.m.div_ceil(self.layout.block_rows())
    }
    /// A row's share of its block in bytes (`K_p`, or `K_p` rounded up to 64 for the tiles).
    pub fn row_bytes(&self) -> usize {
        self.layout.row_bytes(self.k_padded)
    }
    /// The int8 codes in `layout()` (see the module docs): `blocks() · block_rows · row_bytes()`
    /// bytes.
    pub fn data(&self) -> &[u8] {
        let len = self.blocks() * self.layout.block_rows() * self.row_bytes();
        match &self.data {
            Some(d) => &d.as_slice()[..len],
            None => &[],
        }
    }
    /// Σ_k q[m, k] per row, padded with zeros to whole blocks.
    pub fn row_sums(&self) -> &[i32] {
        &self.row_sums
    }
    /// 1 / s[m] per row, padded with zeros to whole blocks.
    pub fn row_dequant(&self) -> &[f32] {
        &self.row_dequant
    }
    /// The code q[row, col] read back from the layout.
    pub fn code(&self, row: usize, col: usize) -> Option<i8> {
        if row >= self.m || col >= self.k {
            return None;
        }
        Some(self.data()[self.layout.offset(self.k_padded, row, col)] as i8)
    }

    /// The same codes in another layout (a copy; the kernels call it only when handed
    /// activations quantized for a different kernel).
    pub fn to_layout(&self, layout: ActLayout) -> QuantizedActivations {
        let mut out = QuantizedActivations {
            m: self.m,
            k: self.k,
            k_padded: self.k_padded,
            layout,
            data: None,
            row_sums: Vec::new(),
            row_dequant: Vec::new(),
        };
        let padded_rows = out.blocks() * layout.block_rows();
        let mut data = AlignedBytes::new(padded_rows * out.row_bytes(), 0);
        let bytes = data.as_mut_slice();
        for row in 0..self.m {
            for col in 0..self.k {
                bytes[layout.offset(self.k_padded, row, col)] =
                    self.code(row, col).unwrap_or(0) as u8;
            }
        }
        out.data = Some(data);
        out.row_sums = self.row_sums[..self.m].to_vec();
        out.row_sums.resize(padded_rows, 0);
        out.row_dequant = self.row_dequant[..self.m].to_vec();
        out.row_dequant.resize(padded_rows, 0.0);
        out
    }
}

/// One row block as the parallel quantizer sees it: (index, ((codes, Σq), dequantization)).
type BlockItem<'a> = (usize, ((&'a mut [u8], &'a mut [i32]), &'a mut [f32]));

/// Quantizes `x` (row-major `m × k`) for a weight with `k_padded` inputs (a multiple of 16,
/// `TernaryMatrix::k_padded`), in the layout of the kernel [`super::ternary_matmul`] uses.
/// Reuses `out`'s buffers. Non-finite inputs are an error naming the first offending element.
pub fn quantize_activations(
    x: &[f32],
    m: usize,
    k: usize,
    k_padded: usize,
    out: &mut QuantizedActivations,
) -> Result<()> {
    quantize_input(QuantInput::Plain(x), m, k, k_padded, out)
}

/// [`quantize_activations`] into an explicit layout.
pub fn quantize_activations_for(
    layout: ActLayout,
    x: &[f32],
    m: usize,
    k: usize,
    k_padded: usize,
    out: &mut QuantizedActivations,
) -> Result<()> {
    quantize_input_for(layout, QuantInput::Plain(x), m, k, k_padded, out)
}

/// What a quantizer reads: activations, or their RMSNorm or LayerNorm computed row by row on the
/// way in. A norm input is `ops::rms_norm` / `ops::layer_norm` followed by the quantizer, value
/// for value (each row is normalized by the same function into a small buffer: one row, or the
/// 12 rows of a whole block), without writing the normalized f32 rows of the whole input to
/// memory and reading them back.
#[derive(Debug, Clone, Copy)]
pub enum QuantInput<'a> {
    Plain(&'a [f32]),
    /// `w · (x / sqrt(mean(x²) + eps))` per row, `weight` holding K values.
    RmsNormed {
        x: &'a [f32],
        weight: &'a [f32],
        eps: f32,
    },
    /// `w · (x − μ) / sqrt(σ² + eps) + b` per row, `weight` and `bias` holding K values.
    LayerNormed {
        x: &'a [f32],
        weight: &'a [f32],
        bias: &'a [f32],
        eps: f32,
    },
}

impl QuantInput<'_> {
    /// The activations (before any normalization).
    pub fn raw(&self) -> &[f32] {
        match *self {
            QuantInput::Plain(x)
            | QuantInput::RmsNormed { x, .. }
            | QuantInput::LayerNormed { x, .. } => x,
        }
    }

    /// Checks that the norm's parameters hold `k` values each.
    pub fn check_params(&self, k: usize) -> Result<()> {
        let params = match *self {
            QuantInput::Plain(_) => [None, None],
            QuantInput::RmsNormed { weight, .. } => [Some(("norm weight", weight)), None],
            QuantInput::LayerNormed { weight, bias, .. } => {
                [Some(("norm weight", weight)), Some(("norm bias", bias))]
            }
        };
        for (what, p) in params.into_iter().flatten() {
            super::ops::check_param(what, p, k)?;
        }
        Ok(())
    }

    /// Writes the norm of `rows` (whole rows of `x`, as `ops::rms_norm` / `ops::layer_norm`
    /// would) into `out` and returns true; false, writing nothing, for a plain input. The caller
    /// has checked the parameters ([`QuantInput::check_params`]) and that `rows` and `out` hold
    /// the same whole rows.
    pub fn normalize_rows(&self, rows: &[f32], out: &mut [f32]) -> bool {
        match *self {
            QuantInput::Plain(_) => return false,
            QuantInput::RmsNormed { weight, eps, .. } => {
                super::ops::rms_norm_rows(rows, weight, eps, out)
            }
            QuantInput::LayerNormed {
                weight, bias, eps, ..
            } => super::ops::layer_norm_rows(rows, weight, bias, eps, out),
        }
        true
    }
}

/// [`quantize_activations`] of a [`QuantInput`] in the selected kernel's layout.
pub fn quantize_input(
    input: QuantInput<'_>,
    m: usize,
    k: usize,
    k_padded: usize,
    out: &mut QuantizedActivations,
) -> Result<()> {
    let layout = super::KernelKind::selected().act_layout();
    quantize_input_for(layout, input, m, k, k_padded, out)
}

/// [`quantize_input`] into an explicit layout.
pub fn quantize_input_for(
    layout: ActLayout,
    input: QuantInput<'_>,
    m: usize,
    k: usize,
    k_padded: usize,
    out: &mut QuantizedActivations,
) -> Result<()> {
    let x = input.raw();
    check_matrix("activations", x.len(), m, k)?;
    input.check_params(k)?;
    if k_padded < k || !k_padded.is_multiple_of(16) {
        return Err(KernelError::Invalid(format!(
            "activations: padded K {k_padded} must be a multiple of 16 and >= K = {k}"
        )));
    }
    let block_rows = layout.block_rows();
    let blocks = m.div_ceil(block_rows);
    let padded_rows = blocks * block_rows;
    let row_bytes = layout.row_bytes(k_padded);
    let (group, step) = layout.group_strides();
    // The row's groups quantize_row writes, and all its groups (the rest is zero padding).
    let (written, groups) = (k.div_ceil(16) * 4, row_bytes / 4);
    out.m = m;
    out.k = k;
    out.k_padded = k_padded;
    out.layout = layout;
    let data = out.data.get_or_insert_with(|| AlignedBytes::new(0, 0));
    // Every byte of the used region is written below (padding rows and columns with zeros), so
    // the buffer only has to be large enough.
    data.ensure_len(padded_rows * row_bytes);
    out.row_sums.resize(padded_rows, 0);
    out.row_dequant.resize(padded_rows, 0.0);

    let block_bytes = block_rows * row_bytes;
    let whole_blocks = wide_blocked(layout);
    let quantize_rows = |block: usize,
                         normed: &mut [f32],
                         bytes: &mut [u8],
                         sums: &mut [i32],
                         dequant: &mut [f32]|
     -> Result<()> {
        for r in 0..block_rows {
            let row = block * block_rows + r;
            let lane = &mut bytes[layout.offset(k_padded, r, 0)..];
            // Padding codes: whole padding rows, and the groups past what quantize_row writes.
            for g in if row >= m { 0 } else { written }..groups {
                let at = (g / 16) * step + (g % 16) * group;
                lane[at..at + 4].fill(0);
            }
            if row >= m {
                sums[r] = 0;
                dequant[r] = 0.0;
                continue;
            }
            let (xs, scale) = scaled_row(&input, &x[row * k..(row + 1) * k], row, normed)?;
            // The row this task quantizes next (the next block's first row may be another
            // task's: prefetching it is merely wasted).
            let next = if row + 1 < m {
                x[(row + 1) * k..].as_ptr()
            } else {
                std::ptr::null()
            };
            sums[r] = quantize_row(xs, next, scale, lane, group, step);
            dequant[r] = 1.0 / scale;
        }
        Ok(())
    };
    let quantize_block = |(block, ((bytes, sums), dequant)): BlockItem<'_>| -> Result<()> {
        if whole_blocks && (block + 1) * block_rows <= m {
            // The normalized rows, for a norm input: all 12 of the block.
            return with_normed(&input, ROWS_PER_BLOCK * k, |normed| {
                let padding = written..groups;
                quantize_whole_block(input, block, k, padding, bytes, sums, dequant, normed)
            });
        }
        // The normalized row, for a norm input (one row at a time: it stays in L1).
        with_normed(&input, k, |normed| {
            quantize_rows(block, normed, bytes, sums, dequant)
        })
    };
    let blocks_iter = data.as_mut_slice()[..padded_rows * row_bytes]
        .par_chunks_mut(block_bytes)
        .zip(out.row_sums.par_chunks_mut(block_rows))
        .zip(out.row_dequant.par_chunks_mut(block_rows))
        .enumerate();
    let result = if rayon::current_num_threads() == 1 || blocks == 1 {
        blocks_iter
            .with_max_len(usize::MAX)
            .try_for_each(quantize_block)
    } else {
        blocks_iter.try_for_each(quantize_block)
    };
    if result.is_err() {
        // Report the first offending input element, whatever thread found one (for a norm input
        // with finite activations, the normalized value the block reported).
        for (row, xs) in x.chunks_exact(k).enumerate() {
            if let Some(col) = xs.iter().position(|v| !v.is_finite()) {
                return Err(KernelError::NonFinite {
                    what: "activations",
                    row,
                    col,
                    value: xs[col],
                });
            }
        }
    }
    result
}

/// Row `row` of the input as the quantizer reads it: `xs` itself, or for a norm input its norm
/// written into `normed` (k values); and its scale `127 / max(max_k |x_k|, 1e-5)`. A NaN or ∞
/// is an error naming the row, the column and the value.
fn scaled_row<'a>(
    input: &QuantInput<'_>,
    xs: &'a [f32],
    row: usize,
    normed: &'a mut [f32],
) -> Result<(&'a [f32], f32)> {
    let xs: &[f32] = if input.normalize_rows(xs, normed) {
        normed
    } else {
        xs
    };
    let absmax_bits = absmax_bits(xs);
    if absmax_bits >= 0x7f80_0000 {
        let col = xs.iter().position(|v| !v.is_finite()).unwrap_or(0);
        return Err(KernelError::NonFinite {
            what: "activations",
            row,
            col,
            value: xs[col],
        });
    }
    Ok((xs, 127.0 / f32::from_bits(absmax_bits).max(1e-5)))
}

/// Whether whole 12-row blocks of `layout` go through [`quantize_whole_block`].
fn wide_blocked(layout: ActLayout) -> bool {
    #[cfg(target_arch = "x86_64")]
    if layout == ActLayout::Blocked && avx512::supported() {
        return true;
    }
    let _ = layout;
    false
}

thread_local! {
    /// Each worker's buffer for the normalized rows of a norm input, kept across blocks and
    /// calls. Allocated per block, it cost a page-faulting allocation and a memset of up to
    /// 330 KB (12 rows of K = 6912) for each of the about 8,700 blocks of a forward pass.
    static NORMED: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with `len` values of this thread's normalization buffer (their contents are
/// unspecified: the norm overwrites them before they are read), or with an empty slice for a
/// plain input, which is not normalized.
fn with_normed<R>(input: &QuantInput<'_>, len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    if let QuantInput::Plain(_) = input {
        return f(&mut []);
    }
    NORMED.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buffer) => {
            if buffer.len() < len {
                buffer.resize(len, 0.0);
            }
            f(&mut buffer[..len])
        }
        // Only if `f` ran the quantizer again on this thread (it does not): a buffer of its own.
        Err(_) => f(&mut vec![0.0; len]),
    })
}

/// One whole block of the Blocked layout (rows `12·block ..` of `input`, all inside M): the
/// rows' scales first, then the codes of all 12 rows together, 16 k at a time, which fill 192
/// contiguous bytes (4 groups × 12 rows × 4). Row by row, each 16 values would cost four 4-byte
/// extractions to 48-byte-strided slots. `padding` is the range of 4-k groups past K (zero);
/// `normed` holds 12 · k values for a norm input (none for a plain one).
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
#[allow(clippy::too_many_arguments)]
fn quantize_whole_block(
    input: QuantInput<'_>,
    block: usize,
    k: usize,
    padding: std::ops::Range<usize>,
    bytes: &mut [u8],
    sums: &mut [i32],
    dequant: &mut [f32],
    normed: &mut [f32],
) -> Result<()> {
    #[cfg(target_arch = "x86_64")]
    {
        let x = input.raw();
        let first = block * ROWS_PER_BLOCK;
        let mut scales = [0.0f32; ROWS_PER_BLOCK];
        for r in 0..ROWS_PER_BLOCK {
            let row = first + r;
            // Empty for a plain input, which is not normalized.
            let normed = normed.get_mut(r * k..(r + 1) * k).unwrap_or_default();
            (_, scales[r]) = scaled_row(&input, &x[row * k..(row + 1) * k], row, normed)?;
            dequant[r] = 1.0 / scales[r];
        }
        for g in padding {
            bytes[(g / 16) * 16 * GROUP_STRIDE + (g % 16) * GROUP_STRIDE..][..GROUP_STRIDE].fill(0);
        }
        // The block's 12 rows, contiguous: in the input, or normalized into `normed`.
        let rows = if normed.is_empty() {
            &x[first * k..(first + ROWS_PER_BLOCK) * k]
        } else {
            &normed[..ROWS_PER_BLOCK * k]
        };
        let out = &mut bytes[..k.div_ceil(16) * 16 * ROWS_PER_BLOCK];
        // SAFETY: AVX-512 F/BW (`wide_blocked`); `rows` holds 12 rows of k values and `out` the
        // codes of k.div_ceil(16) chunks of 12 rows.
        let block_sums = unsafe { avx512::quantize_block12(rows, &scales, k, out) };
        sums[..ROWS_PER_BLOCK].copy_from_slice(&block_sums);
        Ok(())
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("wide_blocked is false off x86_64")
}

/// Bits of max_k |x_k|. For non-negative floats the integer order of the bit patterns is the
/// numeric order, and every NaN or ∞ compares above every finite value (>= 0x7f80_0000).
fn absmax_bits(xs: &[f32]) -> u32 {
    #[cfg(target_arch = "x86_64")]
    if avx512::supported() {
        // SAFETY: the CPU supports AVX-512 F/BW.
        return unsafe { avx512::absmax_bits(xs) };
    }
    absmax_bits_generic(xs)
}

/// Byte offset of the 16 codes `16·c .. 16·c + 16` of a row: 4-k groups at `group` bytes, every
/// 16 groups (64 k) a `step`.
#[inline(always)]
fn chunk_offset(c: usize, group: usize, step: usize) -> usize {
    (c / 4) * step + (c % 4) * 4 * group
}

/// Quantizes one row; code k goes to `dst[(g / 16) · step + (g % 16) · group + k % 4]` with
/// `g = k / 4` (the row is padded with zero codes to a multiple of 16). Returns Σ q. `next`, if
/// not null, is the row quantized after this one (at least as long), which the AVX-512 path
/// prefetches while it works; it is never dereferenced.
fn quantize_row(
    xs: &[f32],
    next: *const f32,
    scale: f32,
    dst: &mut [u8],
    group: usize,
    step: usize,
) -> i32 {
    let chunks = xs.len().div_ceil(16);
    assert!(
        group >= 4 && step >= 16 * group,
        "quantize_row: overlapping groups"
    );
    assert!(
        dst.len() >= chunk_offset(chunks - 1, group, step) + 3 * group + 4,
        "quantize_row: destination too short"
    );
    #[cfg(target_arch = "x86_64")]
    if avx512::supported() {
        // SAFETY: the CPU supports AVX-512 F/BW; dst holds every group (checked above).
        return unsafe { avx512::quantize_row(xs, next, scale, dst, group, step) };
    }
    let _ = next; // the portable path does not prefetch
    quantize_row_generic(xs, scale, dst, group, step)
}

/// AVX-512 versions of the two row functions: the same arithmetic as the generic versions (no
/// FMA; the same magic-number rounding), so the results are identical bit for bit.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    pub(super) fn supported() -> bool {
        is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw")
    }

    /// Mask of the first `n` (< 16) lanes.
    fn tail_mask(n: usize) -> __mmask16 {
        ((1u32 << n) - 1) as __mmask16
    }

    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn absmax_bits(xs: &[f32]) -> u32 {
        let abs = _mm512_set1_epi32(0x7fff_ffff);
        let mut max = _mm512_setzero_si512();
        let chunks = xs.chunks_exact(16);
        let tail = chunks.remainder();
        for chunk in chunks {
            // SAFETY: 16 readable f32.
            let v = unsafe { _mm512_loadu_si512(chunk.as_ptr().cast()) };
            max = _mm512_max_epu32(max, _mm512_and_si512(v, abs));
        }
        if !tail.is_empty() {
            // SAFETY: only the first tail.len() lanes are read.
            let v =
                unsafe { _mm512_maskz_loadu_epi32(tail_mask(tail.len()), tail.as_ptr().cast()) };
            max = _mm512_max_epu32(max, _mm512_and_si512(v, abs));
        }
        _mm512_reduce_max_epu32(max)
    }

    /// # Safety
    /// AVX-512 F/BW, and `dst` holds `ceil(len/16)·4` groups at the strides (`quantize_row`).
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn quantize_row(
        xs: &[f32],
        next: *const f32,
        scale: f32,
        dst: &mut [u8],
        group: usize,
        step: usize,
    ) -> i32 {
        let s = _mm512_set1_ps(scale);
        let magic = _mm512_set1_ps(12_582_912.0);
        let offset = _mm512_set1_epi32(0x4B40_0000);
        let (lo, hi) = (_mm512_set1_epi32(-128), _mm512_set1_epi32(127));
        let mut sum = _mm512_setzero_si512();
        let out = dst.as_mut_ptr();
        for (chunk_index, chunk) in xs.chunks(16).enumerate() {
            if !next.is_null() {
                // The next row's line at the same offset: its absmax pass then reads from L1
                // instead of waiting on L3 or DRAM while this loop computes. A prefetch never
                // faults.
                _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(16 * chunk_index).cast());
            }
            // SAFETY: a full or masked load of the chunk's elements (masked lanes read as 0.0,
            // which quantize to 0).
            let x =
                unsafe { _mm512_maskz_loadu_ps(tail_mask_or_full(chunk.len()), chunk.as_ptr()) };
            let v = _mm512_add_ps(_mm512_mul_ps(x, s), magic);
            let q = _mm512_max_epi32(
                _mm512_min_epi32(_mm512_sub_epi32(_mm512_castps_si512(v), offset), hi),
                lo,
            );
            sum = _mm512_add_epi32(sum, q);
            let bytes = _mm512_cvtepi32_epi8(q);
            let at = super::chunk_offset(chunk_index, group, step);
            // SAFETY: groups 4·chunk_index .. +4 lie inside dst (the caller's contract).
            unsafe {
                if group == 4 {
                    _mm_storeu_si128(out.add(at).cast(), bytes);
                } else {
                    _mm_storeu_si32(out.add(at).cast(), bytes);
                    _mm_storeu_si32(out.add(at + group).cast(), _mm_srli_si128::<4>(bytes));
                    _mm_storeu_si32(out.add(at + 2 * group).cast(), _mm_srli_si128::<8>(bytes));
                    _mm_storeu_si32(out.add(at + 3 * group).cast(), _mm_srli_si128::<12>(bytes));
                }
            }
        }
        _mm512_reduce_add_epi32(sum)
    }

    /// The codes of 12 rows (`rows`: 12 contiguous rows of `k` values), chunk by chunk: chunk
    /// `c` (k = 16c .. 16c + 16) fills `dst[192c .. 192c + 192]` with its 4 groups, each the 12
    /// rows' 4 codes in row order (the Blocked layout). Returns each row's Σ q. The same
    /// arithmetic as `quantize_row` (the packs saturate exactly like its clamp); a chunk past K
    /// is read masked, as zeros.
    ///
    /// The rows are addressed from one pointer and the row stride: with a pointer per row, the
    /// 12 pointers did not fit the general registers and were reloaded from the stack for every
    /// load. There is no software prefetch of the next block either: its 12 prefetches per
    /// chunk cost as much as they saved. Measured on the development machine (Zen 5), K = 2560,
    /// 4 interleaved runs, with the input in L2 or L3 (as in the model): 15–25% faster than
    /// with both at 1 thread, 7–41% at 2; with the input in DRAM, no consistent difference
    /// (−5% to +31%, noisy).
    ///
    /// # Safety
    /// AVX-512 F/BW (the extents are checked).
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn quantize_block12(
        rows: &[f32],
        scales: &[f32; 12],
        k: usize,
        dst: &mut [u8],
    ) -> [i32; 12] {
        let chunks = k.div_ceil(16);
        assert!(
            dst.len() >= chunks * 192 && rows.len() >= 12 * k,
            "quantize_block12: rows or destination too short"
        );
        let magic = _mm512_set1_ps(12_582_912.0);
        let offset = _mm512_set1_epi32(0x4B40_0000);
        let (ones8, ones16) = (_mm512_set1_epi8(1), _mm512_set1_epi16(1));
        let s: [__m512; 12] = std::array::from_fn(|r| _mm512_set1_ps(scales[r]));
        // Σ q per (lane, row) of each 4-row quad: dword 4l + j of sums[quad] is row 4·quad + j.
        let mut quad_sums = [_mm512_setzero_si512(); 3];
        // 128-bit lanes of the three quads' codes into three 64-byte stores (qword indices; 8+
        // picks the second operand): [P0.0 P1.0 P2.0 P0.1] [P1.1 P2.1 P0.2 P1.2]
        // [P2.2 P0.3 P1.3 P2.3].
        let i01 = _mm512_setr_epi64(0, 1, 8, 9, 0, 0, 2, 3);
        let i0 = _mm512_setr_epi64(0, 1, 2, 3, 8, 9, 6, 7);
        let i10 = _mm512_setr_epi64(2, 3, 0, 0, 12, 13, 4, 5);
        let i1 = _mm512_setr_epi64(0, 1, 10, 11, 4, 5, 6, 7);
        let i20 = _mm512_setr_epi64(6, 7, 14, 15, 0, 0, 0, 0);
        let i2 = _mm512_setr_epi64(4, 5, 8, 9, 10, 11, 6, 7);
        let out = dst.as_mut_ptr();
        for c in 0..chunks {
            let mask = if 16 * c + 16 <= k {
                0xffff
            } else {
                tail_mask(k - 16 * c)
            };
            let quads: [__m512i; 3] = std::array::from_fn(|quad| {
                let q: [__m512i; 4] = std::array::from_fn(|j| {
                    let r = 4 * quad + j;
                    // SAFETY: the lanes of chunk c below k are inside the row.
                    let x =
                        unsafe { _mm512_maskz_loadu_ps(mask, rows.as_ptr().add(r * k + 16 * c)) };
                    let v = _mm512_add_ps(_mm512_mul_ps(x, s[r]), magic);
                    _mm512_sub_epi32(_mm512_castps_si512(v), offset)
                });
                // Lane l of the result: group l of rows 4·quad .. +4, 4 codes each.
                let codes = _mm512_packs_epi16(
                    _mm512_packs_epi32(q[0], q[1]),
                    _mm512_packs_epi32(q[2], q[3]),
                );
                let pairs = _mm512_maddubs_epi16(ones8, codes);
                quad_sums[quad] =
                    _mm512_add_epi32(quad_sums[quad], _mm512_madd_epi16(pairs, ones16));
                codes
            });
            let [p0, p1, p2] = quads;
            let z0 = _mm512_permutex2var_epi64(_mm512_permutex2var_epi64(p0, i01, p1), i0, p2);
            let z1 = _mm512_permutex2var_epi64(_mm512_permutex2var_epi64(p1, i10, p0), i1, p2);
            let z2 = _mm512_permutex2var_epi64(p2, i2, _mm512_permutex2var_epi64(p0, i20, p1));
            // SAFETY: chunk c's 192 bytes lie inside dst.
            unsafe {
                let at = out.add(192 * c);
                _mm512_storeu_si512(at.cast(), z0);
                _mm512_storeu_si512(at.add(64).cast(), z1);
                _mm512_storeu_si512(at.add(128).cast(), z2);
            }
        }
        let mut sums = [0i32; 12];
        for (quad, v) in quad_sums.iter().enumerate() {
            let mut lanes = [0i32; 16];
            // SAFETY: 16 writable i32.
            unsafe { _mm512_storeu_si512(lanes.as_mut_ptr().cast(), *v) };
            for (i, lane) in lanes.iter().enumerate() {
                sums[4 * quad + i % 4] += lane;
            }
        }
        sums
    }

    fn tail_mask_or_full(n: usize) -> __mmask16 {
        if n >= 16 { 0xffff } else { tail_mask(n) }
    }
}

#[inline(always)]
fn absmax_bits_generic(xs: &[f32]) -> u32 {
    let mut lanes = [0u32; 16];
    let chunks = xs.chunks_exact(16);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (l, v) in lanes.iter_mut().zip(chunk) {
            *l = (*l).max(v.to_bits() & 0x7fff_ffff);
        }
    }
    let mut max = lanes.into_iter().max().unwrap_or(0);
    for v in tail {
        max = max.max(v.to_bits() & 0x7fff_ffff);
    }
    max
}

/// Bytes between consecutive 4-k groups of one row in the blocked layout.
const GROUP_STRIDE: usize = 4 * ROWS_PER_BLOCK;

/// q = clamp(round_half_even(x · s), -128, 127), 16 values at a time, each group of 4 stored at
/// its place in the blocked layout; returns Σ q.
///
/// Rounding uses the exact "magic number" identity: for |v| < 2^22, `v + 1.5·2^23` rounds v to the
/// nearest integer n, ties to even (IEEE f32, default rounding), and its bit pattern is
/// `0x4B40_0000 + n`. Here |v| <= 127 (|x| <= max |x|), so this equals `round_ties_even`, needs
/// no float-to-int conversion, and vectorizes everywhere.
#[inline(always)]
fn quantize_row_generic(xs: &[f32], scale: f32, dst: &mut [u8], group: usize, step: usize) -> i32 {
    #[inline(always)]
    fn code(v: f32, scale: f32) -> i32 {
        const MAGIC: f32 = 12_582_912.0; // 1.5 · 2^23
        ((v * scale + MAGIC).to_bits() as i32 - 0x4B40_0000).clamp(-128, 127)
    }
    let mut sums = [0i32; 16];
    let chunks = xs.chunks_exact(16);
    let tail = chunks.remainder();
    let full = chunks.len();
    for (c, chunk) in chunks.enumerate() {
        let mut codes = [0u8; 16];
        for ((q, &v), s) in codes.iter_mut().zip(chunk).zip(sums.iter_mut()) {
            let r = code(v, scale);
            *q = r as u8;
            *s += r;
        }
        let at = chunk_offset(c, group, step);
        for (i, g) in codes.chunks_exact(4).enumerate() {
            dst[at + i * group..at + i * group + 4].copy_from_slice(g);
        }
    }
    let mut sum: i32 = sums.iter().sum();
    if !tail.is_empty() {
        // The last chunk of 16: its padding codes are 0.
        let at = chunk_offset(full, group, step);
        for i in 0..16 {
            let r = tail.get(i).map_or(0, |&v| code(v, scale));
            dst[at + (i / 4) * group + i % 4] = r as u8;
            sum += r;
        }
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quantize(x: &[f32], m: usize, k: usize) -> QuantizedActivations {
        quantize_in(ActLayout::Blocked, x, m, k)
    }

    fn quantize_in(layout: ActLayout, x: &[f32], m: usize, k: usize) -> QuantizedActivations {
        let mut q = QuantizedActivations::new();
        quantize_activations_for(layout, x, m, k, k.div_ceil(16) * 16, &mut q).unwrap();
        q
    }

    #[test]
    fn hand_computed_codes_with_ties() {
        // max |x| = 127 -> s = 1: codes are round_half_even(x)
        let x = [0.5f32, 1.5, 2.5, -0.5, -1.5, -127.0, 126.5, 3.49];
        let q = quantize(&x, 1, 8);
        let codes: Vec<i8> = (0..8).map(|c| q.code(0, c).unwrap()).collect();
        assert_eq!(codes, vec![0, 2, 2, 0, -2, -127, 126, 3]);
        assert_eq!(q.row_sums()[0], 2 + 2 - 2 - 127 + 126 + 3);
        assert_eq!(q.row_dequant()[0], 1.0);
    }

    #[test]
    fn scale_follows_the_reference() {
        let x = [0.25f32, -0.5, 0.1];
        let q = quantize(&x, 1, 3);
        let s = 127.0f32 / 0.5;
        let expect: Vec<i8> = x.iter().map(|&v| (v * s).round_ties_even() as i8).collect();
        let codes: Vec<i8> = (0..3).map(|c| q.code(0, c).unwrap()).collect();
        assert_eq!(codes, expect);
        assert_eq!(q.row_dequant()[0], 1.0 / s);
    }

    #[test]
    fn all_zero_rows_give_zero_codes_and_finite_scales() {
        let x = vec![0.0f32; 2 * 20];
        let q = quantize(&x, 2, 20);
        assert!(q.data().iter().all(|&b| b == 0));
        assert!(q.row_sums().iter().all(|&s| s == 0));
        for &d in &q.row_dequant()[..2] {
            assert!(d.is_finite() && d > 0.0);
            assert_eq!(d, 1.0 / (127.0f32 / 1e-5));
        }
    }

    #[test]
    fn tiny_rows_use_the_floor() {
        // max |x| below 1e-5: s = 127 / 1e-5, codes stay within range.
        let x = [5e-6f32, -1e-6];
        let q = quantize(&x, 1, 2);
        let s = 127.0f32 / 1e-5;
        for (c, v) in x.iter().enumerate() {
            let expect = (v * s).round_ties_even() as i8;
            assert_eq!(q.code(0, c), Some(expect));
        }
        // 5e-6 · (127 / 1e-5) ≈ 63.5 and -1e-6 · (127 / 1e-5) = -12.7
        assert!(matches!(q.code(0, 0), Some(63 | 64)) && q.code(0, 1) == Some(-13));
    }

    #[test]
    fn both_layouts_round_trip_with_tails() {
        let (m, k) = (37, 37);
        let x: Vec<f32> = (0..m * k)
            .map(|i| ((i * 7919) % 255) as f32 - 127.0)
            .collect();
        for layout in [ActLayout::Blocked, ActLayout::Tiles] {
            let q = quantize_in(layout, &x, m, k);
            assert_eq!(q.k_padded(), 48);
            let rows = m.div_ceil(layout.block_rows()) * layout.block_rows();
            let row_bytes = match layout {
                ActLayout::Blocked => 48,
                ActLayout::Tiles => 64,
            };
            assert_eq!(q.data().len(), rows * row_bytes, "{layout:?}");
            for r in 0..m {
                let s = 127.0
                    / x[r * k..(r + 1) * k]
                        .iter()
                        .fold(0f32, |a, v| a.max(v.abs()));
                let mut sum = 0;
                for c in 0..k {
                    let expect = (x[r * k + c] * s).round_ties_even().clamp(-128.0, 127.0) as i8;
                    assert_eq!(q.code(r, c), Some(expect), "{layout:?} row {r} col {c}");
                    sum += expect as i32;
                }
                assert_eq!(q.row_sums()[r], sum);
            }
            assert_eq!(q.row_sums()[m..], vec![0; rows - m][..]);
            // padding rows and columns are zero
            let count_nonzero = q.data().iter().filter(|&&b| b != 0).count();
            let expected_nonzero = (0..m * k)
                .filter(|&i| q.code(i / k, i % k) != Some(0))
                .count();
            assert_eq!(count_nonzero, expected_nonzero, "{layout:?}");
            // converting to the other layout and back changes nothing
            let other = match layout {
                ActLayout::Blocked => ActLayout::Tiles,
                ActLayout::Tiles => ActLayout::Blocked,
            };
            let there = q.to_layout(other);
            assert_eq!(there.layout(), other);
            let fresh = quantize_in(other, &x, m, k);
            assert_eq!(there.data(), fresh.data());
            assert_eq!(there.row_sums(), fresh.row_sums());
            assert_eq!(there.row_dequant(), fresh.row_dequant());
            assert_eq!(there.to_layout(layout).data(), q.data());
        }
    }

    #[test]
    fn reused_buffers_hold_no_stale_codes() {
        for layout in [ActLayout::Blocked, ActLayout::Tiles] {
            let mut q = QuantizedActivations::new();
            let big: Vec<f32> = (0..40 * 128).map(|i| (i % 7) as f32 - 3.0).collect();
            quantize_activations_for(layout, &big, 40, 128, 128, &mut q).unwrap();
            let small: Vec<f32> = (0..29 * 20).map(|i| (i % 5) as f32 - 2.0).collect();
            // K_p = 48 > 32: the columns past the row's last 16 must be cleared too, in the two
            // whole 12-row blocks and in the partial one.
            quantize_activations_for(layout, &small, 29, 20, 48, &mut q).unwrap();
            let mut fresh = QuantizedActivations::new();
            quantize_activations_for(layout, &small, 29, 20, 48, &mut fresh).unwrap();
            assert_eq!(q.data(), fresh.data(), "{layout:?}");
            assert_eq!(q.row_sums(), fresh.row_sums());
            assert_eq!(q.row_dequant(), fresh.row_dequant());
            let nonzero = (0..29 * 20).filter(|&i| q.code(i / 20, i % 20) != Some(0));
            assert_eq!(
                q.data().iter().filter(|&&b| b != 0).count(),
                nonzero.count()
            );
        }
    }

    #[test]
    fn generic_and_wide_paths_agree_bit_for_bit() {
        let mut state = 7u64;
        let x: Vec<f32> = (0..1003)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 8.0
            })
            .collect();
        let layouts = [(GROUP_STRIDE, 16 * GROUP_STRIDE), (4, 2048)];
        for (len, (group, step)) in [1000, 1003, 16, 7]
            .into_iter()
            .flat_map(|l| layouts.map(|g| (l, g)))
        {
            let x = &x[..len];
            let s = 127.0 / f32::from_bits(absmax_bits_generic(x));
            let size = len.div_ceil(64) * step;
            let mut a = vec![0u8; size];
            let mut b = vec![0u8; size];
            assert_eq!(absmax_bits(x), absmax_bits_generic(x));
            assert_eq!(
                quantize_row(x, std::ptr::null(), s, &mut a, group, step),
                quantize_row_generic(x, s, &mut b, group, step)
            );
            assert_eq!(a, b);
            for (k, v) in x.iter().enumerate() {
                let g = k / 4;
                let q = a[(g / 16) * step + (g % 16) * group + k % 4] as i8;
                assert_eq!(q, (v * s).round_ties_even().clamp(-128.0, 127.0) as i8);
            }
        }
    }

    #[test]
    fn non_finite_and_bad_shapes_are_errors() {
        let mut q = QuantizedActivations::new();
        let err =
            quantize_activations(&[1.0, 2.0, f32::INFINITY, 0.0], 2, 2, 16, &mut q).unwrap_err();
        assert!(
            matches!(err, KernelError::NonFinite { row: 1, col: 0, .. }),
            "{err}"
        );
        let err = quantize_activations(&[f32::NAN], 1, 1, 16, &mut q).unwrap_err();
        assert!(matches!(err, KernelError::NonFinite { row: 0, col: 0, .. }));
        assert!(quantize_activations(&[1.0; 3], 1, 4, 16, &mut q).is_err());
        assert!(quantize_activations(&[], 0, 4, 16, &mut q).is_err());
        assert!(quantize_activations(&[1.0; 4], 1, 4, 12, &mut q).is_err());
    }

    /// The fused norm inputs give exactly the codes, sums and scales of `ops::rms_norm` /
    /// `ops::layer_norm` followed by the quantizer: both layouts, M and K tails, 1 and 3 threads.
    /// The pools live across all the shapes, so their workers' normalization buffers are reused
    /// from longer and shorter rows.
    #[test]
    fn normed_inputs_match_norm_then_quantize() {
        use crate::kernels::ops::{layer_norm, rms_norm};
        let pools = [1, 3].map(|threads| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap()
        });
        for ((m, k), layer) in [(37, 37), (13, 64), (1, 2560), (40, 1000)]
            .into_iter()
            .flat_map(|s| [(s, false), (s, true)])
        {
            let x = crate::kernels::pseudo_random(m * k, 11, 3.0);
            let weight = crate::kernels::pseudo_random(k, 12, 1.5);
            let bias = crate::kernels::pseudo_random(k, 13, 0.5);
            let eps = 1e-6;
            let mut normed = vec![0.0; m * k];
            let input = if layer {
                layer_norm(&x, &weight, &bias, eps, &mut normed).unwrap();
                QuantInput::LayerNormed {
                    x: &x,
                    weight: &weight,
                    bias: &bias,
                    eps,
                }
            } else {
                rms_norm(&x, &weight, eps, &mut normed).unwrap();
                QuantInput::RmsNormed {
                    x: &x,
                    weight: &weight,
                    eps,
                }
            };
            let k_padded = k.div_ceil(16) * 16;
            for layout in [ActLayout::Blocked, ActLayout::Tiles] {
                let expect = quantize_in(layout, &normed, m, k);
                for pool in &pools {
                    let threads = pool.current_num_threads();
                    // Stale contents from another shape must not survive either.
                    let mut q = quantize_in(layout, &x, m, k);
                    pool.install(|| quantize_input_for(layout, input, m, k, k_padded, &mut q))
                        .unwrap();
                    let what =
                        format!("layer norm {layer}, {layout:?}, m {m} k {k}, {threads} threads");
                    assert_eq!(q.data(), expect.data(), "{what}");
                    assert_eq!(q.row_sums(), expect.row_sums(), "{what}");
                    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(q.row_dequant()), bits(expect.row_dequant()), "{what}");
                }
            }
        }
    }

    #[test]
    fn normed_input_errors_name_the_element_and_the_parameters() {
        let mut q = QuantizedActivations::new();
        let weight = [1.0f32; 4];
        let mut x = [0.5f32; 8];
        x[6] = f32::NAN;
        let input = QuantInput::RmsNormed {
            x: &x,
            weight: &weight,
            eps: 1e-6,
        };
        let err = quantize_input(input, 2, 4, 16, &mut q).unwrap_err();
        assert!(
            matches!(err, KernelError::NonFinite { row: 1, col: 2, .. }),
            "{err}"
        );
        // Finite activations, but a weight that makes the normalized row non-finite.
        let bad_weight = [1.0, f32::INFINITY, 1.0, 1.0];
        let input = QuantInput::RmsNormed {
            x: &[0.5; 8],
            weight: &bad_weight,
            eps: 1e-6,
        };
        let err = quantize_input(input, 2, 4, 16, &mut q).unwrap_err();
        assert!(
            matches!(err, KernelError::NonFinite { col: 1, .. }),
            "{err}"
        );
        let input = QuantInput::RmsNormed {
            x: &[0.5; 8],
            weight: &weight[..3],
            eps: 1e-6,
        };
        let err = quantize_input(input, 2, 4, 16, &mut q).unwrap_err();
        assert!(matches!(err, KernelError::LengthMismatch { .. }), "{err}");
        let input = QuantInput::LayerNormed {
            x: &[0.5; 8],
            weight: &weight,
            bias: &weight[..2],
            eps: 1e-6,
        };
        let err = quantize_input(input, 2, 4, 16, &mut q).unwrap_err();
        assert!(
            matches!(
                err,
                KernelError::LengthMismatch {
                    what: "norm bias",
                    ..
                }
            ),
            "{err}"
        );
    }
}
