//! f32 element-wise operations of the model (`bitvla-model.md` §1.6): RMSNorm, LayerNorm, softmax,
//! exact (erf) and tanh GELU, squared ReLU, RoPE in the rotate-half layout.
//!
//! Transcendentals are branch-free polynomials written in plain f32 arithmetic so that LLVM
//! vectorizes them; each slice function is compiled twice (generic, and for AVX-512 on x86-64 with
//! a runtime check) from the same source, with no fused multiply-add contraction, so both builds
//! give identical bits. Reductions use 16 explicit lanes in a fixed order: results never depend
//! on the SIMD width or the thread count.

use super::{KernelError, Result, check_matrix};

/// Defines `$vis fn $name(args)` that runs `$generic(args)` compiled for AVX-512 when the CPU has
/// it, else the generic build. Same source, same operation order, same results.
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? => $generic:ident) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
                fn wide($($arg: $ty),*) $(-> $ret)? {
                    $generic($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512dq")
                {
                    // SAFETY: the CPU supports every feature `wide` is compiled for.
                    return unsafe { wide($($arg),*) };
                }
            }
            $generic($($arg),*)
        }
    };
}

pub(crate) use multiversion;

const LANES: usize = 16;

/// Σ f(x) over 16 lanes in a fixed order.
#[inline(always)]
fn lane_sum(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut lanes = [0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l += f(v);
        }
    }
    for (l, &v) in lanes.iter_mut().zip(tail) {
        *l += f(v);
    }
    lanes.iter().sum()
}

#[inline(always)]
fn lane_max(x: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l = if v > *l { v } else { *l };
        }
    }
    for (l, &v) in lanes.iter_mut().zip(tail) {
        *l = if v > *l { v } else { *l };
    }
    lanes
        .iter()
        .fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a })
}

fn check_rows(what: &'static str, len: usize, width: usize, out_len: usize) -> Result<()> {
    if width == 0 || len == 0 || !len.is_multiple_of(width) {
        return Err(KernelError::Invalid(format!(
            "{what}: input of {len} values is not a non-empty multiple of the width {width}"
        )));
    }
    check_matrix(what, out_len, len / width, width)
}

pub(crate) fn check_param(what: &'static str, p: &[f32], width: usize) -> Result<()> {
    if p.len() != width {
        return Err(KernelError::LengthMismatch {
            what,
            expected: width,
            got: p.len(),
        });
    }
    Ok(())
}

/// RMSNorm over rows of `weight.len()`: `out = w · (x / sqrt(mean(x²) + eps))`.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) -> Result<()> {
    check_rows("rms_norm", x.len(), weight.len(), out.len())?;
    rms_norm_rows(x, weight, eps, out);
    Ok(())
}

/// [`rms_norm`] in place (saves a buffer the size of the FFN activations).
pub fn rms_norm_in_place(x: &mut [f32], weight: &[f32], eps: f32) -> Result<()> {
    check_rows("rms_norm", x.len(), weight.len(), x.len())?;
    rms_norm_in_place_rows(x, weight, eps);
    Ok(())
}

multiversion!(fn rms_norm_in_place_rows(x: &mut [f32], weight: &[f32], eps: f32) => rms_norm_in_place_generic);

#[inline(always)]
fn rms_norm_in_place_generic(x: &mut [f32], weight: &[f32], eps: f32) {
    let width = weight.len();
    for row in x.chunks_exact_mut(width) {
        let inv = 1.0 / (lane_sum(row, |v| v * v) / width as f32 + eps).sqrt();
        for (v, &w) in row.iter_mut().zip(weight) {
            *v = w * (*v * inv);
        }
    }
}

multiversion!(
    /// [`rms_norm`] without the checks: rows of `weight.len()` (the activation quantizer
    /// normalizes one row at a time with it, so the fused path computes the same values).
    pub(crate) fn rms_norm_rows(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) => rms_norm_generic
);

#[inline(always)]
fn rms_norm_generic(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let width = weight.len();
    for (xr, yr) in x.chunks_exact(width).zip(out.chunks_exact_mut(width)) {
        let inv = 1.0 / (lane_sum(xr, |v| v * v) / width as f32 + eps).sqrt();
        for ((y, &v), &w) in yr.iter_mut().zip(xr).zip(weight) {
            *y = w * (v * inv);
        }
    }
}

/// LayerNorm over rows of `weight.len()`: `out = w · (x − μ) / sqrt(σ² + eps) + b` (biased σ²).
pub fn layer_norm(
    x: &[f32],
    weight: &[f32],
    bias: &[f32],
    eps: f32,
    out: &mut [f32],
) -> Result<()> {
    check_rows("layer_norm", x.len(), weight.len(), out.len())?;
    check_param("layer_norm bias", bias, weight.len())?;
    layer_norm_rows(x, weight, bias, eps, out);
    Ok(())
}

multiversion!(
    /// [`layer_norm`] without the checks (the activation quantizer's fused path uses it per row).
    pub(crate) fn layer_norm_rows(x: &[f32], weight: &[f32], bias: &[f32], eps: f32, out: &mut [f32]) => layer_norm_generic
);

#[inline(always)]
fn layer_norm_generic(x: &[f32], weight: &[f32], bias: &[f32], eps: f32, out: &mut [f32]) {
    let width = weight.len();
    for (xr, yr) in x.chunks_exact(width).zip(out.chunks_exact_mut(width)) {
        let mean = lane_sum(xr, |v| v) / width as f32;
        let var = lane_sum(xr, |v| (v - mean) * (v - mean)) / width as f32;
        let inv = 1.0 / (var + eps).sqrt();
        for (((y, &v), &w), &b) in yr.iter_mut().zip(xr).zip(weight).zip(bias) {
            *y = w * ((v - mean) * inv) + b;
        }
    }
}

/// Softmax over each row of `width`, in place (max-subtracted, f32).
pub fn softmax_rows(x: &mut [f32], width: usize) -> Result<()> {
    check_rows("softmax", x.len(), width, x.len())?;
    softmax_rows_mv(x, width);
    Ok(())
}

multiversion!(fn softmax_rows_mv(x: &mut [f32], width: usize) => softmax_generic);

#[inline(always)]
fn softmax_generic(x: &mut [f32], width: usize) {
    for row in x.chunks_exact_mut(width) {
        let m = lane_max(row);
        for v in row.iter_mut() {
            *v = exp(*v - m);
        }
        let inv = 1.0 / lane_sum(row, |v| v);
        for v in row.iter_mut() {
            *v *= inv;
        }
    }
}

multiversion!(
    /// Exact GELU, `0.5·x·(1 + erf(x/√2))`, in place (projector, proprio projector).
    pub fn gelu_erf(x: &mut [f32]) => gelu_erf_generic
);
multiversion!(
    /// tanh GELU, `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`, in place (SigLIP MLP).
    pub fn gelu_tanh(x: &mut [f32]) => gelu_tanh_generic
);
multiversion!(
    /// Squared ReLU, `max(x, 0)²`, in place.
    pub fn relu_squared(x: &mut [f32]) => relu_squared_generic
);

/// The BitNet FFN gate: `gate ← max(gate, 0)² · up`, element-wise.
pub fn relu_squared_mul(gate: &mut [f32], up: &[f32]) -> Result<()> {
    check_param("relu_squared_mul up", up, gate.len())?;
    relu_squared_mul_mv(gate, up);
    Ok(())
}
multiversion!(fn relu_squared_mul_mv(gate: &mut [f32], up: &[f32]) => relu_squared_mul_generic);

#[inline(always)]
fn gelu_erf_generic(x: &mut [f32]) {
    for v in x.iter_mut() {
        *v = 0.5 * *v * (1.0 + erf(*v * std::f32::consts::FRAC_1_SQRT_2));
    }
}

#[inline(always)]
fn gelu_tanh_generic(x: &mut [f32]) {
    const C: f32 = 0.797_884_6; // sqrt(2/pi)
    for v in x.iter_mut() {
        let u = *v;
        *v = 0.5 * u * (1.0 + tanh(C * (u + 0.044715 * (u * u * u))));
    }
}

#[inline(always)]
fn relu_squared_generic(x: &mut [f32]) {
    for v in x.iter_mut() {
        let r = if *v > 0.0 { *v } else { 0.0 };
        *v = r * r;
    }
}

#[inline(always)]
fn relu_squared_mul_generic(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        let r = if *g > 0.0 { *g } else { 0.0 };
        *g = r * r * u;
    }
}

/// 1.5 · 2^23: `(v + MAGIC) − MAGIC` rounds |v| < 2^22 to the nearest integer (ties to even),
/// and the sum's mantissa holds that integer + 2^22.
const ROUND_MAGIC: f32 = 12_582_912.0;

/// The constants of [`exp`] (Cephes `expf`), shared with the vectorized e^x of the AVX-512
/// attention: the range limits, ln 2 split for the Cody–Waite reduction, and the polynomial
/// coefficients from the highest degree down.
pub(crate) const EXP_MIN: f32 = -87.336_55;
pub(crate) const EXP_MAX: f32 = 88.722_83;
pub(crate) const EXP_LN2_HI: f32 = 0.693_359_4;
#[allow(clippy::excessive_precision)] // published Cephes coefficients, kept verbatim
pub(crate) const EXP_LN2_LO: f32 = -2.121_944_4e-4;
#[allow(clippy::excessive_precision)]
pub(crate) const EXP_POLY: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    1.666_666_5e-1,
    5.000_000_1e-1,
];

/// e^x in f32, |relative error| ≲ 2 ulp on [-87, 88]; 0 below, +∞ above, NaN propagates.
/// Cody–Waite reduction x = n·ln2 + r, |r| ≤ ln2/2, then a degree-6 polynomial (Cephes `expf`).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    // Integer-only from here so the function vectorizes: n = round(xc·log2 e) via the magic
    // number, its integer value read from the mantissa (no float→int conversion, whose NaN and
    // saturation rules would force per-lane code). A NaN input goes through as 0 and is
    // restored at the end.
    let xc = if x.is_nan() {
        0.0
    } else {
        x.clamp(EXP_MIN, EXP_MAX)
    };
    let t = xc * std::f32::consts::LOG2_E + ROUND_MAGIC;
    let n = t - ROUND_MAGIC;
    let ni = (t.to_bits() & 0x7f_ffff) as i32 - 0x40_0000;
    let r = (xc - n * EXP_LN2_HI) - n * EXP_LN2_LO;
    let r2 = r * r;
    let mut p = EXP_POLY[0];
    for c in &EXP_POLY[1..] {
        p = p * r + c;
    }
    let y = (p * r2 + r) + 1.0;
    // 2^n by building the exponent bits; n ∈ [-126, 128] after the clamp. Split to stay normal.
    let half = ni >> 1;
    let s1 = f32::from_bits(((half + 127) as u32) << 23);
    let s2 = f32::from_bits(((ni - half + 127) as u32) << 23);
    let out = y * s1 * s2;
    if x.is_nan() {
        x
    } else if x < EXP_MIN {
        0.0
    } else if x > EXP_MAX {
        f32::INFINITY
    } else {
        out
    }
}

/// tanh in f32 via `1 − 2/(e^{2x} + 1)` for |x| ≥ 0.625 and an odd polynomial below
/// (|abs error| ≲ 2e-7).
#[inline(always)]
pub fn tanh(x: f32) -> f32 {
    let a = x.abs();
    // small: tanh(x) ≈ x + x³·P(x²) (Cephes tanhf coefficients)
    let z = x * x;
    let mut p = -5.704_988_7e-3f32;
    p = p * z + 2.063_908_6e-2;
    p = p * z - 5.373_971e-2;
    p = p * z + 1.333_144_2e-1;
    p = p * z - 3.333_328_8e-1;
    let small = x + x * z * p;
    let e = exp(2.0 * a.min(20.0));
    let large = 1.0 - 2.0 / (e + 1.0);
    let large = if x < 0.0 { -large } else { large };
    if a < 0.625 { small } else { large }
}

/// erf in f32 (|abs error| ≲ 2e-7): odd polynomial for |x| < 0.84375 (FreeBSD `s_erff.c` scheme,
/// here a minimax fit of erf(x)/x in x²), else `1 − t·e^{−x²+P(t)}` with t = 1/(1 + 0.5|x|)
/// (the Numerical Recipes erfc, relative error < 1.2e-7).
#[inline(always)]
#[allow(clippy::excessive_precision)] // published Numerical Recipes coefficients, kept verbatim
pub fn erf(x: f32) -> f32 {
    let a = x.abs();
    let z = x * x;
    // erf(x) = x · (2/√π)(1 − z/3 + z²/10 − z³/42 + z⁴/216 − z⁵/1320 + z⁶/9360) (Taylor, |x| < 0.84375:
    // truncation z⁷/75600 · 1.13 · 0.84 ≲ 1.2e-7·…)
    let mut p = -(1.0f32 / 75600.0);
    p = p * z + 1.0 / 9360.0;
    p = p * z - 1.0 / 1320.0;
    p = p * z + 1.0 / 216.0;
    p = p * z - 1.0 / 42.0;
    p = p * z + 1.0 / 10.0;
    p = p * z - 1.0 / 3.0;
    p = p * z + 1.0;
    let small = x * (std::f32::consts::FRAC_2_SQRT_PI * p);
    let t = 1.0 / (1.0 + 0.5 * a);
    let mut q = 0.170_872_77f32;
    q = q * t - 0.822_152_23;
    q = q * t + 1.488_515_87;
    q = q * t - 1.135_203_98;
    q = q * t + 0.278_868_07;
    q = q * t - 0.186_288_06;
    q = q * t + 0.096_784_18;
    q = q * t + 0.374_091_96;
    q = q * t + 1.000_023_68;
    q = q * t - 1.265_512_23;
    let erfc = t * exp(-z + q);
    let large = 1.0 - erfc;
    let large = if x < 0.0 { -large } else { large };
    if a < 0.84375 { small } else { large }
}

/// Precomputed RoPE angles for the rotate-half (NeoX) layout, emulating the reference's f32
/// arithmetic: `inv_freq[i] = 1 / θ^(2i/d)` and `angle = pos · inv_freq[i]` in f32; cos/sin of that
/// f32 angle, correctly rounded.
#[derive(Debug, Clone)]
pub struct RopeTable {
    head_dim: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl RopeTable {
    pub fn new(head_dim: usize, positions: usize, theta: f32) -> Result<Self> {
        if head_dim == 0 || !head_dim.is_multiple_of(2) || positions == 0 {
            return Err(KernelError::Invalid(format!(
                "RoPE: head_dim {head_dim} must be even and non-zero, positions {positions} non-zero"
            )));
        }
        let half = head_dim / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| 1.0 / theta.powf((2 * i) as f32 / head_dim as f32))
            .collect();
        let mut cos = Vec::with_capacity(positions * half);
        let mut sin = Vec::with_capacity(positions * half);
        for pos in 0..positions {
            for &f in &inv_freq {
                let angle = f64::from(pos as f32 * f);
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        Ok(Self { head_dim, cos, sin })
    }

    pub fn positions(&self) -> usize {
        self.cos.len() / (self.head_dim / 2)
    }

    /// Rotates `x` (rows = tokens at positions `0..rows`, each row `heads · head_dim` wide) in place.
    pub fn apply(&self, x: &mut [f32], heads: usize) -> Result<()> {
        let width = heads * self.head_dim;
        check_rows("rope", x.len(), width, x.len())?;
        let rows = x.len() / width;
        if rows > self.positions() {
            return Err(KernelError::Invalid(format!(
                "RoPE: {rows} positions requested, table has {}",
                self.positions()
            )));
        }
        rope_mv(x, &self.cos, &self.sin, self.head_dim, width);
        Ok(())
    }
}

multiversion!(fn rope_mv(x: &mut [f32], cos: &[f32], sin: &[f32], head_dim: usize, width: usize) => rope_generic);

#[inline(always)]
fn rope_generic(x: &mut [f32], cos: &[f32], sin: &[f32], head_dim: usize, width: usize) {
    let half = head_dim / 2;
    for (pos, row) in x.chunks_exact_mut(width).enumerate() {
        let (c, s) = (&cos[pos * half..][..half], &sin[pos * half..][..half]);
        for head in row.chunks_exact_mut(head_dim) {
            let (lo, hi) = head.split_at_mut(half);
            for i in 0..half {
                let (a, b) = (lo[i], hi[i]);
                lo[i] = a * c[i] - b * s[i];
                hi[i] = b * c[i] + a * s[i];
            }
        }
    }
}

/// Element-wise `x += y` (residual connections).
pub fn add_in_place(x: &mut [f32], y: &[f32]) -> Result<()> {
    check_param("add_in_place", y, x.len())?;
    add_mv(x, y);
    Ok(())
}
multiversion!(fn add_mv(x: &mut [f32], y: &[f32]) => add_generic);
#[inline(always)]
fn add_generic(x: &mut [f32], y: &[f32]) {
    for (a, &b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize, seed: u64, amp: f32) -> Vec<f32> {
        crate::kernels::pseudo_random(len, seed, amp)
    }

    fn erf64(x: f64) -> f64 {
        // Abramowitz–Stegun is too coarse for a reference: use the series/continued fraction.
        if x.abs() < 3.0 {
            let mut sum = 0.0;
            let mut term = x;
            let mut n = 0.0;
            while term.abs() > 1e-18 {
                sum += term / (2.0 * n + 1.0);
                n += 1.0;
                term *= -x * x / n;
            }
            sum * 2.0 / std::f64::consts::PI.sqrt()
        } else {
            // erfc continued fraction (Lentz), converges fast for |x| >= 3
            let a = x.abs();
            let mut f = 0.0;
            for k in (1..60).rev() {
                f = (k as f64 / 2.0) / (a + f);
            }
            let erfc = (-a * a).exp() / std::f64::consts::PI.sqrt() / (a + f);
            (1.0 - erfc).copysign(x)
        }
    }

    #[test]
    fn dispatched_and_generic_builds_agree_bit_for_bit() {
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let x = data(4099, 21, 6.0);
        let (mut a, mut b) = (x.clone(), x.clone());
        gelu_tanh(&mut a);
        gelu_tanh_generic(&mut b);
        assert_eq!(bits(&a), bits(&b));
        let (mut a, mut b) = (x.clone(), x.clone());
        gelu_erf(&mut a);
        gelu_erf_generic(&mut b);
        assert_eq!(bits(&a), bits(&b));
        let (mut a, mut b) = (x[..4096].to_vec(), x[..4096].to_vec());
        softmax_rows(&mut a, 512).unwrap();
        softmax_generic(&mut b, 512);
        assert_eq!(bits(&a), bits(&b));
        let w = data(1024, 22, 1.0);
        let (mut a, mut b) = (vec![0.0; 4096], vec![0.0; 4096]);
        rms_norm(&x[..4096], &w, 1e-5, &mut a).unwrap();
        rms_norm_generic(&x[..4096], &w, 1e-5, &mut b);
        assert_eq!(bits(&a), bits(&b));
        let mut c = x[..4096].to_vec();
        rms_norm_in_place(&mut c, &w, 1e-5).unwrap();
        assert_eq!(bits(&a), bits(&c));
    }

    #[test]
    fn transcendentals_match_f64() {
        let mut worst = [0f64; 3];
        let mut x = -30.0f32;
        while x < 30.0 {
            let e = f64::from(exp(x));
            let e_ref = f64::from(x).exp();
            worst[0] = worst[0].max((e - e_ref).abs() / e_ref);
            worst[1] = worst[1].max((f64::from(tanh(x)) - f64::from(x).tanh()).abs());
            worst[2] = worst[2].max((f64::from(erf(x)) - erf64(f64::from(x))).abs());
            x += 0.000_731;
        }
        assert!(worst[0] < 3e-7, "exp relative error {}", worst[0]);
        assert!(worst[1] < 3e-7, "tanh abs error {}", worst[1]);
        assert!(worst[2] < 3e-7, "erf abs error {}", worst[2]);
        assert_eq!(exp(-200.0), 0.0);
        assert_eq!(exp(200.0), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
        assert_eq!(tanh(50.0), 1.0);
        assert_eq!(erf(-10.0), -1.0);
    }

    #[test]
    fn activations_match_f64() {
        let x = data(4099, 5, 8.0);
        let mut a = x.clone();
        gelu_erf(&mut a);
        let mut b = x.clone();
        gelu_tanh(&mut b);
        let mut c = x.clone();
        relu_squared(&mut c);
        let up = data(4099, 6, 2.0);
        let mut d = x.clone();
        relu_squared_mul(&mut d, &up).unwrap();
        for i in 0..x.len() {
            let v = f64::from(x[i]);
            let ge = 0.5 * v * (1.0 + erf64(v / std::f64::consts::SQRT_2));
            let gt = 0.5
                * v
                * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (v + 0.044715 * v * v * v)).tanh());
            assert!(
                (f64::from(a[i]) - ge).abs() <= 1e-6 * v.abs().max(1.0),
                "gelu_erf({v})"
            );
            assert!(
                (f64::from(b[i]) - gt).abs() <= 1e-6 * v.abs().max(1.0),
                "gelu_tanh({v})"
            );
            assert_eq!(c[i], if x[i] > 0.0 { x[i] * x[i] } else { 0.0 });
            assert_eq!(d[i], c[i] * up[i]);
        }
    }

    #[test]
    fn norms_match_f64() {
        let width = 2560;
        let x = data(3 * width, 9, 3.0);
        let w = data(width, 10, 1.0);
        let b = data(width, 11, 1.0);
        let mut y = vec![0.0; x.len()];
        rms_norm(&x, &w, 1e-5, &mut y).unwrap();
        let mut z = vec![0.0; x.len()];
        layer_norm(&x, &w, &b, 1e-6, &mut z).unwrap();
        for r in 0..3 {
            let row: Vec<f64> = x[r * width..(r + 1) * width]
                .iter()
                .map(|&v| f64::from(v))
                .collect();
            let ms = row.iter().map(|v| v * v).sum::<f64>() / width as f64;
            let mean = row.iter().sum::<f64>() / width as f64;
            let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / width as f64;
            for i in 0..width {
                let e = f64::from(w[i]) * row[i] / (ms + 1e-5).sqrt();
                assert!((f64::from(y[r * width + i]) - e).abs() < 2e-6 * e.abs().max(1.0));
                let e = f64::from(w[i]) * (row[i] - mean) / (var + 1e-6).sqrt() + f64::from(b[i]);
                assert!((f64::from(z[r * width + i]) - e).abs() < 2e-6 * e.abs().max(1.0));
            }
        }
        assert!(rms_norm(&x[..10], &w, 1e-5, &mut y[..10]).is_err());
        assert!(layer_norm(&x, &w, &b[..5], 1e-5, &mut z).is_err());
    }

    #[test]
    fn softmax_matches_f64_and_handles_extremes() {
        let width = 625;
        let mut x = data(2 * width, 12, 30.0);
        let orig = x.clone();
        softmax_rows(&mut x, width).unwrap();
        for r in 0..2 {
            let row = &orig[r * width..(r + 1) * width];
            let m = row.iter().cloned().fold(f32::MIN, f32::max) as f64;
            let z: f64 = row.iter().map(|&v| (f64::from(v) - m).exp()).sum();
            for i in 0..width {
                let e = (f64::from(row[i]) - m).exp() / z;
                assert!((f64::from(x[r * width + i]) - e).abs() < 1e-6 * e.max(1e-3));
            }
        }
        let mut same = vec![-1e30f32; 7];
        softmax_rows(&mut same, 7).unwrap();
        assert!(same.iter().all(|&p| (p - 1.0 / 7.0).abs() < 1e-7));
        assert!(softmax_rows(&mut [1.0; 5], 2).is_err());
    }

    #[test]
    fn rope_matches_the_rotate_half_definition() {
        let (d, heads, positions) = (128, 3, 9);
        let table = RopeTable::new(d, positions, 500_000.0).unwrap();
        let x = data(positions * heads * d, 13, 1.0);
        let mut y = x.clone();
        table.apply(&mut y, heads).unwrap();
        for p in 0..positions {
            for h in 0..heads {
                for i in 0..d / 2 {
                    let f = 500_000f64.powf(-(i as f64) / (d / 2) as f64);
                    let (c, s) = ((p as f64 * f).cos(), (p as f64 * f).sin());
                    let base = p * heads * d + h * d;
                    let (a, b) = (f64::from(x[base + i]), f64::from(x[base + i + d / 2]));
                    assert!((f64::from(y[base + i]) - (a * c - b * s)).abs() < 1e-5);
                    assert!((f64::from(y[base + i + d / 2]) - (b * c + a * s)).abs() < 1e-5);
                }
            }
        }
        // position 0 is the identity
        assert_eq!(&y[..heads * d], &x[..heads * d]);
        assert!(table.apply(&mut vec![0.0; 10 * heads * d], heads).is_err());
        assert!(RopeTable::new(127, 4, 1e4).is_err());
    }
}
