//! x86-64 tile kernels: AVX-512 VNNI (`vpdpbusd`) and AVX2 (`vpmaddubsw` + `vpmaddwd`).
//!
//! Both multiply the unsigned weight codes `c = t + 1 ∈ {0,1,2}` by the signed int8 activations
//! and accumulate in int32; the epilogue subtracts Σq per row (Σ c·q − Σ q = Σ t·q).

use super::pack::PANEL_COLS;
use super::quant::ROWS_PER_BLOCK;
use super::tile::{Accumulators, Epilogue, Tile, TileOutput, finish_chunk, start_chunk};
use std::arch::x86_64::*;

pub(crate) fn avx512vnni_supported() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vnni")
}

pub(crate) fn avx2_supported() -> bool {
    is_x86_feature_detected!("avx2")
}

/// How far ahead of its loads the VNNI loop prefetches activations: 32 groups of 12 rows × 4
/// bytes, about 400 cycles of `vpdpbusd` at peak, enough to cover an L3 hit. Measured on the
/// 625×2560×2560 shape at 1 thread: efficiency 0.61 without, 0.69 with (1024 to 3072 bytes are
/// within the noise of each other).
const ACT_PREFETCH_BYTES: usize = 1536;

/// 12 rows × 32 columns: 24 zmm accumulators (row r, half h). Per 4-k group: two 64-byte weight
/// loads from the unpacked chunk and one `vpbroadcastd` of 4 activation bytes per row, each used by
/// two `vpdpbusd` — no shuffles or unpacking in the loop.
///
/// The last row block of a GEMM usually holds fewer than 12 real rows (the LLM's 625 tokens are
/// 52 blocks and 1 row); it runs a tile of just those rows rather than multiplying the zero
/// padding.
///
/// # Safety
/// The [`Tile`] invariants, and the CPU supports AVX-512 F/BW/VNNI (`avx512vnni_supported`).
pub(crate) unsafe fn tile_avx512vnni(tile: &Tile) {
    // SAFETY: forwarded; each instance touches only its first R rows (R <= 12).
    unsafe {
        match tile.real_rows() {
            1 => tile_vnni::<1>(tile),
            2 => tile_vnni::<2>(tile),
            3 => tile_vnni::<3>(tile),
            4 => tile_vnni::<4>(tile),
            5 => tile_vnni::<5>(tile),
            6 => tile_vnni::<6>(tile),
            7 => tile_vnni::<7>(tile),
            8 => tile_vnni::<8>(tile),
            9 => tile_vnni::<9>(tile),
            10 => tile_vnni::<10>(tile),
            11 => tile_vnni::<11>(tile),
            _ => tile_vnni::<ROWS_PER_BLOCK>(tile),
        }
    }
}

/// The VNNI tile on its first `R` rows (`R <= 12`). Rows `R..12` of the carried accumulators
/// are neither read nor written: the epilogue never reads them.
///
/// # Safety
/// As [`tile_avx512vnni`], with `R >= tile.epi.rows`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn tile_vnni<const R: usize>(tile: &Tile) {
    let mut acc = [_mm512_setzero_si512(); 2 * ROWS_PER_BLOCK];
    if !tile.first {
        let carry = tile.carry as *const i32;
        for (i, a) in acc.iter_mut().enumerate().take(2 * R) {
            // SAFETY: `carry` holds 12 × 32 i32 = 24 zmm.
            *a = unsafe { _mm512_loadu_si512(carry.add(16 * i).cast()) };
        }
    }
    let mut w = tile.weights;
    let mut a = tile.act as *const i32;
    for _ in 0..tile.k_blocks * 4 {
        // The weight chunk sits in L1, but the activations stream in from L2 or L3: each row
        // block's chunk is read once per panel. The hardware prefetchers stop at every 4 KB
        // page, so fetch ahead into L1 explicitly (one line per 48-byte group covers every
        // line). A prefetch never faults: past the tile's end it is merely wasted.
        _mm_prefetch::<_MM_HINT_T0>((a as *const i8).wrapping_add(ACT_PREFETCH_BYTES));
        // SAFETY: w points at the 128 weight bytes of this 4-k group, a at its 4-byte activation
        // words (one per row), both inside the tile's extents.
        unsafe {
            let c0 = _mm512_loadu_si512(w.cast());
            let c1 = _mm512_loadu_si512(w.add(64).cast());
            for r in 0..R {
                let q = _mm512_set1_epi32(a.add(r).read_unaligned());
                acc[2 * r] = _mm512_dpbusd_epi32(acc[2 * r], c0, q);
                acc[2 * r + 1] = _mm512_dpbusd_epi32(acc[2 * r + 1], c1, q);
            }
            w = w.add(128);
            a = a.add(ROWS_PER_BLOCK);
        }
    }

    let e = &tile.epi;
    match e.out {
        _ if !tile.last => {
            let carry = tile.carry as *mut i32;
            for (i, a) in acc.iter().enumerate().take(2 * R) {
                // SAFETY: `carry` holds 24 zmm and belongs to this tile.
                unsafe { _mm512_storeu_si512(carry.add(16 * i).cast(), *a) };
            }
        }
        // The common case straight from the registers: a full tile of plain f32 outputs.
        TileOutput::F32(out) if R == ROWS_PER_BLOCK && e.rows == R && e.cols == PANEL_COLS => {
            // SAFETY: Tile invariants (12 row values, 32 column values, full 12 × 32 output
            // rectangle of this tile's own).
            unsafe {
                let scales = [
                    _mm512_loadu_ps(e.col_scales),
                    _mm512_loadu_ps(e.col_scales.add(16)),
                ];
                let bias = (!e.bias.is_null())
                    .then(|| [_mm512_loadu_ps(e.bias), _mm512_loadu_ps(e.bias.add(16))]);
                for r in 0..ROWS_PER_BLOCK {
                    let sum = _mm512_set1_epi32(*e.row_sums.add(r));
                    let dequant = _mm512_set1_ps(*e.row_dequant.add(r));
                    for h in 0..2 {
                        let v = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[2 * r + h], sum));
                        let mut y = _mm512_mul_ps(v, _mm512_mul_ps(scales[h], dequant));
                        if let Some(b) = bias {
                            y = _mm512_add_ps(y, b[h]);
                        }
                        _mm512_storeu_ps(out.add(r * e.ldo + 16 * h), y);
                    }
                }
            }
        }
        // Tails and the other outputs: through memory to the shared epilogue.
        _ => {
            let mut raw: Accumulators = [[0; PANEL_COLS]; ROWS_PER_BLOCK];
            for (r, row) in raw.iter_mut().enumerate().take(R) {
                // SAFETY: each row array holds 32 i32 = two zmm stores.
                unsafe {
                    _mm512_storeu_si512(row.as_mut_ptr().cast(), acc[2 * r]);
                    _mm512_storeu_si512(row.as_mut_ptr().add(16).cast(), acc[2 * r + 1]);
                }
            }
            // SAFETY: the Tile invariants (12 row values, 32 column values, an output rectangle
            // of this tile's own); AVX-512 F is enabled.
            unsafe { epilogue_avx512(raw.as_flattened(), e) };
        }
    }
}

/// The epilogue of the math contract on a finished tile or block of the AVX-512 kernels (VNNI
/// and AMX), 16 columns at a time with masked stores: `v = acc − Σq`, then
/// `(v as f32) · (γ[n] · d[m]) (+ b[n])` — the operations of `tile::epilogue_scalar` in the same
/// order. `acc` holds the raw sums row-major, 32 per row.
///
/// Kept out of line, reading the accumulators from memory: whether LLVM keeps the VNNI tile's 24
/// accumulators in registers depends on everything that follows its loop. Adding one runtime
/// flag to the tile's inlined epilogue made it store all 24 to the stack on every iteration,
/// which halved the kernel's speed. The tile therefore writes only full tiles of plain f32
/// outputs from its registers, and sends tails and the other outputs here.
///
/// # Safety
/// The CPU supports AVX-512 F; `e.rows` row values and 32 column values are readable; the
/// output rectangle `rows × cols` at stride `ldo` is writable and belongs to this block.
#[target_feature(enable = "avx512f")]
#[inline(never)]
pub(crate) unsafe fn epilogue_avx512(acc: &[i32], e: &Epilogue) {
    assert!(
        acc.len() >= e.rows * PANEL_COLS,
        "epilogue: accumulators too short"
    );
    let masks: [__mmask16; 2] = [
        (((1u32 << e.cols.min(16)) - 1) & 0xffff) as __mmask16,
        if e.cols > 16 {
            (((1u32 << (e.cols - 16)) - 1) & 0xffff) as __mmask16
        } else {
            0
        },
    ];
    // SAFETY: the function's contract.
    unsafe {
        let scales = [
            _mm512_loadu_ps(e.col_scales),
            _mm512_loadu_ps(e.col_scales.add(16)),
        ];
        let bias =
            (!e.bias.is_null()).then(|| [_mm512_loadu_ps(e.bias), _mm512_loadu_ps(e.bias.add(16))]);
        for r in 0..e.rows {
            let sum = _mm512_set1_epi32(*e.row_sums.add(r));
            let dequant = _mm512_set1_ps(*e.row_dequant.add(r));
            for h in 0..2 {
                if masks[h] == 0 {
                    continue;
                }
                let raw = _mm512_loadu_si512(acc.as_ptr().add(r * PANEL_COLS + 16 * h).cast());
                let v = _mm512_sub_epi32(raw, sum);
                let at = r * e.ldo + 16 * h;
                match e.out {
                    TileOutput::I32(out) => _mm512_mask_storeu_epi32(out.add(at), masks[h], v),
                    TileOutput::F32(out) | TileOutput::Relu2Mul(out) | TileOutput::AddTo(out) => {
                        let mut y =
                            _mm512_mul_ps(_mm512_cvtepi32_ps(v), _mm512_mul_ps(scales[h], dequant));
                        if let Some(b) = bias {
                            y = _mm512_add_ps(y, b[h]);
                        }
                        match e.out {
                            TileOutput::Relu2Mul(_) => {
                                // max(y, 0) returns its second operand for NaN and for ±0, so it
                                // is exactly `if y > 0 { y } else { 0 }`.
                                let relu = _mm512_max_ps(y, _mm512_setzero_ps());
                                let up = _mm512_maskz_loadu_ps(masks[h], out.add(at));
                                y = _mm512_mul_ps(_mm512_mul_ps(relu, relu), up);
                            }
                            TileOutput::AddTo(_) => {
                                let x = _mm512_maskz_loadu_ps(masks[h], out.add(at));
                                y = _mm512_add_ps(y, x);
                            }
                            _ => {}
                        }
                        _mm512_mask_storeu_ps(out.add(at), masks[h], y);
                    }
                }
            }
        }
    }
}

/// AVX2: sub-tiles of 4 rows × 16 columns (8 ymm accumulators each, 16 registers in all).
/// `vpmaddubsw` forms int16 sums of two products (|c·q| ≤ 2·128, so a pair is at most 512: no
/// saturation) and `vpmaddwd` with ones widens them to int32, added to the accumulators every
/// step — never accumulated in int16.
///
/// # Safety
/// The [`Tile`] invariants, and the CPU supports AVX2.
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn tile_avx2(tile: &Tile) {
    let ones = _mm256_set1_epi16(1);
    // SAFETY: Tile invariants.
    let mut raw = unsafe { start_chunk(tile) };
    for half in 0..2 {
        // Only the quads that hold real rows (the last row block is usually partial).
        for quad in 0..tile.real_rows().div_ceil(4) {
            let mut acc = [_mm256_setzero_si256(); 8];
            for r in 0..4 {
                let row = &raw[4 * quad + r][16 * half..16 * half + 16];
                // SAFETY: `row` holds 16 i32 = two ymm loads.
                unsafe {
                    acc[2 * r] = _mm256_loadu_si256(row.as_ptr().cast());
                    acc[2 * r + 1] = _mm256_loadu_si256(row.as_ptr().add(8).cast());
                }
            }
            let mut w = tile.weights.wrapping_add(64 * half);
            let mut a = (tile.act as *const i32).wrapping_add(4 * quad);
            for _ in 0..tile.k_blocks * 4 {
                // SAFETY: the 64 weight bytes of this half in this 4-k group, and the 4-byte
                // activation words of rows 4·quad..4·quad+4, inside the tile's extents.
                unsafe {
                    let c_lo = _mm256_loadu_si256(w.cast());
                    let c_hi = _mm256_loadu_si256(w.add(32).cast());
                    for r in 0..4 {
                        let q = _mm256_set1_epi32(a.add(r).read_unaligned());
                        let p_lo = _mm256_madd_epi16(_mm256_maddubs_epi16(c_lo, q), ones);
                        let p_hi = _mm256_madd_epi16(_mm256_maddubs_epi16(c_hi, q), ones);
                        acc[2 * r] = _mm256_add_epi32(acc[2 * r], p_lo);
                        acc[2 * r + 1] = _mm256_add_epi32(acc[2 * r + 1], p_hi);
                    }
                }
                w = w.wrapping_add(128);
                a = a.wrapping_add(ROWS_PER_BLOCK);
            }
            for r in 0..4 {
                let row = &mut raw[4 * quad + r][16 * half..16 * half + 16];
                // SAFETY: `row` holds 16 i32 = two ymm stores.
                unsafe {
                    _mm256_storeu_si256(row.as_mut_ptr().cast(), acc[2 * r]);
                    _mm256_storeu_si256(row.as_mut_ptr().add(8).cast(), acc[2 * r + 1]);
                }
            }
        }
    }
    // SAFETY: forwarded Tile invariants.
    unsafe { finish_chunk(&raw, tile) };
}

pub(crate) fn avxvnni_supported() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("avxvnni")
}

/// The CPU can run the 256-bit VNNI body with its EVEX encoding (AVX-512 VNNI + VL).
pub(crate) fn avx512vnni_ymm_supported() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512vnni")
}

/// Rows of the 256-bit VNNI register tile: 6 rows × 16 columns are 12 ymm accumulators, plus two
/// weight registers and one broadcast: 15 of the 16 ymm registers (VEX code has no more).
const YMM_TILE_ROWS: usize = 6;

/// The 256-bit `vpdpbusd` tile body, written once and compiled twice (see its two instances
/// below): VEX-encoded for AVX-VNNI (Intel Alder Lake and later client CPUs, Sapphire Rapids,
/// Zen 5), EVEX-encoded for AVX-512 VNNI + VL, so that every AVX-512 VNNI CPU runs (and tests)
/// the body the AVX-VNNI machines run.
///
/// The 12 × 32 tile runs as four 6 × 16 sub-tiles, each over the whole K chunk with its 12
/// accumulators in registers: per 4-k group two 32-byte weight loads (16 columns × 4 k), and per
/// row one 4-byte activation broadcast used by two `vpdpbusd`. The chunk's weights (up to 32 KB)
/// and activations (up to 12 KB) are read twice, from L1. Sums are exact int32 like every
/// kernel's; the epilogue is [`epilogue_avx2`], the scalar contract's operations in order.
macro_rules! vnni_ymm_tile {
    ($(#[$doc:meta])* $name:ident, $features:literal, $dpbusd:ident) => {
        $(#[$doc])*
        #[target_feature(enable = $features)]
        pub(crate) unsafe fn $name(tile: &Tile) {
            // SAFETY: Tile invariants.
            let mut raw = unsafe { start_chunk(tile) };
            let row_halves = tile.real_rows().div_ceil(YMM_TILE_ROWS);
            for rh in 0..row_halves {
                for ch in 0..2 {
                    let mut acc = [_mm256_setzero_si256(); 2 * YMM_TILE_ROWS];
                    for r in 0..YMM_TILE_ROWS {
                        let row = &raw[YMM_TILE_ROWS * rh + r][16 * ch..16 * ch + 16];
                        // SAFETY: `row` holds 16 i32 = two ymm loads.
                        unsafe {
                            acc[2 * r] = _mm256_loadu_si256(row.as_ptr().cast());
                            acc[2 * r + 1] = _mm256_loadu_si256(row.as_ptr().add(8).cast());
                        }
                    }
                    let mut w = tile.weights.wrapping_add(64 * ch);
                    let mut a = (tile.act as *const i32).wrapping_add(YMM_TILE_ROWS * rh);
                    for _ in 0..tile.k_blocks * 4 {
                        _mm_prefetch::<_MM_HINT_T0>(
                            (a as *const i8).wrapping_add(ACT_PREFETCH_BYTES),
                        );
                        // SAFETY: the 64 weight bytes of this column half in this 4-k group,
                        // and the 4-byte activation words of rows 6·rh..6·rh+6, inside the
                        // tile's extents (a block always holds 12 rows, padding included).
                        unsafe {
                            let c0 = _mm256_loadu_si256(w.cast());
                            let c1 = _mm256_loadu_si256(w.add(32).cast());
                            for r in 0..YMM_TILE_ROWS {
                                let q = _mm256_set1_epi32(a.add(r).read_unaligned());
                                acc[2 * r] = $dpbusd(acc[2 * r], c0, q);
                                acc[2 * r + 1] = $dpbusd(acc[2 * r + 1], c1, q);
                            }
                        }
                        w = w.wrapping_add(128);
                        a = a.wrapping_add(ROWS_PER_BLOCK);
                    }
                    for r in 0..YMM_TILE_ROWS {
                        let row = &mut raw[YMM_TILE_ROWS * rh + r][16 * ch..16 * ch + 16];
                        // SAFETY: `row` holds 16 i32 = two ymm stores.
                        unsafe {
                            _mm256_storeu_si256(row.as_mut_ptr().cast(), acc[2 * r]);
                            _mm256_storeu_si256(row.as_mut_ptr().add(8).cast(), acc[2 * r + 1]);
                        }
                    }
                }
            }
            if tile.last {
                // SAFETY: the Tile invariants; AVX2 is enabled.
                unsafe { epilogue_avx2(raw.as_flattened(), &tile.epi) };
            } else {
                // SAFETY: `carry` is valid for writes and owned by this tile.
                unsafe { *tile.carry = raw };
            }
        }
    };
}

vnni_ymm_tile!(
    /// AVX-VNNI: the 256-bit body with VEX-encoded `vpdpbusd` (`{vex} vpdpbusd ymm`).
    ///
    /// # Safety
    /// The [`Tile`] invariants, and the CPU supports AVX2 and AVX-VNNI (`avxvnni_supported`).
    tile_avxvnni,
    "avx2,avxvnni",
    _mm256_dpbusd_avx_epi32
);

vnni_ymm_tile!(
    /// The same body with EVEX-encoded `vpdpbusd ymm` (AVX-512 VNNI + VL).
    ///
    /// # Safety
    /// The [`Tile`] invariants, and the CPU supports AVX2 and AVX-512 F/VL/VNNI
    /// (`avx512vnni_ymm_supported`).
    tile_avx512vnni_ymm,
    "avx2,avx512f,avx512vl,avx512vnni",
    _mm256_dpbusd_epi32
);

/// The epilogue of the math contract on a finished tile, 8 columns at a time (masked for a
/// partial panel): `v = acc − Σq`, then `(v as f32) · (γ[n] · d[m]) (+ b[n])`, and for the fused
/// FFN gate `relu(y)² · up` — the operations of `tile::epilogue_scalar` in the same order.
/// `acc` holds the raw sums row-major, 32 per row.
///
/// # Safety
/// The CPU supports AVX2; `e.rows` row values and 32 column values are readable; the output
/// rectangle `rows × cols` at stride `ldo` is writable and belongs to this tile.
#[target_feature(enable = "avx2")]
#[inline(never)]
pub(crate) unsafe fn epilogue_avx2(acc: &[i32], e: &Epilogue) {
    assert!(
        acc.len() >= e.rows * PANEL_COLS,
        "epilogue: accumulators too short"
    );
    let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    let masks: [__m256i; 4] = std::array::from_fn(|q| {
        _mm256_cmpgt_epi32(_mm256_set1_epi32(e.cols as i32 - 8 * q as i32), lane)
    });
    let active = e.cols.min(PANEL_COLS).div_ceil(8);
    // SAFETY: the function's contract (col_scales and bias hold 32 values; masked lanes of the
    // output are neither read nor written).
    unsafe {
        for r in 0..e.rows {
            let sum = _mm256_set1_epi32(*e.row_sums.add(r));
            let dequant = _mm256_set1_ps(*e.row_dequant.add(r));
            for (q, &mask) in masks.iter().enumerate().take(active) {
                let raw = _mm256_loadu_si256(acc.as_ptr().add(r * PANEL_COLS + 8 * q).cast());
                let v = _mm256_sub_epi32(raw, sum);
                let at = r * e.ldo + 8 * q;
                match e.out {
                    TileOutput::I32(out) => _mm256_maskstore_epi32(out.add(at), mask, v),
                    TileOutput::F32(out) | TileOutput::Relu2Mul(out) | TileOutput::AddTo(out) => {
                        let factor =
                            _mm256_mul_ps(_mm256_loadu_ps(e.col_scales.add(8 * q)), dequant);
                        let mut y = _mm256_mul_ps(_mm256_cvtepi32_ps(v), factor);
                        if !e.bias.is_null() {
                            y = _mm256_add_ps(y, _mm256_loadu_ps(e.bias.add(8 * q)));
                        }
                        match e.out {
                            TileOutput::Relu2Mul(_) => {
                                // max(y, 0) returns its second operand for NaN and for ±0:
                                // exactly `if y > 0 { y } else { 0 }`.
                                let relu = _mm256_max_ps(y, _mm256_setzero_ps());
                                let up = _mm256_maskload_ps(out.add(at), mask);
                                y = _mm256_mul_ps(_mm256_mul_ps(relu, relu), up);
                            }
                            TileOutput::AddTo(_) => {
                                let x = _mm256_maskload_ps(out.add(at), mask);
                                y = _mm256_add_ps(y, x);
                            }
                            _ => {}
                        }
                        _mm256_maskstore_ps(out.add(at), mask, y);
                    }
                }
            }
        }
    }
}
