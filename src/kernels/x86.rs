//! x86-64 tile kernels: AVX-512 VNNI (`vpdpbusd`) and AVX2 (`vpmaddubsw` + `vpmaddwd`).
//!
//! Both multiply the unsigned weight codes `c = t + 1 ∈ {0,1,2}` by the signed int8 activations
//! and accumulate in int32; the epilogue subtracts Σq per row (Σ c·q − Σ q = Σ t·q).

use super::pack::PANEL_COLS;
use super::quant::ROWS_PER_BLOCK;
use super::tile::{Tile, TileOutput, epilogue_scalar};
use std::arch::x86_64::*;

pub(crate) fn avx512vnni_supported() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vnni")
}

pub(crate) fn avx2_supported() -> bool {
    is_x86_feature_detected!("avx2")
}

/// 8 rows × 32 columns: 16 zmm accumulators (row r, half h), 2 packed weight registers per 16 k
/// unpacked in registers by shift + mask, one `vpbroadcastd` of 4 activation bytes per row and
/// 4-k group.
///
/// # Safety
/// The [`Tile`] invariants, and the CPU supports AVX-512 F/BW/VNNI (`avx512vnni_supported`).
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub(crate) unsafe fn tile_avx512vnni(tile: &Tile) {
    let mask = _mm512_set1_epi8(3);
    let mut acc = [_mm512_setzero_si512(); 2 * ROWS_PER_BLOCK];
    let mut w = tile.weights;
    let mut a = tile.act as *const i32;

    macro_rules! group {
        ($shift:literal, $w0:ident, $w1:ident, $i:literal) => {{
            let c0 = _mm512_and_si512(_mm512_srli_epi16::<$shift>($w0), mask);
            let c1 = _mm512_and_si512(_mm512_srli_epi16::<$shift>($w1), mask);
            for r in 0..ROWS_PER_BLOCK {
                // SAFETY: a points at a 128-byte k-block of the activation block: 4 groups × 8 rows.
                let q = _mm512_set1_epi32(unsafe { a.add($i * ROWS_PER_BLOCK + r).read_unaligned() });
                acc[2 * r] = _mm512_dpbusd_epi32(acc[2 * r], c0, q);
                acc[2 * r + 1] = _mm512_dpbusd_epi32(acc[2 * r + 1], c1, q);
            }
        }};
    }

    for _ in 0..tile.k_blocks {
        // SAFETY: w points at a 128-byte k-block of the weight panel; a at the matching 128 bytes.
        let (w0, w1) = unsafe {
            (
                _mm512_loadu_si512(w.cast()),
                _mm512_loadu_si512(w.add(64).cast()),
            )
        };
        group!(0, w0, w1, 0);
        group!(2, w0, w1, 1);
        group!(4, w0, w1, 2);
        group!(6, w0, w1, 3);
        // SAFETY: advancing within (or one past) the tile's blocks.
        unsafe {
            w = w.add(128);
            a = a.add(4 * ROWS_PER_BLOCK);
        }
    }

    let full = tile.rows == ROWS_PER_BLOCK && tile.cols == PANEL_COLS;
    match tile.out {
        TileOutput::F32(out) if full => {
            // SAFETY: Tile invariants (8 row values, 32 column values, full 8 × 32 output rect).
            unsafe {
                let scales = [
                    _mm512_loadu_ps(tile.col_scales),
                    _mm512_loadu_ps(tile.col_scales.add(16)),
                ];
                let bias = (!tile.bias.is_null())
                    .then(|| [_mm512_loadu_ps(tile.bias), _mm512_loadu_ps(tile.bias.add(16))]);
                for r in 0..ROWS_PER_BLOCK {
                    let sum = _mm512_set1_epi32(*tile.row_sums.add(r));
                    let dequant = _mm512_set1_ps(*tile.row_dequant.add(r));
                    for h in 0..2 {
                        let v = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[2 * r + h], sum));
                        let mut y = _mm512_mul_ps(v, _mm512_mul_ps(scales[h], dequant));
                        if let Some(b) = bias {
                            y = _mm512_add_ps(y, b[h]);
                        }
                        _mm512_storeu_ps(out.add(r * tile.ldo + 16 * h), y);
                    }
                }
            }
        }
        _ => {
            let mut raw = [[0i32; PANEL_COLS]; ROWS_PER_BLOCK];
            for (r, row) in raw.iter_mut().enumerate() {
                // SAFETY: each row array holds 32 i32 = two zmm stores.
                unsafe {
                    _mm512_storeu_si512(row.as_mut_ptr().cast(), acc[2 * r]);
                    _mm512_storeu_si512(row.as_mut_ptr().add(16).cast(), acc[2 * r + 1]);
                }
            }
            // SAFETY: forwarded Tile invariants.
            unsafe { epilogue_scalar(&raw, tile) };
        }
    }
}

/// AVX2: four sub-tiles of 4 rows × 16 columns (8 ymm accumulators each, 16 registers in all).
/// `vpmaddubsw` forms int16 sums of two products (|c·q| ≤ 2·128, so a pair is at most 512: no
/// saturation) and `vpmaddwd` with ones widens them to int32, added to the accumulators every
/// step — never accumulated in int16.
///
/// # Safety
/// The [`Tile`] invariants, and the CPU supports AVX2.
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn tile_avx2(tile: &Tile) {
    let mask = _mm256_set1_epi8(3);
    let ones = _mm256_set1_epi16(1);
    let mut raw = [[0i32; PANEL_COLS]; ROWS_PER_BLOCK];
    for half in 0..2 {
        for quad in 0..2 {
            let mut acc = [_mm256_setzero_si256(); 8];
            let mut w = tile.weights.wrapping_add(64 * half);
            let mut a = (tile.act as *const i32).wrapping_add(4 * quad);

            macro_rules! group {
                ($shift:literal, $lo:ident, $hi:ident, $i:literal) => {{
                    let c_lo = _mm256_and_si256(_mm256_srli_epi16::<$shift>($lo), mask);
                    let c_hi = _mm256_and_si256(_mm256_srli_epi16::<$shift>($hi), mask);
                    for r in 0..4 {
                        // SAFETY: within the 128-byte activation k-block (group $i, row 4·quad + r).
                        let q = _mm256_set1_epi32(unsafe {
                            a.add($i * ROWS_PER_BLOCK + r).read_unaligned()
                        });
                        let p_lo = _mm256_madd_epi16(_mm256_maddubs_epi16(c_lo, q), ones);
                        let p_hi = _mm256_madd_epi16(_mm256_maddubs_epi16(c_hi, q), ones);
                        acc[2 * r] = _mm256_add_epi32(acc[2 * r], p_lo);
                        acc[2 * r + 1] = _mm256_add_epi32(acc[2 * r + 1], p_hi);
                    }
                }};
            }

            for _ in 0..tile.k_blocks {
                // SAFETY: the 64-byte vector of this half inside the 128-byte weight k-block.
                let (lo, hi) = unsafe {
                    (
                        _mm256_loadu_si256(w.cast()),
                        _mm256_loadu_si256(w.add(32).cast()),
                    )
                };
                group!(0, lo, hi, 0);
                group!(2, lo, hi, 1);
                group!(4, lo, hi, 2);
                group!(6, lo, hi, 3);
                w = w.wrapping_add(128);
                a = a.wrapping_add(4 * ROWS_PER_BLOCK);
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
    unsafe { epilogue_scalar(&raw, tile) };
}
