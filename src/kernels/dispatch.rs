//! The one runtime dispatch point of the ternary GEMM, and the parallel driver that splits a GEMM
//! into 12 × 32 tiles over the current rayon pool.
//!
//! Each output element is produced by exactly one tile with an exact integer sum and a per-element
//! epilogue, so results are bit-identical for every thread count and every kernel.

use super::AlignedBytes;
use super::pack::PANEL_COLS;
use super::quant::{ActLayout, ROWS_PER_BLOCK};
use super::tile::{
    Accumulators, Epilogue, Tile, TileFn, TileOutput, UNPACKED_BLOCK_BYTES, tile_scalar,
    unpack_panel,
};
use super::{KernelError, QuantizedActivations, Result, TernaryMatrix};
use rayon::prelude::*;
use std::borrow::Cow;
use std::cell::RefCell;
use std::sync::OnceLock;

/// A ternary GEMM implementation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KernelKind {
    /// x86-64 AMX-INT8 `tdpbssd` (32 × 32 blocks of four 16 × 16 tiles), via `asm!`.
    AmxInt8,
    /// Portable Rust over the packed layouts (ground-truth fallback).
    Scalar,
    /// x86-64 AVX2 `vpmaddubsw` + `vpmaddwd`, int32 accumulation every step.
    Avx2,
    /// x86-64 AVX-512 VNNI `vpdpbusd` (12 × 32 register tile, 24 zmm accumulators).
    Avx512Vnni,
    /// x86-64 AVX-VNNI: VEX-encoded `vpdpbusd ymm` (6 × 16 register tiles, 12 ymm accumulators),
    /// for CPUs with AVX-VNNI but no AVX-512 (Intel client CPUs from Alder Lake on).
    AvxVnni,
    /// The AVX-VNNI kernel's body with EVEX-encoded `vpdpbusd ymm` (AVX-512 VNNI + VL): never
    /// chosen (the zmm kernel is faster), it runs that body on every AVX-512 VNNI CPU, so its
    /// logic is tested and measured where AVX-VNNI itself is missing (Zen 4, QEMU).
    Avx512VnniYmm,
    /// aarch64 NEON `sdot` (dotprod), via `asm!`.
    NeonDot,
    /// aarch64 NEON without dotprod: `smull` + `sadalp`.
    NeonMull,
}

impl KernelKind {
    pub const ALL: [KernelKind; 8] = [
        KernelKind::Scalar,
        KernelKind::AmxInt8,
        KernelKind::Avx2,
        KernelKind::Avx512Vnni,
        KernelKind::AvxVnni,
        KernelKind::Avx512VnniYmm,
        KernelKind::NeonDot,
        KernelKind::NeonMull,
    ];

    pub fn name(self) -> &'static str {
        match self {
            KernelKind::Scalar => "scalar",
            KernelKind::AmxInt8 => "amx-int8",
            KernelKind::Avx2 => "avx2",
            KernelKind::Avx512Vnni => "avx512vnni",
            KernelKind::AvxVnni => "avxvnni",
            KernelKind::Avx512VnniYmm => "avx512vnni-ymm",
            KernelKind::NeonDot => "neon-sdot",
            KernelKind::NeonMull => "neon-smull",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }

    /// Whether this CPU can run the kernel (checked at run time).
    pub fn is_supported(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            KernelKind::AmxInt8 => super::amx::supported(),
            _ => self.tile_fn().is_some(),
        }
    }

    /// The activation layout the kernel reads ([`super::quantize_activations`] produces the
    /// selected kernel's; others are converted, at a cost, when handed to the kernel).
    pub fn act_layout(self) -> ActLayout {
        match self {
            KernelKind::AmxInt8 => ActLayout::Tiles,
            _ => ActLayout::Blocked,
        }
    }

    /// Every kernel this CPU can run, the scalar reference first.
    pub fn supported() -> Vec<KernelKind> {
        Self::ALL.into_iter().filter(|k| k.is_supported()).collect()
    }

    /// The fastest kernel this CPU supports.
    pub fn best() -> KernelKind {
        [
            KernelKind::AmxInt8,
            KernelKind::Avx512Vnni,
            KernelKind::AvxVnni,
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
            #[cfg(target_arch = "x86_64")]
            KernelKind::AvxVnni => {
                super::x86::avxvnni_supported().then_some(super::x86::tile_avxvnni as TileFn)
            }
            #[cfg(target_arch = "x86_64")]
            KernelKind::Avx512VnniYmm => super::x86::avx512vnni_ymm_supported()
                .then_some(super::x86::tile_avx512vnni_ymm as TileFn),
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
    run_f32(kind, a, w, bias, out, TileOutput::F32)
}

/// The FFN's gate with its activation fused: `up[m, n] = relu(y[m, n])² · up[m, n]`, where `y`
/// is [`ternary_matmul`]'s result for the gate weight — bit for bit what `ternary_matmul`
/// followed by [`super::ops::relu_squared_mul`] computes, without writing the gate's output or
/// reading it back. `up` holds the up projection on entry and the gated product on return.
pub fn ternary_matmul_relu2_mul(
    a: &QuantizedActivations,
    gate: &TernaryMatrix,
    bias: Option<&[f32]>,
    up: &mut [f32],
) -> Result<()> {
    ternary_matmul_relu2_mul_with(KernelKind::selected(), a, gate, bias, up)
}

/// [`ternary_matmul_relu2_mul`] with an explicit kernel.
pub fn ternary_matmul_relu2_mul_with(
    kind: KernelKind,
    a: &QuantizedActivations,
    gate: &TernaryMatrix,
    bias: Option<&[f32]>,
    up: &mut [f32],
) -> Result<()> {
    run_f32(kind, a, gate, bias, up, TileOutput::Relu2Mul)
}

/// A residual connection fused into the GEMM: `x[m, n] += y[m, n]`, where `y` is
/// [`ternary_matmul`]'s result — bit for bit what `ternary_matmul` followed by
/// [`super::ops::add_in_place`] computes, without writing `y` or reading it back.
pub fn ternary_matmul_add(
    a: &QuantizedActivations,
    w: &TernaryMatrix,
    bias: Option<&[f32]>,
    x: &mut [f32],
) -> Result<()> {
    ternary_matmul_add_with(KernelKind::selected(), a, w, bias, x)
}

/// [`ternary_matmul_add`] with an explicit kernel.
pub fn ternary_matmul_add_with(
    kind: KernelKind,
    a: &QuantizedActivations,
    w: &TernaryMatrix,
    bias: Option<&[f32]>,
    x: &mut [f32],
) -> Result<()> {
    run_f32(kind, a, w, bias, x, TileOutput::AddTo)
}

/// The f32-output GEMMs: checks, the bias padded to whole panels, then [`run`].
fn run_f32(
    kind: KernelKind,
    a: &QuantizedActivations,
    w: &TernaryMatrix,
    bias: Option<&[f32]>,
    out: &mut [f32],
    output: fn(*mut f32) -> TileOutput,
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
    run(kind, a, w, padded_bias.as_deref(), output(out.as_mut_ptr()))
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

/// The epilogue of the output rectangle at (`row0`, `col0`): at most `block_rows` × 32, clipped
/// to the m × n output.
///
/// # Safety
/// `row0 < m` and `col0 < n` (the output pointer is advanced to their element).
unsafe fn epilogue_at(
    a: &QuantizedActivations,
    w: &TernaryMatrix,
    bias: Option<&[f32]>,
    out: TileOutput,
    row0: usize,
    col0: usize,
    block_rows: usize,
) -> Epilogue {
    let (m, n) = (a.rows(), w.rows());
    debug_assert!(row0 < m && col0 < n);
    Epilogue {
        row_sums: a.row_sums()[row0..].as_ptr(),
        row_dequant: a.row_dequant()[row0..].as_ptr(),
        col_scales: w.column_scales()[col0..].as_ptr(),
        bias: bias.map_or(std::ptr::null(), |b| b[col0..].as_ptr()),
        // SAFETY (pointer arithmetic): row0·n + col0 < m·n, the output's length.
        out: unsafe { out.offset(row0 * n + col0) },
        ldo: n,
        rows: (m - row0).min(block_rows),
        cols: (n - col0).min(PANEL_COLS),
    }
}

/// The most 16-k blocks per K chunk: 64 blocks = 1024 k, i.e. 32 KB of unpacked weights plus
/// 12 KB of activations per tile, resident in a 48 KB L1 while every row block of the task
/// passes over them. Measured with the tile alone (`tile_loop`), VNNI at 1 thread: 0.90 of the
/// peak at 32 blocks, 0.91–0.95 at 48 and 64, 0.86–0.90 at 72–160 (the codes no longer fit in
/// L1).
const MAX_CHUNK_BLOCKS: usize = 64;

/// Bytes of L1 a K chunk occupies per 16-k block: 512 of unpacked codes and 16 activation bytes
/// for each of the block's 12 rows.
const CHUNK_BYTES_PER_BLOCK: usize = UNPACKED_BLOCK_BYTES + 16 * ROWS_PER_BLOCK;

/// 16-k blocks per K chunk on this machine: as many as fit, with 4 KB to spare (stack,
/// accumulators, output lines), in the smallest L1 data cache of its cores, in multiples of 8,
/// at most [`MAX_CHUNK_BLOCKS`]. A 48 KB L1 (Intel P-cores since Golden Cove, Sapphire Rapids)
/// and the 64 KB of Arm's Cortex-A76/A78AE (Raspberry Pi 5, Jetson Orin) get 64 blocks; a 32 KB
/// L1 (AMD Zen 4, Intel E-cores, which run the AVX-VNNI kernel next to the P-cores of a hybrid
/// CPU) gets 40 (27.5 KB) instead of a chunk that spills to L2. Where the cache size cannot be read, 64. Results do not depend on it: the
/// chunks' int32 sums are carried exactly.
pub fn chunk_blocks() -> usize {
    static BLOCKS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *BLOCKS.get_or_init(|| blocks_for_l1(crate::kernels::l1d_bytes()))
}

fn blocks_for_l1(l1d: Option<usize>) -> usize {
    match l1d {
        Some(bytes) => {
            let fit = bytes.saturating_sub(4096) / CHUNK_BYTES_PER_BLOCK / 8 * 8;
            fit.clamp(8, MAX_CHUNK_BLOCKS)
        }
        None => MAX_CHUNK_BLOCKS,
    }
}

/// Activation bytes of the row blocks a task sweeps across its panels at a time, so that they
/// stay in L2 (2 MiB per core on the development machine) next to the output lines, carries
/// and codes passing through. When a task's rows hold more, it runs its panels once per group
/// of row blocks (`block_groups`): M blocking for L2, as in Goto's GEMM.
const ACT_GROUP_BYTES: usize = 1 << 20;

/// The fewest row blocks in a group: every group unpacks every K chunk of the task's panels
/// again (about 1,100 cycles per chunk against about 2,500 per tile), so small groups would
/// cost more in unpacking than they save. Measured A/B at 1 thread (time with groups / without,
/// GEMM alone): at the model's M (625 LLM tokens, 512 ViT) 0.94–1.04 per shape, median 0.98;
/// at twice that M, where the activations outgrow L2, 0.83–0.97 (1 and 2 threads).
const MIN_GROUP_BLOCKS: usize = 24;

/// A task's row blocks in groups of at most `ACT_GROUP_BYTES` of activations (but at least
/// `MIN_GROUP_BLOCKS` blocks each), balanced, in order. Grouping changes only the order in
/// which tiles run: each output tile still sums its K chunks in the same order, so results are
/// the same bit for bit.
fn block_groups(
    blocks: std::ops::Range<usize>,
    act_block_bytes: usize,
) -> impl Iterator<Item = std::ops::Range<usize>> {
    let most = (ACT_GROUP_BYTES / act_block_bytes.max(1)).max(MIN_GROUP_BLOCKS);
    let groups = blocks.len().div_ceil(most).max(1);
    (0..groups).map(move |g| {
        let part = split(blocks.len(), groups, g);
        (blocks.start + part.start)..(blocks.start + part.end)
    })
}

/// Brings the packed codes of the weight panel a task runs next into L2 while it computes the
/// current one, a few lines before each tile, so that unpacking that panel reads L2 rather than
/// waiting on L3 or memory line by line (a panel's codes are read once per row group and are
/// usually not cached: a model's weights are far larger than L3). Measured on the development
/// machine (Zen 5, `bench kernels --kernel avx512vnni`, interleaved A/B, three runs),
/// GEMM-alone efficiency, median of 7 shapes: 0.884–0.888 → 0.905 at 1 thread; at 2 threads
/// 0.880 → 0.913 in one run and within the noise (±1%) in two.
struct PanelPrefetch<'a> {
    /// The panel's cache lines not yet prefetched (none when there is no next panel).
    lines: std::slice::Chunks<'a, u8>,
    /// Lines per tile: the panel's lines spread over the tiles that run before it.
    per_tile: usize,
}

impl<'a> PanelPrefetch<'a> {
    fn new(codes: &'a [u8], tiles: usize) -> Self {
        PanelPrefetch {
            lines: codes.chunks(64),
            per_tile: codes.len().div_ceil(64).div_ceil(tiles.max(1)),
        }
    }

    /// Prefetches the next `per_tile` lines into L2. A prefetch never faults; it is only a hint.
    fn step(&mut self) {
        for line in self.lines.by_ref().take(self.per_tile) {
            super::prefetch(line.as_ptr(), super::CacheLevel::L2);
        }
    }
}

/// Per-worker scratch, reused across calls.
#[derive(Default)]
struct Scratch {
    /// One unpacked K chunk of a weight panel (`chunk_blocks() · 512` bytes).
    unpacked: Option<AlignedBytes>,
    /// Accumulators carried between K chunks, one per row block of the task.
    carry: Vec<Accumulators>,
    /// The AMX kernel's carried 32 × 32 blocks.
    #[cfg(target_arch = "x86_64")]
    amx_carry: Vec<super::amx::Carry>,
}

/// How a GEMM is split into tasks over the current pool: about 4 per thread for load balance,
/// N first (a task owns whole weight panels), then M when N has too few panels. Task `t` covers
/// panels `split(panels, panel_parts, t / m_parts)` and row blocks
/// `split(m_blocks, m_parts, t % m_parts)`.
struct Tasks {
    panel_parts: usize,
    m_parts: usize,
}

impl Tasks {
    fn new(panels: usize, m_blocks: usize) -> Self {
        let threads = rayon::current_num_threads().max(1);
        let target = if threads == 1 { 1 } else { threads * 4 };
        let panel_parts = panels.min(target);
        let m_parts = target.div_ceil(panel_parts).min(m_blocks);
        Tasks {
            panel_parts,
            m_parts,
        }
    }

    /// For the AMX kernel, whose units are coarse (groups of 4 panels, 32-row blocks): the split
    /// with the least estimated time, `⌈tasks / threads⌉ · groups_per_task · (blocks_per_task
    /// plus one)` (each task unpacks its weights once per block range), preferring more tasks
    /// (up to 4 per thread) among equals so that work stealing can absorb a busy core.
    #[cfg(target_arch = "x86_64")]
    fn balanced(groups: usize, m_blocks: usize) -> Self {
        let threads = rayon::current_num_threads().max(1);
        let limit = 4 * threads;
        let mut best = (
            usize::MAX,
            0,
            Tasks {
                panel_parts: 1,
                m_parts: 1,
            },
        );
        for panel_parts in 1..=groups.min(limit) {
            for m_parts in 1..=m_blocks.min(limit / panel_parts).max(1) {
                let tasks = panel_parts * m_parts;
                let cost = tasks.div_ceil(threads)
                    * groups.div_ceil(panel_parts)
                    * (m_blocks.div_ceil(m_parts) + 1);
                if cost < best.0 || (cost == best.0 && tasks > best.1) {
                    best = (
                        cost,
                        tasks,
                        Tasks {
                            panel_parts,
                            m_parts,
                        },
                    );
                }
            }
        }
        best.2
    }

    fn run(&self, task: impl Fn(usize) + Sync + Send) {
        let count = self.panel_parts * self.m_parts;
        if count == 1 {
            task(0);
        } else {
            (0..count).into_par_iter().for_each(task);
        }
    }
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
    if !kind.is_supported() {
        return Err(KernelError::Unsupported(kind));
    }
    let a = if a.layout() == kind.act_layout() {
        Cow::Borrowed(a)
    } else {
        log::debug!(
            "activations quantized as {:?} converted for kernel {kind}",
            a.layout()
        );
        Cow::Owned(a.to_layout(kind.act_layout()))
    };
    #[cfg(target_arch = "x86_64")]
    if kind == KernelKind::AmxInt8 {
        run_amx(&a, w, bias, out);
        return Ok(());
    }
    run_tiles(kind, &a, w, bias, out, chunk_blocks())
}

/// `kind`'s register tile alone, the same function the GEMM calls on a full K chunk
/// ([`chunk_blocks`]), on operands of its own that stay in L1: no quantization, unpacking,
/// epilogue, output stores or cache misses. The returned runner makes `count` calls and returns
/// their int8 ops. A diagnostic for `bench kernels` (`bench::peak::rate_on_pool` times it on
/// every thread at once): against the register-only peak it is the ceiling of the kernel's inner
/// loop, against the GEMM it shows what the memory system and the driver cost. None for kernels
/// without a vector tile (AMX) or unsupported on this CPU.
pub fn tile_loop(kind: KernelKind) -> Option<impl Fn(u64) -> f64 + Sync> {
    let tile_fn = kind.tile_fn()?;
    let blocks = chunk_blocks();
    Some(move |count: u64| {
        let act = vec![0x5au8; blocks * 16 * ROWS_PER_BLOCK];
        let weights = vec![1u8; blocks * UNPACKED_BLOCK_BYTES];
        let mut carry: Accumulators = [[0; PANEL_COLS]; ROWS_PER_BLOCK];
        for _ in 0..count {
            let tile = Tile {
                act: act.as_ptr(),
                weights: weights.as_ptr(),
                k_blocks: blocks,
                carry: &mut carry,
                first: true,
                last: false,
                // Only `rows` is read (a full block): a tile that is not the last only writes
                // `carry`.
                epi: Epilogue {
                    row_sums: std::ptr::null(),
                    row_dequant: std::ptr::null(),
                    col_scales: std::ptr::null(),
                    bias: std::ptr::null(),
                    out: TileOutput::I32(std::ptr::null_mut()),
                    ldo: 0,
                    rows: ROWS_PER_BLOCK,
                    cols: PANEL_COLS,
                },
            };
            // SAFETY: `act` and `weights` hold `blocks` blocks, `carry` is this loop's
            // own; with `last` false the epilogue's pointers are never used; `tile_fn` is
            // supported on this CPU (`tile_fn()`).
            unsafe { tile_fn(&tile) };
            std::hint::black_box(&carry);
        }
        (count * (2 * ROWS_PER_BLOCK * PANEL_COLS * 16 * blocks) as u64) as f64
    })
}

/// The vector kernels: 12 × 32 tiles over K chunks of `chunk_blocks` 16-k blocks.
fn run_tiles(
    kind: KernelKind,
    a: &QuantizedActivations,
    w: &TernaryMatrix,
    bias: Option<&[f32]>,
    out: TileOutput,
    chunk_blocks: usize,
) -> Result<()> {
    let tile_fn = kind.tile_fn().ok_or(KernelError::Unsupported(kind))?;
    let panels = w.panels();
    let m_blocks = a.blocks();
    let k_blocks = w.k_padded() / 16;
    let panel_bytes = w.panel_bytes();
    let act_block_bytes = ROWS_PER_BLOCK * w.k_padded();
    let (act, weights) = (a.data(), w.packed());
    debug_assert_eq!(act.len(), m_blocks * act_block_bytes);
    debug_assert_eq!(weights.len(), panels * panel_bytes);
    let chunks = k_blocks.div_ceil(chunk_blocks.max(1));

    let tasks = Tasks::new(panels, m_blocks);
    let (panel_parts, m_parts) = (tasks.panel_parts, tasks.m_parts);
    let task = |t: usize| {
        let (pp, mp) = (t / m_parts, t % m_parts);
        let block_range = split(m_blocks, m_parts, mp);
        SCRATCH.with_borrow_mut(|scratch| {
            let unpacked = scratch
                .unpacked
                .get_or_insert_with(|| AlignedBytes::new(0, 0));
            unpacked.ensure_len(chunk_blocks * UNPACKED_BLOCK_BYTES);
            let unpacked = unpacked.as_mut_slice();
            scratch
                .carry
                .resize(block_range.len(), [[0; PANEL_COLS]; ROWS_PER_BLOCK]);
            let task_panels = split(panels, panel_parts, pp);
            let codes = |panel: usize| &weights[panel * panel_bytes..(panel + 1) * panel_bytes];
            let mut groups = block_groups(block_range.clone(), act_block_bytes).peekable();
            while let Some(group) = groups.next() {
                let last_group = groups.peek().is_none();
                for panel in task_panels.clone() {
                    let col0 = panel * PANEL_COLS;
                    let panel_packed = codes(panel);
                    // The next panel of this group, or the first one again for the next group.
                    let next = if panel + 1 < task_panels.end {
                        codes(panel + 1)
                    } else if !last_group {
                        codes(task_panels.start)
                    } else {
                        &[]
                    };
                    let mut prefetch = PanelPrefetch::new(next, chunks * group.len());
                    for chunk in 0..chunks {
                        let kb = split(k_blocks, chunks, chunk);
                        let chunk_unpacked = &mut unpacked[..kb.len() * UNPACKED_BLOCK_BYTES];
                        unpack_panel(&panel_packed[kb.start * 128..kb.end * 128], chunk_unpacked);
                        for (mb, carry) in group.clone().zip(scratch.carry.iter_mut()) {
                            prefetch.step();
                            let row0 = mb * ROWS_PER_BLOCK;
                            let act_offset = mb * act_block_bytes + kb.start * 16 * ROWS_PER_BLOCK;
                            let tile = Tile {
                                act: act[act_offset..].as_ptr(),
                                weights: chunk_unpacked.as_ptr(),
                                k_blocks: kb.len(),
                                carry,
                                first: chunk == 0,
                                last: chunk + 1 == chunks,
                                // SAFETY: row0 < m and col0 < n.
                                epi: unsafe {
                                    epilogue_at(a, w, bias, out, row0, col0, ROWS_PER_BLOCK)
                                },
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
            }
        });
    };
    tasks.run(task);
    Ok(())
}

/// 16-k blocks per K chunk of the AMX kernel: a multiple of 4 (64-k tile steps), so that only
/// the last chunk ends inside a step, where the activations' zero padding meets whatever codes
/// follow the chunk in the unpack buffer.
#[cfg(target_arch = "x86_64")]
const AMX_CHUNK_BLOCKS: usize = 16;

/// Weight panels the AMX kernel runs against each block of activations while that block's chunk
/// sits in L1: a block's 8 KB of codes feed 4 × 32 columns, and the group's unpacked chunks
/// (4 × 8 KB) stay in L1 with it.
#[cfg(target_arch = "x86_64")]
const AMX_GROUP: usize = 4;

/// The AMX kernel: per task, groups of [`AMX_GROUP`] panels; per group, K chunks of
/// [`AMX_CHUNK_BLOCKS`]; per chunk, every 32-row block against every panel of the group, with
/// 32 × 32 accumulators carried between chunks. The same task split as the vector kernels.
#[cfg(target_arch = "x86_64")]
fn run_amx(a: &QuantizedActivations, w: &TernaryMatrix, bias: Option<&[f32]>, out: TileOutput) {
    use super::amx;
    use super::quant::AMX_ROWS;
    debug_assert_eq!(a.layout(), ActLayout::Tiles);
    let m = a.rows();
    let panels = w.panels();
    let m_blocks = a.blocks();
    let k_blocks = w.k_padded() / 16;
    let panel_bytes = w.panel_bytes();
    let block_bytes = AMX_ROWS * a.row_bytes();
    let (act, weights) = (a.data(), w.packed());
    debug_assert_eq!(act.len(), m_blocks * block_bytes);
    let chunks = k_blocks.div_ceil(AMX_CHUNK_BLOCKS);
    let chunk_bytes = AMX_CHUNK_BLOCKS * UNPACKED_BLOCK_BYTES;
    // Tasks own whole groups of panels (a group shares each block's trip through L1).
    let groups = panels.div_ceil(AMX_GROUP);
    let tasks = Tasks::balanced(groups, m_blocks);
    let (panel_parts, m_parts) = (tasks.panel_parts, tasks.m_parts);
    tasks.run(|t: usize| {
        let (pp, mp) = (t / m_parts, t % m_parts);
        let block_range = split(m_blocks, m_parts, mp);
        let blocks = block_range.len();
        SCRATCH.with_borrow_mut(|scratch| {
            let unpacked = scratch
                .unpacked
                .get_or_insert_with(|| AlignedBytes::new(0, 0));
            unpacked.ensure_len(AMX_GROUP * chunk_bytes);
            let unpacked = unpacked.as_mut_slice();
            scratch
                .amx_carry
                .resize(AMX_GROUP * blocks, amx::Carry::default());
            // SAFETY: `run` checked `is_supported`, i.e. `amx::supported()`.
            let _tiles = unsafe { amx::TileSession::start() };
            let task_groups = split(groups, panel_parts, pp);
            let task_panels =
                task_groups.start * AMX_GROUP..(task_groups.end * AMX_GROUP).min(panels);
            for group_start in task_panels.clone().step_by(AMX_GROUP) {
                let group = group_start..(group_start + AMX_GROUP).min(task_panels.end);
                for chunk in 0..chunks {
                    let kb =
                        (chunk * AMX_CHUNK_BLOCKS)..((chunk + 1) * AMX_CHUNK_BLOCKS).min(k_blocks);
                    let steps = kb.len().div_ceil(4);
                    let step0 = kb.start / 4 * 2048;
                    for (g, panel) in group.clone().enumerate() {
                        let packed = &weights[panel * panel_bytes..(panel + 1) * panel_bytes];
                        unpack_panel(
                            &packed[kb.start * 128..kb.end * 128],
                            &mut unpacked[g * chunk_bytes..][..kb.len() * UNPACKED_BLOCK_BYTES],
                        );
                    }
                    let last = chunk + 1 == chunks;
                    for (b, mb) in block_range.clone().enumerate() {
                        let row0 = mb * AMX_ROWS;
                        let next = (mb + 1 < block_range.end).then_some(mb + 1);
                        for (g, panel) in group.clone().enumerate() {
                            let carry = &mut scratch.amx_carry[g * blocks + b];
                            // The first panel fetches the next block's chunk into L1.
                            let fetch = next.filter(|_| g == 0);
                            // SAFETY: a block holds K_64 / 64 steps of 2048 bytes, zero past
                            // K_p (quant.rs), so the chunk's steps from k = 16·kb.start (a
                            // multiple of 64) are readable in this block and the next; the
                            // panel's unpack slot holds AMX_CHUNK_BLOCKS (>= steps · 4) blocks
                            // of 512 bytes; the tile session is active on this thread.
                            unsafe {
                                amx::block(amx::Block {
                                    act: act[mb * block_bytes + step0..].as_ptr(),
                                    prefetch: fetch.map_or(std::ptr::null(), |f| {
                                        act[f * block_bytes + step0..].as_ptr()
                                    }),
                                    weights: unpacked[g * chunk_bytes..].as_ptr(),
                                    steps,
                                    carry,
                                    first: chunk == 0,
                                })
                            };
                            if last && row0 < m {
                                let col0 = panel * PANEL_COLS;
                                // SAFETY: row0 < m and col0 < n (a panel of the weight).
                                let epilogue =
                                    unsafe { epilogue_at(a, w, bias, out, row0, col0, AMX_ROWS) };
                                // SAFETY: AVX-512 F is part of `amx::supported`; row values are
                                // padded to whole 32-row blocks, column values to whole panels;
                                // the output rectangle lies in the m × n output and belongs to
                                // this (panel, block) only.
                                unsafe { super::x86::epilogue_avx512(&carry.0, &epilogue) };
                            }
                        }
                    }
                }
            }
        });
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn k_chunks_fit_the_l1_of_the_machine() {
        // Zen 4 and Intel E-cores; Golden Cove P-cores and Sapphire Rapids; Cortex-A76/A78AE.
        assert_eq!(blocks_for_l1(Some(32 << 10)), 40);
        assert_eq!(blocks_for_l1(Some(48 << 10)), 64);
        assert_eq!(blocks_for_l1(Some(64 << 10)), 64);
        assert_eq!(blocks_for_l1(Some(16 << 10)), 16);
        assert_eq!(blocks_for_l1(Some(1024)), 8);
        assert_eq!(blocks_for_l1(None), MAX_CHUNK_BLOCKS);
        for l1 in [32 << 10, 48 << 10] {
            let blocks = blocks_for_l1(Some(l1));
            assert!(
                blocks * CHUNK_BYTES_PER_BLOCK + 4096 <= l1,
                "{l1}: {blocks}"
            );
        }
        assert!((8..=MAX_CHUNK_BLOCKS).contains(&chunk_blocks()));
    }

    #[test]
    fn every_k_chunk_size_gives_the_exact_sums() {
        // The chunk sizes of 32, 48 and 64 KB L1s and the smallest, on K that splits into
        // uneven chunks (K = 2560: 160 blocks; 1152: 72; 208: 13), on every vector kernel this
        // CPU runs.
        for kind in KernelKind::ALL {
            if kind == KernelKind::AmxInt8 || kind.tile_fn().is_none() {
                eprintln!("{kind}: skipped (no vector tile on this CPU)");
                continue;
            }
            for (m, k, n) in [(25, 2560, 64), (13, 1152, 96), (7, 208, 32)] {
                let x = crate::kernels::pseudo_random(m * k, 7, 3.0);
                let codes: Vec<i8> = crate::kernels::pseudo_random(n * k, 11, 1.5)
                    .iter()
                    .map(|v| v.round().clamp(-1.0, 1.0) as i8)
                    .collect();
                let w = TernaryMatrix::from_codes(&codes, n, k, 0.5).expect("codes");
                let mut a = QuantizedActivations::default();
                crate::kernels::quantize_activations_for(
                    kind.act_layout(),
                    &x,
                    m,
                    k,
                    w.k_padded(),
                    &mut a,
                )
                .expect("quantized");
                let expected = crate::kernels::reference::matmul_i32(&a, &w);
                for blocks in [8, 40, 64, 1000] {
                    let mut out = vec![0i32; m * n];
                    run_tiles(
                        kind,
                        &a,
                        &w,
                        None,
                        TileOutput::I32(out.as_mut_ptr()),
                        blocks,
                    )
                    .expect("GEMM");
                    assert_eq!(out, expected, "{kind}, {m}x{k}x{n}, {blocks} blocks");
                }
            }
        }
    }

    #[test]
    fn row_block_groups_cover_the_task_in_order_and_fit_the_budget() {
        let groups =
            |blocks: std::ops::Range<usize>, bytes| block_groups(blocks, bytes).collect::<Vec<_>>();
        // The model's shapes at 1 thread: LLM K = 2560 and 6912 (12-row blocks), ViT K = 1152.
        assert_eq!(groups(0..53, 12 * 2560), vec![0..26, 26..53]);
        assert_eq!(groups(0..53, 12 * 6912), vec![0..17, 17..35, 35..53]);
        assert_eq!(groups(0..43, 12 * 1152), vec![0..43]);
        // A task's own range, and the degenerate ones.
        assert_eq!(groups(10..60, 12 * 2560), vec![10..35, 35..60]);
        assert_eq!(groups(5..5, 12 * 2560), vec![5..5]);
        assert_eq!(groups(0..3, 0), vec![0..3]);
        for (len, bytes) in [(1, 1), (200, 12 * 16), (97, 1 << 16), (300, 12 * 6912)] {
            let g = groups(7..7 + len, bytes);
            assert_eq!(g.first().map(|r| r.start), Some(7));
            assert_eq!(g.last().map(|r| r.end), Some(7 + len));
            assert!(g.windows(2).all(|w| w[0].end == w[1].start));
            let most = (ACT_GROUP_BYTES / bytes).max(MIN_GROUP_BLOCKS);
            assert!(g.iter().all(|r| r.len() <= most), "{len} {bytes}: {g:?}");
        }
    }

    #[test]
    fn tile_loop_rate_is_measured_for_every_vector_kernel_and_not_for_amx() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .expect("a one-thread pool");
        for kind in KernelKind::ALL {
            let rate = tile_loop(kind)
                .and_then(|run| crate::bench::peak::rate_on_pool(&pool, 0.002, &run));
            if kind == KernelKind::AmxInt8 || !kind.is_supported() {
                assert_eq!(rate, None, "{kind}");
            } else {
                let rate = rate.unwrap_or(f64::NAN);
                assert!(rate.is_finite() && rate > 0.0, "{kind}: {rate}");
            }
        }
    }
}
