//! Intel AMX-INT8 ternary GEMM (Sapphire Rapids and later): `tdpbssd` on 16 × 64-byte tiles.
//!
//! One block is 32 activation rows × 32 output columns (one weight panel): four int32 C tiles
//! (tmm0-3) fed by two activation tiles (tmm4-5: rows 0-15 and 16-31, 64 k each, from the
//! tile layout of `quant.rs`, where a block's steps are one sequential stream) and two weight tiles (tmm6-7: panel columns 0-15 and 16-31).
//! The weight tiles are read straight from the unpacked chunk of `tile::unpack_panel`, whose
//! 4-k groups are exactly AMX's "VNNI" B layout at a row stride of 128 bytes:
//!
//! ```text
//! B_h[g][4j + e] = unpacked[g·128 + h·64 + 4j + e] = c[32p + 16h + j, 4g + e]
//! ```
//!
//! so `C[m][n] += Σ q[m,k] · c[n,k]` with unsigned codes `c = t + 1 ∈ {0,1,2}` (exact as signed
//! bytes too), and the epilogue subtracts Σq per row like every other kernel: the same int32 sums
//! and the same f32 operations, bit for bit. Stable Rust has no AMX intrinsics, hence `asm!`;
//! the compiler never allocates tile registers, so tile state survives between the blocks.

use super::pack::PANEL_COLS;
use super::quant::AMX_ROWS;
use std::arch::asm;
use std::arch::x86_64::*;

/// CPUID.(7,0):EDX bits 24 (AMX-TILE) and 25 (AMX-INT8), AVX-512 F/BW (the epilogue), and
/// Linux's `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)` granting this process the tile
/// data state (requested once; without it the first tile instruction faults).
pub(crate) fn supported() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(|| {
        let leaf = __cpuid_count(7, 0);
        let hw = leaf.edx & (1 << 24) != 0
            && leaf.edx & (1 << 25) != 0
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw");
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: a plain syscall with integer arguments.
        hw && unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_REQ_XCOMP_PERM,
                XFEATURE_XTILEDATA,
            )
        } == 0
    })
}

/// The 64-byte tile configuration: palette 1, eight tiles of 16 rows × 64 bytes.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

impl TileConfig {
    fn full_tiles() -> Self {
        let mut cfg = TileConfig([0; 64]);
        cfg.0[0] = 1;
        for t in 0..8 {
            cfg.0[16 + 2 * t..18 + 2 * t].copy_from_slice(&64u16.to_le_bytes());
            cfg.0[48 + t] = 16;
        }
        cfg
    }
}

/// Tile state of the calling thread for the duration of a GEMM task: configured on creation,
/// released on drop (so the OS need not save 8 KB of tile data at every context switch after).
pub(crate) struct TileSession(());

impl TileSession {
    /// # Safety
    /// [`supported`] returned true.
    pub(crate) unsafe fn start() -> Self {
        let cfg = TileConfig::full_tiles();
        // SAFETY: AMX is enabled for this process; the configuration is valid for palette 1.
        unsafe { asm!("ldtilecfg [{}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly)) };
        TileSession(())
    }
}

impl Drop for TileSession {
    fn drop(&mut self) {
        // SAFETY: tiles were configured by `start`.
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    }
}

/// 32 × 32 int32 accumulators, row-major (row stride 128 bytes), carried between K chunks.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub(crate) struct Carry(pub [i32; AMX_ROWS * PANEL_COLS]);

impl Default for Carry {
    fn default() -> Self {
        Carry([0; AMX_ROWS * PANEL_COLS])
    }
}

/// One 32 × 32 block over one K chunk of `steps` × 64 k.
pub(crate) struct Block<'a> {
    /// The block's first 64-k step of the chunk in the tile layout (32 rows × 64 bytes, row
    /// stride 64); the next step follows 2048 bytes later.
    pub act: *const u8,
    /// What the next block reads (`steps · 2048` bytes), fetched into L1 meanwhile; null for
    /// none.
    pub prefetch: *const u8,
    /// The chunk's unpacked weight codes: `steps · 2048` readable bytes (codes past the chunk's
    /// end may be anything: they meet zero activation padding).
    pub weights: *const u8,
    pub steps: usize,
    pub carry: &'a mut Carry,
    /// Start from zero instead of `carry`.
    pub first: bool,
}

/// The K loop of [`block`]: per 64-k step, two activation and two weight tiles into the four C
/// tiles, then the `extra` instructions (the prefetches) with their `operands`.
macro_rules! step_loop {
    ($b:expr; $($extra:literal),*; $($operands:tt)*) => {
        asm!(
            "2:",
            "tileloadd tmm4, [{a0} + {sa}*1]",
            "tileloadd tmm6, [{b0} + {sb}*1]",
            "tdpbssd tmm0, tmm4, tmm6",
            "tileloadd tmm7, [{b1} + {sb}*1]",
            "tdpbssd tmm1, tmm4, tmm7",
            "tileloadd tmm5, [{a1} + {sa}*1]",
            "tdpbssd tmm2, tmm5, tmm6",
            "tdpbssd tmm3, tmm5, tmm7",
            $($extra,)*
            "add {a0}, 2048",
            "add {a1}, 2048",
            "add {b0}, 2048",
            "add {b1}, 2048",
            "dec {n}",
            "jnz 2b",
            a0 = inout(reg) $b.act => _,
            a1 = inout(reg) $b.act.add(1024) => _,
            b0 = inout(reg) $b.weights => _,
            b1 = inout(reg) $b.weights.add(64) => _,
            n = inout(reg) $b.steps => _,
            $($operands)*
            sa = in(reg) 64usize,
            sb = in(reg) 128usize,
            options(nostack, readonly)
        )
    };
}

/// Accumulates one block's chunk into `carry`.
///
/// # Safety
/// A [`TileSession`] is active on this thread; `act` and `weights` are readable for
/// `steps · 2048` bytes.
pub(crate) unsafe fn block(b: Block<'_>) {
    const ROW: usize = PANEL_COLS * 4; // bytes per carry row
    let c = b.carry.0.as_mut_ptr().cast::<u8>();
    // SAFETY: `carry` is 32 rows × 128 bytes: the four 16 × 64-byte quadrants below.
    unsafe {
        let (c1, c2, c3) = (c.add(64), c.add(16 * ROW), c.add(16 * ROW + 64));
        if b.first {
            asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                options(nostack, nomem)
            );
        } else {
            asm!(
                "tileloadd tmm0, [{c0} + {s}*1]",
                "tileloadd tmm1, [{c1} + {s}*1]",
                "tileloadd tmm2, [{c2} + {s}*1]",
                "tileloadd tmm3, [{c3} + {s}*1]",
                c0 = in(reg) c, c1 = in(reg) c1, c2 = in(reg) c2, c3 = in(reg) c3,
                s = in(reg) ROW,
                options(nostack, readonly)
            );
        }
        // The prefetching loop only where there is a next block to fetch: 32 `prefetcht0` per
        // step compete with the tile loads for the load ports.
        if b.prefetch.is_null() {
            step_loop!(b;;);
        } else {
            step_loop!(
                b;
                "prefetcht0 [{pf} + 0]",
                "prefetcht0 [{pf} + 64]",
                "prefetcht0 [{pf} + 128]",
                "prefetcht0 [{pf} + 192]",
                "prefetcht0 [{pf} + 256]",
                "prefetcht0 [{pf} + 320]",
                "prefetcht0 [{pf} + 384]",
                "prefetcht0 [{pf} + 448]",
                "prefetcht0 [{pf} + 512]",
                "prefetcht0 [{pf} + 576]",
                "prefetcht0 [{pf} + 640]",
                "prefetcht0 [{pf} + 704]",
                "prefetcht0 [{pf} + 768]",
                "prefetcht0 [{pf} + 832]",
                "prefetcht0 [{pf} + 896]",
                "prefetcht0 [{pf} + 960]",
                "prefetcht0 [{pf} + 1024]",
                "prefetcht0 [{pf} + 1088]",
                "prefetcht0 [{pf} + 1152]",
                "prefetcht0 [{pf} + 1216]",
                "prefetcht0 [{pf} + 1280]",
                "prefetcht0 [{pf} + 1344]",
                "prefetcht0 [{pf} + 1408]",
                "prefetcht0 [{pf} + 1472]",
                "prefetcht0 [{pf} + 1536]",
                "prefetcht0 [{pf} + 1600]",
                "prefetcht0 [{pf} + 1664]",
                "prefetcht0 [{pf} + 1728]",
                "prefetcht0 [{pf} + 1792]",
                "prefetcht0 [{pf} + 1856]",
                "prefetcht0 [{pf} + 1920]",
                "prefetcht0 [{pf} + 1984]",
                "add {pf}, 2048";
                pf = inout(reg) b.prefetch => _,
            );
        }
        asm!(
            "tilestored [{c0} + {s}*1], tmm0",
            "tilestored [{c1} + {s}*1], tmm1",
            "tilestored [{c2} + {s}*1], tmm2",
            "tilestored [{c3} + {s}*1], tmm3",
            c0 = in(reg) c, c1 = in(reg) c1, c2 = in(reg) c2, c3 = in(reg) c3,
            s = in(reg) ROW,
            options(nostack)
        );
    }
}
