//! The two OFT sidecars (§1.4, §1.5): `proprio_projector--*_checkpoint.pt` and
//! `action_head--*_checkpoint.pt`, registered in the store under the prefixes
//! `proprio_projector.` and `action_head.`. Their shapes decide the proprio width, the action
//! dimension and the chunk length (nothing is a constant).

use super::linear::{Linear, LinearKind};
use super::store::TensorStore;
use super::vision::LayerNorm;
use super::{ModelError, Result};
use crate::kernels::QuantizedActivations;
use crate::kernels::ops::gelu_erf;

use super::files::{ACTION_HEAD_PREFIX, PROPRIO_PREFIX};

/// fc1 → exact GELU → fc2: one token embedding from the normalized proprio vector.
pub struct ProprioProjector {
    pub fc1: Linear,
    pub fc2: Linear,
}

impl ProprioProjector {
    pub fn load(store: &TensorStore, hidden: usize) -> Result<Self> {
        let name = format!("{PROPRIO_PREFIX}.fc1.weight");
        let shape = store.shape(&name)?;
        let [n, dim] = shape else {
            return Err(ModelError::tensor(
                &name,
                format!("shape {shape:?} is not 2-D"),
            ));
        };
        if *n != hidden {
            return Err(ModelError::tensor(
                &name,
                format!("shape {shape:?}, expected [{hidden}, *]"),
            ));
        }
        let dim = *dim;
        Ok(Self {
            fc1: Linear::load(
                store,
                &format!("{PROPRIO_PREFIX}.fc1"),
                hidden,
                dim,
                true,
                LinearKind::DenseBf16,
            )?,
            fc2: Linear::load(
                store,
                &format!("{PROPRIO_PREFIX}.fc2"),
                hidden,
                hidden,
                true,
                LinearKind::DenseBf16,
            )?,
        })
    }

    pub fn input_dim(&self) -> usize {
        self.fc1.k
    }

    pub fn forward(&self, proprio: &[f32], qa: &mut QuantizedActivations) -> Result<Vec<f32>> {
        let mut x = self.fc1.forward(proprio, 1, qa)?;
        gelu_erf(&mut x);
        self.fc2.forward(&x, 1, qa)
    }
}

/// `model.mlp_resnet_blocks.N`: x ← x + ReLU(Linear(LayerNorm(x))).
pub struct ResnetBlock {
    pub norm: LayerNorm,
    pub linear: Linear,
}

/// L1-regression MLP-ResNet head: each of `horizon` rows of `action_dim · hidden` extracted
/// hidden states → `action_dim` actions.
pub struct ActionHead {
    pub layer_norm1: LayerNorm,
    pub fc1: Linear,
    pub blocks: Vec<ResnetBlock>,
    pub layer_norm2: LayerNorm,
    pub fc2: Linear,
    pub horizon: usize,
    pub action_dim: usize,
}

fn relu(x: &mut [f32]) {
    for v in x {
        *v = v.max(0.0);
    }
}

impl ActionHead {
    /// `horizon` is not stored in the head (each chunk row maps `action_dim` hidden states to
    /// `action_dim` actions); it comes from the configuration.
    pub fn load(store: &TensorStore, llm_hidden: usize, horizon: usize) -> Result<Self> {
        let p = format!("{ACTION_HEAD_PREFIX}.model");
        let shape_of = |name: &str| -> Result<Vec<usize>> {
            Ok(store.shape(&format!("{p}.{name}"))?.to_vec())
        };
        let fc2 = shape_of("fc2.weight")?;
        let fc1 = shape_of("fc1.weight")?;
        let (&[action_dim, head_hidden], &[head_hidden1, input]) = (fc2.as_slice(), fc1.as_slice())
        else {
            return Err(ModelError::tensor(
                format!("{p}.fc1.weight"),
                format!("shapes {fc1:?} / fc2 {fc2:?} are not 2-D"),
            ));
        };
        if head_hidden != head_hidden1
            || action_dim == 0
            || input != action_dim * llm_hidden
            || horizon == 0
        {
            return Err(ModelError::tensor(
                format!("{p}.fc1.weight"),
                format!(
                    "shape {fc1:?} does not fit fc2 {fc2:?} and the LLM width {llm_hidden} \
                     (expected [hidden, action_dim·{llm_hidden}]), horizon {horizon}"
                ),
            ));
        }
        let mut blocks = Vec::new();
        while store.contains(&format!(
            "{p}.mlp_resnet_blocks.{}.ffn.0.weight",
            blocks.len()
        )) {
            let b = format!("{p}.mlp_resnet_blocks.{}.ffn", blocks.len());
            blocks.push(ResnetBlock {
                norm: LayerNorm::load(store, &format!("{b}.0"), head_hidden, 1e-5)?,
                linear: Linear::load(
                    store,
                    &format!("{b}.1"),
                    head_hidden,
                    head_hidden,
                    true,
                    LinearKind::Dense,
                )?,
            });
        }
        Ok(Self {
            layer_norm1: LayerNorm::load(store, &format!("{p}.layer_norm1"), input, 1e-5)?,
            fc1: Linear::load(
                store,
                &format!("{p}.fc1"),
                head_hidden,
                input,
                true,
                LinearKind::Dense,
            )?,
            blocks,
            layer_norm2: LayerNorm::load(store, &format!("{p}.layer_norm2"), head_hidden, 1e-5)?,
            fc2: Linear::load(
                store,
                &format!("{p}.fc2"),
                action_dim,
                head_hidden,
                true,
                LinearKind::Dense,
            )?,
            horizon,
            action_dim,
        })
    }

    /// `rows`: the `horizon · action_dim` extracted hidden states, row-major; returns
    /// `horizon × action_dim` normalized actions.
    pub fn forward(&self, rows: &[f32], qa: &mut QuantizedActivations) -> Result<Vec<f32>> {
        let m = self.horizon;
        let x = self.layer_norm1.forward(rows)?;
        let mut x = self.fc1.forward(&x, m, qa)?;
        relu(&mut x);
        for b in &self.blocks {
            let n = b.norm.forward(&x)?;
            let mut y = b.linear.forward(&n, m, qa)?;
            relu(&mut y);
            for (a, v) in x.iter_mut().zip(&y) {
                *a += v;
            }
        }
        let x = self.layer_norm2.forward(&x)?;
        self.fc2.forward(&x, m, qa)
    }

    pub fn memory_bytes(&self) -> usize {
        self.fc1.memory_bytes()
            + self.fc2.memory_bytes()
            + self
                .blocks
                .iter()
                .map(|b| b.linear.memory_bytes())
                .sum::<usize>()
    }
}
