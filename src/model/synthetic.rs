//! `bitvla make-synthetic`: a full-size packed model (the real shapes of the BitVLA LIBERO
//! fine-tunes: 26-layer SigLIP, 30-layer BitNet 2B, vocabulary 128264, the OFT head) with random
//! weights, written directly in the packed format. For benchmarks of time and memory without the
//! 6 GB download; its actions mean nothing.

use super::packed::{
    CODES_SUFFIX, FORMAT, PlannedTensor, SCALE_SUFFIX, packed_len, ternary_layers, write_streaming,
};
use super::store::DType;
use super::tiny::{TinyShape, fnv, tiny_config, tiny_statistics, tokenizer_json};
use super::{BitVlaConfig, ModelError, Result};
use half::bf16;
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::path::Path;

/// The published shapes (§1, §3.3).
pub fn full_shape() -> TinyShape {
    TinyShape {
        vision_hidden: 1152,
        vision_intermediate: 4304,
        vision_layers: 26,
        vision_heads: 16,
        hidden: 2560,
        intermediate: 6912,
        layers: 30,
        heads: 20,
        kv_heads: 5,
        vocab: 128264,
        action_dim: 7,
        proprio_dim: 8,
    }
}

const CHUNK: usize = 1 << 20;

fn lcg(state: &mut u64) -> u64 {
    *state = state
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    *state >> 16
}

/// Random 2-bit codes in {0, 1, 2}, chunk-parallel and deterministic.
fn random_codes(len: usize, seed: u64) -> Vec<u8> {
    let mut out = vec![0u8; len];
    out.par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(c, chunk)| {
            let mut s = seed ^ (c as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            for b in chunk.iter_mut() {
                let r = lcg(&mut s);
                let mut byte = 0u8;
                for i in 0..4 {
                    byte |= ((((r >> (8 * i)) & 0xff) % 3) as u8) << (2 * i);
                }
                *b = byte;
            }
        });
    out
}

/// Random values uniform in `center ± amplitude`, as `dtype` bytes.
fn random_values(len: usize, seed: u64, center: f32, amplitude: f32, dtype: DType) -> Vec<u8> {
    let size = dtype.size();
    let mut out = vec![0u8; len * size];
    out.par_chunks_mut(CHUNK * size)
        .enumerate()
        .for_each(|(c, chunk)| {
            let mut s = seed ^ (c as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            for v in chunk.chunks_exact_mut(size) {
                let u = (lcg(&mut s) >> 24) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
                let x = center + amplitude * u;
                match dtype {
                    DType::F32 => v.copy_from_slice(&x.to_le_bytes()),
                    _ => v.copy_from_slice(&bf16::from_f32(x).to_le_bytes()),
                }
            }
        });
    out
}

/// Writes the synthetic full-size model to `out`.
pub fn make_synthetic(out: &Path, seed: u64) -> Result<u64> {
    let shape = full_shape();
    let config_json = tiny_config(&shape);
    let config_text =
        serde_json::to_string_pretty(&config_json).map_err(|e| ModelError::file(out, e))?;
    let config = BitVlaConfig::from_json(&config_text)?;
    let ternary: BTreeMap<String, (usize, usize)> = ternary_layers(&config)
        .into_iter()
        .map(|(p, n, k)| (format!("{p}.weight"), (n, k)))
        .collect();
    let (vh, h) = (shape.vision_hidden, shape.hidden);
    let mut plan: Vec<PlannedTensor> = Vec::new();
    let mut add = |name: String, dtype: DType, dims: Vec<usize>| {
        plan.push(PlannedTensor {
            name,
            dtype,
            shape: dims,
        })
    };
    let v = "vision_tower.vision_model";
    add(
        format!("{v}.embeddings.patch_embedding.weight"),
        DType::BF16,
        vec![vh, 3, 14, 14],
    );
    add(
        format!("{v}.embeddings.patch_embedding.bias"),
        DType::BF16,
        vec![vh],
    );
    add(
        format!("{v}.embeddings.position_embedding.weight"),
        DType::BF16,
        vec![256, vh],
    );
    for i in 0..shape.vision_layers {
        let l = format!("{v}.encoder.layers.{i}");
        for norm in ["layer_norm1", "layer_norm2"] {
            add(format!("{l}.{norm}.weight"), DType::BF16, vec![vh]);
            add(format!("{l}.{norm}.bias"), DType::BF16, vec![vh]);
        }
        for (p, n) in [
            ("self_attn.q_proj", vh),
            ("self_attn.k_proj", vh),
            ("self_attn.v_proj", vh),
            ("self_attn.out_proj", vh),
            ("mlp.fc1", shape.vision_intermediate),
            ("mlp.fc2", vh),
        ] {
            add(format!("{l}.{p}.bias"), DType::BF16, vec![n]);
        }
    }
    for (name, n, k) in [("linear_1", h, vh), ("linear_2", h, h)] {
        add(
            format!("multi_modal_projector.{name}.weight"),
            DType::BF16,
            vec![n, k],
        );
        add(
            format!("multi_modal_projector.{name}.bias"),
            DType::BF16,
            vec![n],
        );
    }
    let p = "language_model.model";
    add(
        format!("{p}.embed_tokens.weight"),
        DType::BF16,
        vec![shape.vocab, h],
    );
    for j in 0..shape.layers {
        let l = format!("{p}.layers.{j}");
        for (norm, width) in [
            ("input_layernorm", h),
            ("self_attn.attn_sub_norm", h),
            ("post_attention_layernorm", h),
            ("mlp.ffn_sub_norm", shape.intermediate),
        ] {
            add(format!("{l}.{norm}.weight"), DType::BF16, vec![width]);
        }
    }
    add(format!("{p}.norm.weight"), DType::BF16, vec![h]);
    for (name, (n, k)) in &ternary {
        add(
            format!("{name}{CODES_SUFFIX}"),
            DType::U8,
            vec![packed_len(*n, *k)],
        );
        add(format!("{name}{SCALE_SUFFIX}"), DType::F32, vec![1]);
    }
    let pp = super::files::PROPRIO_PREFIX;
    add(
        format!("{pp}.fc1.weight"),
        DType::F32,
        vec![h, shape.proprio_dim],
    );
    add(format!("{pp}.fc1.bias"), DType::F32, vec![h]);
    add(format!("{pp}.fc2.weight"), DType::F32, vec![h, h]);
    add(format!("{pp}.fc2.bias"), DType::F32, vec![h]);
    let a = format!("{}.model", super::files::ACTION_HEAD_PREFIX);
    let width = shape.action_dim * h;
    for (name, dims) in [
        ("layer_norm1.weight", vec![width]),
        ("layer_norm1.bias", vec![width]),
        ("fc1.weight", vec![h, width]),
        ("fc1.bias", vec![h]),
        ("mlp_resnet_blocks.0.ffn.0.weight", vec![h]),
        ("mlp_resnet_blocks.0.ffn.0.bias", vec![h]),
        ("mlp_resnet_blocks.0.ffn.1.weight", vec![h, h]),
        ("mlp_resnet_blocks.0.ffn.1.bias", vec![h]),
        ("mlp_resnet_blocks.1.ffn.0.weight", vec![h]),
        ("mlp_resnet_blocks.1.ffn.0.bias", vec![h]),
        ("mlp_resnet_blocks.1.ffn.1.weight", vec![h, h]),
        ("mlp_resnet_blocks.1.ffn.1.bias", vec![h]),
        ("layer_norm2.weight", vec![h]),
        ("layer_norm2.bias", vec![h]),
        ("fc2.weight", vec![shape.action_dim, h]),
        ("fc2.bias", vec![shape.action_dim]),
    ] {
        add(format!("{a}.{name}"), DType::BF16, dims);
    }

    let mut metadata = BTreeMap::new();
    metadata.insert("format".to_owned(), FORMAT.to_owned());
    metadata.insert("config.json".to_owned(), config_text);
    metadata.insert(
        "dataset_statistics.json".to_owned(),
        tiny_statistics(&shape, seed).to_string(),
    );
    metadata.insert("tokenizer.json".to_owned(), tokenizer_json().to_string());
    metadata.insert(
        "source".to_owned(),
        format!("bitvla make-synthetic --seed {seed}"),
    );
    let io = |e: std::io::Error| ModelError::file(out, e);
    write_streaming(out, &metadata, &plan, |t, sink| {
        let s = fnv(&t.name, seed);
        let numel: usize = t.shape.iter().product();
        let bytes = if t.name.ends_with(CODES_SUFFIX) {
            random_codes(numel, s)
        } else if let Some(weight) = t.name.strip_suffix(SCALE_SUFFIX) {
            // γ for unit output variance: K · (2/3) · γ² = 1; residual outputs 10 times smaller.
            let k = ternary.get(weight).map_or(1, |x| x.1) as f32;
            let residual = ["o_proj", "out_proj", "down_proj", "fc2"]
                .iter()
                .any(|r| weight.contains(r));
            let gamma = (1.5 / k).sqrt() * if residual { 0.1 } else { 1.0 };
            gamma.to_le_bytes().to_vec()
        } else if t.name.ends_with("norm.weight")
            || t.name.contains("layer_norm")
            || t.name.ends_with("ffn.0.weight")
        {
            if t.name.ends_with(".bias") {
                random_values(numel, s, 0.0, 0.05, t.dtype)
            } else {
                random_values(numel, s, 1.0, 0.1, t.dtype)
            }
        } else if t.shape.len() >= 2 {
            let k: usize = t.shape[1..].iter().product();
            random_values(numel, s, 0.0, (3.0 / k as f32).sqrt(), t.dtype)
        } else {
            random_values(numel, s, 0.0, 0.05, t.dtype)
        };
        sink.write(&bytes).map_err(io)
    })?;
    Ok(std::fs::metadata(out).map_err(io)?.len())
}
