//! HF layout: `model.safetensors` or `model-0000N-of-0000M.safetensors` (+ index), with tensors
//! renamed to Meta names and q/k rows converted from HF's rotate-half order to Meta's
//! interleaved pairs.

use super::pth::{apply_slice, check_slice, map_file};
use super::view::{extent, row_major, View};
use super::{short, Bytes, CheckpointError, DType, QkHeads, Slice, Tensor, TensorSource, MAX_DIMS};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Largest header accepted (the safetensors format's own limit).
const MAX_HEADER: usize = 100_000_000;

/// One safetensors file: tensor name -> (shape, view or why it cannot load).
pub(super) struct StFile {
    pub(super) path: PathBuf,
    pub(super) tensors: HashMap<String, (Vec<usize>, Result<View, String>)>,
}

fn st_dtype(s: &str) -> Result<DType, String> {
    match s {
        "BF16" => Ok(DType::BF16),
        "F16" => Ok(DType::F16),
        "F32" => Ok(DType::F32),
        other => Err(format!(
            "unsupported dtype {}; herd loads BF16, F16 and F32",
            short(other)
        )),
    }
}

impl StFile {
    pub(super) fn open(path: &Path) -> Result<StFile, CheckpointError> {
        let map = map_file(path)?;
        let ferr = |msg: String| CheckpointError::File {
            path: path.to_path_buf(),
            msg,
        };
        if map.len() < 8 {
            return Err(ferr(
                "too short for a safetensors header (truncated?)".into(),
            ));
        }
        let mut n8 = [0u8; 8];
        n8.copy_from_slice(&map[..8]);
        let n = usize::try_from(u64::from_le_bytes(n8)).unwrap_or(usize::MAX);
        if n > MAX_HEADER || 8 + n > map.len() {
            return Err(ferr(format!(
                "safetensors header of {n} bytes does not fit in the file of {} bytes (truncated?)",
                map.len()
            )));
        }
        let header: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&map[8..8 + n])
                .map_err(|e| ferr(format!("bad safetensors header: {}", short(&e.to_string()))))?;
        let data_start = 8 + n;
        let data_len = map.len() - data_start;
        let mut tensors = HashMap::new();
        for (name, info) in header {
            if name == "__metadata__" {
                continue;
            }
            let terr = |msg: &str| CheckpointError::Tensor {
                path: path.to_path_buf(),
                tensor: name.clone(),
                msg: format!("bad header entry: {msg}"),
            };
            let dtype = info
                .get("dtype")
                .and_then(|d| d.as_str())
                .ok_or_else(|| terr("no dtype"))?;
            let shape = info
                .get("shape")
                .and_then(|s| s.as_array())
                .and_then(|a| {
                    a.iter()
                        .map(|x| x.as_u64().and_then(|x| usize::try_from(x).ok()))
                        .collect::<Option<Vec<usize>>>()
                })
                .ok_or_else(|| terr("shape is not a list of sizes"))?;
            if shape.len() > MAX_DIMS {
                return Err(terr(&format!(
                    "{} dimensions; herd loads tensors of at most {MAX_DIMS}",
                    shape.len()
                )));
            }
            let offs = info
                .get("data_offsets")
                .and_then(|s| s.as_array())
                .and_then(|a| match a.as_slice() {
                    [b, e] => Some((b.as_u64()?, e.as_u64()?)),
                    _ => None,
                })
                .and_then(|(b, e)| Some((usize::try_from(b).ok()?, usize::try_from(e).ok()?)))
                .filter(|(b, e)| b <= e)
                .ok_or_else(|| terr("data_offsets is not [begin, end]"))?;
            let view = st_dtype(dtype).and_then(|dt| {
                let numel = shape
                    .iter()
                    .try_fold(1usize, |a, &b| a.checked_mul(b))
                    .ok_or("shape overflows")?;
                let need = numel.checked_mul(dt.size()).ok_or("shape overflows")?;
                if offs.1 - offs.0 != need {
                    return Err(format!(
                        "data_offsets span {} bytes but shape {shape:?} {dt:?} needs {need}",
                        offs.1 - offs.0
                    ));
                }
                if offs.1 > data_len {
                    return Err(format!(
                        "bytes {}..{} of the data section are past the end of the file ({} data bytes; truncated?)",
                        offs.0, offs.1, data_len
                    ));
                }
                let strides = row_major(&shape);
                extent(0, &shape, &strides, numel)?;
                Ok(View {
                    map: map.clone(),
                    offset: data_start + offs.0,
                    dtype: dt,
                    shape: shape.clone(),
                    strides,
                })
            });
            tensors.insert(name, (shape, view));
        }
        Ok(StFile {
            path: path.to_path_buf(),
            tensors,
        })
    }
}

/// Meta name for an HF tensor name; None for buffers herd does not use.
pub fn hf_to_meta(name: &str) -> Option<String> {
    match name {
        "model.embed_tokens.weight" => return Some("tok_embeddings.weight".into()),
        "model.norm.weight" => return Some("norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    if name.ends_with("rotary_emb.inv_freq") {
        return None;
    }
    let Some(rest) = name.strip_prefix("model.layers.") else {
        return Some(name.to_string());
    };
    let Some((layer, tail)) = rest.split_once('.') else {
        return Some(name.to_string());
    };
    let meta = match tail {
        "self_attn.q_proj.weight" => "attention.wq.weight",
        "self_attn.k_proj.weight" => "attention.wk.weight",
        "self_attn.v_proj.weight" => "attention.wv.weight",
        "self_attn.o_proj.weight" => "attention.wo.weight",
        "mlp.gate_proj.weight" => "feed_forward.w1.weight",
        "mlp.down_proj.weight" => "feed_forward.w2.weight",
        "mlp.up_proj.weight" => "feed_forward.w3.weight",
        "input_layernorm.weight" => "attention_norm.weight",
        "post_attention_layernorm.weight" => "ffn_norm.weight",
        // Unknown tensors keep their HF name, so the model layer can name them if it needs them.
        _ => return Some(name.to_string()),
    };
    Some(format!("layers.{layer}.{meta}"))
}

/// Which q/k permutation a Meta name needs: the number of heads in its rows.
fn qk_heads(name: &str, heads: &QkHeads) -> Option<usize> {
    if name.ends_with("attention.wq.weight") {
        Some(heads.n_heads)
    } else if name.ends_with("attention.wk.weight") {
        Some(heads.n_kv_heads)
    } else {
        None
    }
}

/// An HF safetensors checkpoint seen under Meta names.
pub struct HfSource {
    files: Vec<StFile>,
    heads: QkHeads,
    names: Vec<String>,
    /// Meta name -> (file index, HF name)
    index: HashMap<String, (usize, String)>,
}

impl HfSource {
    /// Opens the safetensors files; `index` (`model.safetensors.index.json`), if given, is checked
    /// against what the files hold.
    pub fn open(
        files: &[PathBuf],
        index: Option<&Path>,
        heads: QkHeads,
    ) -> Result<HfSource, CheckpointError> {
        let files = files
            .iter()
            .map(|p| StFile::open(p))
            .collect::<Result<Vec<_>, _>>()?;
        let mut map: HashMap<String, (usize, String)> = HashMap::new();
        let mut hf_names: Vec<(String, usize)> = Vec::new();
        for (i, f) in files.iter().enumerate() {
            let mut ns: Vec<&String> = f.tensors.keys().collect();
            ns.sort();
            hf_names.extend(ns.into_iter().map(|n| (n.clone(), i)));
        }
        for (hf, i) in &hf_names {
            let Some(meta) = hf_to_meta(hf) else { continue };
            if let Some((j, other)) = map.get(&meta) {
                return Err(CheckpointError::Tensor {
                    path: files[*i].path.clone(),
                    tensor: hf.clone(),
                    msg: format!(
                        "duplicate: '{}' in {} is also '{}'",
                        short(other),
                        files[*j].path.display(),
                        short(&meta)
                    ),
                });
            }
            map.insert(meta, (*i, hf.clone()));
        }
        // Tied embeddings (no lm_head): the output projection is the embedding matrix.
        if !map.contains_key("output.weight") {
            if let Some(e) = map.get("tok_embeddings.weight").cloned() {
                map.insert("output.weight".into(), e);
            }
        }
        if let Some(ix) = index {
            check_index(ix, &files)?;
        }
        let mut names: Vec<String> = map.keys().cloned().collect();
        names.sort_by_key(|n| meta_order(n));
        Ok(HfSource {
            files,
            heads,
            names,
            index: map,
        })
    }

    fn lookup(&self, name: &str) -> Result<(&StFile, &str), CheckpointError> {
        let (i, hf) = self
            .index
            .get(name)
            .ok_or_else(|| CheckpointError::NotFound {
                path: self
                    .files
                    .first()
                    .map(|f| f.path.clone())
                    .unwrap_or_default(),
                tensor: name.to_string(),
            })?;
        Ok((&self.files[*i], hf))
    }
}

/// Sort key: embeddings, layers in numeric order, then the rest.
fn meta_order(name: &str) -> (usize, usize, String) {
    if name == "tok_embeddings.weight" {
        return (0, 0, String::new());
    }
    if let Some(rest) = name.strip_prefix("layers.") {
        if let Some((l, tail)) = rest.split_once('.') {
            if let Ok(l) = l.parse() {
                return (1, l, tail.to_string());
            }
        }
    }
    (2, 0, name.to_string())
}

/// Every tensor the index names must be in the file it names.
fn check_index(ix: &Path, files: &[StFile]) -> Result<(), CheckpointError> {
    let ferr = |msg: String| CheckpointError::File {
        path: ix.to_path_buf(),
        msg,
    };
    let text = std::fs::read(ix).map_err(|source| CheckpointError::Io {
        path: ix.to_path_buf(),
        source,
    })?;
    let v: serde_json::Value = serde_json::from_slice(&text)
        .map_err(|e| ferr(format!("bad JSON: {}", short(&e.to_string()))))?;
    let wm = v
        .get("weight_map")
        .and_then(|w| w.as_object())
        .ok_or_else(|| ferr("no weight_map object".into()))?;
    for (tensor, file) in wm {
        let file = file.as_str().ok_or_else(|| {
            ferr(format!(
                "weight_map entry '{}' is not a file name",
                short(tensor)
            ))
        })?;
        let f = files
            .iter()
            .find(|f| f.path.file_name().is_some_and(|n| n == file))
            .ok_or_else(|| CheckpointError::Tensor {
                path: ix.to_path_buf(),
                tensor: tensor.clone(),
                msg: format!(
                    "listed in '{}', which is not among the checkpoint's files",
                    short(file)
                ),
            })?;
        if !f.tensors.contains_key(tensor) {
            return Err(CheckpointError::Tensor {
                path: f.path.clone(),
                tensor: tensor.clone(),
                msg: format!("listed in {} but not in this file", ix.display()),
            });
        }
    }
    Ok(())
}

/// Gathers Meta rows `rows` of an HF q/k matrix (`view`, already column-sliced):
/// Meta row `h*d + 2i + p` is HF row `h*d + p*(d/2) + i`.
fn permuted_rows(view: &View, d: usize, rows: std::ops::Range<usize>) -> Tensor {
    let half = d / 2;
    let mut out = Vec::with_capacity(rows.len() * view.shape[1] * view.dtype.size());
    for r in rows.clone() {
        let (h, j) = (r / d, r % d);
        let (i, p) = (j / 2, j % 2);
        view.narrow(0, h * d + p * half + i, 1)
            .gather_into(&mut out);
    }
    Tensor {
        dtype: view.dtype,
        shape: vec![rows.len(), view.shape[1]],
        bytes: Bytes::Owned(Arc::new(out)),
    }
}

impl TensorSource for HfSource {
    fn names(&self) -> Vec<String> {
        self.names.clone()
    }

    fn shape(&self, name: &str) -> Result<Vec<usize>, CheckpointError> {
        let (f, hf) = self.lookup(name)?;
        Ok(f.tensors[hf].0.clone())
    }

    fn load(&self, name: &str, slice: Option<Slice>) -> Result<Tensor, CheckpointError> {
        let (f, hf) = self.lookup(name)?;
        let terr = |msg: String| CheckpointError::Tensor {
            path: f.path.clone(),
            tensor: hf.to_string(),
            msg,
        };
        let view = f.tensors[hf].1.clone().map_err(terr)?;
        let Some(nh) = qk_heads(name, &self.heads) else {
            return Ok(apply_slice(view, slice, &f.path, hf)?.to_tensor());
        };
        let d = self.heads.head_dim;
        if view.shape.len() != 2 || d == 0 || !d.is_multiple_of(2) || view.shape[0] != nh * d {
            return Err(terr(format!(
                "shape {:?} is not {nh} heads x head_dim {d} rows (q/k permutation needs whole heads)",
                view.shape
            )));
        }
        let mut rows = 0..view.shape[0];
        let mut view = view;
        if let Some(s) = slice {
            check_slice(&view.shape, s, &f.path, hf)?;
            if s.dim == 0 {
                if s.start % d != 0 || s.len % d != 0 {
                    return Err(terr(format!(
                        "row slice {}..+{} is not whole heads of {d} rows",
                        s.start, s.len
                    )));
                }
                rows = s.start..s.start + s.len;
            } else {
                view = view.narrow(s.dim, s.start, s.len);
            }
        }
        Ok(permuted_rows(&view, d, rows))
    }

    fn describe(&self) -> String {
        let files: Vec<String> = self
            .files
            .iter()
            .map(|f| {
                f.path.file_name().map_or_else(
                    || f.path.display().to_string(),
                    |n| n.to_string_lossy().into_owned(),
                )
            })
            .collect();
        format!("HF safetensors ({})", files.join(", "))
    }
}
