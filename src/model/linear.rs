//! Linear layers as the checkpoint stores them (`<prefix>.weight` [N, K], optional
//! `<prefix>.bias` [N]): BitLinear layers pre-quantized once at load into packed ternary codes
//! (§2.2, run with the W1.58-A8 kernels), full-precision ones kept in f32.

use super::packed::{CODES_SUFFIX, SCALE_SUFFIX, packed_len};
use super::store::{DType, TensorStore};
use super::{KernelContext, ModelError, Result};
use crate::kernels::f32_linear::{self, WeightRef};
use crate::kernels::ops::{add_in_place, relu_squared_mul};
use crate::kernels::{
    QuantInput, QuantizedActivations, TernaryMatrix, quantize_input, ternary_matmul,
    ternary_matmul_add, ternary_matmul_relu2_mul,
};

pub enum Weights {
    /// W1.58-A8: ternary codes × γ, int8 activations.
    Ternary(TernaryMatrix),
    /// Full precision, row-major N × K.
    Dense(Vec<f32>),
    /// Full precision stored as bf16 (as in the checkpoint: exact, half the memory).
    DenseBf16(Vec<half::bf16>),
}

pub struct Linear {
    /// The tensor-name prefix (`...self_attn.q_proj`), used in error messages.
    pub name: String,
    pub n: usize,
    pub k: usize,
    pub weights: Weights,
    pub bias: Option<Vec<f32>>,
}

/// How the layer is stored and computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinearKind {
    /// BitLinear, W1.58-A8.
    Ternary,
    /// BitLinear weights with full-precision activations: the dequantized γ·t in f32.
    TernaryWeightsOnly,
    /// Plain `nn.Linear`.
    Dense,
    /// Plain `nn.Linear` that the reference casts to bf16 before loading its (f32) checkpoint
    /// into it (OFT's proprio projector: `.to(torch.bfloat16)`, then `load_state_dict`): the
    /// weights are rounded to bf16 (to nearest even, as torch does) and kept so, in half the
    /// memory of f32 (13 MB less for the full-size proprio projector). Bias stays f32.
    DenseBf16,
}

impl Linear {
    /// Loads `<prefix>.weight` (and `<prefix>.bias` when `bias`), checking the shape [n, k].
    pub fn load(
        store: &TensorStore,
        prefix: &str,
        n: usize,
        k: usize,
        bias: bool,
        kind: LinearKind,
    ) -> Result<Self> {
        let weight_name = format!("{prefix}.weight");
        let codes = format!("{weight_name}{CODES_SUFFIX}");
        if store.contains(&codes) {
            // A packed checkpoint: adopt the codes as they are.
            let (bytes, dtype) = store.raw(&codes, &[packed_len(n, k)])?;
            if dtype != DType::U8 {
                return Err(ModelError::tensor(
                    &codes,
                    format!("is {dtype:?}, expected U8"),
                ));
            }
            let scale = store.f32(&format!("{weight_name}{SCALE_SUFFIX}"), &[1])?[0];
            let t = TernaryMatrix::from_packed(bytes, n, k, scale).stage(&codes);
            store.release(&codes);
            let weights = match kind {
                LinearKind::Ternary => Weights::Ternary(t?),
                LinearKind::TernaryWeightsOnly => Weights::Dense(dequantize(&t?)),
                LinearKind::Dense | LinearKind::DenseBf16 => {
                    return Err(ModelError::tensor(
                        &codes,
                        "packed ternary codes for a full-precision layer (config mismatch)",
                    ));
                }
            };
            return Self::with_bias(store, prefix, n, k, bias, weights);
        }
        let stored_bf16 = store.dtype(&weight_name)? == DType::BF16;
        let weights = match kind {
            LinearKind::Dense | LinearKind::DenseBf16 if stored_bf16 => {
                Weights::DenseBf16(store.bf16(&weight_name, &[n, k])?)
            }
            LinearKind::DenseBf16 => Weights::DenseBf16(
                store
                    .f32(&weight_name, &[n, k])?
                    .into_iter()
                    .map(half::bf16::from_f32)
                    .collect(),
            ),
            LinearKind::Dense => Weights::Dense(store.f32(&weight_name, &[n, k])?),
            LinearKind::Ternary => Weights::Ternary(store.ternary(&weight_name, n, k)?),
            LinearKind::TernaryWeightsOnly => {
                Weights::Dense(dequantize(&store.ternary(&weight_name, n, k)?))
            }
        };
        Self::with_bias(store, prefix, n, k, bias, weights)
    }

    fn with_bias(
        store: &TensorStore,
        prefix: &str,
        n: usize,
        k: usize,
        bias: bool,
        weights: Weights,
    ) -> Result<Self> {
        let bias = if bias {
            Some(store.f32(&format!("{prefix}.bias"), &[n])?)
        } else {
            None
        };
        Ok(Self {
            name: prefix.to_owned(),
            n,
            k,
            weights,
            bias,
        })
    }

    /// Bytes of weight and bias storage.
    pub fn memory_bytes(&self) -> usize {
        let w = match &self.weights {
            Weights::Ternary(t) => t.memory_bytes(),
            Weights::Dense(d) => d.len() * 4,
            Weights::DenseBf16(d) => d.len() * 2,
        };
        w + self.bias.as_ref().map_or(0, |b| b.len() * 4)
    }

    /// `x (m × k) → m × n`.
    pub fn forward(&self, x: &[f32], m: usize, qa: &mut QuantizedActivations) -> Result<Vec<f32>> {
        let mut out = Self::forward_shared(&[self], x, m, qa)?;
        out.pop()
            .ok_or_else(|| ModelError::Input(format!("{}: no output", self.name)))
    }

    /// Several layers that read the same input (q/k/v, gate/up): the ternary ones share one
    /// activation quantization, as in the reference.
    pub fn forward_shared(
        layers: &[&Linear],
        x: &[f32],
        m: usize,
        qa: &mut QuantizedActivations,
    ) -> Result<Vec<Vec<f32>>> {
        let mut outs = vec![Vec::new(); layers.len()];
        Self::forward_shared_into(layers, x, m, qa, &mut outs)?;
        Ok(outs)
    }

    /// [`Linear::forward_shared`] into caller-owned buffers, resized as needed: a layer loop
    /// that reuses them neither allocates nor zeroes memory after its first iteration (every
    /// output element is overwritten).
    pub fn forward_shared_into(
        layers: &[&Linear],
        x: &[f32],
        m: usize,
        qa: &mut QuantizedActivations,
        outs: &mut [Vec<f32>],
    ) -> Result<()> {
        Self::forward_shared_input_into(layers, QuantInput::Plain(x), m, qa, outs)
    }

    /// [`Linear::forward_shared_into`] of a [`QuantInput`]: for an RMSNorm input, ternary
    /// layers quantize the normalized rows as they are computed (the normalized f32 activations
    /// are never written), with the same codes as normalizing first; full-precision layers get
    /// the normalized activations computed once.
    pub fn forward_shared_input_into(
        layers: &[&Linear],
        input: QuantInput<'_>,
        m: usize,
        qa: &mut QuantizedActivations,
        outs: &mut [Vec<f32>],
    ) -> Result<()> {
        let x = input.raw();
        let mut normalized: Option<Vec<f32>> = None;
        let mut quantized_for: Option<usize> = None;
        for (layer, out) in layers.iter().zip(outs.iter_mut()) {
            layer.check_len("input", x.len(), m, layer.k)?;
            out.resize(m * layer.n, 0.0);
            match &layer.weights {
                Weights::Ternary(t) => {
                    if quantized_for != Some(t.k_padded()) {
                        layer.quantize(t, input, m, qa)?;
                        quantized_for = Some(t.k_padded());
                    }
                    ternary_matmul(qa, t, layer.bias.as_deref(), out).stage(&layer.name)?;
                }
                Weights::Dense(w) => {
                    let x = dense_input(input, layer.k, &mut normalized, &layer.name)?;
                    layer.dense(x, m, WeightRef::F32(w), out)?
                }
                Weights::DenseBf16(w) => {
                    let x = dense_input(input, layer.k, &mut normalized, &layer.name)?;
                    layer.dense(x, m, WeightRef::Bf16(w), out)?
                }
            }
        }
        Ok(())
    }

    /// A residual connection, `x += layer(input)` (`x`: `m × n`). A ternary layer adds in its
    /// GEMM's epilogue (its output is never written); a full-precision one (the engine's f32
    /// path) computes into `scratch` and adds. Both give the same values bit for bit.
    pub fn forward_residual_into(
        &self,
        input: QuantInput<'_>,
        m: usize,
        qa: &mut QuantizedActivations,
        x: &mut [f32],
        scratch: &mut Vec<f32>,
    ) -> Result<()> {
        self.check_len("residual stream", x.len(), m, self.n)?;
        match &self.weights {
            Weights::Ternary(t) => {
                self.check_len("input", input.raw().len(), m, self.k)?;
                self.quantize(t, input, m, qa)?;
                ternary_matmul_add(qa, t, self.bias.as_deref(), x).stage(&self.name)
            }
            _ => {
                Self::forward_shared_input_into(
                    &[self],
                    input,
                    m,
                    qa,
                    std::slice::from_mut(scratch),
                )?;
                add_in_place(x, scratch).stage(format!("{} residual", self.name))
            }
        }
    }

    /// The int8 activations of this ternary layer's input, into `qa`.
    fn quantize(
        &self,
        t: &TernaryMatrix,
        input: QuantInput<'_>,
        m: usize,
        qa: &mut QuantizedActivations,
    ) -> Result<()> {
        quantize_input(input, m, self.k, t.k_padded(), qa).stage(format!("{} input", self.name))
    }

    /// An error naming the layer unless `len` = `m × width`.
    fn check_len(&self, what: &str, len: usize, m: usize, width: usize) -> Result<()> {
        if len == m * width {
            return Ok(());
        }
        Err(ModelError::Input(format!(
            "{}: {what} has {len} values, expected {m} × {width}",
            self.name
        )))
    }

    /// The gated FFN activation `relu(gate(x))² · up(x)` (BitNet's `relu2` MLP) into `out`,
    /// resized as needed. With ternary weights the two projections share one activation
    /// quantization and the gate's activation runs in its GEMM's epilogue (the gate's output is
    /// never written); otherwise (the engine's f32 path) the projections run separately and
    /// [`relu_squared_mul`] combines them. Both give the same values bit for bit.
    pub fn forward_relu2_gated_into(
        gate: &Linear,
        up: &Linear,
        input: QuantInput<'_>,
        m: usize,
        qa: &mut QuantizedActivations,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        if gate.n != up.n || gate.k != up.k {
            return Err(ModelError::Input(format!(
                "{} ({} × {}) and {} ({} × {}) must have the same shape",
                gate.name, gate.n, gate.k, up.name, up.n, up.k
            )));
        }
        match (&gate.weights, &up.weights) {
            (Weights::Ternary(g), Weights::Ternary(u)) if g.k_padded() == u.k_padded() => {
                // One quantization, then up into `out` and the fused gate over it.
                Self::forward_shared_input_into(&[up], input, m, qa, std::slice::from_mut(out))?;
                ternary_matmul_relu2_mul(qa, g, gate.bias.as_deref(), out).stage(&gate.name)
            }
            _ => {
                let mut outs = [Vec::new(), std::mem::take(out)];
                Self::forward_shared_input_into(&[gate, up], input, m, qa, &mut outs)?;
                let [mut gated, up_out] = outs;
                relu_squared_mul(&mut gated, &up_out).stage(format!("{} activation", gate.name))?;
                *out = gated;
                Ok(())
            }
        }
    }

    fn dense(&self, x: &[f32], m: usize, w: WeightRef<'_>, out: &mut [f32]) -> Result<()> {
        f32_linear::linear_weights(x, m, self.k, w, self.n, self.bias.as_deref(), out)
            .stage(&self.name)
    }

    /// This layer with its ternary weights expanded to f32 (γ·t): the engine's f32 path.
    pub fn to_dense(&self) -> Linear {
        let weights = match &self.weights {
            Weights::Ternary(t) => Weights::Dense(dequantize(t)),
            Weights::Dense(d) => Weights::Dense(d.clone()),
            Weights::DenseBf16(d) => Weights::DenseBf16(d.clone()),
        };
        Linear {
            name: self.name.clone(),
            n: self.n,
            k: self.k,
            weights,
            bias: self.bias.clone(),
        }
    }
}

/// The f32 activations a full-precision layer of `k` inputs reads: `input` itself, or its norm,
/// computed into `normalized` on first use.
fn dense_input<'a>(
    input: QuantInput<'a>,
    k: usize,
    normalized: &'a mut Option<Vec<f32>>,
    layer: &str,
) -> Result<&'a [f32]> {
    if let QuantInput::Plain(x) = input {
        return Ok(x);
    }
    match normalized {
        Some(v) => Ok(v),
        None => {
            input.check_params(k).stage(format!("{layer} input norm"))?;
            let mut v = vec![0.0; input.raw().len()];
            input.normalize_rows(input.raw(), &mut v);
            Ok(normalized.insert(v))
        }
    }
}

/// γ·t as a row-major f32 N × K matrix.
pub fn dequantize(t: &TernaryMatrix) -> Vec<f32> {
    let (n, k) = (t.rows(), t.cols());
    let codes = t.unpack_codes();
    let scales = t.column_scales();
    let mut out = Vec::with_capacity(n * k);
    for row in 0..n {
        out.extend(
            codes[row * k..(row + 1) * k]
                .iter()
                .map(|&c| f32::from(c) * scales[row]),
        );
    }
    out
}
