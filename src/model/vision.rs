//! `vision_tower.vision_model`: the SigLIP encoder (§1.1, §5.5) and `multi_modal_projector`
//! (§1.2). Images are encoded independently (attention never mixes them) but share the linear
//! layers as one batch of `images × patches` rows.

use super::buffers::{ForwardBuffers, sized};
use super::config::{BitVlaConfig, VisionPrecision};
use super::linear::{Linear, LinearKind};
use super::store::TensorStore;
use super::{KernelContext, ModelError, Result};
use crate::kernels::attention::{AttentionShape, attention};
use crate::kernels::ops::{add_in_place, gelu_erf, gelu_tanh, layer_norm};
use crate::kernels::{QuantInput, QuantizedActivations};

pub struct LayerNorm {
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
    pub eps: f32,
    name: String,
}

impl LayerNorm {
    pub fn load(store: &TensorStore, prefix: &str, width: usize, eps: f32) -> Result<Self> {
        Ok(Self {
            weight: store.f32(&format!("{prefix}.weight"), &[width])?,
            bias: store.f32(&format!("{prefix}.bias"), &[width])?,
            eps,
            name: prefix.to_owned(),
        })
    }

    pub fn forward(&self, x: &[f32]) -> Result<Vec<f32>> {
        let mut out = vec![0.0; x.len()];
        self.forward_into(x, &mut out)?;
        Ok(out)
    }

    pub fn forward_into(&self, x: &[f32], out: &mut [f32]) -> Result<()> {
        layer_norm(x, &self.weight, &self.bias, self.eps, out).stage(&self.name)
    }

    /// The norm of `x` as the input of linear layers: ternary layers quantize it row by row as
    /// it is computed, so the normalized f32 activations are never written to memory.
    pub fn input<'a>(&'a self, x: &'a [f32]) -> QuantInput<'a> {
        QuantInput::LayerNormed {
            x,
            weight: &self.weight,
            bias: &self.bias,
            eps: self.eps,
        }
    }
}

/// `encoder.layers.N`: pre-LN attention and tanh-GELU MLP blocks.
pub struct EncoderLayer {
    pub layer_norm1: LayerNorm,
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub out_proj: Linear,
    pub layer_norm2: LayerNorm,
    pub fc1: Linear,
    pub fc2: Linear,
}

impl EncoderLayer {
    /// The layer's BitLinear layers (ternary when the config says so).
    pub fn bitlinears_mut(&mut self) -> [&mut Linear; 6] {
        [
            &mut self.q_proj,
            &mut self.k_proj,
            &mut self.v_proj,
            &mut self.out_proj,
            &mut self.fc1,
            &mut self.fc2,
        ]
    }

    pub fn bitlinears(&self) -> [&Linear; 6] {
        [
            &self.q_proj,
            &self.k_proj,
            &self.v_proj,
            &self.out_proj,
            &self.fc1,
            &self.fc2,
        ]
    }
}

pub struct VisionTower {
    /// The patch convolution as a GEMM: [hidden, channels·patch·patch] in (c, ky, kx) order.
    pub patch_embedding: Linear,
    /// [patches, hidden], added by patch index.
    pub position_embedding: Vec<f32>,
    pub layers: Vec<EncoderLayer>,
    hidden: usize,
    heads: usize,
    image_size: usize,
    patch: usize,
}

impl VisionTower {
    pub fn load(store: &TensorStore, config: &BitVlaConfig) -> Result<Self> {
        let v = &config.vision_config;
        let p = "vision_tower.vision_model";
        let (h, f, patch) = (v.hidden_size, v.intermediate_size, v.patch_size);
        let patches = config.patches_per_image();
        let kind = match config.vision_precision() {
            VisionPrecision::Ternary => LinearKind::Ternary,
            VisionPrecision::TernaryWeightsOnly => LinearKind::TernaryWeightsOnly,
            VisionPrecision::Full => LinearKind::Dense,
        };
        let conv = format!("{p}.embeddings.patch_embedding");
        let k = v.num_channels * patch * patch;
        let weight = store.f32(
            &format!("{conv}.weight"),
            &[h, v.num_channels, patch, patch],
        )?;
        let patch_embedding = Linear {
            name: conv.clone(),
            n: h,
            k,
            weights: super::linear::Weights::Dense(weight),
            bias: Some(store.f32(&format!("{conv}.bias"), &[h])?),
        };
        let position_embedding = store.f32(
            &format!("{p}.embeddings.position_embedding.weight"),
            &[patches, h],
        )?;
        let eps = v.layer_norm_eps as f32;
        let layers = (0..v.num_hidden_layers)
            .map(|i| {
                let l = format!("{p}.encoder.layers.{i}");
                let lin = |name: &str, n, k| {
                    Linear::load(store, &format!("{l}.{name}"), n, k, true, kind)
                };
                Ok(EncoderLayer {
                    layer_norm1: LayerNorm::load(store, &format!("{l}.layer_norm1"), h, eps)?,
                    q_proj: lin("self_attn.q_proj", h, h)?,
                    k_proj: lin("self_attn.k_proj", h, h)?,
                    v_proj: lin("self_attn.v_proj", h, h)?,
                    out_proj: lin("self_attn.out_proj", h, h)?,
                    layer_norm2: LayerNorm::load(store, &format!("{l}.layer_norm2"), h, eps)?,
                    fc1: lin("mlp.fc1", f, h)?,
                    fc2: lin("mlp.fc2", h, f)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            patch_embedding,
            position_embedding,
            layers,
            hidden: h,
            heads: v.num_attention_heads,
            image_size: v.image_size,
            patch,
        })
    }

    pub fn memory_bytes(&self) -> usize {
        let l: usize = self
            .layers
            .iter()
            .map(|l| {
                l.bitlinears()
                    .iter()
                    .map(|x| x.memory_bytes())
                    .sum::<usize>()
                    + 4 * 4 * self.hidden
            })
            .sum();
        l + self.patch_embedding.memory_bytes() + self.position_embedding.len() * 4
    }

    pub fn patches_per_image(&self) -> usize {
        (self.image_size / self.patch).pow(2)
    }

    /// `images`: CHW tensors of `image_size`². Returns the last encoder layer's output (no
    /// post-LayerNorm), `images·patches × hidden`, image after image.
    pub fn forward(&self, images: &[Vec<f32>], buffers: &mut ForwardBuffers) -> Result<Vec<f32>> {
        let ForwardBuffers {
            qa,
            cols,
            qkv,
            attn,
            hidden,
        } = buffers;
        let (s, p, h) = (self.image_size, self.patch, self.hidden);
        let grid = s / p;
        let patches = grid * grid;
        let k = 3 * p * p;
        let m = images.len() * patches;
        // Patch flattening in (channel, ky, kx) order, patches row-major (§5.1).
        // Every value is written below.
        let cols = sized(cols, m * k);
        for (i, img) in images.iter().enumerate() {
            if img.len() != 3 * s * s {
                return Err(ModelError::Input(format!(
                    "image {i}: {} values, expected 3×{s}×{s}",
                    img.len()
                )));
            }
            for gy in 0..grid {
                for gx in 0..grid {
                    let row = &mut cols[(i * patches + gy * grid + gx) * k..][..k];
                    for c in 0..3 {
                        for ky in 0..p {
                            let src = &img[c * s * s + (gy * p + ky) * s + gx * p..][..p];
                            row[(c * p + ky) * p..][..p].copy_from_slice(src);
                        }
                    }
                }
            }
        }
        let mut x = self.patch_embedding.forward(cols, m, qa)?;
        for row in x.chunks_exact_mut(patches * h) {
            add_in_place(row, &self.position_embedding).stage("position_embedding")?;
        }
        let shape = AttentionShape {
            tokens: patches,
            heads: self.heads,
            kv_heads: self.heads,
            head_dim: h / self.heads,
        };
        let mut scores = Vec::new();
        // Buffers reused by every layer and every call (see LanguageModel::forward); both layer
        // norms are fused into the quantization of the layers they feed (`LayerNorm::input`).
        // The attention writes every value of `attn`. out_proj and fc2 add their outputs to the
        // residual stream `x` in their GEMMs' epilogues (on the f32 path through q's buffer, free
        // once the attention has run).
        let attn = sized(attn, m * h);
        let one = std::slice::from_mut;
        for layer in &self.layers {
            Linear::forward_shared_input_into(
                &[&layer.q_proj, &layer.k_proj, &layer.v_proj],
                layer.layer_norm1.input(&x),
                m,
                qa,
                qkv,
            )?;
            for i in 0..images.len() {
                let r = i * patches * h..(i + 1) * patches * h;
                attention(
                    shape,
                    &qkv[0][r.clone()],
                    &qkv[1][r.clone()],
                    &qkv[2][r.clone()],
                    &mut attn[r],
                    &mut scores,
                )
                .stage(format!("{} attention", layer.q_proj.name))?;
            }
            layer.out_proj.forward_residual_into(
                QuantInput::Plain(attn),
                m,
                qa,
                &mut x,
                &mut qkv[0],
            )?;
            Linear::forward_shared_input_into(
                &[&layer.fc1],
                layer.layer_norm2.input(&x),
                m,
                qa,
                one(hidden),
            )?;
            gelu_tanh(hidden);
            layer.fc2.forward_residual_into(
                QuantInput::Plain(hidden),
                m,
                qa,
                &mut x,
                &mut qkv[0],
            )?;
        }
        Ok(x)
    }
}

/// `multi_modal_projector`: linear_1 → exact GELU → linear_2, full precision.
pub struct Projector {
    pub linear_1: Linear,
    pub linear_2: Linear,
}

impl Projector {
    pub fn load(store: &TensorStore, config: &BitVlaConfig) -> Result<Self> {
        let (vh, th) = (
            config.vision_config.hidden_size,
            config.text_config.hidden_size,
        );
        let bias = config.multimodal_projector_bias;
        Ok(Self {
            linear_1: Linear::load(
                store,
                "multi_modal_projector.linear_1",
                th,
                vh,
                bias,
                LinearKind::Dense,
            )?,
            linear_2: Linear::load(
                store,
                "multi_modal_projector.linear_2",
                th,
                th,
                bias,
                LinearKind::Dense,
            )?,
        })
    }

    pub fn forward(&self, x: &[f32], m: usize, qa: &mut QuantizedActivations) -> Result<Vec<f32>> {
        let mut y = self.linear_1.forward(x, m, qa)?;
        gelu_erf(&mut y);
        self.linear_2.forward(&y, m, qa)
    }
}
