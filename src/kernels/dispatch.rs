//! The one runtime dispatch point of the ternary GEMM, and the parallel driver that splits a GEMM
//! into 12 × 32 tiles over the current rayon pool.
//!
//! Each output element is produced by exactly one tile with an exact integer sum and a per-element
//! epilogue, so results are bit-identical for every thread count and every kernel.

use super::AlignedBytes;
use super::pack::PANEL_COLS;
use super::quant::ROWS_PER_BLOCK;
use super::tile::{
    Accumulators, Tile, TileFn, TileOutput, UNPACKED_BLOCK_BYTES, tile_scalar, unpack_panel,
};
use super::{KernelError, QuantizedActivations, Result, TernaryMatrix};
use rayon::prelude::*;
use std::cell::RefCell;
use std::sync::OnceLock;

/// A ternary GEMM implementation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KernelKind {
    /// Portable Rust over the packed layouts (ground-truth fallback).
    Scalar,
    /// x86-64 AVX2 `vpmaddubsw` + `vpmaddwd`, int32 accumulation every step.
    Avx2,
    /// x86-64 AVX-512 VNNI `vpdpbusd` (12 × 32 register tile, 24 zmm accumulators).
    Avx512Vnni,
    /// aarch64 NEON `sdot` (dotprod), via `asm!`.
    NeonDot,
    /// aarch64 NEON without dotprod: `smull` + `sadalp`.
    NeonMull,
}

impl KernelKind {
    pub const ALL: [KernelKind; 5] = [
        KernelKind::Scalar,
        KernelKind::Avx2,
        KernelKind::Avx512Vnni,
        KernelKind::NeonDot,
        KernelKind::NeonMull,
    ];

    pub fn name(self) -> &'static str {
        match self {
            KernelKind::Scalar => "scalar",
            KernelKind::Avx2 => "avx2",
            KernelKind::Avx512Vnni => "avx512vnni",
            KernelKind::NeonDot => "neon-sdot",
            KernelKind::NeonMull => "neon-smull",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }

    /// Whether this CPU can run the kernel (checked at run time).
    pub fn is_supported(self) -> bool {
        self.tile_fn().is_some()
    }

    /// Every kernel this CPU can run, the scalar reference first.
    pub fn supported() -> Vec<KernelKind> {
        Self::ALL.into_iter().filter(|k| k.is_supported()).collect()
    }

    /// The fastest kernel this CPU supports.
    pub fn best() -> KernelKind {
        [
            KernelKind::Avx512Vnni,
            KernelKind::Avx2,
            KernelKind::NeonDot,
            KernelKind::NeonMull,
        ]
        .into_iter()
        .find(|k| k.is_supported())
        .unwrap_or(KernelKind::Scalar)
    }

    /// The kernel [`ternary_matmul`] uses: [`KernelKind::best`], or the one named by the
    /// `BITVLA_KERNEL` environment variable (if supported; otherwise a warning and the best).
    /// Decided once per process.
    pub fn selected() -> KernelKind {
        static SELECTED: OnceLock<KernelKind> = OnceLock::new();
        *SELECTED.get_or_init(|| match std::env::var("BITVLA_KERNEL") {
            Ok(name) => match KernelKind::from_name(&name) {
                Some(kind) if kind.is_supported() => kind,
                _ => {
                    log::warn!(
                        "BITVLA_KERNEL={name} is unknown or unsupported on this CPU; using {}",
                        KernelKind::best()
                    );
                    KernelKind::best()
                }
            },
            Err(_) => KernelKind::best(),
        })
    }

    fn tile_fn(self) -> Option<TileFn> {
        match self {
            KernelKind::Scalar => Some(tile_scalar as TileFn),
            #[cfg(target_arch = "x86_64")]
            KernelKind::Avx2 => {
                super::x86::avx2_supported().then_some(super::x86::tile_avx2 as TileFn)
            }
            #[cfg(target_arch = "x86_64")]
            KernelKind::Avx512Vnni => {
                super::x86::avx512vnni_supported().then_some(super::x86::tile_avx512vnni as TileFn)
            }
            #[cfg(target_arch = "aarch64")]
            KernelKind::NeonDot => {
                super::aarch64::dotprod_supported().then_some(super::aarch64::tile_sdot as TileFn)
            }
            #[cfg(target_arch = "aarch64")]
            KernelKind::NeonMull => Some(super::aarch64::tile_smull as TileFn),
            #[allow(unreachable_patterns)]
            _ => None,
        }
    }
}

impl std::fmt::Display for KernelKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// `out[m, n] = ((Σ_k q[m,k]·t[n,k]) as f32) · (γ[n] · d[m]) (+ bias[n])`, row-major `m × n`, with
/// the selected kernel on the current rayon pool.
pub fn ternary_matmul(
    a: &QuantizedActivations,
    w: &TernaryMatrix,
    bias: Option<&[f32]>,
    out: &mut [f32],
) -> Result<()> {
    ternary_matmul_with(KernelKind::selected(), a, w, bias, out)
}

/// [`ternary_matmul`] with an explicit kernel.
pub fn ternary_matmul_with(
    kind: KernelKind,
    a: &QuantizedActivations,
    w: &TernaryMatrix,
    bias: Option<&[f32]>,
    out: &mut [f32],
) -> Result<()> {
    check_shapes(a, w, out.len())?;
    let padded_bias = match bias {
        Some(b) if b.len() != w.rows() => {
            return Err(KernelError::LengthMismatch {
                what: "ternary GEMM bias",
                expected: w.rows(),
                got: b.len(),
            });
        }
        Some(b) => {
            let mut padded = b.to_vec();
            padded.resize(w.n_padded(), 0.0);
            Some(padded)
        }
        None => None,
    };
    run(
        kind,
        a,
        w,
        padded_bias.as_deref(),
        TileOutput::F32(out.as_mut_ptr()),
    )
}

/// The exact corrected integer sums Σ_k q[m,k]·t[n,k] (row-major `m × n`) computed by `kind`: the
/// quantity every implementation must reproduce bit for bit.
pub fn ternary_matmul_i32(
    kind: KernelKind,
    a: &QuantizedActivations,
    w: &TernaryMatrix,
    out: &mut [i32],
) -> Result<()> {
    check_shapes(a, w, out.len())?;
    run(kind, a, w, None, TileOutput::I32(out.as_mut_ptr()))
}

fn check_shapes(a: &QuantizedActivations, w: &TernaryMatrix, out_len: usize) -> Result<()> {
    if a.rows() == 0 || a.cols() == 0 {
        return Err(KernelError::ZeroDimension {
            what: "ternary GEMM activations (not quantized yet?)",
            rows: a.rows(),
            cols: a.cols(),
        });
    }
    if a.cols() != w.cols() {
        return Err(KernelError::ShapeMismatch {
            what: "ternary GEMM K (activations vs weight)",
            left: a.cols(),
            right: w.cols(),
        });
    }
    if a.k_padded() != w.k_padded() {
        return Err(KernelError::ShapeMismatch {
            what: "ternary GEMM padded K (quantize with the weight's k_padded)",
            left: a.k_padded(),
            right: w.k_padded(),
        });
    }
    let expected = a.rows() * w.rows();
    if out_len != expected {
        return Err(KernelError::LengthMismatch {
            what: "ternary GEMM output",
            expected,
            got: out_len,
        });
    }
    Ok(())
}

/// Balanced split of `len` items into `parts` ranges; range `i`.
fn split(len: usize, parts: usize, i: usize) -> std::ops::Range<usize> {
    (i * len / parts)..((i + 1) * len / parts)
}

/// 16-k blocks per K chunk: 32 blocks = 512 k, i.e. 16 KB of unpacked weights plus 6 KB of
/// activations per tile, resident in L1 while every row block of the task passes over them.
const CHUNK_BLOCKS: usize = 64;

/// Per-worker scratch, reused across calls.
#[derive(Default)]
struct Scratch {
    /// One unpacked K chunk of a weight panel (`CHUNK_BLOCKS · 512` bytes).
    unpacked: Option<AlignedBytes>,
    /// Accumulators carried between K chunks, one per row block of the task.
    carry: Vec<Accumulators>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

fn run(
    kind: KernelKind,
    a: &QuantizedActivations,
    w: &TernaryMatrix,
    bias: Option<&[f32]>,
    out: TileOutput,
) -> Result<()> {
    let tile_fn = kind.tile_fn().ok_or(KernelError::Unsupported(kind))?;
    let (m, n) = (a.rows(), w.rows());
    let panels = w.panels();
    let m_blocks = a.blocks();
    let k_blocks = w.k_padded() / 16;
    let panel_bytes = w.panel_bytes();
    let act_block_bytes = ROWS_PER_BLOCK * w.k_padded();
    let (act, weights) = (a.data(), w.packed());
    let (row_sums, row_dequant, col_scales) = (a.row_sums(), a.row_dequant(), w.column_scales());
    debug_assert_eq!(act.len(), m_blocks * act_block_bytes);
    debug_assert_eq!(weights.len(), panels * panel_bytes);
    let chunks = k_blocks.div_ceil(CHUNK_BLOCKS);

    // Tasks: about 4 per thread for load balance. Split N first (a task owns whole weight
    // panels), then M when N has too few panels.
    let threads = rayon::current_num_threads().max(1);
    let target = if threads == 1 { 1 } else { threads * 4 };
    let panel_parts = panels.min(target);
    let m_parts = target.div_ceil(panel_parts).min(m_blocks);
    let task = |t: usize| {
        let (pp, mp) = (t / m_parts, t % m_parts);
        let block_range = split(m_blocks, m_parts, mp);
        SCRATCH.with_borrow_mut(|scratch| {
            let unpacked = scratch
                .unpacked
                .get_or_insert_with(|| AlignedBytes::new(CHUNK_BLOCKS * UNPACKED_BLOCK_BYTES, 0))
                .as_mut_slice();
            scratch
                .carry
                .resize(block_range.len(), [[0; PANEL_COLS]; ROWS_PER_BLOCK]);
            for panel in split(panels, panel_parts, pp) {
                let col0 = panel * PANEL_COLS;
                let panel_packed = &weights[panel * panel_bytes..(panel + 1) * panel_bytes];
                for chunk in 0..chunks {
                    let kb = split(k_blocks, chunks, chunk);
                    let chunk_unpacked = &mut unpacked[..kb.len() * UNPACKED_BLOCK_BYTES];
                    unpack_panel(&panel_packed[kb.start * 128..kb.end * 128], chunk_unpacked);
                    for (mb, carry) in block_range.clone().zip(scratch.carry.iter_mut()) {
                        let row0 = mb * ROWS_PER_BLOCK;
                        let offset = row0 * n + col0;
                        let act_offset = mb * act_block_bytes + kb.start * 16 * ROWS_PER_BLOCK;
                        let tile = Tile {
                            act: act[act_offset..].as_ptr(),
                            weights: chunk_unpacked.as_ptr(),
                            k_blocks: kb.len(),
                            carry,
                            first: chunk == 0,
                            last: chunk + 1 == chunks,
                            row_sums: row_sums[row0..].as_ptr(),
                            row_dequant: row_dequant[row0..].as_ptr(),
                            col_scales: col_scales[col0..].as_ptr(),
                            bias: bias.map_or(std::ptr::null(), |b| b[col0..].as_ptr()),
                            // SAFETY (pointer arithmetic): offset < m·n, the output's length.
                            out: unsafe { out.offset(offset) },
                            ldo: n,
                            rows: (m - row0).min(ROWS_PER_BLOCK),
                            cols: (n - col0).min(PANEL_COLS),
                        };
                        // SAFETY: the slices above hold the chunk of a full row block, the
                        // unpacked chunk, 12 row values and 32 column values (all padded by
                        // construction); `carry` is this row block's own; the output rect
                        // rows × cols lies inside the m × n output and belongs to this
                        // (panel, block) only; `tile_fn` was returned by `tile_fn()` only if the
                        // CPU supports it.
                        unsafe { tile_fn(&tile) };
                    }
                }
            }
        });
    };
    if panel_parts * m_parts == 1 {
        task(0);
    } else {
        (0..panel_parts * m_parts).into_par_iter().for_each(task);
    }
    Ok(())
}
