//! The unit of work every GEMM implementation computes: one register tile of
//! [`ROWS_PER_BLOCK`] (8) activation rows × [`PANEL_COLS`] (32) output columns over the full K,
//! followed by the shared epilogue. The driver in `dispatch` splits a GEMM into tiles.

use super::pack::PANEL_COLS;
use super::quant::ROWS_PER_BLOCK;

/// Where a tile's results go.
#[derive(Clone, Copy)]
pub(crate) enum TileOutput {
    /// f32 outputs: `((Σ c·q − Σq) as f32) · (γ[n] · d[m]) (+ b[n])`.
    F32(*mut f32),
    /// The exact corrected integer sums `Σ_k q·t` (for exactness tests).
    I32(*mut i32),
}

/// One 8 × 32 tile. Pointers are valid for the stated extents for the duration of the call; the
/// output rows `0..rows` and columns `0..cols` (at stride `ldo`) are written by this tile only.
pub(crate) struct Tile {
    /// `ROWS_PER_BLOCK · k_blocks · 16` interleaved activation bytes (quant.rs layout).
    pub act: *const u8,
    /// `k_blocks · 128` packed weight bytes of one panel (pack.rs layout), 64-byte aligned.
    pub weights: *const u8,
    pub k_blocks: usize,
    /// 8 values each.
    pub row_sums: *const i32,
    pub row_dequant: *const f32,
    /// 32 values each; `bias` may be null.
    pub col_scales: *const f32,
    pub bias: *const f32,
    pub out: TileOutput,
    pub ldo: usize,
    pub rows: usize,
    pub cols: usize,
}

/// A tile implementation. Safety: the caller guarantees the pointer invariants of [`Tile`] and that
/// the CPU supports the implementation's target features.
pub(crate) type TileFn = unsafe fn(&Tile);

/// The epilogue on raw (uncorrected, `Σ c·q`) accumulators, element by element. SIMD kernels
/// perform exactly these operations in this order (no fused multiply-add), so results agree bit
/// for bit.
///
/// # Safety
/// `tile`'s pointers must satisfy the invariants of [`Tile`].
#[inline(always)]
pub(crate) unsafe fn epilogue_scalar(acc: &[[i32; PANEL_COLS]; ROWS_PER_BLOCK], tile: &Tile) {
    for (r, acc_row) in acc.iter().enumerate().take(tile.rows) {
        // SAFETY (all reads/writes below): r < rows <= 8, c < cols <= 32, per the Tile invariants.
        let sum = unsafe { *tile.row_sums.add(r) };
        let dequant = unsafe { *tile.row_dequant.add(r) };
        for (c, &raw) in acc_row.iter().enumerate().take(tile.cols) {
            let v = raw - sum;
            match tile.out {
                TileOutput::I32(out) => unsafe { *out.add(r * tile.ldo + c) = v },
                TileOutput::F32(out) => {
                    let factor = unsafe { *tile.col_scales.add(c) } * dequant;
                    let mut y = v as f32 * factor;
                    if !tile.bias.is_null() {
                        y += unsafe { *tile.bias.add(c) };
                    }
                    unsafe { *out.add(r * tile.ldo + c) = y };
                }
            }
        }
    }
}

/// Portable scalar implementation over the packed layouts (the fallback on CPUs without a SIMD
/// kernel). Correct for any layout-conforming input; slow.
///
/// # Safety
/// The invariants of [`Tile`].
pub(crate) unsafe fn tile_scalar(tile: &Tile) {
    let mut acc = [[0i32; PANEL_COLS]; ROWS_PER_BLOCK];
    // SAFETY: extents as documented on `Tile`.
    let act = unsafe { std::slice::from_raw_parts(tile.act, tile.k_blocks * 16 * ROWS_PER_BLOCK) };
    let weights = unsafe { std::slice::from_raw_parts(tile.weights, tile.k_blocks * 128) };
    for (a_block, w_block) in act.chunks_exact(128).zip(weights.chunks_exact(128)) {
        for i in 0..4 {
            for (r, acc_row) in acc.iter_mut().enumerate() {
                let q = &a_block[i * 32 + r * 4..i * 32 + r * 4 + 4];
                for (col, a) in acc_row.iter_mut().enumerate() {
                    let lane = &w_block[(col / 16) * 64 + (col % 16) * 4..][..4];
                    for e in 0..4 {
                        let code = (lane[e] >> (2 * i)) & 3;
                        *a += i32::from(code) * i32::from(q[e] as i8);
                    }
                }
            }
        }
    }
    // SAFETY: forwarded invariants.
    unsafe { epilogue_scalar(&acc, tile) };
}
