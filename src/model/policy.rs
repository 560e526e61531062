//! `Policy`: a loaded BitVLA OFT checkpoint and its one entry point, [`Policy::predict`]:
//! images + instruction + proprioception → an action chunk (§5).

use super::buffers::ForwardBuffers;
use super::config::BitVlaConfig;
pub use super::files::CheckpointFiles;
use super::files::PROPRIO_PREFIX;
use super::heads::{ActionHead, ProprioProjector};
use super::language::LanguageModel;
use super::prompt::{IMAGE_PAD_ID, PROPRIO_PAD_ID, PromptTokenizer};
use super::stats::{DatasetStatistics, Statistics};
use super::store::TensorStore;
use super::vision::{Projector, VisionTower};
use super::{ModelError, Result};
use crate::obs::{self, ImageOptions};
use image::RgbImage;
use std::path::Path;
use std::sync::{Mutex, TryLockError};
use std::time::Instant;

/// What to do with the last (gripper) action dimension after un-normalization (§5.10).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GripperMapping {
    /// The network's raw value, ≈ [0, 1] with 1 = open.
    #[default]
    Raw,
    /// LIBERO: `g ← −sign(2g − 1)`: −1 = open, +1 = close (robosuite).
    LiberoBinarizeInvert,
}

impl std::str::FromStr for GripperMapping {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "raw" => Ok(Self::Raw),
            "libero" => Ok(Self::LiberoBinarizeInvert),
            other => Err(format!("unknown gripper mapping {other:?} (raw, libero)")),
        }
    }
}

/// Deliberate deviations from the spec, for tests that prove the golden comparison detects them.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Ablation {
    /// Take rows P … P+55 instead of P−1 … P+54 (§5.7).
    pub unshifted_rows: bool,
    /// Leave the action-slot embeddings as `embed_tokens[1]` instead of zero (§5.4).
    pub keep_action_embeddings: bool,
    /// Causal instead of bidirectional attention in the LLM (§5.6).
    pub causal: bool,
}

#[derive(Debug, Clone, Default)]
pub struct PolicyOptions {
    /// `dataset_statistics.json` key; may be omitted when the file has one dataset.
    pub unnorm_key: Option<String>,
    pub gripper: GripperMapping,
    /// Actions per chunk, overriding `config.json`'s `num_actions_chunk` (default 8, LIBERO).
    pub horizon: Option<usize>,
    /// Per camera (third-person first, then wrist); cameras beyond the list use the default.
    pub image_options: Vec<ImageOptions>,
    /// A checkpoint directory is converted into this packed-model cache on its first load and
    /// mapped from it afterwards ([`super::cache`]); None loads the directory every time. The
    /// CLI and the node pass [`super::cache::default_dir`] unless told not to.
    pub cache_dir: Option<std::path::PathBuf>,
    #[doc(hidden)]
    pub ablation: Ablation,
}

/// One observation: 1 or 2 RGB images (third-person first, then wrist), the instruction and the
/// raw (un-normalized) proprioception vector if the checkpoint takes one.
#[derive(Debug, Clone)]
pub struct Observation {
    pub images: Vec<RgbImage>,
    pub instruction: String,
    pub proprio: Option<Vec<f32>>,
}

/// Milliseconds per stage of one call.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct StageTimings {
    pub preprocess_ms: f64,
    pub vision_ms: f64,
    pub projector_ms: f64,
    pub llm_ms: f64,
    pub action_head_ms: f64,
    pub total_ms: f64,
}

/// `horizon × action_dim` actions, row-major (one row per future step).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ActionChunk {
    pub horizon: usize,
    pub action_dim: usize,
    /// The action head's output, in [−1, 1] where normalized.
    pub normalized: Vec<f32>,
    /// Un-normalized with `unnorm_key`'s q01/q99 and mask, gripper mapped.
    pub actions: Vec<f32>,
    pub unnorm_key: String,
    pub gripper: String,
    /// Sequence length L of the LLM pass.
    pub tokens: usize,
    pub timings: StageTimings,
}

impl ActionChunk {
    pub fn step(&self, t: usize) -> Option<&[f32]> {
        self.actions
            .get(t * self.action_dim..(t + 1) * self.action_dim)
    }
}

/// Intermediate tensors of one call, for comparison against a reference (§6).
#[derive(Debug, Clone, Default)]
pub struct StageOutputs {
    pub ids: Vec<u32>,
    pub prompt_len: usize,
    /// `images·patches × vision hidden`.
    pub vision: Vec<f32>,
    /// `images·patches × hidden`.
    pub projector: Vec<f32>,
    /// `L × hidden`, after the final norm.
    pub hidden: Vec<f32>,
    /// The extracted `horizon·action_dim × hidden` rows.
    pub action_rows: Vec<f32>,
}

pub struct Policy {
    pub config: BitVlaConfig,
    store: TensorStore,
    vision: VisionTower,
    projector: Projector,
    language: LanguageModel,
    proprio: Option<ProprioProjector>,
    head: ActionHead,
    unnorm_key: String,
    statistics: DatasetStatistics,
    tokenizer: PromptTokenizer,
    options: PolicyOptions,
    /// The activation buffers of the last call, for the next one.
    buffers: Mutex<ForwardBuffers>,
}

impl Policy {
    /// Loads a model: a published checkpoint directory, or a packed file from `bitvla convert`.
    pub fn load(path: &Path, options: PolicyOptions) -> Result<Self> {
        if path.is_file() {
            let packed = super::packed::open_packed(path)?;
            let statistics = Statistics::from_json(&packed.statistics)
                .map_err(|e| ModelError::file(path, format!("dataset statistics: {e}")))?;
            let text = packed.tokenizer;
            let tokenizer = move || PromptTokenizer::from_json(&text, path);
            return Self::from_parts(packed.config, packed.store, statistics, tokenizer, options);
        }
        let files = CheckpointFiles::find(path)?;
        let mut bad_entry = None;
        if let Some(dir) = options.cache_dir.clone() {
            use super::cache::{CacheOutcome, prepare};
            match prepare(&files, &dir)? {
                CacheOutcome::Hit(entry) | CacheOutcome::Converted(entry) => {
                    log::info!("{}: packed model {}", path.display(), entry.display());
                    match Self::load(&entry, options.clone()) {
                        Ok(policy) => return Ok(policy),
                        // Damaged, or the checkpoint's own problem: the directory tells.
                        Err(e) => {
                            log::warn!("{e}");
                            bad_entry = Some(entry);
                        }
                    }
                }
                CacheOutcome::Unusable(why) => log::warn!(
                    "packed-model cache not used ({why}): loading {} from the directory, which \
                     quantizes every weight again on every start",
                    path.display()
                ),
            }
        }
        let policy = Self::load_directory(&files, options)?;
        if let Some(entry) = bad_entry {
            // The directory loads but its packed file did not: the entry was damaged.
            super::cache::discard(&entry);
        }
        Ok(policy)
    }

    /// A checkpoint directory, quantized at load.
    fn load_directory(files: &CheckpointFiles, options: PolicyOptions) -> Result<Self> {
        let config = BitVlaConfig::from_file(&files.config)?;
        let store = super::packed::open_directory(files)?;
        let statistics = Statistics::from_file(&files.statistics)?;
        let tokenizer = || PromptTokenizer::from_file(&files.tokenizer);
        Self::from_parts(config, store, statistics, tokenizer, options)
    }

    /// The model from its parts; `tokenizer` (parsing `tokenizer.json`: about 0.3 s for the
    /// LLaMA-3 one) runs on a thread of its own while the weights load.
    fn from_parts(
        config: BitVlaConfig,
        store: TensorStore,
        statistics: Statistics,
        tokenizer: impl FnOnce() -> Result<PromptTokenizer> + Send,
        options: PolicyOptions,
    ) -> Result<Self> {
        std::thread::scope(|scope| {
            // A panic becomes an error here, so the thread never panics (a scope whose thread
            // panicked unjoined would panic itself when a weight fails to load first).
            let parsing = scope.spawn(|| {
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(tokenizer)).unwrap_or_else(
                    |_| Err(ModelError::Input("the tokenizer's parser panicked".into())),
                )
            });
            let joined = || {
                parsing.join().unwrap_or_else(|_| {
                    Err(ModelError::Input(
                        "the tokenizer's loading thread panicked".into(),
                    ))
                })
            };
            Self::from_loaded_parts(config, store, statistics, joined, options)
        })
        .inspect(|_| crate::process::release_free_heap())
    }

    fn from_loaded_parts(
        config: BitVlaConfig,
        store: TensorStore,
        statistics: Statistics,
        tokenizer: impl FnOnce() -> Result<PromptTokenizer>,
        options: PolicyOptions,
    ) -> Result<Self> {
        let vision = VisionTower::load(&store, &config)?;
        let projector = Projector::load(&store, &config)?;
        let language = LanguageModel::load(&store, &config)?;
        let hidden = language.hidden();
        let proprio = if store.contains(&format!("{PROPRIO_PREFIX}.fc1.weight")) {
            Some(ProprioProjector::load(&store, hidden)?)
        } else {
            None
        };
        let horizon = options.horizon.unwrap_or(config.num_actions_chunk);
        let head = ActionHead::load(&store, hidden, horizon)?;
        // The sidecars' decoded tensors now live in the heads.
        let mut store = store;
        store.drop_owned();
        store.release_mapped();
        let (unnorm_key, statistics) = statistics.select(
            options.unnorm_key.as_deref(),
            head.action_dim,
            proprio.as_ref().map(|p| p.input_dim()),
        )?;
        for name in store.names() {
            if !super::packed::is_used(name) {
                log::info!("checkpoint tensor {name} is not used on the OFT action path");
            }
        }
        let tokenizer = tokenizer()?;
        Ok(Self {
            config,
            store,
            vision,
            projector,
            language,
            proprio,
            head,
            unnorm_key,
            statistics,
            tokenizer,
            options,
            buffers: Mutex::default(),
        })
    }

    pub fn horizon(&self) -> usize {
        self.head.horizon
    }
    pub fn action_dim(&self) -> usize {
        self.head.action_dim
    }
    /// Width of the proprio vector the checkpoint takes, if any.
    pub fn proprio_dim(&self) -> Option<usize> {
        self.proprio.as_ref().map(|p| p.input_dim())
    }
    pub fn unnorm_key(&self) -> &str {
        &self.unnorm_key
    }
    /// Bytes of weights held in memory (packed ternary + f32), excluding the mapped embedding.
    pub fn weight_bytes(&self) -> usize {
        self.vision.memory_bytes()
            + self.projector.linear_1.memory_bytes()
            + self.projector.linear_2.memory_bytes()
            + self.language.memory_bytes()
            + self.head.memory_bytes()
            + self
                .proprio
                .as_ref()
                .map_or(0, |p| p.fc1.memory_bytes() + p.fc2.memory_bytes())
    }

    /// Replaces every ternary layer by its dequantized f32 weights (γ·t) and f32 activations: the
    /// same graph on the f32 GEMM path, the baseline of `bitvla bench forward`.
    pub fn use_f32_gemms(&mut self) {
        let vision = self
            .vision
            .layers
            .iter_mut()
            .flat_map(|l| l.bitlinears_mut());
        let language = self
            .language
            .layers
            .iter_mut()
            .flat_map(|l| l.bitlinears_mut());
        for l in vision.chain(language) {
            *l = l.to_dense();
        }
    }

    /// Int8-equivalent operations (2·M·N·K) of the ternary layers in one call over `tokens` LLM
    /// positions and `images` images.
    pub fn ternary_ops(&self, tokens: usize, images: usize) -> f64 {
        let vision_rows = images * self.vision.patches_per_image();
        super::packed::ternary_layers(&self.config)
            .iter()
            .map(|(name, n, k)| {
                let m = if name.starts_with("vision_tower") {
                    vision_rows
                } else {
                    tokens
                };
                2.0 * (m * n * k) as f64
            })
            .sum()
    }

    /// f32 FLOPs of the attention products (Q·Kᵀ and P·V) in one call.
    pub fn attention_flops(&self, tokens: usize, images: usize) -> f64 {
        let t = &self.config.text_config;
        let v = &self.config.vision_config;
        let p = self.vision.patches_per_image();
        let llm = t.num_hidden_layers
            * t.num_attention_heads
            * 4
            * tokens
            * tokens
            * self.config.text_head_dim();
        let vit = v.num_hidden_layers
            * images
            * v.num_attention_heads
            * 4
            * p
            * p
            * self.config.vision_head_dim();
        (llm + vit) as f64
    }

    pub fn predict(&self, obs: &Observation) -> Result<ActionChunk> {
        Ok(self.run(obs, false)?.0)
    }

    /// [`Policy::predict`], also returning the intermediate tensors.
    pub fn predict_stages(&self, obs: &Observation) -> Result<(ActionChunk, StageOutputs)> {
        let (chunk, stages) = self.run(obs, true)?;
        let stages = stages.ok_or_else(|| ModelError::Input("no stage outputs kept".into()))?;
        Ok((chunk, stages))
    }

    /// One policy call; with `keep_stages` the intermediate tensors are returned, otherwise
    /// the vision and projector outputs are freed before the language model runs (8 MB less
    /// at the forward's memory peak with the full-size model).
    fn run(
        &self,
        obs: &Observation,
        keep_stages: bool,
    ) -> Result<(ActionChunk, Option<StageOutputs>)> {
        let t0 = Instant::now();
        let ms = |t: Instant| t.elapsed().as_secs_f64() * 1e3;
        let mut timings = StageTimings::default();
        // The buffers of the last call; a call that overlaps another one (on another thread)
        // gets buffers of its own rather than waiting.
        let mut kept = match self.buffers.try_lock() {
            Ok(guard) => Some(guard),
            // A panic during another call: the buffers are overwritten before they are read.
            Err(TryLockError::Poisoned(poisoned)) => Some(poisoned.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        };
        // Empty until used: allocates nothing when the kept buffers are free.
        let mut own = ForwardBuffers::default();
        let buffers = kept.as_deref_mut().unwrap_or(&mut own);
        let n_images = obs.images.len();
        if !(1..=2).contains(&n_images) {
            return Err(ModelError::Input(format!(
                "{n_images} images; BitVLA takes 1 or 2 (third-person, then wrist)"
            )));
        }
        let proprio = match (&self.proprio, &obs.proprio) {
            (Some(p), Some(v)) => {
                if v.len() != p.input_dim() {
                    return Err(ModelError::Input(format!(
                        "proprio vector has {} values, the checkpoint takes {}",
                        v.len(),
                        p.input_dim()
                    )));
                }
                if let Some(i) = v.iter().position(|x| !x.is_finite()) {
                    return Err(ModelError::Input(format!("proprio[{i}] is {}", v[i])));
                }
                let bounds = self.statistics.proprio.as_ref().ok_or_else(|| {
                    ModelError::config(format!("{}.proprio", self.unnorm_key), "missing")
                })?;
                Some(bounds.normalize(v))
            }
            (Some(p), None) => {
                return Err(ModelError::Input(format!(
                    "the checkpoint takes a {}-value proprio vector; none was given",
                    p.input_dim()
                )));
            }
            (None, Some(_)) => {
                return Err(ModelError::Input(
                    "a proprio vector was given but the checkpoint has no proprio projector".into(),
                ));
            }
            (None, None) => None,
        };
        let size = self.config.vision_config.image_size as u32;
        let pixels = obs
            .images
            .iter()
            .enumerate()
            .map(|(i, img)| {
                let opts = self
                    .options
                    .image_options
                    .get(i)
                    .copied()
                    .unwrap_or_default();
                obs::prepare_u8(img, size, opts)
                    .map(|u8img| obs::to_chw(&u8img))
                    .map_err(|e| ModelError::Input(format!("image {i}: {e}")))
            })
            .collect::<Result<Vec<_>>>()?;
        let patches = self.vision.patches_per_image();
        let slots = self.head.horizon * self.head.action_dim;
        let prompt = self.tokenizer.encode(
            &obs.instruction,
            n_images,
            patches,
            proprio.is_some(),
            slots,
        )?;
        timings.preprocess_ms = ms(t0);

        let t = Instant::now();
        let vision = self.vision.forward(&pixels, buffers)?;
        timings.vision_ms = ms(t);
        let t = Instant::now();
        let projected = self
            .projector
            .forward(&vision, n_images * patches, &mut buffers.qa)?;
        timings.projector_ms = ms(t);

        let t = Instant::now();
        let h = self.language.hidden();
        let ids: Vec<usize> = prompt.ids.iter().map(|&i| i as usize).collect();
        let mut x = self.store.f32_rows(&self.language.embed_tokens, h, &ids)?;
        let mut image_rows = projected.chunks_exact(h);
        for (pos, &id) in prompt.ids[..prompt.prompt_len].iter().enumerate() {
            let row = &mut x[pos * h..(pos + 1) * h];
            if id == IMAGE_PAD_ID {
                let src = image_rows.next().ok_or_else(|| {
                    ModelError::Input("more image placeholders than features".into())
                })?;
                row.copy_from_slice(src);
            } else if id == PROPRIO_PAD_ID
                && let (Some(pp), Some(p)) = (&self.proprio, &proprio)
            {
                row.copy_from_slice(&pp.forward(p, &mut buffers.qa)?);
            }
        }
        let (vision, projected) = if keep_stages {
            (vision, projected)
        } else {
            (Vec::new(), Vec::new())
        };
        let p = prompt.prompt_len;
        if !self.options.ablation.keep_action_embeddings {
            x[p * h..(p + slots) * h].fill(0.0);
        }
        let tokens = prompt.ids.len();
        let hidden = self
            .language
            .forward(x, tokens, self.options.ablation.causal, buffers)?;
        // §5.7: the rows used are P−1 … P+slots−2 (shifted by one).
        let first = if self.options.ablation.unshifted_rows {
            p
        } else {
            p - 1
        };
        let action_rows = hidden[first * h..(first + slots) * h].to_vec();
        timings.llm_ms = ms(t);

        let t = Instant::now();
        let normalized = self.head.forward(&action_rows, &mut buffers.qa)?;
        if let Some(i) = normalized.iter().position(|v| !v.is_finite()) {
            return Err(ModelError::Input(format!(
                "the action head produced a non-finite value ({}) at step {}, dim {}; \
                 nothing to publish",
                normalized[i],
                i / self.head.action_dim,
                i % self.head.action_dim
            )));
        }
        let mut actions = vec![0.0; normalized.len()];
        self.statistics
            .action
            .unnormalize(&normalized, &mut actions);
        if self.options.gripper == GripperMapping::LiberoBinarizeInvert {
            for row in actions.chunks_exact_mut(self.head.action_dim) {
                if let Some(g) = row.last_mut() {
                    let s = 2.0 * *g - 1.0;
                    let sign = if s > 0.0 {
                        1.0
                    } else if s < 0.0 {
                        -1.0
                    } else {
                        0.0
                    };
                    *g = -sign;
                }
            }
        }
        timings.action_head_ms = ms(t);
        timings.total_ms = ms(t0);
        let chunk = ActionChunk {
            horizon: self.head.horizon,
            action_dim: self.head.action_dim,
            normalized,
            actions,
            unnorm_key: self.unnorm_key.clone(),
            gripper: format!("{:?}", self.options.gripper),
            tokens,
            timings,
        };
        let stages = keep_stages.then_some(StageOutputs {
            ids: prompt.ids,
            prompt_len: p,
            vision,
            projector: projected,
            hidden,
            action_rows,
        });
        Ok((chunk, stages))
    }
}
