//! Meta layout: `consolidated.NN.pth` (or AIME's `merged.<n>GPUs.NN.pth`) model-parallel shards,
//! combined by fairscale's rule without ever materializing the whole model.

use super::pth::{check_slice, PthFile};
use super::view::{concat, View};
use super::{CheckpointError, Slice, Tensor, TensorSource};
use std::collections::HashMap;
use std::path::PathBuf;

/// RoPE frequencies stored by older Meta checkpoints; herd computes them itself.
const SKIPPED: &[&str] = &["rope.freqs"];

/// The dimension along which fairscale splits a tensor across MP ranks (None: replicated).
pub fn split_dim(name: &str) -> Option<usize> {
    const DIM0: &[&str] = &[
        "attention.wq.weight",
        "attention.wk.weight",
        "attention.wv.weight",
        "feed_forward.w1.weight",
        "feed_forward.w3.weight",
    ];
    const DIM1: &[&str] = &["attention.wo.weight", "feed_forward.w2.weight"];
    if name == "output.weight" || name == "tok_embeddings.weight" {
        return Some(0);
    }
    if DIM0.iter().any(|s| name.ends_with(s)) {
        return Some(0);
    }
    if DIM1.iter().any(|s| name.ends_with(s)) {
        return Some(1);
    }
    None
}

struct MetaTensor {
    split: Option<usize>,
    /// Each shard's extent along the split dim (all shards' shapes agree elsewhere).
    sizes: Vec<usize>,
    shape: Vec<usize>,
}

/// A Meta checkpoint of one or more MP shards.
pub struct MetaSource {
    shards: Vec<PthFile>,
    names: Vec<String>,
    tensors: HashMap<String, MetaTensor>,
}

impl MetaSource {
    /// Opens the shards (in rank order) and checks that their tensor sets and shapes combine.
    pub fn open(shards: &[PathBuf]) -> Result<MetaSource, CheckpointError> {
        let files = shards
            .iter()
            .map(|p| PthFile::open(p))
            .collect::<Result<Vec<_>, _>>()?;
        let Some(first) = files.first() else {
            return Err(CheckpointError::Layout(
                "Meta checkpoint without shards".into(),
            ));
        };
        let names: Vec<String> = first
            .names()
            .into_iter()
            .filter(|n| !SKIPPED.contains(&n.as_str()))
            .collect();
        for f in &files[1..] {
            if let Some(extra) = f
                .names()
                .into_iter()
                .find(|n| !SKIPPED.contains(&n.as_str()) && !first.contains(n))
            {
                return Err(CheckpointError::Tensor {
                    path: f.path().to_path_buf(),
                    tensor: extra,
                    msg: format!("not present in {}", first.path().display()),
                });
            }
        }
        let mut tensors = HashMap::new();
        for name in &names {
            let s0 = first.shape(name)?;
            let split = if files.len() > 1 {
                split_dim(name)
            } else {
                None
            };
            let mut sizes = Vec::with_capacity(files.len());
            for f in &files {
                let s = f.shape(name).map_err(|_| CheckpointError::Tensor {
                    path: f.path().to_path_buf(),
                    tensor: name.clone(),
                    msg: format!(
                        "missing from this shard (present in {})",
                        first.path().display()
                    ),
                })?;
                let agrees = s.len() == s0.len()
                    && s.iter()
                        .zip(&s0)
                        .enumerate()
                        .all(|(d, (a, b))| Some(d) == split || a == b)
                    && split.is_none_or(|d| d < s.len());
                if !agrees || f.dtype_of(name) != first.dtype_of(name) {
                    let rule = match split {
                        Some(d) => format!("split along dim {d}"),
                        None => "replicated".into(),
                    };
                    return Err(CheckpointError::Tensor {
                        path: f.path().to_path_buf(),
                        tensor: name.clone(),
                        msg: format!(
                            "shape/dtype mismatch between shards ({rule}): {s:?} {:?} here vs {s0:?} {:?} in {}",
                            f.dtype_of(name),
                            first.dtype_of(name),
                            first.path().display()
                        ),
                    });
                }
                sizes.push(split.map_or(0, |d| s[d]));
            }
            let mut shape = s0;
            if let Some(d) = split {
                shape[d] = sizes
                    .iter()
                    .try_fold(0usize, |a, &b| a.checked_add(b))
                    .ok_or_else(|| CheckpointError::Tensor {
                        path: first.path().to_path_buf(),
                        tensor: name.clone(),
                        msg: format!("the shards' sizes along dim {d} overflow: {sizes:?}"),
                    })?;
            }
            tensors.insert(
                name.clone(),
                MetaTensor {
                    split,
                    sizes,
                    shape,
                },
            );
        }
        Ok(MetaSource {
            shards: files,
            names,
            tensors,
        })
    }

    fn info(&self, name: &str) -> Result<&MetaTensor, CheckpointError> {
        self.tensors
            .get(name)
            .ok_or_else(|| CheckpointError::NotFound {
                path: self.shards[0].path().to_path_buf(),
                tensor: name.to_string(),
            })
    }

    /// Number of model-parallel shards.
    pub fn mp(&self) -> usize {
        self.shards.len()
    }
}

impl TensorSource for MetaSource {
    fn names(&self) -> Vec<String> {
        self.names.clone()
    }

    fn shape(&self, name: &str) -> Result<Vec<usize>, CheckpointError> {
        Ok(self.info(name)?.shape.clone())
    }

    fn load(&self, name: &str, slice: Option<Slice>) -> Result<Tensor, CheckpointError> {
        let t = self.info(name)?;
        let Some(sd) = t.split else {
            return self.shards[0].load(name, slice);
        };
        if let Some(s) = slice {
            check_slice(&t.shape, s, self.shards[0].path(), name)?;
        }
        // The wanted range along the split dim; other-dim slices apply inside each shard.
        let (lo, hi) = match slice {
            Some(s) if s.dim == sd => (s.start, s.start + s.len),
            _ => (0, t.shape[sd]),
        };
        let other = slice.filter(|s| s.dim != sd);
        let narrow_other = |v: View| match other {
            Some(s) => v.narrow(s.dim, s.start, s.len),
            None => v,
        };
        if lo == hi {
            let v = self.shards[0].view(name)?.narrow(sd, 0, 0);
            return Ok(narrow_other(v).to_tensor());
        }
        // Only the shards overlapping lo..hi are touched.
        let mut parts: Vec<View> = Vec::new();
        let mut base = 0;
        for (shard, &n) in self.shards.iter().zip(&t.sizes) {
            let (a, b) = (lo.max(base), hi.min(base + n));
            if a < b {
                parts.push(narrow_other(shard.view(name)?.narrow(sd, a - base, b - a)));
            }
            base += n;
        }
        Ok(concat(&parts, sd))
    }

    fn describe(&self) -> String {
        let files: Vec<String> = self
            .shards
            .iter()
            .map(|f| {
                f.path().file_name().map_or_else(
                    || f.path().display().to_string(),
                    |n| n.to_string_lossy().into_owned(),
                )
            })
            .collect();
        format!("Meta MP={} ({})", self.shards.len(), files.join(", "))
    }
}
