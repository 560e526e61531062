//! Ternary weight quantization and the packed panel layout the GEMM kernels read.
//!
//! # Quantization (as the reference `weight_quant`)
//! γ = max(mean |W|, 1e-5) over the whole tensor; t = clamp(round_half_even(W · (1/γ)), -1, 1).
//! Σ|W| is summed exactly ([`AbsSum`]: per binary exponent, the integer sum of the significands),
//! so it does not depend on the order of summation: quantizing runs in parallel and gives the same
//! γ for any thread count. The mean is then rounded to f32 (PyTorch's fp32 reduction order is not
//! reproducible; this is the value it approximates).
//!
//! # Packed layout
//! Weights are stored as codes `c = t + 1 ∈ {0, 1, 2}`, 2 bits each. The matrix (N outputs × K
//! inputs) is padded to `N_p` = multiple of [`PANEL_COLS`] (padding code 1, i.e. t = 0, scale 0) and
//! `K_p` = multiple of [`K_BLOCK`] (padding code 1; padded activations are 0, so it contributes 0).
//!
//! The buffer is a sequence of panels of 32 output columns; panel `p` is contiguous
//! (`K_p/16 · 128` bytes). Within a panel, each block of 16 consecutive k is 128 bytes: two 64-byte
//! vectors, one per half `h ∈ {0, 1}` of 16 columns. In the vector of half `h` of k-block `kb`,
//!
//! ```text
//! byte 4·j + e, bits 2i+1..2i  =  c[32p + 16h + j, 16·kb + 4i + e]      j < 16, e < 4, i < 4
//! ```
//!
//! so shifting the 64-byte vector right by `2i` bits and masking every byte with `0b11` yields, for
//! the 4-k group `i`, the operand `vpdpbusd` wants: lane `j` holds the 4 codes of column `16h + j`.

use super::{AlignedBytes, KernelError, Result, check_matrix};
use half::bf16;
use rayon::prelude::*;

/// Output columns per packed panel (the GEMM's register block width).
pub const PANEL_COLS: usize = 32;
/// Inputs (k) per packed block; K is padded to a multiple of this.
pub const K_BLOCK: usize = 16;
/// Bytes of one 32-column × 16-k block.
pub const BLOCK_BYTES: usize = PANEL_COLS * K_BLOCK / 4;

/// A ternary weight matrix `W ≈ γ · t` with `N` outputs (rows) and `K` inputs (columns), packed for
/// the GEMM. Several tensors may be fused along N (q/k/v, gate/up), each keeping its own γ.
#[derive(Clone, Debug)]
pub struct TernaryMatrix {
    n: usize,
    k: usize,
    packed: AlignedBytes,
    /// γ of the tensor each column belongs to; 0 for padding columns. Length `n_padded()`.
    column_scales: Vec<f32>,
    /// (first column, γ) of each fused tensor, in order.
    segments: Vec<(usize, f32)>,
}

/// The per-tensor scale the way earlier versions computed it: max(mean |W|, 1e-5), the mean
/// accumulated sequentially in f64 (eight partial sums). Kept to show that [`AbsSum`] gives the
/// same γ (tests).
pub fn absmean_scale(values: impl Iterator<Item = f32>, count: usize) -> f32 {
    let mut lanes = [0f64; 8];
    for (i, v) in values.enumerate() {
        lanes[i % 8] += f64::from(v.abs());
    }
    let sum: f64 = lanes.iter().sum();
    ((sum / count as f64) as f32).max(1e-5)
}

/// Σ|v| of finite f32 values, exactly: for each of the 256 binary exponents the integer sum of
/// the 24-bit significands of the values with that exponent. Sums merge by integer addition, so
/// any split of a tensor (any thread count) gives the same total.
#[derive(Clone)]
pub struct AbsSum {
    /// `buckets[e]`: Σ significand of the values whose biased exponent is `e` (a value is
    /// `significand · 2^(max(e, 1) − 150)`).
    buckets: [u128; 256],
    /// Values that were NaN or ±∞.
    non_finite: u64,
}

impl Default for AbsSum {
    fn default() -> Self {
        Self {
            buckets: [0; 256],
            non_finite: 0,
        }
    }
}

impl AbsSum {
    /// Σ|v| of `values` (at most 2^40 of them).
    pub fn of(values: impl Iterator<Item = f32>) -> Self {
        // u64 buckets in the loop (2^40 values × 2^24 fit), widened once. Four sets, used in
        // turn: neighbouring weights mostly share an exponent, and one set would chain every
        // add through the same memory word.
        let mut buckets = [[0u64; 256]; 4];
        let mut non_finite = 0u64;
        for (i, v) in values.enumerate() {
            let bits = v.to_bits() & 0x7fff_ffff;
            let e = (bits >> 23) as usize;
            let implicit = if e == 0 { 0 } else { 0x80_0000 };
            buckets[i & 3][e] += u64::from((bits & 0x7f_ffff) | implicit);
            non_finite += u64::from(e == 255);
        }
        let mut out = Self {
            non_finite,
            ..Self::default()
        };
        for (e, o) in out.buckets.iter_mut().enumerate() {
            *o = buckets.iter().map(|set| u128::from(set[e])).sum();
        }
        out.buckets[255] = 0;
        out
    }

    pub fn merge(mut self, other: Self) -> Self {
        for (a, b) in self.buckets.iter_mut().zip(other.buckets) {
            *a += b;
        }
        self.non_finite += other.non_finite;
        self
    }

    pub fn non_finite(&self) -> u64 {
        self.non_finite
    }

    /// The sum as f64 (buckets added from the largest exponent down, in a fixed order).
    pub fn total(&self) -> f64 {
        let mut sum = 0.0f64;
        for e in (0..255).rev() {
            let b = self.buckets[e];
            if b != 0 {
                sum += b as f64 * 2f64.powi(e.max(1) as i32 - 150);
            }
        }
        sum
    }

    /// γ = max(Σ|v| / count, 1e-5).
    pub fn scale(&self, count: usize) -> f32 {
        ((self.total() / count as f64) as f32).max(1e-5)
    }
}

/// A stored floating-point type, decoded from its little-endian bytes.
trait Element: 'static {
    const SIZE: usize;
    fn value(bytes: &[u8]) -> f32;
}

struct Bf16Bytes;
struct F16Bytes;
struct F32Bytes;

impl Element for Bf16Bytes {
    const SIZE: usize = 2;
    #[inline]
    fn value(b: &[u8]) -> f32 {
        f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16)
    }
}

impl Element for F16Bytes {
    const SIZE: usize = 2;
    #[inline]
    fn value(b: &[u8]) -> f32 {
        half::f16::from_le_bytes([b[0], b[1]]).to_f32()
    }
}

impl Element for F32Bytes {
    const SIZE: usize = 4;
    #[inline]
    fn value(b: &[u8]) -> f32 {
        f32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }
}

/// Master weights as stored in a checkpoint: little-endian bytes of one floating-point type.
#[derive(Debug, Clone, Copy)]
pub enum RawWeights<'a> {
    Bf16(&'a [u8]),
    F16(&'a [u8]),
    F32(&'a [u8]),
}

/// Ternary code of one weight given `inv_scale = 1/γ`: clamp(round_half_even(w · inv_scale), -1, 1).
/// With x = w · inv_scale that is 1 for x > 0.5, −1 for x < −0.5 and 0 otherwise (±0.5 are ties
/// that round to the even 0; everything beyond ±1.5 clamps to ±1): two comparisons, which
/// vectorize (`f32::round_ties_even` is a libm call on baseline x86-64 and made quantizing a full
/// model take 30 s).
#[inline]
pub fn ternary_code(w: f32, inv_scale: f32) -> i8 {
    let x = w * inv_scale;
    i8::from(x > 0.5) - i8::from(x < -0.5)
}

impl TernaryMatrix {
    /// Quantizes f32 master weights (row-major, `n` rows of `k`). Rejects NaN/∞.
    pub fn from_f32(weights: &[f32], n: usize, k: usize) -> Result<Self> {
        let raw: Vec<u8> = weights.iter().flat_map(|v| v.to_le_bytes()).collect();
        Self::quantize::<F32Bytes>(&raw, n, k)
    }

    /// Quantizes bf16 master weights (row-major, `n` rows of `k`), as stored in the checkpoints.
    pub fn from_bf16(weights: &[bf16], n: usize, k: usize) -> Result<Self> {
        let raw: Vec<u8> = weights.iter().flat_map(|v| v.to_le_bytes()).collect();
        Self::quantize::<Bf16Bytes>(&raw, n, k)
    }

    /// Quantizes master weights straight from a checkpoint's bytes (row-major, `n` rows of `k`):
    /// two parallel passes over them (Σ|W| and the finiteness check, then the codes panel by
    /// panel), no decoded copy.
    pub fn from_raw(weights: RawWeights<'_>, n: usize, k: usize) -> Result<Self> {
        match weights {
            RawWeights::Bf16(raw) => Self::quantize::<Bf16Bytes>(raw, n, k),
            RawWeights::F16(raw) => Self::quantize::<F16Bytes>(raw, n, k),
            RawWeights::F32(raw) => Self::quantize::<F32Bytes>(raw, n, k),
        }
    }

    fn quantize<E: Element>(raw: &[u8], n: usize, k: usize) -> Result<Self> {
        if !raw.len().is_multiple_of(E::SIZE) {
            return Err(KernelError::Invalid(format!(
                "ternary weight: {} bytes is not a whole number of {}-byte values",
                raw.len(),
                E::SIZE
            )));
        }
        let len = raw.len() / E::SIZE;
        check_matrix("ternary weight", len, n, k)?;
        fn values<E: Element>(bytes: &[u8]) -> impl Iterator<Item = f32> + '_ {
            bytes.chunks_exact(E::SIZE).map(E::value)
        }
        // Pass 1, in parallel: Σ|W| (exact, so the split does not matter) and non-finite values.
        const CHUNK: usize = 1 << 16;
        let sum = raw
            .par_chunks(CHUNK * E::SIZE)
            .map(|chunk| AbsSum::of(values::<E>(chunk)))
            .reduce(AbsSum::default, AbsSum::merge);
        if sum.non_finite() > 0
            && let Some((i, value)) = values::<E>(raw).enumerate().find(|(_, v)| !v.is_finite())
        {
            return Err(KernelError::NonFinite {
                what: "ternary weight",
                row: i / k,
                col: i % k,
                value,
            });
        }
        let gamma = sum.scale(len);
        let inv = 1.0 / gamma;
        // Pass 2, in parallel: the codes, a row at a time into each panel.
        let row_bytes = k * E::SIZE;
        Self::pack_rows(n, k, gamma, |row, codes: &mut [u8]| {
            let bytes = &raw[row * row_bytes..(row + 1) * row_bytes];
            for (c, v) in codes.iter_mut().zip(values::<E>(bytes)) {
                *c = (ternary_code(v, inv) + 1) as u8;
            }
        })
    }

    /// Packs a matrix whose row `row`'s codes `c = t + 1` (k of them) `row_codes` writes.
    fn pack_rows(
        n: usize,
        k: usize,
        gamma: f32,
        row_codes: impl Fn(usize, &mut [u8]) + Sync,
    ) -> Result<Self> {
        let n_padded = n.div_ceil(PANEL_COLS) * PANEL_COLS;
        let k_padded = k.div_ceil(K_BLOCK) * K_BLOCK;
        let k_blocks = k_padded / K_BLOCK;
        let mut packed = AlignedBytes::new(n_padded / PANEL_COLS * k_blocks * BLOCK_BYTES, 0);
        let panel_bytes = k_blocks * BLOCK_BYTES;
        packed
            .as_mut_slice()
            .par_chunks_mut(panel_bytes)
            .enumerate()
            .for_each_init(
                || vec![1u8; k_padded],
                |codes, (panel, bytes)| {
                    for within in 0..PANEL_COLS {
                        let row = panel * PANEL_COLS + within;
                        if row < n {
                            row_codes(row, &mut codes[..k]);
                        } else {
                            codes[..k].fill(1);
                        }
                        // codes[k..] stay 1 (t = 0): the K padding.
                        let (half, j) = (within / 16, within % 16);
                        for (kb, c) in codes.chunks_exact(K_BLOCK).enumerate() {
                            // Byte e of word i is c[4i + e] (≤ 2), so the four words shifted by
                            // 0, 2, 4, 6 and or-ed give byte e = Σ_i c[4i + e] << 2i at once.
                            let word = |i: usize| {
                                u32::from_le_bytes([
                                    c[4 * i],
                                    c[4 * i + 1],
                                    c[4 * i + 2],
                                    c[4 * i + 3],
                                ])
                            };
                            let packed = word(0) | word(1) << 2 | word(2) << 4 | word(3) << 6;
                            let at = (kb * 2 + half) * 64 + 4 * j;
                            bytes[at..at + 4].copy_from_slice(&packed.to_le_bytes());
                        }
                    }
                },
            );
        Ok(Self::single(n, k, packed, gamma))
    }

    /// Packs already-ternary codes `t ∈ {-1, 0, 1}` (row-major `n × k`) with scale `gamma`.
    pub fn from_codes(codes: &[i8], n: usize, k: usize, gamma: f32) -> Result<Self> {
        check_matrix("ternary codes", codes.len(), n, k)?;
        if let Some(i) = codes.iter().position(|c| !(-1..=1).contains(c)) {
            return Err(KernelError::Invalid(format!(
                "ternary codes: value {} at row {}, column {} is not in {{-1, 0, 1}}",
                codes[i],
                i / k,
                i % k
            )));
        }
        if !gamma.is_finite() {
            return Err(KernelError::Invalid(format!(
                "ternary scale {gamma} is not finite"
            )));
        }
        Self::pack_rows(n, k, gamma, |row, out: &mut [u8]| {
            for (o, &c) in out.iter_mut().zip(&codes[row * k..(row + 1) * k]) {
                *o = (c + 1) as u8;
            }
        })
    }

    /// Adopts bytes already in the packed layout (a converted checkpoint), checking their length
    /// and that every 2-bit code is 0, 1 or 2.
    pub fn from_packed(bytes: &[u8], n: usize, k: usize, gamma: f32) -> Result<Self> {
        check_matrix("packed ternary weight", n * k, n, k)?;
        let n_padded = n.div_ceil(PANEL_COLS) * PANEL_COLS;
        let k_padded = k.div_ceil(K_BLOCK) * K_BLOCK;
        let expected = n_padded * k_padded / 4;
        if bytes.len() != expected {
            return Err(KernelError::LengthMismatch {
                what: "packed ternary weight bytes",
                expected,
                got: bytes.len(),
            });
        }
        if !gamma.is_finite() || gamma < 0.0 {
            return Err(KernelError::Invalid(format!(
                "ternary scale {gamma} is not valid"
            )));
        }
        if let Some(i) = bytes.iter().position(|&b| b & (b >> 1) & 0x55 != 0) {
            return Err(KernelError::Invalid(format!(
                "packed ternary weight: byte {i} holds the invalid code 3 (corrupt file)"
            )));
        }
        let mut packed = AlignedBytes::new(bytes.len(), 0);
        packed.as_mut_slice().copy_from_slice(bytes);
        Ok(Self::single(n, k, packed, gamma))
    }

    /// One unfused tensor: every real column has γ, padding columns 0.
    fn single(n: usize, k: usize, packed: AlignedBytes, gamma: f32) -> Self {
        let mut column_scales = vec![gamma; n];
        column_scales.resize(n.div_ceil(PANEL_COLS) * PANEL_COLS, 0.0);
        Self {
            n,
            k,
            packed,
            column_scales,
            segments: vec![(0, gamma)],
        }
    }

    /// γ of an unfused matrix.
    pub fn gamma(&self) -> f32 {
        self.segments.first().map_or(0.0, |s| s.1)
    }

    /// Fuses matrices with the same K along N (e.g. q, k, v into one operand). Every part but the
    /// last must have N a multiple of [`PANEL_COLS`] so the parts stay panel-aligned; each keeps its γ.
    pub fn concat(parts: &[&TernaryMatrix]) -> Result<Self> {
        let first = parts
            .first()
            .ok_or_else(|| KernelError::Invalid("concat of zero ternary matrices".into()))?;
        let k = first.k;
        let mut n = 0;
        let mut packed_len = 0;
        for (i, part) in parts.iter().enumerate() {
            if part.k != k {
                return Err(KernelError::ShapeMismatch {
                    what: "ternary concat (K)",
                    left: k,
                    right: part.k,
                });
            }
            if i + 1 < parts.len() && part.n % PANEL_COLS != 0 {
                return Err(KernelError::Invalid(format!(
                    "ternary concat: part {i} has N = {} (not a multiple of {PANEL_COLS})",
                    part.n
                )));
            }
            n += part.n;
            packed_len += part.packed.len();
        }
        let mut packed = AlignedBytes::new(packed_len, 0);
        let mut column_scales = Vec::with_capacity(n.div_ceil(PANEL_COLS) * PANEL_COLS);
        let mut segments = Vec::new();
        let mut offset = 0;
        for part in parts {
            let len = part.packed.len();
            packed.as_mut_slice()[offset..offset + len].copy_from_slice(part.packed.as_slice());
            offset += len;
            let start = column_scales.len();
            segments.extend(part.segments.iter().map(|&(c, g)| (start + c, g)));
            column_scales.extend_from_slice(&part.column_scales);
        }
        Ok(Self {
            n,
            k,
            packed,
            column_scales,
            segments,
        })
    }

    /// Output features N.
    pub fn rows(&self) -> usize {
        self.n
    }
    /// Input features K.
    pub fn cols(&self) -> usize {
        self.k
    }
    pub fn n_padded(&self) -> usize {
        self.column_scales.len()
    }
    pub fn k_padded(&self) -> usize {
        self.k.div_ceil(K_BLOCK) * K_BLOCK
    }
    pub fn panels(&self) -> usize {
        self.n_padded() / PANEL_COLS
    }
    /// Bytes of one packed panel.
    pub fn panel_bytes(&self) -> usize {
        self.k_padded() / K_BLOCK * BLOCK_BYTES
    }
    pub fn packed(&self) -> &[u8] {
        self.packed.as_slice()
    }
    pub fn column_scales(&self) -> &[f32] {
        &self.column_scales
    }
    /// (first output column, γ) of each fused tensor.
    pub fn segments(&self) -> &[(usize, f32)] {
        &self.segments
    }
    /// Bytes held by this matrix (packed codes + scales).
    pub fn memory_bytes(&self) -> usize {
        self.packed.len() + self.column_scales.len() * 4
    }

    /// The ternary code t[row, col] ∈ {-1, 0, 1} read back from the packed layout.
    pub fn code(&self, row: usize, col: usize) -> Option<i8> {
        if row >= self.n || col >= self.k {
            return None;
        }
        let (panel, within) = (row / PANEL_COLS, row % PANEL_COLS);
        let (half, j) = (within / 16, within % 16);
        let (kb, within_k) = (col / K_BLOCK, col % K_BLOCK);
        let (i, e) = (within_k / 4, within_k % 4);
        let k_blocks = self.k_padded() / K_BLOCK;
        let byte = self.packed.as_slice()[((panel * k_blocks + kb) * 2 + half) * 64 + 4 * j + e];
        Some(((byte >> (2 * i)) & 3) as i8 - 1)
    }

    /// All codes as a row-major `n × k` matrix (for references and tests).
    pub fn unpack_codes(&self) -> Vec<i8> {
        let mut out = Vec::with_capacity(self.n * self.k);
        for row in 0..self.n {
            for col in 0..self.k {
                out.push(self.code(row, col).unwrap_or(0));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantization_matches_hand_computed_codes_with_ties() {
        // mean |W| = (0.5 + 1.5 + 0.25 + 0.0 + 2.0 + 1.75 + 1.0 + 1.0) / 8 = 1.0, so codes are round(W).
        let w = [0.5f32, -1.5, 0.25, 0.0, 2.0, -1.75, 1.0, -1.0];
        let m = TernaryMatrix::from_f32(&w, 2, 4).unwrap();
        assert_eq!(m.segments(), &[(0, 1.0)]);
        // 0.5 -> 0 (tie to even), -1.5 -> -2 -> clamp -1, 0.25 -> 0, 2.0 -> clamp 1, -1.75 -> -1.
        assert_eq!(m.unpack_codes(), vec![0, -1, 0, 0, 1, -1, 1, -1]);
    }

    #[test]
    fn fast_code_equals_round_ties_even_everywhere() {
        let reference = |w: f32, inv: f32| (w * inv).round_ties_even().clamp(-1.0, 1.0) as i8;
        let mut values: Vec<f32> = (-40_000..=40_000).map(|i| i as f32 / 8192.0).collect();
        values.extend([
            0.5,
            -0.5,
            1.5,
            -1.5,
            2.5,
            -2.5,
            1e30,
            -1e30,
            f32::MAX,
            f32::MIN,
            -0.0,
            0.5f32.next_up(),
            0.5f32.next_down(),
            (-0.5f32).next_up(),
            (-0.5f32).next_down(),
            f32::INFINITY,
            f32::NEG_INFINITY,
        ]);
        values.extend(crate::kernels::pseudo_random(100_000, 9, 3.0));
        for inv in [1.0f32, 0.37, 19.3, 1e5] {
            for &w in &values {
                assert_eq!(ternary_code(w, inv), reference(w, inv), "w {w}, inv {inv}");
            }
        }
    }

    #[test]
    fn ties_round_to_even_at_the_half_scale() {
        // mean |W| = 2 -> w/γ: 1.0 -> 0.5 (tie -> 0), 3.0 -> 1.5 (tie -> 2 -> clamp 1)
        let w = [1.0f32, 3.0, -1.0, -3.0];
        let m = TernaryMatrix::from_f32(&w, 1, 4).unwrap();
        assert_eq!(m.unpack_codes(), vec![0, 1, 0, -1]);
    }

    #[test]
    fn all_zero_weights_use_the_floor_scale() {
        let m = TernaryMatrix::from_f32(&[0.0; 6], 2, 3).unwrap();
        assert_eq!(m.segments()[0].1, 1e-5);
        assert!(m.unpack_codes().iter().all(|&c| c == 0));
    }

    #[test]
    fn pack_round_trips_on_odd_shapes() {
        let mut state = 12345u32;
        for &(n, k) in &[(1, 1), (31, 15), (33, 17), (64, 48), (70, 4304 % 100 + 3)] {
            let codes: Vec<i8> = (0..n * k)
                .map(|_| {
                    state = state.wrapping_mul(1664525).wrapping_add(1013904223);
                    ((state >> 24) % 3) as i8 - 1
                })
                .collect();
            let m = TernaryMatrix::from_codes(&codes, n, k, 0.5).unwrap();
            assert_eq!(m.unpack_codes(), codes, "n={n} k={k}");
            assert_eq!(m.n_padded() % PANEL_COLS, 0);
            assert_eq!(m.k_padded() % K_BLOCK, 0);
            assert_eq!(m.packed().len(), m.panels() * m.panel_bytes());
            // padding is code 1 (t = 0) everywhere outside the matrix
            let padded_cols = m.n_padded() - n;
            assert_eq!(m.column_scales()[n..], vec![0.0; padded_cols][..]);
        }
    }

    #[test]
    fn bf16_and_f32_agree() {
        let w: Vec<f32> = (0..96)
            .map(|i| ((i * 37 % 19) as f32 - 9.0) * 0.125)
            .collect();
        let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
        let a = TernaryMatrix::from_f32(&w, 3, 32).unwrap();
        let b = TernaryMatrix::from_bf16(&wb, 3, 32).unwrap();
        assert_eq!(a.unpack_codes(), b.unpack_codes());
        assert_eq!(a.segments(), b.segments());
    }

    /// Deterministic pseudo-normal values with a spread of magnitudes (xorshift, Box-Muller-free:
    /// the sum of four uniforms, scaled).
    fn weights(len: usize, scale: f32, seed: u32) -> Vec<f32> {
        let mut state = seed.max(1);
        let mut uniform = || {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state as f32 / u32::MAX as f32
        };
        (0..len)
            .map(|_| (uniform() + uniform() + uniform() + uniform() - 2.0) * scale)
            .collect()
    }

    #[test]
    fn the_exact_sum_gives_the_sequential_scale() {
        for (len, scale, seed) in [(1000, 0.02, 1), (4096 * 3, 1.0, 2), (1 << 20, 0.003, 3)] {
            let w = weights(len, scale, seed);
            let b: Vec<f32> = w.iter().map(|&v| bf16::from_f32(v).to_f32()).collect();
            for v in [&w, &b] {
                let exact = AbsSum::of(v.iter().copied()).scale(v.len());
                let sequential = absmean_scale(v.iter().copied(), v.len());
                assert_eq!(
                    exact.to_bits(),
                    sequential.to_bits(),
                    "len {len} scale {scale}"
                );
            }
        }
        // Split anywhere, the same sum, bit for bit.
        let w = weights(10_007, 0.5, 9);
        let whole = AbsSum::of(w.iter().copied()).total();
        for cut in [1, 5000, 10_006] {
            let parts =
                AbsSum::of(w[..cut].iter().copied()).merge(AbsSum::of(w[cut..].iter().copied()));
            assert_eq!(parts.total().to_bits(), whole.to_bits());
        }
        // Subnormals, zeros, the largest finite value, and non-finite values are counted apart.
        let odd = [
            0.0f32,
            -0.0,
            f32::MIN_POSITIVE / 4.0,
            f32::MAX,
            f32::NAN,
            f32::NEG_INFINITY,
        ];
        let s = AbsSum::of(odd.iter().copied());
        assert_eq!(s.non_finite(), 2);
        assert_eq!(
            s.total(),
            f64::from(f32::MAX) + f64::from(f32::MIN_POSITIVE / 4.0)
        );
    }

    #[test]
    fn raw_bytes_quantize_like_decoded_values_on_any_thread_count() {
        for &(n, k) in &[(1, 1), (33, 17), (70, 200), (256, 1024)] {
            let w = weights(n * k, 0.05, (n * k) as u32);
            let b16: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
            let raw16: Vec<u8> = b16.iter().flat_map(|v| v.to_le_bytes()).collect();
            let raw32: Vec<u8> = w.iter().flat_map(|v| v.to_le_bytes()).collect();
            let h16: Vec<u8> = w
                .iter()
                .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
                .collect();
            // The reference: sequential γ, codes one by one, the original packing loop.
            let reference = |values: &[f32]| {
                let gamma = absmean_scale(values.iter().copied(), values.len());
                let codes: Vec<i8> = values
                    .iter()
                    .map(|&v| ternary_code(v, 1.0 / gamma))
                    .collect();
                TernaryMatrix::from_codes(&codes, n, k, gamma).unwrap()
            };
            let f16_values: Vec<f32> = w.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect();
            let b16_values: Vec<f32> = b16.iter().map(|v| v.to_f32()).collect();
            for (raw, values) in [
                (RawWeights::Bf16(&raw16), &b16_values),
                (RawWeights::F16(&h16), &f16_values),
                (RawWeights::F32(&raw32), &w),
            ] {
                let expected = reference(values);
                for threads in [1, 3] {
                    let pool = rayon::ThreadPoolBuilder::new()
                        .num_threads(threads)
                        .build()
                        .unwrap();
                    let m = pool.install(|| TernaryMatrix::from_raw(raw, n, k)).unwrap();
                    assert_eq!(
                        m.packed(),
                        expected.packed(),
                        "{n}x{k} {raw:?}",
                        raw = &raw_kind(raw)
                    );
                    assert_eq!(m.gamma().to_bits(), expected.gamma().to_bits());
                }
            }
        }
        fn raw_kind(r: RawWeights<'_>) -> &'static str {
            match r {
                RawWeights::Bf16(_) => "bf16",
                RawWeights::F16(_) => "f16",
                RawWeights::F32(_) => "f32",
            }
        }
        // Non-finite values are named by position; a wrong byte count is an error.
        let mut raw: Vec<u8> = [0.5f32; 12].iter().flat_map(|v| v.to_le_bytes()).collect();
        raw[4 * 7..4 * 8].copy_from_slice(&f32::INFINITY.to_le_bytes());
        assert!(matches!(
            TernaryMatrix::from_raw(RawWeights::F32(&raw), 3, 4),
            Err(KernelError::NonFinite { row: 1, col: 3, .. })
        ));
        assert!(TernaryMatrix::from_raw(RawWeights::Bf16(&[0u8; 5]), 1, 2).is_err());
        assert!(TernaryMatrix::from_raw(RawWeights::Bf16(&[0u8; 8]), 3, 2).is_err());
    }

    #[test]
    fn concat_keeps_each_scale() {
        let a = TernaryMatrix::from_codes(&[1; 32 * 16], 32, 16, 0.5).unwrap();
        let b = TernaryMatrix::from_codes(&[-1; 8 * 16], 8, 16, 2.0).unwrap();
        let c = TernaryMatrix::concat(&[&a, &b]).unwrap();
        assert_eq!(c.rows(), 40);
        assert_eq!(c.segments(), &[(0, 0.5), (32, 2.0)]);
        assert_eq!(c.column_scales()[31], 0.5);
        assert_eq!(c.column_scales()[32], 2.0);
        assert_eq!(c.column_scales()[40], 0.0);
        assert_eq!(c.code(33, 3), Some(-1));
        assert_eq!(c.code(3, 3), Some(1));
        // a part that is not panel-aligned cannot be followed by another
        assert!(TernaryMatrix::concat(&[&b, &a]).is_err());
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        assert!(matches!(
            TernaryMatrix::from_f32(&[], 0, 4),
            Err(KernelError::ZeroDimension { .. })
        ));
        assert!(matches!(
            TernaryMatrix::from_f32(&[1.0; 5], 2, 3),
            Err(KernelError::LengthMismatch { .. })
        ));
        let err = TernaryMatrix::from_f32(&[1.0, f32::NAN, 0.0, 1.0], 2, 2).unwrap_err();
        assert!(
            matches!(err, KernelError::NonFinite { row: 0, col: 1, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("row 0, column 1"));
        assert!(TernaryMatrix::from_codes(&[2], 1, 1, 1.0).is_err());
    }
}
