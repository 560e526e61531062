//! The unit of work every GEMM implementation computes: one register tile of
//! [`ROWS_PER_BLOCK`] (12) activation rows × [`PANEL_COLS`] (32) output columns over one chunk of
//! K, plus the shared epilogue after the last chunk. The driver in `dispatch` splits a GEMM into
//! tiles and K chunks so that a chunk of the weight panel stays in L1 for every row block.

use super::pack::PANEL_COLS;
use super::quant::ROWS_PER_BLOCK;

/// Where a tile's final results go.
#[derive(Clone, Copy)]
pub(crate) enum TileOutput {
    /// f32 outputs: `((Σ c·q − Σq) as f32) · (γ[n] · d[m]) (+ b[n])`.
    F32(*mut f32),
    /// The exact corrected integer sums `Σ_k q·t` (for exactness tests).
    I32(*mut i32),
    /// The FFN's gating fused into the epilogue: the f32 result `y` of [`TileOutput::F32`]
    /// scales what the output already holds (the up projection), `out = relu(y)² · out`, with
    /// `relu(y) = if y > 0 { y } else { 0 }` — the operations of `ops::relu_squared_mul` in its
    /// order.
    Relu2Mul(*mut f32),
    /// A residual connection fused into the epilogue: the f32 result `y` of [`TileOutput::F32`]
    /// is added to what the output already holds (the residual stream), `out = out + y` — the
    /// operation of `ops::add_in_place`.
    AddTo(*mut f32),
}

// SAFETY: the driver gives each tile a disjoint rectangle of the output (see `dispatch::run`).
unsafe impl Send for TileOutput {}
unsafe impl Sync for TileOutput {}

impl TileOutput {
    /// The same output advanced by `elements`.
    ///
    /// # Safety
    /// `elements` must stay within the output buffer.
    pub(crate) unsafe fn offset(self, elements: usize) -> Self {
        // SAFETY: forwarded.
        unsafe {
            match self {
                TileOutput::F32(p) => TileOutput::F32(p.add(elements)),
                TileOutput::I32(p) => TileOutput::I32(p.add(elements)),
                TileOutput::Relu2Mul(p) => TileOutput::Relu2Mul(p.add(elements)),
                TileOutput::AddTo(p) => TileOutput::AddTo(p.add(elements)),
            }
        }
    }
}

/// Raw accumulators of one tile between K chunks: row-major 12 × 32.
pub(crate) type Accumulators = [[i32; PANEL_COLS]; ROWS_PER_BLOCK];

/// One 12 × 32 tile over one K chunk. Pointers are valid for the stated extents for the duration
/// of the call; the output rows `0..rows` and columns `0..cols` (at stride `ldo`) and `carry` are
/// written by this tile only.
pub(crate) struct Tile {
    /// `k_blocks · 16 · ROWS_PER_BLOCK` interleaved activation bytes (quant.rs layout) of the chunk.
    pub act: *const u8,
    /// `k_blocks · 512` unpacked weight codes of the chunk ([`unpack_panel`] layout).
    pub weights: *const u8,
    pub k_blocks: usize,
    /// Accumulators carried between chunks: read unless `first`, written unless `last`.
    pub carry: *mut Accumulators,
    pub first: bool,
    pub last: bool,
    /// Where the results go after the last chunk (12 row values). Its `rows` (1..=12) also
    /// tells the kernels which rows are real: they may skip rows `rows..12`, whose carried
    /// accumulators are then left undefined (the epilogue never reads them).
    pub epi: Epilogue,
}

impl Tile {
    /// The rows a kernel must compute: `epi.rows`, and a whole block for a value outside 1..=12
    /// (so that no kernel reads past its block).
    #[inline(always)]
    pub(crate) fn real_rows(&self) -> usize {
        match self.epi.rows {
            rows @ 1..=ROWS_PER_BLOCK => rows,
            _ => ROWS_PER_BLOCK,
        }
    }
}

/// Where and how a finished tile or block is written, shared by every kernel: rows `0..rows`
/// and columns `0..cols` of the output at stride `ldo`, with the per-row and per-column values
/// of the math contract.
pub(crate) struct Epilogue {
    /// One value per row of the tile or block.
    pub row_sums: *const i32,
    pub row_dequant: *const f32,
    /// 32 values each (padded to whole panels); `bias` may be null.
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
pub(crate) unsafe fn epilogue_scalar(acc: &Accumulators, tile: &Tile) {
    let tile = &tile.epi;
    for (r, acc_row) in acc.iter().enumerate().take(tile.rows) {
        // SAFETY (all reads/writes below): r < rows <= 12, c < cols <= 32, per the Tile invariants.
        let sum = unsafe { *tile.row_sums.add(r) };
        let dequant = unsafe { *tile.row_dequant.add(r) };
        for (c, &raw) in acc_row.iter().enumerate().take(tile.cols) {
            let v = raw - sum;
            match tile.out {
                TileOutput::I32(out) => unsafe { *out.add(r * tile.ldo + c) = v },
                TileOutput::F32(out) | TileOutput::Relu2Mul(out) | TileOutput::AddTo(out) => {
                    let factor = unsafe { *tile.col_scales.add(c) } * dequant;
                    let mut y = v as f32 * factor;
                    if !tile.bias.is_null() {
                        y += unsafe { *tile.bias.add(c) };
                    }
                    let dst = unsafe { out.add(r * tile.ldo + c) };
                    match tile.out {
                        TileOutput::Relu2Mul(_) => {
                            let relu = if y > 0.0 { y } else { 0.0 };
                            y = relu * relu * unsafe { *dst };
                        }
                        TileOutput::AddTo(_) => y += unsafe { *dst },
                        _ => {}
                    }
                    unsafe { *dst = y };
                }
            }
        }
    }
}

/// Ends a chunk for kernels that keep their accumulators in an [`Accumulators`] array: carry them
/// to the next chunk, or run the epilogue after the last.
///
/// # Safety
/// The invariants of [`Tile`].
#[inline(always)]
pub(crate) unsafe fn finish_chunk(acc: &Accumulators, tile: &Tile) {
    if tile.last {
        // SAFETY: forwarded.
        unsafe { epilogue_scalar(acc, tile) }
    } else {
        // SAFETY: `carry` is valid for writes and owned by this tile.
        unsafe { *tile.carry = *acc }
    }
}

/// The accumulators a chunk starts from: zero for the first chunk, else the carried ones.
///
/// # Safety
/// The invariants of [`Tile`].
#[inline(always)]
pub(crate) unsafe fn start_chunk(tile: &Tile) -> Accumulators {
    if tile.first {
        [[0; PANEL_COLS]; ROWS_PER_BLOCK]
    } else {
        // SAFETY: `carry` holds the previous chunk's accumulators.
        unsafe { *tile.carry }
    }
}

/// Bytes of one unpacked 16-k block of a panel: 4 groups × 2 halves × 64 bytes.
pub(crate) const UNPACKED_BLOCK_BYTES: usize = 512;

/// Expands packed blocks of one panel (2-bit codes, pack.rs layout) into the operand layout of the
/// tile kernels, one byte per code:
///
/// ```text
/// dst[(kb·4 + i)·128 + h·64 + 4j + e] = c[32p + 16h + j, 16kb + 4i + e] ∈ {0, 1, 2}
/// ```
///
/// i.e. for each 4-k group, the two 64-byte registers `vpdpbusd` multiplies. A chunk is unpacked
/// once and reused for every block of rows while it sits in L1, so the kernels' inner loops only
/// load, broadcast and multiply.
pub(crate) fn unpack_panel(src: &[u8], dst: &mut [u8]) {
    debug_assert_eq!(dst.len(), src.len() * 4);
    unpack_panel_mv(src, dst)
}

super::ops::multiversion!(fn unpack_panel_mv(src: &[u8], dst: &mut [u8]) => unpack_panel_generic);

#[inline(always)]
fn unpack_panel_generic(src: &[u8], dst: &mut [u8]) {
    for (block, out) in src
        .chunks_exact(128)
        .zip(dst.chunks_exact_mut(UNPACKED_BLOCK_BYTES))
    {
        for (i, group) in out.chunks_exact_mut(128).enumerate() {
            let shift = 2 * i as u32;
            for (d, &b) in group.iter_mut().zip(block) {
                *d = (b >> shift) & 3;
            }
        }
    }
}

/// Portable scalar implementation over the unpacked layouts (the fallback on CPUs without a SIMD
/// kernel).
///
/// # Safety
/// The invariants of [`Tile`].
pub(crate) unsafe fn tile_scalar(tile: &Tile) {
    // SAFETY: extents as documented on `Tile`.
    let mut acc = unsafe { start_chunk(tile) };
    let act = unsafe { std::slice::from_raw_parts(tile.act, tile.k_blocks * 16 * ROWS_PER_BLOCK) };
    let weights =
        unsafe { std::slice::from_raw_parts(tile.weights, tile.k_blocks * UNPACKED_BLOCK_BYTES) };
    // One 4-k group: 4 activation bytes per row and 128 weight bytes (32 columns × 4).
    let group_bytes = 4 * ROWS_PER_BLOCK;
    for (a_group, w_group) in act.chunks_exact(group_bytes).zip(weights.chunks_exact(128)) {
        for (r, acc_row) in acc.iter_mut().enumerate() {
            let q = &a_group[r * 4..r * 4 + 4];
            for (a, codes) in acc_row.iter_mut().zip(w_group.chunks_exact(4)) {
                for (&c, &qe) in codes.iter().zip(q) {
                    *a += i32::from(c) * i32::from(qe as i8);
                }
            }
        }
    }
    // SAFETY: forwarded invariants.
    unsafe { finish_chunk(&acc, tile) };
}
