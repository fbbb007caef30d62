//! A minimal `torch.save` writer: a zip archive (stored, 64-byte aligned entries) holding a
//! protocol-2 pickle of `{name: tensor}` and one storage file per tensor, as torch.load expects.
//! Written for `herd convert --format meta` (Meta's `consolidated.NN.pth`).

use std::io::Write;
use std::path::Path;

use zip::write::SimpleFileOptions;
use zip::CompressionMethod;

use super::{CheckpointError, DType, Tensor};

fn storage_class(d: DType) -> &'static str {
    match d {
        DType::BF16 => "BFloat16Storage",
        DType::F16 => "HalfStorage",
        DType::F32 => "FloatStorage",
    }
}

/// Pickle opcodes of protocol 2.
struct Pickle(Vec<u8>);

impl Pickle {
    fn op(&mut self, b: u8) {
        self.0.push(b);
    }
    fn global(&mut self, module: &str, name: &str) {
        self.0.push(b'c');
        self.0.extend_from_slice(module.as_bytes());
        self.0.push(b'\n');
        self.0.extend_from_slice(name.as_bytes());
        self.0.push(b'\n');
    }
    fn str(&mut self, s: &str) {
        self.0.push(b'X'); // BINUNICODE
        self.0.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.0.extend_from_slice(s.as_bytes());
    }
    fn int(&mut self, v: usize) {
        if let Ok(v) = i32::try_from(v) {
            self.0.push(b'J'); // BININT
            self.0.extend_from_slice(&v.to_le_bytes());
        } else {
            self.0.push(0x8a); // LONG1, 8 bytes little-endian two's complement
            self.0.push(8);
            self.0.extend_from_slice(&(v as u64).to_le_bytes());
        }
    }
    fn tuple(&mut self, xs: &[usize]) {
        self.op(b'(');
        for &x in xs {
            self.int(x);
        }
        self.op(b't');
    }
}

/// Pickle of `{name: torch._utils._rebuild_tensor_v2(storage key i, 0, shape, stride, False, OrderedDict())}`.
pub fn state_dict_pickle(tensors: &[(String, Tensor)]) -> Vec<u8> {
    let mut p = Pickle(vec![0x80, 2]); // PROTO 2
    p.op(b'}'); // EMPTY_DICT
    p.op(b'(');
    for (i, (name, t)) in tensors.iter().enumerate() {
        p.str(name);
        p.global("torch._utils", "_rebuild_tensor_v2");
        p.op(b'(');
        // persistent id: ('storage', torch.XStorage, key, 'cpu', numel)
        p.op(b'(');
        p.str("storage");
        p.global("torch", storage_class(t.dtype));
        p.str(&i.to_string());
        p.str("cpu");
        p.int(t.numel());
        p.op(b't');
        p.op(b'Q'); // BINPERSID
        p.int(0); // storage offset
        p.tuple(&t.shape);
        p.tuple(&super::view::row_major(&t.shape));
        p.op(0x89); // NEWFALSE: requires_grad
        p.global("collections", "OrderedDict");
        p.op(b')');
        p.op(b'R');
        p.op(b't');
        p.op(b'R');
    }
    p.op(b'u'); // SETITEMS
    p.op(b'.');
    p.0
}

/// Write `tensors` (row-major) as a torch.save file at `path`.
pub fn write_pth(path: &Path, tensors: &[(String, Tensor)]) -> Result<(), CheckpointError> {
    let err = |msg: String| CheckpointError::File {
        path: path.to_path_buf(),
        msg,
    };
    let file = std::fs::File::create(path).map_err(|source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut z = zip::ZipWriter::new(std::io::BufWriter::new(file));
    // torch aligns every record to 64 bytes so storages can be mapped.
    let opts = SimpleFileOptions::default()
        .compression_method(CompressionMethod::Stored)
        .large_file(true)
        .with_alignment(64);
    let mut put = |name: &str, data: &[u8]| -> Result<(), CheckpointError> {
        z.start_file(format!("archive/{name}"), opts)
            .map_err(|e| err(format!("zip: {e}")))?;
        z.write_all(data).map_err(|e| err(format!("zip: {e}")))
    };
    put("data.pkl", &state_dict_pickle(tensors))?;
    put("byteorder", b"little")?;
    for (i, (_, t)) in tensors.iter().enumerate() {
        put(&format!("data/{i}"), t.bytes.as_slice())?;
    }
    put("version", b"3\n")?;
    z.finish().map_err(|e| err(format!("zip: {e}")))?;
    Ok(())
}
