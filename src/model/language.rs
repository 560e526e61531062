//! `language_model.model`: BitNet b1.58 2B4T (§1.3) run fully bidirectionally (§5.6). The
//! embedding table stays in the (memory-mapped) checkpoint; only the rows a prompt uses are read.

use super::buffers::{ForwardBuffers, sized};
use super::config::BitVlaConfig;
use super::linear::{Linear, LinearKind};
use super::store::TensorStore;
use super::{KernelContext, Result};
use crate::kernels::QuantInput;
use crate::kernels::attention::{AttentionImpl, AttentionShape, attention_with};
use crate::kernels::ops::{RopeTable, rms_norm_in_place};

pub struct RmsNorm {
    pub weight: Vec<f32>,
    pub eps: f32,
    name: String,
}

impl RmsNorm {
    pub fn load(store: &TensorStore, prefix: &str, width: usize, eps: f32) -> Result<Self> {
        Ok(Self {
            weight: store.f32(&format!("{prefix}.weight"), &[width])?,
            eps,
            name: prefix.to_owned(),
        })
    }

    /// Normalizes `x` in place (the final norm: no second tokens × hidden buffer at the
    /// forward's memory peak).
    pub fn apply(&self, x: &mut [f32]) -> Result<()> {
        rms_norm_in_place(x, &self.weight, self.eps).stage(&self.name)
    }

    /// The norm of `x` as the input of linear layers: ternary layers quantize it row by row as
    /// it is computed, so the normalized f32 activations are never written to memory.
    pub fn input<'a>(&'a self, x: &'a [f32]) -> QuantInput<'a> {
        QuantInput::RmsNormed {
            x,
            weight: &self.weight,
            eps: self.eps,
        }
    }
}

/// `layers.N.self_attn`.
pub struct SelfAttention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub attn_sub_norm: RmsNorm,
    pub o_proj: Linear,
}

/// `layers.N.mlp`.
pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub ffn_sub_norm: RmsNorm,
    pub down_proj: Linear,
}

/// `layers.N`.
pub struct DecoderLayer {
    pub input_layernorm: RmsNorm,
    pub self_attn: SelfAttention,
    pub post_attention_layernorm: RmsNorm,
    pub mlp: Mlp,
}

impl DecoderLayer {
    /// The layer's seven BitLinear layers.
    pub fn bitlinears_mut(&mut self) -> [&mut Linear; 7] {
        let (a, m) = (&mut self.self_attn, &mut self.mlp);
        [
            &mut a.q_proj,
            &mut a.k_proj,
            &mut a.v_proj,
            &mut a.o_proj,
            &mut m.gate_proj,
            &mut m.up_proj,
            &mut m.down_proj,
        ]
    }

    pub fn bitlinears(&self) -> [&Linear; 7] {
        let (a, m) = (&self.self_attn, &self.mlp);
        [
            &a.q_proj,
            &a.k_proj,
            &a.v_proj,
            &a.o_proj,
            &m.gate_proj,
            &m.up_proj,
            &m.down_proj,
        ]
    }
}

pub struct LanguageModel {
    pub layers: Vec<DecoderLayer>,
    pub norm: RmsNorm,
    /// `language_model.model.embed_tokens.weight`, read row by row from the store.
    pub embed_tokens: String,
    pub vocab: usize,
    hidden: usize,
    heads: usize,
    kv_heads: usize,
    rope_theta: f32,
}

impl LanguageModel {
    pub fn load(store: &TensorStore, config: &BitVlaConfig) -> Result<Self> {
        let t = &config.text_config;
        let (h, f) = (t.hidden_size, t.intermediate_size);
        let kv = config.kv_heads() * config.text_head_dim();
        let eps = t.rms_norm_eps as f32;
        let p = "language_model.model";
        let embed_tokens = format!("{p}.embed_tokens.weight");
        let shape = store.shape(&embed_tokens)?;
        if shape != [t.vocab_size, h] {
            return Err(super::ModelError::tensor(
                &embed_tokens,
                format!("shape {shape:?}, config says [{}, {h}]", t.vocab_size),
            ));
        }
        let layers = (0..t.num_hidden_layers)
            .map(|j| {
                let l = format!("{p}.layers.{j}");
                let lin = |name: &str, n, k| {
                    Linear::load(
                        store,
                        &format!("{l}.{name}"),
                        n,
                        k,
                        false,
                        LinearKind::Ternary,
                    )
                };
                let norm =
                    |name: &str, width| RmsNorm::load(store, &format!("{l}.{name}"), width, eps);
                Ok(DecoderLayer {
                    input_layernorm: norm("input_layernorm", h)?,
                    self_attn: SelfAttention {
                        q_proj: lin("self_attn.q_proj", h, h)?,
                        k_proj: lin("self_attn.k_proj", kv, h)?,
                        v_proj: lin("self_attn.v_proj", kv, h)?,
                        attn_sub_norm: norm("self_attn.attn_sub_norm", h)?,
                        o_proj: lin("self_attn.o_proj", h, h)?,
                    },
                    post_attention_layernorm: norm("post_attention_layernorm", h)?,
                    mlp: Mlp {
                        gate_proj: lin("mlp.gate_proj", f, h)?,
                        up_proj: lin("mlp.up_proj", f, h)?,
                        ffn_sub_norm: norm("mlp.ffn_sub_norm", f)?,
                        down_proj: lin("mlp.down_proj", h, f)?,
                    },
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            layers,
            norm: RmsNorm::load(store, &format!("{p}.norm"), h, eps)?,
            embed_tokens,
            vocab: t.vocab_size,
            hidden: h,
            heads: t.num_attention_heads,
            kv_heads: config.kv_heads(),
            rope_theta: t.rope_theta as f32,
        })
    }

    pub fn hidden(&self) -> usize {
        self.hidden
    }

    pub fn memory_bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| {
                l.bitlinears()
                    .iter()
                    .map(|x| x.memory_bytes())
                    .sum::<usize>()
                    + 4 * (3 * self.hidden + l.mlp.ffn_sub_norm.weight.len())
            })
            .sum::<usize>()
            + self.hidden * 4
    }

    /// All layers and the final norm over `x` (`tokens × hidden`, the assembled embeddings).
    /// `causal` exists only to show the tests can detect a wrongly masked implementation.
    pub fn forward(
        &self,
        mut x: Vec<f32>,
        tokens: usize,
        causal: bool,
        buffers: &mut ForwardBuffers,
    ) -> Result<Vec<f32>> {
        let ForwardBuffers {
            qa,
            qkv,
            attn,
            hidden: gated,
            ..
        } = buffers;
        let head_dim = self.hidden / self.heads;
        let rope = RopeTable::new(head_dim, tokens, self.rope_theta).stage("RoPE table")?;
        let shape = AttentionShape {
            tokens,
            heads: self.heads,
            kv_heads: self.kv_heads,
            head_dim,
        };
        let mut scores = Vec::new();
        // Buffers reused by every layer and every call (each output is fully overwritten):
        // after the first call nothing is allocated or zeroed. The four norms of a layer feed
        // only ternary layers, which normalize and quantize their input in one pass
        // (`RmsNorm::input`). `attn` holds the attention output, `gated` the FFN's
        // relu(gate)² · up. o_proj and down_proj add their outputs to the residual stream `x`
        // in their GEMMs' epilogues (on the f32 path through q's buffer, free once the attention
        // has run).
        let attn = sized(attn, tokens * self.hidden);
        for layer in &self.layers {
            let a = &layer.self_attn;
            Linear::forward_shared_input_into(
                &[&a.q_proj, &a.k_proj, &a.v_proj],
                layer.input_layernorm.input(&x),
                tokens,
                qa,
                qkv,
            )?;
            rope.apply(&mut qkv[0], self.heads).stage("RoPE q")?;
            rope.apply(&mut qkv[1], self.kv_heads).stage("RoPE k")?;
            attention_with(
                AttentionImpl::best(),
                shape,
                causal,
                &qkv[0],
                &qkv[1],
                &qkv[2],
                attn,
                &mut scores,
            )
            .stage(format!("{} attention", a.q_proj.name))?;
            a.o_proj.forward_residual_into(
                a.attn_sub_norm.input(attn),
                tokens,
                qa,
                &mut x,
                &mut qkv[0],
            )?;
            let m = &layer.mlp;
            Linear::forward_relu2_gated_into(
                &m.gate_proj,
                &m.up_proj,
                layer.post_attention_layernorm.input(&x),
                tokens,
                qa,
                gated,
            )?;
            m.down_proj.forward_residual_into(
                m.ffn_sub_norm.input(gated),
                tokens,
                qa,
                &mut x,
                &mut qkv[0],
            )?;
        }
        self.norm.apply(&mut x)?;
        Ok(x)
    }
}
