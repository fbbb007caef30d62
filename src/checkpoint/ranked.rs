//! herd's per-rank layout (written by `herd convert --tp N`): `herd-tp.json`, the source's config
//! and tokenizer, and `rank-RR-of-NN.safetensors`, each holding exactly the slices rank RR of a
//! tp-N replica loads, under Meta names and in Meta's RoPE convention. At tp N every rank maps
//! its own file with no reshuffling; at any other tp the slices are stitched like MP shards.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::hf::StFile;
use super::pth::apply_slice;
use super::view::{concat, View};
use super::{short, CheckpointError, DType, Slice, Tensor, TensorSource, MAX_DIMS};

/// Name of the manifest that marks the layout.
pub const MANIFEST: &str = "herd-tp.json";

/// File name of rank `r` of `n`.
pub fn rank_file(r: usize, n: usize) -> String {
    format!("rank-{r:02}-of-{n:02}.safetensors")
}

/// What one file holds of a tensor: `None` the whole tensor, else this slice of it.
type Piece = Option<Slice>;

struct Entry {
    shape: Vec<usize>,
    /// Per file, what part it holds.
    pieces: Vec<Piece>,
}

/// The pieces of a tensor, all along one dim, must cover its shape (or one file holds it whole):
/// the manifest's shape is what the model is checked against.
fn check_cover(shape: &[usize], pieces: &[Piece]) -> Result<(), String> {
    if pieces.iter().any(Option::is_none) {
        return Ok(());
    }
    let mut parts: Vec<Slice> = pieces.iter().flatten().copied().collect();
    let dim = parts.first().map_or(0, |p| p.dim);
    if parts.iter().any(|p| p.dim != dim) {
        return Err("pieces split more than one dim".into());
    }
    parts.sort_by_key(|p| p.start);
    let mut covered = 0;
    for p in &parts {
        if p.start > covered {
            break;
        }
        covered = covered.max(p.start + p.len);
    }
    match shape.get(dim) {
        Some(&n) if covered == n => Ok(()),
        _ => Err(format!(
            "pieces cover 0..{covered} of dim {dim} without gaps, but the shape is {shape:?}"
        )),
    }
}

/// A per-rank checkpoint written by `herd convert`.
pub struct RankedSource {
    /// herd-tp.json: the list of tensors.
    manifest: PathBuf,
    files: Vec<StFile>,
    names: Vec<String>,
    tensors: HashMap<String, Entry>,
}

fn lerr(path: &Path, msg: impl Into<String>) -> CheckpointError {
    CheckpointError::File {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// Manifest JSON: {"format": "herd-tp", "tp": N, "files": [...], "tensors": {name: {"shape": [...],
/// "pieces": [null | [dim, start, len], ...]}}}.
pub fn manifest_json(tp: usize, tensors: &[(String, Vec<usize>, Vec<Piece>)]) -> serde_json::Value {
    let mut t = serde_json::Map::new();
    for (name, shape, pieces) in tensors {
        let p: Vec<serde_json::Value> = pieces
            .iter()
            .map(|p| match p {
                None => serde_json::Value::Null,
                Some(s) => serde_json::json!([s.dim, s.start, s.len]),
            })
            .collect();
        t.insert(
            name.clone(),
            serde_json::json!({"shape": shape, "pieces": p}),
        );
    }
    serde_json::json!({
        "format": "herd-tp",
        "tp": tp,
        "files": (0..tp).map(|r| rank_file(r, tp)).collect::<Vec<_>>(),
        "tensors": t,
    })
}

impl RankedSource {
    /// Opens `dir/herd-tp.json` and the rank files it names.
    pub fn open(dir: &Path) -> Result<RankedSource, CheckpointError> {
        let mpath = dir.join(MANIFEST);
        let text = std::fs::read_to_string(&mpath).map_err(|source| CheckpointError::Io {
            path: mpath.clone(),
            source,
        })?;
        let m: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| lerr(&mpath, format!("bad JSON: {}", short(&e.to_string()))))?;
        if m["format"] != "herd-tp" {
            return Err(lerr(&mpath, "not a herd-tp manifest (format != herd-tp)"));
        }
        let names_f: Vec<String> = m["files"]
            .as_array()
            .and_then(|a| a.iter().map(|f| f.as_str().map(String::from)).collect())
            .ok_or_else(|| lerr(&mpath, "files must be a list of file names"))?;
        // A plain name of a file in this directory (not "", ".", "..", nor a path).
        let plain = |f: &String| Path::new(f).file_name().is_some_and(|n| n == f.as_str());
        if names_f.is_empty() || !names_f.iter().all(plain) {
            return Err(lerr(
                &mpath,
                "files must be plain file names in this directory",
            ));
        }
        let files = names_f
            .iter()
            .map(|f| {
                StFile::open(&dir.join(f)).map_err(|e| match e {
                    CheckpointError::Io { source, .. }
                        if source.kind() == std::io::ErrorKind::NotFound =>
                    {
                        lerr(&mpath, format!("lists '{}', which is not there", short(f)))
                    }
                    CheckpointError::Io { source, .. } => lerr(
                        &mpath,
                        format!("lists '{}', which cannot be read: {source}", short(f)),
                    ),
                    e => e,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let obj = m["tensors"]
            .as_object()
            .ok_or_else(|| lerr(&mpath, "tensors must be an object"))?;
        let mut tensors = HashMap::new();
        for (name, e) in obj {
            let bad = |msg: &str| lerr(&mpath, format!("tensor '{}': {msg}", short(name)));
            let shape: Vec<usize> = e["shape"]
                .as_array()
                .and_then(|a| a.iter().map(|x| x.as_u64().map(|x| x as usize)).collect())
                .filter(|s: &Vec<usize>| s.len() <= MAX_DIMS)
                .ok_or_else(|| bad("shape is not a list of at most 8 sizes"))?;
            let pieces: Vec<Piece> = e["pieces"]
                .as_array()
                .ok_or_else(|| bad("pieces is not a list"))?
                .iter()
                .map(|p| match p {
                    serde_json::Value::Null => Ok(None),
                    serde_json::Value::Array(a) => match a.as_slice() {
                        [d, s, l] => match (d.as_u64(), s.as_u64(), l.as_u64()) {
                            (Some(d), Some(s), Some(l)) => Ok(Some(Slice {
                                dim: d as usize,
                                start: s as usize,
                                len: l as usize,
                            })),
                            _ => Err(bad("piece is not [dim, start, len]")),
                        },
                        _ => Err(bad("piece is not [dim, start, len]")),
                    },
                    _ => Err(bad("piece is not null or [dim, start, len]")),
                })
                .collect::<Result<_, _>>()?;
            if pieces.len() != files.len() {
                return Err(bad("one piece per file is needed"));
            }
            for (f, p) in files.iter().zip(&pieces) {
                let mut want = shape.clone();
                if let Some(s) = p {
                    if s.dim >= want.len()
                        || s.start.checked_add(s.len).is_none_or(|e| e > want[s.dim])
                    {
                        return Err(bad("piece outside the tensor"));
                    }
                    want[s.dim] = s.len;
                }
                match f.tensors.get(name) {
                    Some((got, _)) if *got == want => {}
                    Some((got, _)) => {
                        return Err(CheckpointError::Tensor {
                            path: f.path.clone(),
                            tensor: name.clone(),
                            msg: format!("shape {got:?}, but {MANIFEST} says {want:?}"),
                        })
                    }
                    None => {
                        return Err(CheckpointError::Tensor {
                            path: f.path.clone(),
                            tensor: name.clone(),
                            msg: format!("listed in {MANIFEST} but not in this file"),
                        })
                    }
                }
            }
            check_cover(&shape, &pieces).map_err(|m| bad(&m))?;
            tensors.insert(name.clone(), Entry { shape, pieces });
        }
        let mut names: Vec<String> = tensors.keys().cloned().collect();
        names.sort();
        Ok(RankedSource {
            manifest: mpath,
            files,
            names,
            tensors,
        })
    }

    /// The manifest's entry for `name`; a tensor it does not list is missing from the manifest.
    fn entry(&self, name: &str) -> Result<&Entry, CheckpointError> {
        self.tensors
            .get(name)
            .ok_or_else(|| CheckpointError::NotFound {
                path: self.manifest.clone(),
                tensor: name.to_string(),
            })
    }

    fn view(&self, file: usize, name: &str) -> Result<View, CheckpointError> {
        let f = &self.files[file];
        match f.tensors.get(name) {
            Some((_, Ok(v))) => Ok(v.clone()),
            Some((_, Err(msg))) => Err(CheckpointError::Tensor {
                path: f.path.clone(),
                tensor: name.to_string(),
                msg: msg.clone(),
            }),
            None => Err(CheckpointError::NotFound {
                path: f.path.clone(),
                tensor: name.to_string(),
            }),
        }
    }
}

impl TensorSource for RankedSource {
    fn names(&self) -> Vec<String> {
        self.names.clone()
    }

    fn shape(&self, name: &str) -> Result<Vec<usize>, CheckpointError> {
        Ok(self.entry(name)?.shape.clone())
    }

    fn load(&self, name: &str, slice: Option<Slice>) -> Result<Tensor, CheckpointError> {
        let e = self.entry(name)?;
        let path = self.files[0].path.clone();
        // A file holding the whole tensor answers any slice.
        if let Some(i) = e.pieces.iter().position(|p| p.is_none()) {
            return Ok(
                apply_slice(self.view(i, name)?, slice, &self.files[i].path, name)?.to_tensor(),
            );
        }
        if let Some(s) = slice {
            super::pth::check_slice(&e.shape, s, &path, name)?;
        }
        let sd = e.pieces.iter().flatten().map(|p| p.dim).next().unwrap_or(0);
        let (lo, hi) = match slice {
            Some(s) if s.dim == sd => (s.start, s.start + s.len),
            _ => (0, e.shape[sd]),
        };
        let other = slice.filter(|s| s.dim != sd);
        // Walk lo..hi, each time taking the file whose piece holds `pos` (pieces may overlap:
        // replicated KV heads). The slice a rank was written for is one file, mapped as is.
        let mut parts = Vec::new();
        let mut pos = lo;
        while pos < hi || parts.is_empty() {
            let hit = e.pieces.iter().enumerate().find_map(|(i, p)| {
                p.filter(|p| {
                    p.dim == sd && p.start <= pos && pos < p.start.saturating_add(p.len.max(1))
                })
                .map(|p| (i, p))
            });
            let Some((i, p)) = hit else {
                return Err(CheckpointError::Tensor {
                    path,
                    tensor: name.to_string(),
                    msg: format!("no rank file holds index {pos} of dim {sd}"),
                });
            };
            let end = hi.min(p.start + p.len);
            let mut v = self.view(i, name)?.narrow(sd, pos - p.start, end - pos);
            if let Some(o) = other {
                v = v.narrow(o.dim, o.start, o.len);
            }
            parts.push(v);
            if end <= pos {
                break;
            }
            pos = end;
        }
        if parts.len() == 1 {
            return Ok(parts[0].to_tensor());
        }
        Ok(concat(&parts, sd))
    }

    fn describe(&self) -> String {
        format!(
            "herd per-rank tp={} ({MANIFEST}, {}, ...)",
            self.files.len(),
            rank_file(0, self.files.len())
        )
    }
}

fn st_dtype(d: DType) -> &'static str {
    match d {
        DType::BF16 => "BF16",
        DType::F16 => "F16",
        DType::F32 => "F32",
    }
}

/// Write `tensors` as one safetensors file (header padded to 8 bytes, data in the given order).
pub fn write_safetensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<(), CheckpointError> {
    let io = |source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut header = serde_json::Map::new();
    let mut off = 0usize;
    for (name, t) in tensors {
        let n = t.bytes.as_slice().len();
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": st_dtype(t.dtype), "shape": t.shape, "data_offsets": [off, off + n]}),
        );
        off += n;
    }
    let mut h = serde_json::to_vec(&header).map_err(|e| lerr(path, e.to_string()))?;
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).map_err(io)?);
    f.write_all(&(h.len() as u64).to_le_bytes()).map_err(io)?;
    f.write_all(&h).map_err(io)?;
    for (_, t) in tensors {
        f.write_all(t.bytes.as_slice()).map_err(io)?;
    }
    f.flush().map_err(io)?;
    Ok(())
}

/// The rank files of a directory in the per-rank layout, from its manifest (for [`super::detect`]).
pub fn files_of(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_to_string(dir.join(MANIFEST))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|m| {
            m["files"].as_array().map(|a| {
                a.iter()
                    .filter_map(|f| f.as_str().map(|f| dir.join(f)))
                    .collect()
            })
        })
        .unwrap_or_default()
}
