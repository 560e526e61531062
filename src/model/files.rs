//! The files of a checkpoint directory and the tensor-name prefixes of its `.pt` sidecars: what
//! both the loader of published directories (`policy`) and the packed format (`packed`) name,
//! kept below both so that neither imports the other for it.

use super::{ModelError, Result};
use std::path::{Path, PathBuf};

/// Tensor-name prefix of the proprio projector sidecar's tensors.
pub const PROPRIO_PREFIX: &str = "proprio_projector";
/// Tensor-name prefix of the action head sidecar's tensors.
pub const ACTION_HEAD_PREFIX: &str = "action_head";

/// The files of a checkpoint directory (§3.1).
#[derive(Debug, Clone)]
pub struct CheckpointFiles {
    pub config: PathBuf,
    pub weights: Vec<PathBuf>,
    pub action_head: PathBuf,
    pub proprio_projector: Option<PathBuf>,
    pub statistics: PathBuf,
    pub tokenizer: PathBuf,
}

impl CheckpointFiles {
    pub fn find(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(ModelError::file(dir, "is not a checkpoint directory"));
        }
        let need = |name: &str| -> Result<PathBuf> {
            let p = dir.join(name);
            if p.is_file() {
                Ok(p)
            } else {
                Err(ModelError::file(
                    &p,
                    "missing from the checkpoint directory",
                ))
            }
        };
        let index = dir.join("model.safetensors.index.json");
        let weights = if index.is_file() {
            let text = std::fs::read_to_string(&index).map_err(|e| ModelError::file(&index, e))?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| ModelError::file(&index, e))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| ModelError::file(&index, "no \"weight_map\" object"))?;
            let mut files: Vec<String> = map
                .values()
                .map(|f| {
                    f.as_str().map(str::to_owned).ok_or_else(|| {
                        ModelError::file(&index, "weight_map values must be file names")
                    })
                })
                .collect::<Result<_>>()?;
            files.sort();
            files.dedup();
            files.iter().map(|f| need(f)).collect::<Result<Vec<_>>>()?
        } else {
            vec![need("model.safetensors").map_err(|_| {
                ModelError::file(
                    dir,
                    "neither model.safetensors nor model.safetensors.index.json is present",
                )
            })?]
        };
        let sidecar = |stem: &str| -> Result<Option<PathBuf>> {
            let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
                .map_err(|e| ModelError::file(dir, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                        n.starts_with(&format!("{stem}--")) && n.ends_with("_checkpoint.pt")
                    })
                })
                .collect();
            found.sort();
            match found.len() {
                0 => Ok(None),
                1 => Ok(found.pop()),
                _ => Err(ModelError::file(
                    dir,
                    format!("several {stem}--*_checkpoint.pt files ({found:?}); keep one"),
                )),
            }
        };
        Ok(Self {
            config: need("config.json")?,
            weights,
            action_head: sidecar("action_head")?.ok_or_else(|| {
                ModelError::file(dir, "no action_head--*_checkpoint.pt (the OFT action head)")
            })?,
            proprio_projector: sidecar("proprio_projector")?,
            statistics: need("dataset_statistics.json")?,
            tokenizer: need("tokenizer.json")?,
        })
    }
}
