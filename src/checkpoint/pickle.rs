//! A minimal, non-executing pickle VM for the `data.pkl` of a `torch.save` archive.
//!
//! It knows only the opcodes torch emits for a state dict (protocol 2, plus the protocol 3/4
//! byte, framing and memo opcodes some writers use) and only a fixed allow-list of globals:
//! `collections.OrderedDict`, the torch tensor/parameter rebuild functions and the legacy
//! `torch.*Storage` classes. Anything else is an error naming the opcode or global; nothing is
//! ever imported or called.

use std::collections::HashMap;

/// Element type of a torch storage, as named by its legacy storage class.
#[derive(Clone, Debug, PartialEq)]
pub enum StorageType {
    /// A type herd can load.
    Supported(super::DType),
    /// Any other storage class, kept by name so loading it can say what it is.
    Unsupported(String),
}

/// A storage reference from a persistent id: `('storage', type, key, location, numel)`.
#[derive(Clone, Debug, PartialEq)]
pub struct StorageRef {
    pub stype: StorageType,
    /// Archive entry name under `data/`.
    pub key: String,
    /// Number of elements in the storage.
    pub numel: u64,
}

/// A tensor described by `_rebuild_tensor_v2`: a strided view of a storage.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorRef {
    pub storage: StorageRef,
    pub storage_offset: u64,
    pub size: Vec<u64>,
    pub stride: Vec<u64>,
}

/// A value on the pickle stack.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    /// dict and OrderedDict, in insertion order.
    Dict(Vec<(Value, Value)>),
    /// An allow-listed global, `module.name`.
    Global(String),
    Storage(StorageRef),
    Tensor(TensorRef),
}

/// Upper bound on values created (counting every copy: memo puts and gets, DUP; a string
/// counts once per 16 bytes), so a hostile pickle cannot blow up memory by repeatedly
/// duplicating a container or a long string.
const MAX_NODES: usize = 500_000;

/// Upper bound on MARKs open at once (each one an unfinished container).
const MAX_MARKS: usize = 4 * MAX_DEPTH;

/// Upper bound on container nesting, so recursion over values (and their drop) stays shallow.
const MAX_DEPTH: usize = 64;

struct Vm<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
    nodes: usize,
}

fn depth(v: &Value) -> usize {
    match v {
        Value::Tuple(items) | Value::List(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
        Value::Dict(items) => {
            1 + items
                .iter()
                .map(|(k, v)| depth(k).max(depth(v)))
                .max()
                .unwrap_or(0)
        }
        _ => 0,
    }
}

/// A short description of a value for error messages (never the whole value).
fn kind(v: &Value) -> String {
    match v {
        Value::None => "None".into(),
        Value::Bool(b) => format!("bool {b}"),
        Value::Int(i) => format!("int {i}"),
        Value::Float(f) => format!("float {f}"),
        Value::Str(s) if s.len() <= 64 => format!("str '{s}'"),
        Value::Str(_) => "a long str".into(),
        Value::Bytes(b) => format!("bytes of length {}", b.len()),
        Value::Tuple(t) => format!("tuple of {}", t.len()),
        Value::List(l) => format!("list of {}", l.len()),
        Value::Dict(d) => format!("dict of {}", d.len()),
        Value::Global(g) => format!("global {g}"),
        Value::Storage(s) => format!("storage '{}'", s.key),
        Value::Tensor(_) => "tensor".into(),
    }
}

/// What copying `v` costs against [`MAX_NODES`].
fn size_of_value(v: &Value) -> usize {
    match v {
        Value::Tuple(items) | Value::List(items) => {
            1 + items.iter().map(size_of_value).sum::<usize>()
        }
        Value::Dict(items) => {
            1 + items
                .iter()
                .map(|(k, v)| size_of_value(k) + size_of_value(v))
                .sum::<usize>()
        }
        Value::Str(s) => 1 + s.len() / 16,
        Value::Bytes(b) => 1 + b.len() / 16,
        _ => 1,
    }
}

impl<'a> Vm<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or_else(|| format!("pickle ends inside an operand at byte {}", self.pos))?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, String> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, String> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    fn line(&mut self) -> Result<&'a str, String> {
        let rest = &self.data[self.pos..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or("GLOBAL operand without newline")?;
        let s = std::str::from_utf8(&rest[..n]).map_err(|_| "GLOBAL operand is not UTF-8")?;
        self.pos += n + 1;
        Ok(s)
    }

    fn utf8(&mut self, n: usize) -> Result<String, String> {
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| "string operand is not UTF-8".to_string())
    }

    fn push(&mut self, v: Value) -> Result<(), String> {
        self.nodes += 1;
        if self.nodes > MAX_NODES {
            return Err("pickle builds too many values".into());
        }
        check_depth(&v)?;
        self.stack.push(v);
        Ok(())
    }

    fn pop(&mut self) -> Result<Value, String> {
        // A mark below the top means this pop would cross it: the pickle is malformed.
        if self.marks.last().is_some_and(|&m| m >= self.stack.len()) {
            return Err("stack underflow at a mark".into());
        }
        self.stack
            .pop()
            .ok_or_else(|| "stack underflow".to_string())
    }

    fn top_mut(&mut self) -> Result<&mut Value, String> {
        if self.marks.last().is_some_and(|&m| m >= self.stack.len()) {
            return Err("stack underflow at a mark".into());
        }
        self.stack
            .last_mut()
            .ok_or_else(|| "stack underflow".to_string())
    }

    fn pop_mark(&mut self) -> Result<Vec<Value>, String> {
        let m = self.marks.pop().ok_or("no MARK on the stack")?;
        if m > self.stack.len() {
            return Err("MARK above the stack top".into());
        }
        Ok(self.stack.split_off(m))
    }

    fn pop_n(&mut self, n: usize) -> Result<Vec<Value>, String> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() < floor + n {
            return Err("stack underflow".into());
        }
        let at = self.stack.len() - n;
        Ok(self.stack.split_off(at))
    }

    /// Counts `units` of new values before they are made, so the budget bounds memory too.
    fn charge(&mut self, units: usize) -> Result<(), String> {
        self.nodes = self.nodes.saturating_add(units);
        if self.nodes > MAX_NODES {
            return Err("pickle builds too many values".into());
        }
        Ok(())
    }

    /// A copy of the top of the stack, paid for.
    fn copy_top(&mut self) -> Result<Value, String> {
        let units = size_of_value(self.top_mut()?);
        self.charge(units)?;
        Ok(self.top_mut()?.clone())
    }

    fn memo_put(&mut self, idx: u32) -> Result<(), String> {
        if self.stack.is_empty() {
            return Err("memo put on an empty stack".into());
        }
        let v = self.copy_top()?;
        self.memo.insert(idx, v);
        Ok(())
    }

    fn memo_get(&mut self, idx: u32) -> Result<(), String> {
        let units = self
            .memo
            .get(&idx)
            .map(size_of_value)
            .ok_or_else(|| format!("memo get of unset index {idx}"))?;
        self.charge(units)?;
        let v = self.memo[&idx].clone();
        self.push(v)
    }

    fn run(mut self) -> Result<Value, String> {
        loop {
            let at = self.pos;
            let op = self
                .u8()
                .map_err(|_| "pickle ends without STOP".to_string())?;
            match op {
                // PROTO
                0x80 => {
                    let p = self.u8()?;
                    if p > 5 {
                        return Err(format!("unsupported pickle protocol {p}"));
                    }
                }
                // FRAME (protocol 4): framing is only a read hint.
                0x95 => {
                    self.u64()?;
                }
                b'.' => return self.pop(),
                b'(' => {
                    if self.marks.len() >= MAX_MARKS {
                        return Err(format!("more than {MAX_MARKS} MARKs open at once"));
                    }
                    self.marks.push(self.stack.len())
                }
                b'}' => self.push(Value::Dict(Vec::new()))?,
                b']' => self.push(Value::List(Vec::new()))?,
                b')' => self.push(Value::Tuple(Vec::new()))?,
                b'N' => self.push(Value::None)?,
                0x88 => self.push(Value::Bool(true))?,
                0x89 => self.push(Value::Bool(false))?,
                // BININT, BININT1, BININT2
                b'J' => {
                    let v = self.u32()? as i32;
                    self.push(Value::Int(v.into()))?
                }
                b'K' => {
                    let v = self.u8()?;
                    self.push(Value::Int(v.into()))?
                }
                b'M' => {
                    let v = self.u16()?;
                    self.push(Value::Int(v.into()))?
                }
                // LONG1: little-endian two's complement of n bytes
                0x8a => {
                    let n = self.u8()? as usize;
                    let b = self.take(n)?;
                    let v = long_from_bytes(b).ok_or_else(|| {
                        format!("LONG1 of {n} bytes at byte {at} does not fit in 64 bits")
                    })?;
                    self.push(Value::Int(v))?
                }
                // BINFLOAT is big-endian
                b'G' => {
                    let v = f64::from_bits(self.u64()?.swap_bytes());
                    self.push(Value::Float(v))?
                }
                // BINUNICODE, SHORT_BINUNICODE, BINUNICODE8
                b'X' => {
                    let n = self.u32()? as usize;
                    let s = self.utf8(n)?;
                    self.push(Value::Str(s))?
                }
                0x8c => {
                    let n = self.u8()? as usize;
                    let s = self.utf8(n)?;
                    self.push(Value::Str(s))?
                }
                0x8d => {
                    let n = usize::try_from(self.u64()?).map_err(|_| "string too long")?;
                    let s = self.utf8(n)?;
                    self.push(Value::Str(s))?
                }
                // SHORT_BINSTRING, BINSTRING (py2 str), SHORT_BINBYTES, BINBYTES
                b'U' | b'C' => {
                    let n = self.u8()? as usize;
                    let b = self.take(n)?.to_vec();
                    self.push(Value::Bytes(b))?
                }
                b'T' | b'B' => {
                    let n = self.u32()? as usize;
                    let b = self.take(n)?.to_vec();
                    self.push(Value::Bytes(b))?
                }
                // BINPUT, LONG_BINPUT, MEMOIZE
                b'q' => {
                    let i = self.u8()?;
                    self.memo_put(i.into())?
                }
                b'r' => {
                    let i = self.u32()?;
                    self.memo_put(i)?
                }
                0x94 => {
                    let i = u32::try_from(self.memo.len()).map_err(|_| "memo overflow")?;
                    self.memo_put(i)?
                }
                // BINGET, LONG_BINGET
                b'h' => {
                    let i = self.u8()?;
                    self.memo_get(i.into())?
                }
                b'j' => {
                    let i = self.u32()?;
                    self.memo_get(i)?
                }
                // GLOBAL, STACK_GLOBAL
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    let g = check_global(module, name)?;
                    self.push(g)?
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module, name) {
                        (Value::Str(m), Value::Str(n)) => {
                            let g = check_global(&m, &n)?;
                            self.push(g)?
                        }
                        _ => return Err("STACK_GLOBAL operands are not strings".into()),
                    }
                }
                b't' => {
                    let items = self.pop_mark()?;
                    self.push(Value::Tuple(items))?
                }
                0x85..=0x87 => {
                    let items = self.pop_n((op - 0x84) as usize)?;
                    self.push(Value::Tuple(items))?
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    self.push(Value::List(items))?
                }
                b'a' => {
                    let v = self.pop()?;
                    check_item_depth(&v)?;
                    match self.top_mut()? {
                        Value::List(l) => l.push(v),
                        _ => return Err(format!("APPEND at byte {at} to a non-list")),
                    }
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    items.iter().try_for_each(check_item_depth)?;
                    match self.top_mut()? {
                        Value::List(l) => l.extend(items),
                        _ => return Err(format!("APPENDS at byte {at} to a non-list")),
                    }
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    let d = pairs(items).ok_or("DICT with an odd number of items")?;
                    self.push(Value::Dict(d))?
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    check_item_depth(&k)?;
                    check_item_depth(&v)?;
                    match self.top_mut()? {
                        Value::Dict(d) => d.push((k, v)),
                        _ => return Err(format!("SETITEM at byte {at} on a non-dict")),
                    }
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    items.iter().try_for_each(check_item_depth)?;
                    let new = pairs(items).ok_or("SETITEMS with an odd number of items")?;
                    match self.top_mut()? {
                        Value::Dict(d) => d.extend(new),
                        _ => return Err(format!("SETITEMS at byte {at} on a non-dict")),
                    }
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let s = persistent_load(pid)?;
                    self.push(s)?
                }
                b'R' => {
                    let args = self.pop()?;
                    let func = self.pop()?;
                    let v = reduce(func, args)?;
                    self.push(v)?
                }
                // BUILD: the state torch attaches (a state dict's `_metadata`, tensor hooks)
                // carries nothing herd needs, so it is dropped after a sanity check.
                b'b' => {
                    self.pop()?;
                    match self.top_mut()? {
                        Value::Dict(_) | Value::Tensor(_) => {}
                        _ => return Err(format!("BUILD at byte {at} on an unexpected object")),
                    }
                }
                b'0' => {
                    self.pop()?;
                }
                b'2' => {
                    let v = self.copy_top()?;
                    self.push(v)?
                }
                _ => return Err(format!("unsupported pickle opcode 0x{op:02x} at byte {at}")),
            }
        }
    }
}

fn check_depth(v: &Value) -> Result<(), String> {
    if depth(v) > MAX_DEPTH {
        Err(format!("pickle nests containers deeper than {MAX_DEPTH}"))
    } else {
        Ok(())
    }
}

/// Depth check for a value about to be put into a container on the stack.
fn check_item_depth(v: &Value) -> Result<(), String> {
    if depth(v) + 1 > MAX_DEPTH {
        Err(format!("pickle nests containers deeper than {MAX_DEPTH}"))
    } else {
        Ok(())
    }
}

fn long_from_bytes(b: &[u8]) -> Option<i64> {
    if b.is_empty() {
        return Some(0);
    }
    let neg = b[b.len() - 1] & 0x80 != 0;
    let fill = if neg { 0xff } else { 0 };
    // Bytes beyond 8 must be pure sign extension for the value to fit.
    if b.len() > 8 && b[8..].iter().any(|&x| x != fill) {
        return None;
    }
    let mut a = [fill; 8];
    let n = b.len().min(8);
    a[..n].copy_from_slice(&b[..n]);
    let v = i64::from_le_bytes(a);
    if b.len() > 8 && (v < 0) != neg {
        return None;
    }
    Some(v)
}

fn pairs(items: Vec<Value>) -> Option<Vec<(Value, Value)>> {
    if !items.len().is_multiple_of(2) {
        return None;
    }
    let mut out = Vec::with_capacity(items.len() / 2);
    let mut it = items.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        out.push((k, v));
    }
    Some(out)
}

const REBUILD_TENSOR: &str = "torch._utils._rebuild_tensor_v2";
const REBUILD_PARAM: &str = "torch._utils._rebuild_parameter";
const REBUILD_PARAM_STATE: &str = "torch._utils._rebuild_parameter_with_state";
const ORDERED_DICT: &str = "collections.OrderedDict";

fn check_global(module: &str, name: &str) -> Result<Value, String> {
    let full = format!("{module}.{name}");
    let ok = matches!(
        full.as_str(),
        REBUILD_TENSOR | REBUILD_PARAM | REBUILD_PARAM_STATE | ORDERED_DICT
    ) || (module == "torch" && name.ends_with("Storage") && name.is_ascii());
    if ok {
        Ok(Value::Global(full))
    } else {
        Err(format!(
            "pickle refers to global '{full}', which a tensor checkpoint does not need (refused)"
        ))
    }
}

fn storage_type(global: &str) -> StorageType {
    match global {
        "torch.BFloat16Storage" => StorageType::Supported(super::DType::BF16),
        "torch.HalfStorage" => StorageType::Supported(super::DType::F16),
        "torch.FloatStorage" => StorageType::Supported(super::DType::F32),
        other => StorageType::Unsupported(other.trim_start_matches("torch.").to_string()),
    }
}

fn as_u64(v: &Value, what: &str) -> Result<u64, String> {
    match v {
        Value::Int(i) => u64::try_from(*i).map_err(|_| format!("{what} is negative ({i})")),
        other => Err(format!("{what} is not an integer: {}", kind(other))),
    }
}

fn as_u64_tuple(v: &Value, what: &str) -> Result<Vec<u64>, String> {
    match v {
        Value::Tuple(items) | Value::List(items) => items.iter().map(|x| as_u64(x, what)).collect(),
        other => Err(format!("{what} is not a tuple: {}", kind(other))),
    }
}

fn persistent_load(pid: Value) -> Result<Value, String> {
    let items = match pid {
        Value::Tuple(items) => items,
        other => return Err(format!("persistent id is not a tuple: {}", kind(&other))),
    };
    match items.as_slice() {
        [Value::Str(tag), Value::Global(cls), Value::Str(key), _location, numel]
            if tag == "storage" =>
        {
            Ok(Value::Storage(StorageRef {
                stype: storage_type(cls),
                key: key.clone(),
                numel: as_u64(numel, "storage numel")?,
            }))
        }
        _ => Err(format!(
            "persistent id is not ('storage', type, key, location, numel): a tuple of {}",
            items.len()
        )),
    }
}

fn reduce(func: Value, args: Value) -> Result<Value, String> {
    let name = match func {
        Value::Global(g) => g,
        other => return Err(format!("REDUCE of a non-global: {}", kind(&other))),
    };
    let args = match args {
        Value::Tuple(a) => a,
        other => {
            return Err(format!(
                "REDUCE of '{name}' with non-tuple arguments: {}",
                kind(&other)
            ))
        }
    };
    match name.as_str() {
        ORDERED_DICT => match args.as_slice() {
            [] => Ok(Value::Dict(Vec::new())),
            // OrderedDict([(k, v), ...])
            [Value::List(items)] => {
                let mut d = Vec::with_capacity(items.len());
                for it in items {
                    match it {
                        Value::Tuple(kv) if kv.len() == 2 => d.push((kv[0].clone(), kv[1].clone())),
                        _ => return Err("OrderedDict item is not a pair".into()),
                    }
                }
                Ok(Value::Dict(d))
            }
            _ => Err("OrderedDict called with unexpected arguments".into()),
        },
        REBUILD_TENSOR => {
            // (storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata])
            if args.len() < 4 {
                return Err(format!("{REBUILD_TENSOR} with {} arguments", args.len()));
            }
            let storage = match &args[0] {
                Value::Storage(s) => s.clone(),
                other => return Err(format!("{REBUILD_TENSOR}: storage is {}", kind(other))),
            };
            let storage_offset = as_u64(&args[1], "storage offset")?;
            let size = as_u64_tuple(&args[2], "size")?;
            let stride = as_u64_tuple(&args[3], "stride")?;
            if size.len() != stride.len() {
                return Err(format!(
                    "{REBUILD_TENSOR}: size has {} dims but stride has {}",
                    size.len(),
                    stride.len()
                ));
            }
            Ok(Value::Tensor(TensorRef {
                storage,
                storage_offset,
                size,
                stride,
            }))
        }
        // nn.Parameter(data, requires_grad, hooks[, state]): herd only wants the data.
        REBUILD_PARAM | REBUILD_PARAM_STATE => match args.into_iter().next() {
            Some(t @ Value::Tensor(_)) => Ok(t),
            _ => Err(format!("{name}: first argument is not a tensor")),
        },
        other => Err(format!("REDUCE of '{other}' is not supported")),
    }
}

/// Runs the pickle program and returns the object it builds. Errors are plain messages;
/// the caller adds the file name.
pub fn unpickle(data: &[u8]) -> Result<Value, String> {
    Vm {
        data,
        pos: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        nodes: 0,
    }
    .run()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simple_dict() {
        // {'a': 1, 'b': [True, None, 'x']} in protocol 2
        let p = b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01K\x01X\x01\x00\x00\x00bq\x02]q\x03(\x88NX\x01\x00\x00\x00xq\x04eu.";
        let v = unpickle(p).unwrap();
        assert_eq!(
            v,
            Value::Dict(vec![
                (Value::Str("a".into()), Value::Int(1)),
                (
                    Value::Str("b".into()),
                    Value::List(vec![Value::Bool(true), Value::None, Value::Str("x".into())])
                ),
            ])
        );
    }

    #[test]
    fn long1_and_binfloat() {
        // LONG1 of -2 and 2**40, BINFLOAT 1.5
        let p = b"\x80\x02(\x8a\x01\xfe\x8a\x06\x00\x00\x00\x00\x00\x01G?\xf8\x00\x00\x00\x00\x00\x00t.";
        let v = unpickle(p).unwrap();
        assert_eq!(
            v,
            Value::Tuple(vec![Value::Int(-2), Value::Int(1 << 40), Value::Float(1.5)])
        );
    }

    #[test]
    fn rejects_unknown_global() {
        let p = b"\x80\x02cos\nsystem\nq\x00X\x02\x00\x00\x00lsq\x01\x85R.";
        let e = unpickle(p).unwrap_err();
        assert!(e.contains("os.system"), "{e}");
    }

    #[test]
    fn rejects_truncated_and_garbage() {
        assert!(unpickle(b"\x80\x02}q").is_err());
        assert!(unpickle(b"\x80\x02").unwrap_err().contains("STOP"));
        assert!(unpickle(b"\xff").unwrap_err().contains("0xff"));
        assert!(unpickle(b"u.").is_err());
        assert!(unpickle(b"(.").is_err());
        assert!(unpickle(b"h\x05.").unwrap_err().contains("memo"));
    }

    #[test]
    fn memo_bomb_is_bounded() {
        // l = []; repeat: l = [l, l] via BINGET - must stop with an error, not exhaust memory.
        let mut p = b"\x80\x02]q\x00".to_vec();
        for _ in 0..64 {
            p.extend_from_slice(b"h\x00h\x00\x86q\x00");
        }
        p.push(b'.');
        assert!(unpickle(&p).unwrap_err().contains("too many"));
    }
}
