//! The BitVLA policy: checkpoint loading, the forward pass and the action post-processing.
//!
//! The module tree mirrors the checkpoint's tensor-name tree (`vision_tower.vision_model...`,
//! `multi_modal_projector...`, `language_model.model.layers.N...`, and the two `.pt` sidecars), so
//! a tensor name in an error message leads to the struct that loads it. The spec is
//! `shared/spec/bitvla-model.md`; section numbers (§) below refer to it.

pub mod buffers;
pub mod cache;
pub mod config;
pub mod files;
pub mod heads;
pub mod language;
pub mod linear;
pub mod packed;
pub mod pickle;
pub mod policy;
pub mod prompt;
pub mod stats;
pub mod store;
pub mod synthetic;
pub mod tiny;
pub mod vision;

pub use config::BitVlaConfig;
pub use policy::{ActionChunk, GripperMapping, Observation, Policy, PolicyOptions, StageTimings};
pub use store::TensorStore;

use crate::kernels::KernelError;
use std::path::PathBuf;

/// Errors of model loading and inference. Each names the file, tensor, field or input at fault.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("tensor {name}: {message}")]
    Tensor { name: String, message: String },
    #[error("config {field}: {message}")]
    Config { field: String, message: String },
    #[error("invalid input: {0}")]
    Input(String),
    #[error("{stage}: {source}")]
    Kernel {
        stage: String,
        #[source]
        source: KernelError,
    },
}

pub type Result<T> = std::result::Result<T, ModelError>;

impl ModelError {
    pub(crate) fn file(path: impl Into<PathBuf>, message: impl std::fmt::Display) -> Self {
        Self::File {
            path: path.into(),
            message: message.to_string(),
        }
    }
    pub(crate) fn tensor(name: impl Into<String>, message: impl std::fmt::Display) -> Self {
        Self::Tensor {
            name: name.into(),
            message: message.to_string(),
        }
    }
    pub(crate) fn config(field: impl Into<String>, message: impl std::fmt::Display) -> Self {
        Self::Config {
            field: field.into(),
            message: message.to_string(),
        }
    }
}

/// Attaches the stage name to a kernel error.
pub(crate) trait KernelContext<T> {
    fn stage(self, stage: impl std::fmt::Display) -> Result<T>;
}

impl<T> KernelContext<T> for std::result::Result<T, KernelError> {
    fn stage(self, stage: impl std::fmt::Display) -> Result<T> {
        self.map_err(|source| ModelError::Kernel {
            stage: stage.to_string(),
            source,
        })
    }
}
