//! The packed checkpoint (`bitvla convert`): one safetensors file that loads with mmap in about
//! a second. BitLinear weights are stored already quantized in the GEMM's panel layout
//! (`<layer>.weight.codes`, U8, 2 bits per weight, see `kernels/pack.rs`) with their per-tensor
//! scale (`<layer>.weight.scale`, F32 [1]); every other tensor the OFT action path uses is kept
//! as published (bf16 / f32), the sidecars under `action_head.` / `proprio_projector.`. The
//! header's `__metadata__` carries `config.json`, `dataset_statistics.json`, `tokenizer.json`
//! and the unpadded [N, K] of each ternary tensor.
//!
//! Files are written streaming (a header planned from shapes, then one tensor at a time), so
//! converting a 6 GB bf16 checkpoint never holds more than one tensor in memory.

use super::config::{BitVlaConfig, VisionPrecision};
use super::files::{ACTION_HEAD_PREFIX, CheckpointFiles, PROPRIO_PREFIX};
use super::pickle::read_state_dict;
use super::store::{DType, TensorStore};
use super::{ModelError, Result};
use crate::kernels::pack::{K_BLOCK, PANEL_COLS};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

/// `__metadata__["format"]` of a packed checkpoint.
pub const FORMAT: &str = "bitvla-packed-1";
pub const CODES_SUFFIX: &str = ".codes";
pub const SCALE_SUFFIX: &str = ".scale";

/// One tensor of a file to write.
#[derive(Debug, Clone)]
pub struct PlannedTensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
}

impl PlannedTensor {
    pub fn bytes(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.size()
    }
}

/// Bytes of the packed codes of an `n × k` ternary matrix.
pub fn packed_len(n: usize, k: usize) -> usize {
    n.div_ceil(PANEL_COLS) * PANEL_COLS * k.div_ceil(K_BLOCK) * K_BLOCK / 4
}

fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::BF16 => "BF16",
        DType::F16 => "F16",
        DType::F32 => "F32",
        DType::U8 => "U8",
    }
}

/// A progress bar on stderr (hidden when stderr is not a terminal).
pub fn progress(len: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    if let Ok(style) = ProgressStyle::with_template(
        "{msg} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} ({eta})",
    ) {
        bar.set_style(style);
    }
    bar.set_message(what.to_owned());
    bar
}

/// Counts what a producer writes, so that each tensor is checked against its planned size.
pub struct TensorSink<'a> {
    out: &'a mut dyn Write,
    written: usize,
    bar: &'a ProgressBar,
}

impl TensorSink<'_> {
    pub fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.out.write_all(bytes)?;
        self.written += bytes.len();
        self.bar.inc(bytes.len() as u64);
        Ok(())
    }
}

/// Writes a safetensors file tensor by tensor: `produce` is called once per planned tensor, in
/// order, and must write exactly its bytes (in as many pieces as it likes). The file appears
/// atomically (written to a temporary name, then renamed).
pub fn write_streaming(
    path: &Path,
    metadata: &BTreeMap<String, String>,
    plan: &[PlannedTensor],
    mut produce: impl FnMut(&PlannedTensor, &mut TensorSink<'_>) -> Result<()>,
) -> Result<()> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), json!(metadata));
    let mut offset = 0usize;
    for t in plan {
        let end = offset + t.bytes();
        header.insert(
            t.name.clone(),
            json!({"dtype": dtype_name(t.dtype), "shape": t.shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    let mut text = serde_json::to_string(&header).map_err(|e| ModelError::file(path, e))?;
    while !text.len().is_multiple_of(8) {
        text.push(' ');
    }
    let tmp = path.with_extension(format!("partial-{}", std::process::id()));
    let io = |e: std::io::Error| ModelError::file(&tmp, e);
    let file = std::fs::File::create(&tmp).map_err(io)?;
    let bar = progress(offset as u64, "writing");
    let written = (|| {
        let mut out = std::io::BufWriter::with_capacity(1 << 22, file);
        out.write_all(&(text.len() as u64).to_le_bytes())
            .map_err(io)?;
        out.write_all(text.as_bytes()).map_err(io)?;
        for t in plan {
            let mut sink = TensorSink {
                out: &mut out,
                written: 0,
                bar: &bar,
            };
            produce(t, &mut sink)?;
            if sink.written != t.bytes() {
                return Err(ModelError::tensor(
                    &t.name,
                    format!("produced {} bytes, planned {}", sink.written, t.bytes()),
                ));
            }
        }
        // On disk before it gets its name: a crash leaves no renamed file with missing data.
        let file = out.into_inner().map_err(|e| io(e.into_error()))?;
        file.sync_all().map_err(io)?;
        std::fs::rename(&tmp, path).map_err(|e| ModelError::file(path, e))
    })();
    bar.finish_and_clear();
    if written.is_err() {
        // A failed write (a bad tensor, a full disk) leaves nothing behind.
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// The BitLinear layers of a model: (tensor prefix, N, K).
pub fn ternary_layers(config: &BitVlaConfig) -> Vec<(String, usize, usize)> {
    let mut out = Vec::new();
    let v = &config.vision_config;
    if config.vision_precision() != VisionPrecision::Full {
        let (h, f) = (v.hidden_size, v.intermediate_size);
        for i in 0..v.num_hidden_layers {
            let l = format!("vision_tower.vision_model.encoder.layers.{i}");
            for p in ["q_proj", "k_proj", "v_proj", "out_proj"] {
                out.push((format!("{l}.self_attn.{p}"), h, h));
            }
            out.push((format!("{l}.mlp.fc1"), f, h));
            out.push((format!("{l}.mlp.fc2"), h, f));
        }
    }
    let t = &config.text_config;
    let (h, f) = (t.hidden_size, t.intermediate_size);
    let kv = config.kv_heads() * config.text_head_dim();
    for j in 0..t.num_hidden_layers {
        let l = format!("language_model.model.layers.{j}");
        for (p, n, k) in [
            ("self_attn.q_proj", h, h),
            ("self_attn.k_proj", kv, h),
            ("self_attn.v_proj", kv, h),
            ("self_attn.o_proj", h, h),
            ("mlp.gate_proj", f, h),
            ("mlp.up_proj", f, h),
            ("mlp.down_proj", h, f),
        ] {
            out.push((format!("{l}.{p}"), n, k));
        }
    }
    out
}

/// Whether a tensor is read on the OFT action path (others, e.g. `lm_head` or a ViT
/// post-LayerNorm, are left out of packed files).
pub fn is_used(name: &str) -> bool {
    name.starts_with("vision_tower.vision_model.embeddings.")
        || name.starts_with("vision_tower.vision_model.encoder.layers.")
        || name.starts_with("multi_modal_projector.")
        || name.starts_with("language_model.model.")
        || name.starts_with(&format!("{PROPRIO_PREFIX}."))
        || name.starts_with(&format!("{ACTION_HEAD_PREFIX}."))
}

/// Loads a published checkpoint directory into one store (sidecars under their prefixes).
pub fn open_directory(files: &CheckpointFiles) -> Result<TensorStore> {
    let mut store = TensorStore::new();
    for w in &files.weights {
        store.add_safetensors(w)?;
    }
    let head = read_state_dict(&files.action_head)?;
    store.add_owned(&files.action_head, &format!("{ACTION_HEAD_PREFIX}."), head)?;
    if let Some(p) = &files.proprio_projector {
        let t = read_state_dict(p)?;
        store.add_owned(p, &format!("{PROPRIO_PREFIX}."), t)?;
    }
    Ok(store)
}

fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| ModelError::file(path, e))
}

/// Statistics of one conversion.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ConvertReport {
    pub tensors: usize,
    pub ternary: usize,
    pub skipped: Vec<String>,
    pub bytes: u64,
}

/// `bitvla convert`: a published checkpoint directory → one packed file.
pub fn convert(dir: &Path, out: &Path) -> Result<ConvertReport> {
    let files = CheckpointFiles::find(dir)?;
    convert_files(dir, &files, out)
}

/// [`convert`] of the files already found in `dir`.
pub fn convert_files(dir: &Path, files: &CheckpointFiles, out: &Path) -> Result<ConvertReport> {
    let config_text = read_text(&files.config)?;
    let config =
        BitVlaConfig::from_json(&config_text).map_err(|e| ModelError::file(&files.config, e))?;
    let statistics = read_text(&files.statistics)?;
    super::stats::Statistics::from_json(&statistics)
        .map_err(|e| ModelError::file(&files.statistics, e))?;
    let tokenizer = read_text(&files.tokenizer)?;
    super::prompt::PromptTokenizer::from_json(&tokenizer, &files.tokenizer)?;
    let store = open_directory(files)?;

    let layers = ternary_layers(&config);
    let ternary: BTreeMap<String, (usize, usize)> = layers
        .iter()
        .map(|(p, n, k)| (format!("{p}.weight"), (*n, *k)))
        .collect();
    let mut plan = Vec::new();
    let mut skipped = Vec::new();
    for name in store.names() {
        if !is_used(name) {
            skipped.push(name.to_owned());
            continue;
        }
        if let Some(&(n, k)) = ternary.get(name) {
            let shape = store.shape(name)?;
            if shape != [n, k] {
                return Err(ModelError::tensor(
                    name,
                    format!("shape {shape:?}, expected [{n}, {k}]"),
                ));
            }
            plan.push(PlannedTensor {
                name: format!("{name}{CODES_SUFFIX}"),
                dtype: DType::U8,
                shape: vec![packed_len(n, k)],
            });
            plan.push(PlannedTensor {
                name: format!("{name}{SCALE_SUFFIX}"),
                dtype: DType::F32,
                shape: vec![1],
            });
        } else {
            plan.push(PlannedTensor {
                name: name.to_owned(),
                dtype: store.dtype(name)?,
                shape: store.shape(name)?.to_vec(),
            });
        }
    }
    for name in ternary.keys() {
        if !store.contains(name) {
            return Err(ModelError::tensor(name, "missing from the checkpoint"));
        }
    }
    for s in &skipped {
        log::info!("not converted (unused on the OFT action path): {s}");
    }
    let mut metadata = BTreeMap::new();
    metadata.insert("format".to_owned(), FORMAT.to_owned());
    metadata.insert("config.json".to_owned(), config_text);
    metadata.insert("dataset_statistics.json".to_owned(), statistics);
    metadata.insert("tokenizer.json".to_owned(), tokenizer);
    let shapes: BTreeMap<&String, [usize; 2]> =
        ternary.iter().map(|(k, v)| (k, [v.0, v.1])).collect();
    metadata.insert(
        "ternary_shapes".to_owned(),
        serde_json::to_string(&shapes).map_err(|e| ModelError::file(out, e))?,
    );
    metadata.insert(
        "source".to_owned(),
        dir.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
    );
    let mut last_gamma: Option<(String, f32)> = None;
    write_streaming(out, &metadata, &plan, |t, sink| {
        let io = |e: std::io::Error| ModelError::file(out, e);
        if let Some(weight) = t.name.strip_suffix(CODES_SUFFIX) {
            let (n, k) = ternary[weight];
            let m = store.ternary(weight, n, k)?;
            last_gamma = Some((weight.to_owned(), m.gamma()));
            sink.write(m.packed()).map_err(io)
        } else if let Some(weight) = t.name.strip_suffix(SCALE_SUFFIX) {
            match &last_gamma {
                Some((w, g)) if w == weight => sink.write(&g.to_le_bytes()).map_err(io),
                _ => Err(ModelError::tensor(weight, "scale planned before its codes")),
            }
        } else {
            // Copied from the mapping in slices, each released once written (the embedding
            // table alone is 0.66 GB).
            let (bytes, dtype) = store.raw(&t.name, &t.shape)?;
            for piece in bytes.chunks(32 << 20) {
                if dtype != DType::U8 {
                    // Checked in parallel, 1 MB at a time (whole values: 1 MB is a multiple
                    // of every element size).
                    use rayon::prelude::*;
                    piece.par_chunks(1 << 20).try_for_each(|part| {
                        let values = super::store::decode_f32(&t.name, part, dtype)?;
                        super::store::check_finite(&t.name, &values)
                    })?;
                }
                sink.write(piece).map_err(io)?;
            }
            store.release(&t.name);
            Ok(())
        }
    })?;
    let bytes = std::fs::metadata(out)
        .map_err(|e| ModelError::file(out, e))?
        .len();
    Ok(ConvertReport {
        tensors: plan.len(),
        ternary: ternary.len(),
        skipped,
        bytes,
    })
}

/// A packed file opened for loading: the mapped store and the texts from its metadata.
pub struct PackedFile {
    pub store: TensorStore,
    pub config: BitVlaConfig,
    pub statistics: String,
    pub tokenizer: String,
}

pub fn open_packed(path: &Path) -> Result<PackedFile> {
    let mut store = TensorStore::new();
    store.add_safetensors(path)?;
    let meta = store.metadata().clone();
    let get = |key: &str| -> Result<String> {
        meta.get(key).cloned().ok_or_else(|| {
            ModelError::file(
                path,
                format!("no {key:?} in the metadata: not a packed BitVLA file (make one with `bitvla convert`)"),
            )
        })
    };
    let format = get("format")?;
    if format != FORMAT {
        return Err(ModelError::file(
            path,
            format!("format {format:?}, this build reads {FORMAT:?}; re-run `bitvla convert`"),
        ));
    }
    let config =
        BitVlaConfig::from_json(&get("config.json")?).map_err(|e| ModelError::file(path, e))?;
    Ok(PackedFile {
        store,
        config,
        statistics: get("dataset_statistics.json")?,
        tokenizer: get("tokenizer.json")?,
    })
}
