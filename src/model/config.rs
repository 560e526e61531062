//! `config.json` of a BitVLA checkpoint (§3.2), deserialized with serde. Every field carries the
//! reference default (the BitVLA fork of `configuration_llava.py`, `configuration_siglip.py`,
//! `configuration_bitnet.py`); unknown keys are ignored, known keys with a wrong type are an error
//! naming the key path.

use super::{ModelError, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BitVlaConfig {
    /// `"openvla"` in the published fine-tunes; informational.
    #[serde(default)]
    pub model_type: Option<String>,
    pub text_config: TextConfig,
    pub vision_config: VisionConfig,
    /// Which encoder layer feeds the projector; only −1 (the last) is supported.
    #[serde(default = "minus_one")]
    pub vision_feature_layer: i64,
    /// `"full"` keeps all patch tokens (§1.1); `"default"` would drop one and is rejected.
    #[serde(default = "full")]
    pub vision_feature_select_strategy: String,
    /// Projector activation: `"gelu"` (exact erf).
    #[serde(default = "gelu")]
    pub projector_hidden_act: String,
    #[serde(default = "yes")]
    pub multimodal_projector_bias: bool,
    /// Actions per chunk. Not in the published `config.json`: the reference takes
    /// `NUM_ACTIONS_CHUNK` from `prismatic/vla/constants.py` per platform (LIBERO 8, ALOHA 25,
    /// BRIDGE 5); a config may carry it, `PolicyOptions::horizon` overrides it.
    #[serde(default = "d_chunk")]
    pub num_actions_chunk: usize,
}

/// `text_config`: BitNet b1.58 2B4T (§1.3).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TextConfig {
    #[serde(default)]
    pub model_type: Option<String>,
    #[serde(default = "d_text_hidden")]
    pub hidden_size: usize,
    #[serde(default = "d_text_intermediate")]
    pub intermediate_size: usize,
    #[serde(default = "d_text_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "d_text_heads")]
    pub num_attention_heads: usize,
    /// Defaults to `num_attention_heads` (no grouping) when absent, as in the reference.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default = "d_rms_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "d_rope_theta")]
    pub rope_theta: f64,
    #[serde(default = "d_vocab")]
    pub vocab_size: usize,
    #[serde(default = "d_max_positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "yes")]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<serde_json::Value>,
}

/// `vision_config`: the SigLIP tower (§1.1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VisionConfig {
    #[serde(default)]
    pub model_type: Option<String>,
    #[serde(default = "d_vit_hidden")]
    pub hidden_size: usize,
    #[serde(default = "d_vit_intermediate")]
    pub intermediate_size: usize,
    #[serde(default = "d_vit_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "d_vit_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "d_channels")]
    pub num_channels: usize,
    #[serde(default = "d_image_size")]
    pub image_size: usize,
    #[serde(default = "d_patch")]
    pub patch_size: usize,
    #[serde(default = "d_ln_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "gelu_tanh")]
    pub hidden_act: String,
    /// 1 = ternary weights; absent = 32 = full precision (§2.1).
    #[serde(default = "thirty_two")]
    pub vit_weight_bits: u32,
    /// 8 = int8 activations; absent = 32 = full precision.
    #[serde(default = "thirty_two")]
    pub vit_act_bits: u32,
    #[serde(default)]
    pub vision_use_head: Option<bool>,
}

fn d_chunk() -> usize {
    8
}
fn minus_one() -> i64 {
    -1
}
fn full() -> String {
    "full".into()
}
fn gelu() -> String {
    "gelu".into()
}
fn gelu_tanh() -> String {
    "gelu_pytorch_tanh".into()
}
fn yes() -> bool {
    true
}
fn thirty_two() -> u32 {
    32
}
fn d_text_hidden() -> usize {
    2560
}
fn d_text_intermediate() -> usize {
    6912
}
fn d_text_layers() -> usize {
    30
}
fn d_text_heads() -> usize {
    20
}
fn d_rms_eps() -> f64 {
    1e-5
}
fn d_rope_theta() -> f64 {
    500000.0
}
fn d_vocab() -> usize {
    128264
}
fn d_max_positions() -> usize {
    4096
}
fn d_vit_hidden() -> usize {
    1152
}
fn d_vit_intermediate() -> usize {
    4304
}
fn d_vit_layers() -> usize {
    26
}
fn d_vit_heads() -> usize {
    16
}
fn d_channels() -> usize {
    3
}
fn d_image_size() -> usize {
    224
}
fn d_patch() -> usize {
    14
}
fn d_ln_eps() -> f64 {
    1e-6
}

/// How a vision-tower linear layer computes, from `vit_weight_bits` / `vit_act_bits`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VisionPrecision {
    /// W1.58-A8: the ternary kernels.
    Ternary,
    /// Ternary weights, full-precision activations (dequantized weights in f32).
    TernaryWeightsOnly,
    /// Plain f32.
    Full,
}

impl BitVlaConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::file(path, e))?;
        Self::from_json(&text).map_err(|e| match e {
            ModelError::Config { field, message } => {
                ModelError::file(path, format!("field {field}: {message}"))
            }
            other => other,
        })
    }

    pub fn from_json(text: &str) -> Result<Self> {
        let de = &mut serde_json::Deserializer::from_str(text);
        let config: Self = serde_path_to_error::deserialize(de).map_err(|e| {
            let field = e.path().to_string();
            ModelError::config(field, e.into_inner())
        })?;
        config.validate()?;
        Ok(config)
    }

    pub fn kv_heads(&self) -> usize {
        let t = &self.text_config;
        t.num_key_value_heads.unwrap_or(t.num_attention_heads)
    }

    pub fn text_head_dim(&self) -> usize {
        self.text_config.hidden_size / self.text_config.num_attention_heads
    }

    pub fn vision_head_dim(&self) -> usize {
        self.vision_config.hidden_size / self.vision_config.num_attention_heads
    }

    /// Patch tokens per image (no CLS token).
    pub fn patches_per_image(&self) -> usize {
        let v = &self.vision_config;
        (v.image_size / v.patch_size).pow(2)
    }

    pub fn vision_precision(&self) -> VisionPrecision {
        match (
            self.vision_config.vit_weight_bits,
            self.vision_config.vit_act_bits,
        ) {
            (1, 8) => VisionPrecision::Ternary,
            (1, _) => VisionPrecision::TernaryWeightsOnly,
            _ => VisionPrecision::Full,
        }
    }

    /// The structural checks of §10 item 1 that the forward pass depends on.
    fn validate(&self) -> Result<()> {
        let t = &self.text_config;
        let v = &self.vision_config;
        let positive = [
            ("text_config.hidden_size", t.hidden_size),
            ("text_config.intermediate_size", t.intermediate_size),
            ("text_config.num_hidden_layers", t.num_hidden_layers),
            ("text_config.num_attention_heads", t.num_attention_heads),
            ("text_config.vocab_size", t.vocab_size),
            ("vision_config.hidden_size", v.hidden_size),
            ("vision_config.intermediate_size", v.intermediate_size),
            ("vision_config.num_hidden_layers", v.num_hidden_layers),
            ("vision_config.num_attention_heads", v.num_attention_heads),
            ("vision_config.patch_size", v.patch_size),
            ("vision_config.image_size", v.image_size),
        ];
        for (field, value) in positive {
            if value == 0 {
                return Err(ModelError::config(field, "must be positive"));
            }
        }
        if !t.hidden_size.is_multiple_of(t.num_attention_heads)
            || !(t.hidden_size / t.num_attention_heads).is_multiple_of(2)
        {
            return Err(ModelError::config(
                "text_config.num_attention_heads",
                format!(
                    "hidden_size {} must split into heads of even size",
                    t.hidden_size
                ),
            ));
        }
        let kv = self.kv_heads();
        if kv == 0 || !t.num_attention_heads.is_multiple_of(kv) {
            return Err(ModelError::config(
                "text_config.num_key_value_heads",
                format!(
                    "{kv} must divide num_attention_heads {}",
                    t.num_attention_heads
                ),
            ));
        }
        if !v.hidden_size.is_multiple_of(v.num_attention_heads) {
            return Err(ModelError::config(
                "vision_config.num_attention_heads",
                format!("must divide hidden_size {}", v.hidden_size),
            ));
        }
        if !v.image_size.is_multiple_of(v.patch_size) {
            return Err(ModelError::config(
                "vision_config.patch_size",
                format!("must divide image_size {}", v.image_size),
            ));
        }
        if v.num_channels != 3 {
            return Err(ModelError::config(
                "vision_config.num_channels",
                format!("{} (only RGB, 3, is supported)", v.num_channels),
            ));
        }
        if self.vision_feature_layer != -1 {
            return Err(ModelError::config(
                "vision_feature_layer",
                format!(
                    "{} (only -1, the last encoder layer, is supported)",
                    self.vision_feature_layer
                ),
            ));
        }
        if self.vision_feature_select_strategy != "full" {
            return Err(ModelError::config(
                "vision_feature_select_strategy",
                format!(
                    "{:?} (BitVLA uses \"full\": all patch tokens)",
                    self.vision_feature_select_strategy
                ),
            ));
        }
        if self.projector_hidden_act != "gelu" {
            return Err(ModelError::config(
                "projector_hidden_act",
                format!(
                    "{:?} (only \"gelu\" is supported)",
                    self.projector_hidden_act
                ),
            ));
        }
        if v.hidden_act != "gelu_pytorch_tanh" {
            return Err(ModelError::config(
                "vision_config.hidden_act",
                format!(
                    "{:?} (only \"gelu_pytorch_tanh\" is supported)",
                    v.hidden_act
                ),
            ));
        }
        if let Some(model_type) = &t.model_type
            && !model_type.eq_ignore_ascii_case("bitnet")
        {
            return Err(ModelError::config(
                "text_config.model_type",
                format!("{model_type:?} (expected \"BitNet\")"),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_published_shapes() {
        let c = BitVlaConfig::from_json(r#"{"text_config": {}, "vision_config": {}}"#).unwrap();
        assert_eq!(c.text_config.hidden_size, 2560);
        assert_eq!(c.kv_heads(), 20);
        assert_eq!(c.patches_per_image(), 256);
        assert_eq!(c.vision_head_dim(), 72);
        assert_eq!(c.vision_precision(), VisionPrecision::Full);
    }

    #[test]
    fn wrong_type_names_the_field() {
        let err = BitVlaConfig::from_json(
            r#"{"text_config": {"hidden_size": "big"}, "vision_config": {}, "unknown": [1]}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("text_config.hidden_size"), "{err}");
    }

    #[test]
    fn unsupported_strategy_is_rejected() {
        let err = BitVlaConfig::from_json(
            r#"{"text_config": {}, "vision_config": {}, "vision_feature_select_strategy": "default"}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("vision_feature_select_strategy"), "{err}");
    }
}
