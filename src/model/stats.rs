//! `dataset_statistics.json` (§3.5): per-dataset q01/q99 bounds for un-normalizing actions
//! (§5.9) and normalizing proprioception (§5.2), `BOUNDS_Q99` in the reference.

use super::{ModelError, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Bounds {
    pub q01: Vec<f32>,
    pub q99: Vec<f32>,
    /// Which dimensions are normalized; absent means all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask: Option<Vec<bool>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetStatistics {
    pub action: Bounds,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proprio: Option<Bounds>,
}

/// All datasets of one file, by key (e.g. `libero_spatial_no_noops`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Statistics(pub BTreeMap<String, DatasetStatistics>);

impl Bounds {
    fn validate(&self, what: &str, dim: Option<usize>) -> Result<()> {
        let n = self.q01.len();
        if self.q99.len() != n || self.mask.as_ref().is_some_and(|m| m.len() != n) {
            return Err(ModelError::config(
                what,
                format!(
                    "q01 ({n}), q99 ({}) and mask ({:?}) lengths differ",
                    self.q99.len(),
                    self.mask.as_ref().map(Vec::len)
                ),
            ));
        }
        if let Some(d) = dim
            && d != n
        {
            return Err(ModelError::config(
                what,
                format!("{n} dimensions, the model uses {d}"),
            ));
        }
        if self.q01.iter().chain(&self.q99).any(|v| !v.is_finite()) {
            return Err(ModelError::config(what, "non-finite bound"));
        }
        Ok(())
    }

    fn normalized(&self, i: usize) -> bool {
        self.mask.as_ref().is_none_or(|m| m[i])
    }

    /// `a = 0.5·(a_n + 1)·(q99 − q01 + 1e-8) + q01` where the mask is set; raw elsewhere.
    pub fn unnormalize(&self, normalized: &[f32], out: &mut [f32]) {
        let dim = self.q01.len();
        for (row_n, row) in normalized.chunks_exact(dim).zip(out.chunks_exact_mut(dim)) {
            for i in 0..dim {
                row[i] = if self.normalized(i) {
                    0.5 * (row_n[i] + 1.0) * (self.q99[i] - self.q01[i] + 1e-8) + self.q01[i]
                } else {
                    row_n[i]
                };
            }
        }
    }

    /// `p_n = clip(2·(p − q01)/(q99 − q01 + 1e-8) − 1, −1, 1)` where the mask is set.
    pub fn normalize(&self, raw: &[f32]) -> Vec<f32> {
        raw.iter()
            .enumerate()
            .map(|(i, &p)| {
                if self.normalized(i) {
                    (2.0 * (p - self.q01[i]) / (self.q99[i] - self.q01[i] + 1e-8) - 1.0)
                        .clamp(-1.0, 1.0)
                } else {
                    p
                }
            })
            .collect()
    }
}

impl Statistics {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::file(path, e))?;
        Self::from_json(&text).map_err(|e| ModelError::file(path, e))
    }

    pub fn from_json(text: &str) -> Result<Self> {
        // Unknown members (mean, std, num_transitions, ...) are ignored.
        let de = &mut serde_json::Deserializer::from_str(text);
        let map: BTreeMap<String, DatasetStatistics> = serde_path_to_error::deserialize(de)
            .map_err(|e| ModelError::config(e.path().to_string(), e.into_inner()))?;
        Ok(Self(map))
    }

    /// The statistics for `key`, or the only entry when `key` is `None`.
    pub fn select(
        &self,
        key: Option<&str>,
        action_dim: usize,
        proprio_dim: Option<usize>,
    ) -> Result<(String, DatasetStatistics)> {
        let keys = || self.0.keys().cloned().collect::<Vec<_>>().join(", ");
        let (k, s) = match key {
            Some(k) => self.0.get_key_value(k).ok_or_else(|| {
                ModelError::config(
                    "unnorm_key",
                    format!(
                        "{k:?} is not in dataset_statistics.json (available: {})",
                        keys()
                    ),
                )
            })?,
            None if self.0.len() == 1 => self.0.iter().next().ok_or_else(|| {
                ModelError::config("unnorm_key", "dataset_statistics.json is empty")
            })?,
            None => {
                return Err(ModelError::config(
                    "unnorm_key",
                    format!(
                        "dataset_statistics.json has {} datasets; choose one with --unnorm-key ({})",
                        self.0.len(),
                        keys()
                    ),
                ));
            }
        };
        s.action
            .validate(&format!("{k}.action"), Some(action_dim))?;
        if let Some(pd) = proprio_dim {
            let p = s.proprio.as_ref().ok_or_else(|| {
                ModelError::config(
                    format!("{k}.proprio"),
                    "missing, the model takes proprioception",
                )
            })?;
            p.validate(&format!("{k}.proprio"), Some(pd))?;
        }
        Ok((k.clone(), s.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unnormalize_respects_the_mask() {
        let b = Bounds {
            q01: vec![-1.0, 0.0],
            q99: vec![1.0, 2.0],
            mask: Some(vec![true, false]),
        };
        let mut out = [0.0; 2];
        b.unnormalize(&[0.5, 0.25], &mut out);
        assert!((out[0] - 0.5).abs() < 1e-6 && out[1] == 0.25);
        assert_eq!(b.normalize(&[3.0, 7.0]), vec![1.0, 7.0]);
    }

    #[test]
    fn key_selection() {
        let s = Statistics::from_json(
            r#"{"a": {"action": {"q01": [0], "q99": [1], "mean": [0]}},
                "b": {"action": {"q01": [0], "q99": [1]}}}"#,
        )
        .unwrap();
        assert!(
            s.select(None, 1, None)
                .unwrap_err()
                .to_string()
                .contains("a, b")
        );
        assert_eq!(s.select(Some("b"), 1, None).unwrap().0, "b");
        assert!(s.select(Some("c"), 1, None).is_err());
        assert!(s.select(Some("a"), 2, None).is_err());
        assert!(s.select(Some("a"), 1, Some(8)).is_err());
    }
}
