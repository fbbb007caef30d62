//! One `torch.save` file (zip archive: `<archive>/data.pkl`, `<archive>/data/<key>`,
//! `<archive>/byteorder`), mapped once; tensors are views of its stored entries.

use super::pickle::{self, StorageType, TensorRef, Value};
use super::view::{extent, View};
use super::{short, CheckpointError, DType, Slice, Tensor, TensorSource, MAX_DIMS};
use std::collections::HashMap;
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Maps a file read-only. The checkpoint must not be modified while herd runs (like any mmap user).
pub(crate) fn map_file(path: &Path) -> Result<Arc<memmap2::Mmap>, CheckpointError> {
    let io = |source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    };
    let f = std::fs::File::open(path).map_err(io)?;
    // SAFETY: the map is read-only; a concurrent writer to the checkpoint file is outside what
    // herd supports (it would corrupt any reader), and every access is bounds-checked against
    // the length captured here.
    let map = unsafe { memmap2::Mmap::map(&f) }.map_err(io)?;
    Ok(Arc::new(map))
}

/// Where one tensor's elements are, or why it cannot be loaded.
struct Entry {
    shape: Vec<usize>,
    view: Result<View, String>,
}

/// A `torch.save` state dict file.
pub struct PthFile {
    path: PathBuf,
    names: Vec<String>,
    tensors: HashMap<String, Entry>,
}

/// Human dtype names for storage classes herd refuses.
fn storage_dtype_name(class: &str) -> String {
    let n = match class {
        "LongStorage" => "int64",
        "IntStorage" => "int32",
        "ShortStorage" => "int16",
        "CharStorage" => "int8",
        "ByteStorage" => "uint8",
        "BoolStorage" => "bool",
        "DoubleStorage" => "float64",
        "ComplexFloatStorage" => "complex64",
        "ComplexDoubleStorage" => "complex128",
        _ => return class.to_string(),
    };
    format!("{n} ({class})")
}

impl PthFile {
    /// Maps `path`, reads the zip central directory and the pickle. Tensor bytes are not touched.
    pub fn open(path: &Path) -> Result<PthFile, CheckpointError> {
        let map = map_file(path)?;
        let ferr = |msg: String| CheckpointError::File {
            path: path.to_path_buf(),
            msg,
        };

        // name -> (data offset, length, stored uncompressed)
        let mut entries: HashMap<String, (usize, usize, bool)> = HashMap::new();
        {
            let mut zip = zip::ZipArchive::new(Cursor::new(&map[..])).map_err(|e| {
                ferr(format!(
                    "not a readable torch.save zip archive ({e}); truncated or not a .pth from torch >= 1.6?"
                ))
            })?;
            for i in 0..zip.len() {
                let f = zip
                    .by_index_raw(i)
                    .map_err(|e| ferr(format!("zip entry {i}: {e}")))?;
                let start = usize::try_from(f.data_start()).ok();
                let len = usize::try_from(f.compressed_size()).ok();
                let (start, len) = match (start, len) {
                    (Some(s), Some(l)) if s.checked_add(l).is_some_and(|e| e <= map.len()) => {
                        (s, l)
                    }
                    _ => {
                        return Err(ferr(format!(
                            "zip entry '{}' extends past the end of the file (truncated?)",
                            short(f.name())
                        )))
                    }
                };
                let stored = f.compression() == zip::CompressionMethod::Stored;
                entries.insert(f.name().to_string(), (start, len, stored));
            }
        }

        let mut pkls: Vec<&String> = entries
            .keys()
            .filter(|n| n.ends_with("/data.pkl") && n.matches('/').count() == 1)
            .collect();
        pkls.sort();
        let pkl_name = match pkls.as_slice() {
            [one] => (*one).clone(),
            [] => {
                return Err(ferr(
                    "no '<archive>/data.pkl' entry: not a torch.save file".into(),
                ))
            }
            many => {
                return Err(ferr(format!(
                    "several pickles in one archive: {}",
                    many.iter()
                        .take(4)
                        .map(|s| short(s))
                        .collect::<Vec<_>>()
                        .join(", ")
                )))
            }
        };
        let prefix = pkl_name.trim_end_matches("data.pkl").to_string();

        let entry_bytes = |name: &str| -> Result<&[u8], CheckpointError> {
            let &(s, l, stored) = entries
                .get(name)
                .ok_or_else(|| ferr(format!("archive entry '{name}' is missing")))?;
            if !stored {
                return Err(ferr(format!(
                    "archive entry '{name}' is compressed; torch stores entries uncompressed"
                )));
            }
            Ok(&map[s..s + l])
        };

        // Files from torch < 1.10 have no byteorder record and are little-endian.
        if entries.contains_key(&format!("{prefix}byteorder")) {
            let bo = entry_bytes(&format!("{prefix}byteorder"))?;
            if bo != b"little" {
                return Err(ferr(format!(
                    "byteorder is '{}'; only little-endian checkpoints are supported",
                    String::from_utf8_lossy(bo)
                )));
            }
        }

        let root = pickle::unpickle(entry_bytes(&pkl_name)?)
            .map_err(|e| ferr(format!("bad pickle in '{pkl_name}': {e}")))?;
        let items = match root {
            Value::Dict(items) => items,
            _ => return Err(ferr("the pickle is not a dict of tensors".into())),
        };

        let mut names = Vec::new();
        let mut tensors = HashMap::new();
        for (k, v) in items {
            let name = match k {
                Value::Str(s) => s,
                _ => return Err(ferr("a state dict key is not a string".into())),
            };
            // Non-tensor values (step counters, config) are not weights.
            let Value::Tensor(t) = v else { continue };
            if t.size.len() > MAX_DIMS {
                return Err(CheckpointError::Tensor {
                    path: path.to_path_buf(),
                    tensor: name,
                    msg: format!(
                        "{} dimensions; herd loads tensors of at most {MAX_DIMS}",
                        t.size.len()
                    ),
                });
            }
            let shape = t
                .size
                .iter()
                .map(|&x| usize::try_from(x))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|_| CheckpointError::Tensor {
                    path: path.to_path_buf(),
                    tensor: name.clone(),
                    msg: "size does not fit in memory".into(),
                })?;
            let view = make_view(&map, &entries, &prefix, &t, &shape);
            if !tensors.contains_key(&name) {
                names.push(name.clone());
            }
            tensors.insert(name, Entry { shape, view });
        }
        Ok(PthFile {
            path: path.to_path_buf(),
            names,
            tensors,
        })
    }

    /// The file this was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn entry(&self, name: &str) -> Result<&Entry, CheckpointError> {
        self.tensors
            .get(name)
            .ok_or_else(|| CheckpointError::NotFound {
                path: self.path.clone(),
                tensor: name.to_string(),
            })
    }

    /// True when the file holds a tensor of this name (loadable or not).
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The tensor's view, or an error naming file and tensor.
    pub(crate) fn view(&self, name: &str) -> Result<View, CheckpointError> {
        self.entry(name)?
            .view
            .clone()
            .map_err(|msg| CheckpointError::Tensor {
                path: self.path.clone(),
                tensor: name.to_string(),
                msg,
            })
    }

    /// Element type name for cross-shard checks, even for unloadable tensors.
    pub(crate) fn dtype_of(&self, name: &str) -> Option<DType> {
        self.tensors
            .get(name)
            .and_then(|e| e.view.as_ref().ok())
            .map(|v| v.dtype)
    }
}

/// Builds and bounds-checks the view of one tensor; errors are kept per tensor so one bad
/// tensor does not stop the others from loading.
fn make_view(
    map: &Arc<memmap2::Mmap>,
    entries: &HashMap<String, (usize, usize, bool)>,
    prefix: &str,
    t: &TensorRef,
    shape: &[usize],
) -> Result<View, String> {
    let dtype = match &t.storage.stype {
        StorageType::Supported(d) => *d,
        StorageType::Unsupported(class) => {
            return Err(format!(
                "unsupported dtype {}; herd loads bf16, f16 and f32",
                storage_dtype_name(class)
            ))
        }
    };
    let ename = format!("{prefix}data/{}", t.storage.key);
    let key = short(&t.storage.key);
    let &(start, len, stored) = entries
        .get(&ename)
        .ok_or_else(|| format!("storage entry '{prefix}data/{key}' is missing from the archive"))?;
    if !stored {
        return Err(format!("storage entry '{prefix}data/{key}' is compressed"));
    }
    let numel = usize::try_from(t.storage.numel).map_err(|_| "storage too large".to_string())?;
    // More elements than the storage holds means a broadcast (stride 0) or overlapping view:
    // gathering it would allocate by the header's sizes, not by the bytes in the file.
    let elements = shape
        .iter()
        .try_fold(1usize, |a, &b| a.checked_mul(b))
        .ok_or("shape overflows")?;
    if elements > numel {
        return Err(format!(
            "shape {shape:?} has {elements} elements but its storage '{key}' holds {numel}; \
             herd loads dense tensors, not broadcast views"
        ));
    }
    let need = numel
        .checked_mul(dtype.size())
        .ok_or("storage size overflow")?;
    if need > len {
        return Err(format!(
            "storage '{key}' needs {need} bytes but its archive entry holds {len} (truncated file?)"
        ));
    }
    let strides = t
        .stride
        .iter()
        .map(|&x| usize::try_from(x))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| "stride too large".to_string())?;
    let offset = usize::try_from(t.storage_offset).map_err(|_| "offset too large".to_string())?;
    extent(offset, shape, &strides, numel).map_err(|e| format!("storage '{key}': {e}"))?;
    Ok(View {
        map: map.clone(),
        offset: start + offset * dtype.size(),
        dtype,
        shape: shape.to_vec(),
        strides,
    })
}

/// Checks `slice` against `shape` and narrows `view` to it.
pub(crate) fn apply_slice(
    view: View,
    slice: Option<Slice>,
    path: &Path,
    name: &str,
) -> Result<View, CheckpointError> {
    let Some(s) = slice else { return Ok(view) };
    check_slice(&view.shape, s, path, name)?;
    Ok(view.narrow(s.dim, s.start, s.len))
}

/// Errors when `s` is not inside `shape`.
pub(crate) fn check_slice(
    shape: &[usize],
    s: Slice,
    path: &Path,
    name: &str,
) -> Result<(), CheckpointError> {
    let ok = s.dim < shape.len()
        && s.start
            .checked_add(s.len)
            .is_some_and(|e| e <= shape[s.dim]);
    if ok {
        Ok(())
    } else {
        Err(CheckpointError::Tensor {
            path: path.to_path_buf(),
            tensor: name.to_string(),
            msg: format!(
                "slice dim {} [{}..+{}] is outside shape {shape:?}",
                s.dim, s.start, s.len
            ),
        })
    }
}

impl TensorSource for PthFile {
    fn names(&self) -> Vec<String> {
        self.names.clone()
    }

    fn shape(&self, name: &str) -> Result<Vec<usize>, CheckpointError> {
        Ok(self.entry(name)?.shape.clone())
    }

    fn load(&self, name: &str, slice: Option<Slice>) -> Result<Tensor, CheckpointError> {
        let v = self.view(name)?;
        Ok(apply_slice(v, slice, &self.path, name)?.to_tensor())
    }

    fn describe(&self) -> String {
        format!("torch.save file {}", self.path.display())
    }
}
