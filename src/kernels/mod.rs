//! Compute kernels: the ternary W1.58-A8 GEMM (packing, activation quantization, one runtime
//! dispatch over scalar / AVX2 / AVX-512 VNNI / AMX-INT8 / NEON implementations) and the f32 operations the
//! model needs (norms, activations, RoPE, attention, full-precision linear layers).
//!
//! The math contract (see `shared/spec/kernels.md` §3.1 and `bitvla-model.md` §2.2):
//!
//! ```text
//! y[m, n] = ((Σ_k q[m,k]·t[n,k]) as f32) · (γ[n] · d[m]) + b[n]
//! ```
//!
//! with ternary codes `t ∈ {-1, 0, 1}`, per-tensor weight scale `γ`, int8 activation codes `q` and the
//! per-row dequantization factor `d[m] = 1 / s[m]`, `s[m] = 127 / max(max_k |x[m,k]|, 1e-5)`. The
//! integer sum is exact (int32); every implementation evaluates the f32 epilogue with the same
//! operations in the same order, so all kernels produce bit-identical outputs for any thread count.

pub mod attention;
pub mod dispatch;
pub mod f32_linear;
pub mod ops;
pub mod pack;
pub mod quant;
pub mod reference;
mod tile;

#[cfg(target_arch = "aarch64")]
mod aarch64;
#[cfg(target_arch = "x86_64")]
mod amx;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use dispatch::{
    KernelKind, ternary_matmul, ternary_matmul_add, ternary_matmul_add_with, ternary_matmul_i32,
    ternary_matmul_relu2_mul, ternary_matmul_relu2_mul_with, ternary_matmul_with,
};
pub use pack::{RawWeights, TernaryMatrix};
pub use quant::{
    ActLayout, QuantInput, QuantizedActivations, quantize_activations, quantize_activations_for,
    quantize_input, quantize_input_for,
};

/// Errors of the kernel layer: always about the caller's data, never a panic.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum KernelError {
    #[error("{what}: dimension must be non-zero (got {rows}x{cols})")]
    ZeroDimension {
        what: &'static str,
        rows: usize,
        cols: usize,
    },
    #[error("{what}: expected {expected} elements, got {got}")]
    LengthMismatch {
        what: &'static str,
        expected: usize,
        got: usize,
    },
    #[error("{what}: inner dimensions differ ({left} vs {right})")]
    ShapeMismatch {
        what: &'static str,
        left: usize,
        right: usize,
    },
    #[error("{what}: non-finite value {value} at row {row}, column {col}")]
    NonFinite {
        what: &'static str,
        row: usize,
        col: usize,
        value: f32,
    },
    #[error("kernel {0} is not supported by this CPU")]
    Unsupported(KernelKind),
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, KernelError>;

/// The smallest level-1 data cache among this machine's cores, in bytes (Linux sysfs), or None
/// where it cannot be read. The smallest, because on a hybrid CPU a worker thread may run on
/// either kind of core.
pub fn l1d_bytes() -> Option<usize> {
    let cpus = std::fs::read_dir("/sys/devices/system/cpu").ok()?;
    let mut smallest: Option<usize> = None;
    for cpu in cpus.flatten() {
        let name = cpu.file_name();
        let is_cpu = name
            .to_str()
            .and_then(|n| n.strip_prefix("cpu"))
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
        if !is_cpu {
            continue;
        }
        let Ok(caches) = std::fs::read_dir(cpu.path().join("cache")) else {
            continue;
        };
        for cache in caches.flatten() {
            let read = |f: &str| std::fs::read_to_string(cache.path().join(f)).ok();
            let (Some(level), Some(kind), Some(size)) = (read("level"), read("type"), read("size"))
            else {
                continue;
            };
            if level.trim() != "1" || !matches!(kind.trim(), "Data" | "Unified") {
                continue;
            }
            if let Some(bytes) = parse_cache_size(size.trim()) {
                smallest = Some(smallest.map_or(bytes, |s| s.min(bytes)));
            }
        }
    }
    smallest
}

/// sysfs cache sizes: "48K", "2048K", "1M".
fn parse_cache_size(text: &str) -> Option<usize> {
    let (digits, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => text.split_at(i),
        None => (text, ""),
    };
    let value: usize = digits.parse().ok()?;
    match unit {
        "" => Some(value),
        "K" => Some(value << 10),
        "M" => Some(value << 20),
        _ => None,
    }
}

/// Deterministic pseudo-random values uniform in [-amplitude, amplitude) (an LCG): test and
/// benchmark inputs that are the same on every machine.
pub fn pseudo_random(len: usize, seed: u64, amplitude: f32) -> Vec<f32> {
    let mut s = seed;
    (0..len)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * amplitude
        })
        .collect()
}

/// The cache level a [`prefetch`] asks for.
#[derive(Clone, Copy)]
pub(crate) enum CacheLevel {
    L1,
    L2,
}

/// Asks for the cache line holding `at` in `level` (x86 `prefetcht0` / `prefetcht1`, aarch64
/// `prfm pldl1keep` / `pldl2keep`, nothing elsewhere): a hint with no architectural effect, which
/// never faults wherever `at` points.
#[inline(always)]
pub(crate) fn prefetch(at: *const u8, level: CacheLevel) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: see above.
    unsafe {
        use std::arch::x86_64::{_MM_HINT_T0, _MM_HINT_T1, _mm_prefetch};
        match level {
            CacheLevel::L1 => _mm_prefetch::<_MM_HINT_T0>(at.cast()),
            CacheLevel::L2 => _mm_prefetch::<_MM_HINT_T1>(at.cast()),
        }
    };
    #[cfg(target_arch = "aarch64")]
    // SAFETY: see above.
    unsafe {
        use std::arch::asm;
        match level {
            CacheLevel::L1 => asm!(
                "prfm pldl1keep, [{}]",
                in(reg) at,
                options(nostack, readonly, preserves_flags)
            ),
            CacheLevel::L2 => asm!(
                "prfm pldl2keep, [{}]",
                in(reg) at,
                options(nostack, readonly, preserves_flags)
            ),
        }
    };
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    let _ = (at, level);
}

/// Checks `len == rows * cols` and both non-zero.
pub(crate) fn check_matrix(what: &'static str, len: usize, rows: usize, cols: usize) -> Result<()> {
    if rows == 0 || cols == 0 {
        return Err(KernelError::ZeroDimension { what, rows, cols });
    }
    let expected = rows
        .checked_mul(cols)
        .ok_or_else(|| KernelError::Invalid(format!("{what}: {rows}x{cols} overflows usize")))?;
    if len != expected {
        return Err(KernelError::LengthMismatch {
            what,
            expected,
            got: len,
        });
    }
    Ok(())
}

/// A heap buffer of bytes aligned to 64 (one cache line / one zmm register), length a multiple of 64.
#[derive(Clone)]
pub struct AlignedBytes {
    blocks: Vec<Align64>,
}

#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Align64([u8; 64]);

impl AlignedBytes {
    /// `len` is rounded up to a multiple of 64; contents are filled with `fill`.
    pub fn new(len: usize, fill: u8) -> Self {
        Self {
            blocks: vec![Align64([fill; 64]); len.div_ceil(64)],
        }
    }
    pub fn len(&self) -> usize {
        self.blocks.len() * 64
    }
    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `Align64` is `repr(C)` around `[u8; 64]` (size 64, no padding), so the vector's
        // storage is `len()` initialised, contiguous bytes.
        unsafe { std::slice::from_raw_parts(self.blocks.as_ptr().cast::<u8>(), self.len()) }
    }
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`; the borrow is unique.
        unsafe { std::slice::from_raw_parts_mut(self.blocks.as_mut_ptr().cast::<u8>(), self.len()) }
    }
    /// Grows (never shrinks) the buffer to at least `len` bytes; new bytes are zero, existing
    /// bytes keep their values.
    pub fn ensure_len(&mut self, len: usize) {
        let blocks = len.div_ceil(64);
        if self.blocks.len() < blocks {
            self.blocks.resize(blocks, Align64([0; 64]));
        }
    }
}

impl std::fmt::Debug for AlignedBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBytes({} bytes)", self.len())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn sysfs_cache_sizes_parse() {
        assert_eq!(super::parse_cache_size("48K"), Some(48 << 10));
        assert_eq!(super::parse_cache_size("1M"), Some(1 << 20));
        assert_eq!(super::parse_cache_size("512"), Some(512));
        assert_eq!(super::parse_cache_size("K"), None);
        assert_eq!(super::parse_cache_size("48 KB"), None);
    }
}
