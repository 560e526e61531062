//! aarch64 tile kernels over the unpacked operand layout (tile.rs): NEON `sdot` (dotprod, written
//! with `asm!` because `vdotq_s32` is still nightly-only) and a `smull` + `sadalp` fallback for
//! cores without dotprod. Both multiply codes `c ∈ {0,1,2}` by int8 activations into int32
//! accumulators; the shared epilogue subtracts Σq per row.

use super::quant::ROWS_PER_BLOCK;
use super::tile::{Tile, finish_chunk, start_chunk};
use std::arch::aarch64::*;
use std::arch::asm;

pub(crate) fn dotprod_supported() -> bool {
    std::arch::is_aarch64_feature_detected!("dotprod")
}

/// `acc += Σ_e w[4j+e] · a[4·LANE+e]` per 32-bit lane j (SDOT by element).
macro_rules! sdot_lane {
    ($acc:expr, $w:expr, $a:expr, $lane:literal) => {
        // SAFETY: register-only instruction; the enclosing function enables dotprod.
        unsafe {
            asm!(
                concat!("sdot {acc:v}.4s, {w:v}.16b, {a:v}.4b[", $lane, "]"),
                acc = inout(vreg) $acc,
                w = in(vreg) $w,
                a = in(vreg) $a,
                options(pure, nomem, nostack)
            )
        }
    };
}

/// Sub-tiles of 4 rows × 16 columns: 16 accumulators, 4 weight registers (4 columns × 4 k
/// each) and one activation register holding the 4-byte words of the 4 rows.
///
/// # Safety
/// The [`Tile`] invariants, and the CPU supports dotprod.
#[target_feature(enable = "neon,dotprod")]
pub(crate) unsafe fn tile_sdot(tile: &Tile) {
    // SAFETY: Tile invariants.
    let mut raw = unsafe { start_chunk(tile) };
    for half in 0..2 {
        // Only the quads that hold real rows (the last row block is usually partial).
        for quad in 0..tile.real_rows().div_ceil(4) {
            let mut acc = [[vdupq_n_s32(0); 4]; 4];
            for (r, row) in acc.iter_mut().enumerate() {
                for (c, a) in row.iter_mut().enumerate() {
                    // SAFETY: 4 i32 inside the 32-column row.
                    *a = unsafe { vld1q_s32(raw[4 * quad + r][16 * half + 4 * c..].as_ptr()) };
                }
            }
            let mut w = tile.weights.wrapping_add(64 * half) as *const i8;
            let mut a = tile.act.wrapping_add(16 * quad) as *const i8;
            for _ in 0..tile.k_blocks * 4 {
                // SAFETY: 64 weight bytes of this half and 16 activation bytes (rows 4·quad..+4)
                // of this 4-k group, inside the tile's extents.
                let (w0, w1, w2, w3, q) = unsafe {
                    (
                        vld1q_s8(w),
                        vld1q_s8(w.add(16)),
                        vld1q_s8(w.add(32)),
                        vld1q_s8(w.add(48)),
                        vld1q_s8(a),
                    )
                };
                for (c, wc) in [w0, w1, w2, w3].into_iter().enumerate() {
                    sdot_lane!(acc[0][c], wc, q, "0");
                    sdot_lane!(acc[1][c], wc, q, "1");
                    sdot_lane!(acc[2][c], wc, q, "2");
                    sdot_lane!(acc[3][c], wc, q, "3");
                }
                w = w.wrapping_add(128);
                a = a.wrapping_add(4 * ROWS_PER_BLOCK);
            }
            for (r, row) in acc.iter().enumerate() {
                for (c, v) in row.iter().enumerate() {
                    // SAFETY: 4 i32 inside the 32-column row.
                    unsafe { vst1q_s32(raw[4 * quad + r][16 * half + 4 * c..].as_mut_ptr(), *v) };
                }
            }
        }
    }
    // SAFETY: forwarded Tile invariants.
    unsafe { finish_chunk(&raw, tile) };
}

/// Without dotprod: sub-tiles of 2 rows × 16 columns. `smull`/`smull2` multiply 8 code bytes
/// (2 columns × 4 k) by the row's 4 activation bytes repeated (|c·q| ≤ 256 fits int16), `sadalp`
/// adds adjacent pairs into int32; a final pairwise add gives one sum per column.
///
/// # Safety
/// The [`Tile`] invariants (NEON is baseline on aarch64).
#[target_feature(enable = "neon")]
pub(crate) unsafe fn tile_smull(tile: &Tile) {
    // SAFETY: Tile invariants.
    let mut raw = unsafe { start_chunk(tile) };
    for half in 0..2 {
        // Only the pairs that hold real rows (the last row block is usually partial).
        for pair in 0..tile.real_rows().div_ceil(2) {
            // acc[r][c][0]: columns 4c, 4c+1 (two partial sums each); acc[r][c][1]: 4c+2, 4c+3
            let mut acc = [[[vdupq_n_s32(0); 2]; 4]; 2];
            let mut w = tile.weights.wrapping_add(64 * half) as *const i8;
            let mut a = tile.act.wrapping_add(8 * pair) as *const i32;
            for _ in 0..tile.k_blocks * 4 {
                // SAFETY: as in `tile_sdot`, rows 2·pair..+2.
                let (ws, q) = unsafe {
                    (
                        [
                            vld1q_s8(w),
                            vld1q_s8(w.add(16)),
                            vld1q_s8(w.add(32)),
                            vld1q_s8(w.add(48)),
                        ],
                        [
                            vreinterpretq_s8_s32(vld1q_dup_s32(a)),
                            vreinterpretq_s8_s32(vld1q_dup_s32(a.add(1))),
                        ],
                    )
                };
                for (r, acc_row) in acc.iter_mut().enumerate() {
                    for (c, wc) in ws.iter().enumerate() {
                        let lo = vmull_s8(vget_low_s8(*wc), vget_low_s8(q[r]));
                        let hi = vmull_high_s8(*wc, q[r]);
                        acc_row[c][0] = vpadalq_s16(acc_row[c][0], lo);
                        acc_row[c][1] = vpadalq_s16(acc_row[c][1], hi);
                    }
                }
                w = w.wrapping_add(128);
                a = a.wrapping_add(ROWS_PER_BLOCK);
            }
            for (r, acc_row) in acc.iter().enumerate() {
                let row = &mut raw[2 * pair + r];
                for (c, v) in acc_row.iter().enumerate() {
                    let sums = vpaddq_s32(v[0], v[1]);
                    let at = 16 * half + 4 * c;
                    // SAFETY: 4 i32 inside the 32-column row.
                    unsafe {
                        let prev = vld1q_s32(row[at..].as_ptr());
                        vst1q_s32(row[at..].as_mut_ptr(), vaddq_s32(prev, sums));
                    }
                }
            }
        }
    }
    // SAFETY: forwarded Tile invariants.
    unsafe { finish_chunk(&raw, tile) };
}
