//! `bitvla make-tiny`: a small random BitVLA checkpoint in exactly the published layout (§3):
//! sharded bf16 safetensors with an index, the `.pt` sidecars (action head bf16, proprio
//! projector f32 with a `module.` prefix), `dataset_statistics.json`, a byte-level BPE
//! `tokenizer.json` with BitVLA's special tokens at their real ids, `tokenizer_config.json` with
//! the chat template, and the processor configs. Same seed, same bytes.

use super::packed::{PlannedTensor, write_streaming};
use super::pickle::write_state_dict;
use super::prompt::{IMAGE_PAD_ID, PROPRIO_PAD_ID, STOP_ID};
use super::store::{DType, RawTensor};
use super::{ModelError, Result};
use crate::kernels::pseudo_random;
use half::bf16;
use serde_json::json;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Shapes of the tiny model (the real ones are in `config.rs` defaults).
#[derive(Debug, Clone, Copy)]
pub struct TinyShape {
    pub vision_hidden: usize,
    pub vision_intermediate: usize,
    pub vision_layers: usize,
    pub vision_heads: usize,
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub vocab: usize,
    pub action_dim: usize,
    pub proprio_dim: usize,
}

impl Default for TinyShape {
    fn default() -> Self {
        Self {
            vision_hidden: 64,
            vision_intermediate: 128,
            vision_layers: 2,
            vision_heads: 4,
            hidden: 128,
            intermediate: 256,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            vocab: 128264,
            action_dim: 7,
            proprio_dim: 8,
        }
    }
}

/// Output scale of the residual-branch projections relative to the stream.
const RESIDUAL_GAIN: f32 = 0.1;

pub const TINY_UNNORM_KEY: &str = "libero_spatial_no_noops";

pub(crate) fn fnv(text: &str, seed: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for b in text.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
    }
    h
}

/// One tensor to generate: `center + amplitude · u`, u uniform in [−1, 1) from an LCG seeded by
/// the tensor's name (so a tensor's values do not depend on the order of generation).
#[derive(Debug, Clone)]
pub(crate) struct Spec {
    pub name: String,
    pub shape: Vec<usize>,
    center: f32,
    amplitude: f32,
}

impl Spec {
    /// Feeds the values to `sink` in pieces of at most 1 Mi values.
    fn generate(&self, seed: u64, mut sink: impl FnMut(&[f32]) -> Result<()>) -> Result<()> {
        let mut state = fnv(&self.name, seed);
        let mut left: usize = self.shape.iter().product();
        let mut piece = Vec::with_capacity(left.min(1 << 20));
        while left > 0 {
            piece.clear();
            for _ in 0..left.min(1 << 20) {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let u = (state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
                piece.push(self.center + u * self.amplitude);
            }
            left -= piece.len();
            sink(&piece)?;
        }
        Ok(())
    }

    fn values(&self, seed: u64) -> Vec<f32> {
        let mut out = Vec::new();
        let _ = self.generate(seed, |p| {
            out.extend_from_slice(p);
            Ok(())
        });
        out
    }
}

#[derive(Default)]
struct Gen {
    specs: Vec<Spec>,
}

impl Gen {
    fn add(&mut self, name: String, shape: Vec<usize>, center: f32, amplitude: f32) {
        self.specs.push(Spec {
            name,
            shape,
            center,
            amplitude,
        });
    }
    /// Uniform with unit output variance for unit-variance inputs.
    fn linear(&mut self, prefix: &str, n: usize, k: usize, bias: bool) {
        self.linear_scaled(prefix, n, k, bias, 1.0);
    }
    /// Output variance `gain²`. Residual-branch outputs (out_proj, o_proj, fc2, down_proj) use
    /// a small gain, as GPT-2's initialization and trained networks do: the residual stream
    /// dominates each block's update, so the model is not chaotic.
    fn linear_scaled(&mut self, prefix: &str, n: usize, k: usize, bias: bool, gain: f32) {
        let amplitude = gain * (3.0 / k as f32).sqrt();
        self.add(format!("{prefix}.weight"), vec![n, k], 0.0, amplitude);
        if bias {
            self.add(format!("{prefix}.bias"), vec![n], 0.0, 0.05);
        }
    }
    fn norm(&mut self, prefix: &str, width: usize, bias: bool) {
        self.add(format!("{prefix}.weight"), vec![width], 1.0, 0.2);
        if bias {
            self.add(format!("{prefix}.bias"), vec![width], 0.0, 0.1);
        }
    }
    fn take(&mut self) -> Vec<Spec> {
        std::mem::take(&mut self.specs)
    }
}

fn encode(values: &[f32], dtype: DType, out: &mut Vec<u8>) {
    match dtype {
        DType::BF16 => out.extend(values.iter().flat_map(|&v| bf16::from_f32(v).to_le_bytes())),
        _ => out.extend(values.iter().flat_map(|v| v.to_le_bytes())),
    }
}

fn to_raw(specs: &[Spec], seed: u64, dtype: DType) -> Vec<RawTensor> {
    specs
        .iter()
        .map(|spec| {
            let mut data = Vec::new();
            encode(&spec.values(seed), dtype, &mut data);
            RawTensor {
                name: spec.name.clone(),
                dtype,
                shape: spec.shape.clone(),
                data,
            }
        })
        .collect()
}

/// Writes a bf16 safetensors shard, generating each tensor piece by piece.
fn write_shard(path: &Path, specs: &[Spec], seed: u64) -> Result<usize> {
    let plan: Vec<PlannedTensor> = specs
        .iter()
        .map(|s| PlannedTensor {
            name: s.name.clone(),
            dtype: DType::BF16,
            shape: s.shape.clone(),
        })
        .collect();
    let metadata = BTreeMap::from([("format".to_owned(), "pt".to_owned())]);
    let mut index = 0;
    let mut bytes = Vec::new();
    write_streaming(path, &metadata, &plan, |t, sink| {
        let spec = &specs[index];
        index += 1;
        debug_assert_eq!(spec.name, t.name);
        spec.generate(seed, |piece| {
            bytes.clear();
            encode(piece, DType::BF16, &mut bytes);
            sink.write(&bytes).map_err(|e| ModelError::file(path, e))
        })
    })?;
    Ok(plan.iter().map(PlannedTensor::bytes).sum())
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| ModelError::file(path, e))?;
    std::fs::write(path, text + "\n").map_err(|e| ModelError::file(path, e))
}

/// A tiny model in a fresh scratch directory under the system temp dir, removed when dropped
/// (also when a test fails), so test and demo runs leave nothing behind.
pub struct ScratchModel(PathBuf);

impl ScratchModel {
    /// `tag` names the directory (with the process id) so parallel tests never share one.
    pub fn new(tag: &str, seed: u64, shape: TinyShape) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("bitvla-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let scratch = Self(dir);
        make_tiny(&scratch.0, seed, shape)?;
        Ok(scratch)
    }
}

impl std::ops::Deref for ScratchModel {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchModel {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes the tiny checkpoint into `dir` (created if needed).
pub fn make_tiny(dir: &Path, seed: u64, s: TinyShape) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| ModelError::file(dir, e))?;
    let mut g = Gen::default();
    // Shard 1: vision tower and projector.
    let v = "vision_tower.vision_model";
    let (vh, vf) = (s.vision_hidden, s.vision_intermediate);
    let patch = format!("{v}.embeddings.patch_embedding");
    g.add(
        format!("{patch}.weight"),
        vec![vh, 3, 14, 14],
        0.0,
        (3.0f32 / 588.0).sqrt(),
    );
    g.add(format!("{patch}.bias"), vec![vh], 0.0, 0.05);
    g.add(
        format!("{v}.embeddings.position_embedding.weight"),
        vec![256, vh],
        0.0,
        0.3,
    );
    for i in 0..s.vision_layers {
        let l = format!("{v}.encoder.layers.{i}");
        g.norm(&format!("{l}.layer_norm1"), vh, true);
        for p in ["q_proj", "k_proj", "v_proj"] {
            g.linear(&format!("{l}.self_attn.{p}"), vh, vh, true);
        }
        g.linear_scaled(
            &format!("{l}.self_attn.out_proj"),
            vh,
            vh,
            true,
            RESIDUAL_GAIN,
        );
        g.norm(&format!("{l}.layer_norm2"), vh, true);
        g.linear(&format!("{l}.mlp.fc1"), vf, vh, true);
        g.linear_scaled(&format!("{l}.mlp.fc2"), vh, vf, true, RESIDUAL_GAIN);
    }
    g.linear("multi_modal_projector.linear_1", s.hidden, vh, true);
    g.linear("multi_modal_projector.linear_2", s.hidden, s.hidden, true);
    let shard1 = g.take();

    // Shard 2: the language model.
    let p = "language_model.model";
    let (h, f) = (s.hidden, s.intermediate);
    let kv = s.kv_heads * (h / s.heads);
    g.add(
        format!("{p}.embed_tokens.weight"),
        vec![s.vocab, h],
        0.0,
        1.0,
    );
    for j in 0..s.layers {
        let l = format!("{p}.layers.{j}");
        g.norm(&format!("{l}.input_layernorm"), h, false);
        g.linear(&format!("{l}.self_attn.q_proj"), h, h, false);
        g.linear(&format!("{l}.self_attn.k_proj"), kv, h, false);
        g.linear(&format!("{l}.self_attn.v_proj"), kv, h, false);
        g.norm(&format!("{l}.self_attn.attn_sub_norm"), h, false);
        g.linear_scaled(&format!("{l}.self_attn.o_proj"), h, h, false, RESIDUAL_GAIN);
        g.norm(&format!("{l}.post_attention_layernorm"), h, false);
        g.linear(&format!("{l}.mlp.gate_proj"), f, h, false);
        g.linear(&format!("{l}.mlp.up_proj"), f, h, false);
        g.norm(&format!("{l}.mlp.ffn_sub_norm"), f, false);
        g.linear_scaled(&format!("{l}.mlp.down_proj"), h, f, false, RESIDUAL_GAIN);
    }
    g.norm(&format!("{p}.norm"), h, false);
    let shard2 = g.take();

    let names = [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ];
    let mut weight_map = BTreeMap::new();
    let mut total = 0usize;
    for (file, shard) in names.iter().zip([&shard1, &shard2]) {
        total += write_shard(&dir.join(file), shard, seed)?;
        for t in shard.iter() {
            weight_map.insert(t.name.clone(), json!(file));
        }
    }
    write_json(
        &dir.join("model.safetensors.index.json"),
        &json!({"metadata": {"total_size": total}, "weight_map": weight_map}),
    )?;

    // Sidecars.
    let width = s.action_dim * h;
    g.norm("model.layer_norm1", width, true);
    g.linear("model.fc1", h, width, true);
    for b in 0..2 {
        g.norm(&format!("model.mlp_resnet_blocks.{b}.ffn.0"), h, true);
        g.linear_scaled(
            &format!("model.mlp_resnet_blocks.{b}.ffn.1"),
            h,
            h,
            true,
            RESIDUAL_GAIN,
        );
    }
    g.norm("model.layer_norm2", h, true);
    g.linear("model.fc2", s.action_dim, h, true);
    let head = to_raw(&g.take(), seed, DType::BF16);
    write_state_dict(&dir.join("action_head--10000_checkpoint.pt"), &head)?;
    g.linear("module.fc1", h, s.proprio_dim, true);
    g.linear("module.fc2", h, h, true);
    let proprio = to_raw(&g.take(), seed, DType::F32);
    write_state_dict(
        &dir.join("proprio_projector--10000_checkpoint.pt"),
        &proprio,
    )?;

    write_json(&dir.join("config.json"), &tiny_config(&s))?;
    write_json(
        &dir.join("dataset_statistics.json"),
        &tiny_statistics(&s, seed),
    )?;
    write_json(&dir.join("tokenizer.json"), &tokenizer_json())?;
    write_json(
        &dir.join("tokenizer_config.json"),
        &json!({
            "bos_token": "<|begin_of_text|>",
            "eos_token": "<|end_of_text|>",
            "pad_token": "<|pad|>",
            "model_max_length": 4096,
            "tokenizer_class": "PreTrainedTokenizerFast",
            "chat_template": CHAT_TEMPLATE,
        }),
    )?;
    write_json(
        &dir.join("preprocessor_config.json"),
        &json!({
            "image_processor_type": "SiglipImageProcessor",
            "do_resize": true, "size": {"height": 224, "width": 224}, "resample": 3,
            "do_rescale": true, "rescale_factor": 1.0 / 255.0,
            "do_normalize": true, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
        }),
    )?;
    write_json(
        &dir.join("processor_config.json"),
        &json!({"processor_class": "LlavaProcessor", "patch_size": 14}),
    )?;
    write_json(
        &dir.join("generation_config.json"),
        &json!({"bos_token_id": 128000, "eos_token_id": 128001}),
    )?;
    Ok(())
}

/// The chat template (§4.2): system preamble, `Role: content<|eot_id|>`, then `Assistant: `.
pub const CHAT_TEMPLATE: &str = "{{ 'System: A chat between a curious human and an artificial \
intelligence assistant. The assistant gives helpful, detailed, and polite answers to the \
human\\'s questions.<|eot_id|>' }}{% for message in messages %}{{ message['role'] | capitalize \
}}: {{ message['content'] | trim }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}\
Assistant: {% endif %}";

pub(crate) fn tiny_config(s: &TinyShape) -> serde_json::Value {
    json!({
        "model_type": "openvla",
        "architectures": ["BitVLAForActionPrediction"],
        "torch_dtype": "bfloat16",
        "image_token_index": IMAGE_PAD_ID,
        "vision_feature_layer": -1,
        "vision_feature_select_strategy": "full",
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": true,
        "n_action_bins": 256,
        "text_config": {
            "model_type": "BitNet",
            "hidden_size": s.hidden,
            "intermediate_size": s.intermediate,
            "num_hidden_layers": s.layers,
            "num_attention_heads": s.heads,
            "num_key_value_heads": s.kv_heads,
            "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0,
            "vocab_size": s.vocab,
            "max_position_embeddings": 4096,
            "tie_word_embeddings": true,
            "hidden_act": "relu2",
            "bos_token_id": 128000,
            "eos_token_id": STOP_ID,
        },
        "vision_config": {
            "model_type": "siglip_vision_model",
            "hidden_size": s.vision_hidden,
            "intermediate_size": s.vision_intermediate,
            "num_hidden_layers": s.vision_layers,
            "num_attention_heads": s.vision_heads,
            "num_channels": 3,
            "image_size": 224,
            "patch_size": 14,
            "hidden_act": "gelu_pytorch_tanh",
            "layer_norm_eps": 1e-6,
            "vit_weight_bits": 1,
            "vit_act_bits": 8,
            "vision_use_head": false,
        },
    })
}

pub(crate) fn tiny_statistics(s: &TinyShape, seed: u64) -> serde_json::Value {
    let a = pseudo_random(s.action_dim, fnv("action stats", seed), 0.5);
    let p = pseudo_random(s.proprio_dim, fnv("proprio stats", seed), 0.5);
    let bounds = |c: &[f32], width: f32| {
        let lo: Vec<f32> = c.iter().map(|v| v - width).collect();
        let hi: Vec<f32> = c.iter().map(|v| v + width).collect();
        (lo, hi)
    };
    let (aq01, aq99) = bounds(&a, 0.8);
    let (pq01, pq99) = bounds(&p, 1.5);
    let mut mask = vec![true; s.action_dim];
    if let Some(m) = mask.last_mut() {
        *m = false;
    }
    json!({
        TINY_UNNORM_KEY: {
            "action": {"mean": a, "std": vec![0.4; s.action_dim], "min": aq01, "max": aq99,
                       "q01": aq01, "q99": aq99, "mask": mask},
            "proprio": {"mean": p, "std": vec![0.7; s.proprio_dim], "min": pq01, "max": pq99,
                        "q01": pq01, "q99": pq99},
            "num_transitions": 1000,
            "num_trajectories": 10,
        }
    })
}

/// GPT-2's byte ↔ printable-character map used by byte-level BPE.
fn byte_chars() -> Vec<char> {
    let mut printable: Vec<u32> = (33..=126).chain(161..=172).chain(174..=255).collect();
    let mut chars: Vec<u32> = printable.clone();
    let mut extra = 0;
    for b in 0..256u32 {
        if !printable.contains(&b) {
            printable.push(b);
            chars.push(256 + extra);
            extra += 1;
        }
    }
    let mut table = vec!['\0'; 256];
    for (b, c) in printable.iter().zip(&chars) {
        table[*b as usize] = char::from_u32(*c).unwrap_or('?');
    }
    table
}

/// LLaMA-3's pre-tokenizer split pattern.
const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// A byte-level BPE: 256 byte tokens, merges building the prompt's frequent words, and BitVLA's
/// added tokens at their real ids (128000…128263).
pub(crate) fn tokenizer_json() -> serde_json::Value {
    let table = byte_chars();
    let mut vocab: BTreeMap<String, u32> = BTreeMap::new();
    for (b, c) in table.iter().enumerate() {
        vocab.insert(c.to_string(), b as u32);
    }
    let mut merges: Vec<[String; 2]> = Vec::new();
    let words = [
        "System",
        ":",
        " A",
        " chat",
        " between",
        " a",
        " curious",
        " human",
        " and",
        " an",
        " artificial",
        " intelligence",
        " assistant",
        " The",
        " gives",
        " helpful",
        " detailed",
        " polite",
        " answers",
        " to",
        " the",
        "'s",
        " questions",
        "User",
        "Assistant",
        "What",
        " action",
        " should",
        " robot",
        " take",
        " pick",
        " up",
        " put",
        " black",
        " bowl",
        " plate",
        " on",
        " in",
        " open",
        " drawer",
        " place",
        " it",
    ];
    for word in words {
        let pieces: Vec<String> = word
            .bytes()
            .map(|b| table[b as usize].to_string())
            .collect();
        let mut acc = pieces[0].clone();
        for piece in &pieces[1..] {
            let merged = format!("{acc}{piece}");
            if !vocab.contains_key(&merged) {
                let id = vocab.len() as u32;
                vocab.insert(merged.clone(), id);
                merges.push([acc.clone(), piece.clone()]);
            }
            acc = merged;
        }
    }
    let mut added = vec![
        (128000, "<|begin_of_text|>".to_owned()),
        (STOP_ID, "<|end_of_text|>".to_owned()),
        (128002, "<|pad|>".to_owned()),
    ];
    added.extend(
        (128003..128009).map(|i| (i, format!("<|reserved_special_token_{}|>", i - 128003))),
    );
    added.push((128009, "<|eot_id|>".to_owned()));
    added.push((IMAGE_PAD_ID, "<|image_pad|>".to_owned()));
    added.push((PROPRIO_PAD_ID, "<proprio_pad>".to_owned()));
    added.extend((0..252).map(|i| (128012 + i, format!("<action_{i}>"))));
    // The added tokens are also model-vocabulary entries: `tokenizers` keeps their ids only then
    // (otherwise it renumbers them after the last vocabulary id).
    for (id, content) in &added {
        vocab.insert(content.clone(), *id);
    }
    let added_tokens: Vec<_> = added
        .iter()
        .map(|(id, content)| {
            json!({"id": id, "content": content, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens,
        "normalizer": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": LLAMA3_PATTERN}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false},
        ]},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}},
                     {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 1}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<|begin_of_text|>": {"id": "<|begin_of_text|>", "ids": [128000],
                                                     "tokens": ["<|begin_of_text|>"]}},
        },
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
                  "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": merges},
    })
}
