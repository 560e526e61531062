//! PyTorch `.pt` state dicts (the BitVLA sidecars, §3.4): a ZIP archive holding `data.pkl` (a
//! pickle of an ordered dict of tensors, each rebuilt from a persistent storage id, an offset, a
//! size and a stride) and one raw little-endian blob per storage under `data/`.
//!
//! The reader executes no code: it interprets the subset of pickle opcodes `torch.save` emits and
//! accepts exactly two callables (`OrderedDict` and `torch._utils._rebuild_tensor_v2` /
//! `_rebuild_parameter`); anything else is an error. The writer produces the same format (used by
//! `bitvla make-tiny`); `torch.load(..., weights_only=True)` reads it.

use super::store::{DType, RawTensor};
use super::{ModelError, Result};
use std::io::{Read, Seek, Write};
use std::path::Path;

#[derive(Debug, Clone)]
#[allow(dead_code)] // every payload is kept for error messages (Debug)
enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    Global(String, String),
    Storage { dtype: DType, key: String },
    Tensor(TensorRef),
    Mark,
}

#[derive(Debug, Clone)]
struct TensorRef {
    dtype: DType,
    key: String,
    offset: usize,
    shape: Vec<usize>,
    stride: Vec<usize>,
}

fn storage_dtype(name: &str) -> Option<DType> {
    match name {
        "BFloat16Storage" => Some(DType::BF16),
        "HalfStorage" => Some(DType::F16),
        "FloatStorage" => Some(DType::F32),
        "ByteStorage" => Some(DType::U8),
        _ => None,
    }
}

fn storage_class(dtype: DType) -> &'static str {
    match dtype {
        DType::BF16 => "BFloat16Storage",
        DType::F16 => "HalfStorage",
        DType::F32 => "FloatStorage",
        DType::U8 => "ByteStorage",
    }
}

struct Unpickler<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    memo: std::collections::HashMap<u32, Value>,
}

type Pr<T> = std::result::Result<T, String>;

impl<'a> Unpickler<'a> {
    fn take(&mut self, n: usize) -> Pr<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or_else(|| format!("truncated pickle at byte {}", self.pos))?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Pr<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Pr<u16> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Pr<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn line(&mut self) -> Pr<String> {
        let rest = &self.data[self.pos..];
        let n = rest
            .iter()
            .position(|&c| c == b'\n')
            .ok_or("truncated pickle: unterminated GLOBAL")?;
        let s = String::from_utf8_lossy(&rest[..n]).into_owned();
        self.pos += n + 1;
        Ok(s)
    }
    fn string(&mut self, n: usize) -> Pr<Value> {
        let b = self.take(n)?;
        Ok(Value::Str(String::from_utf8_lossy(b).into_owned()))
    }
    fn pop(&mut self) -> Pr<Value> {
        self.stack
            .pop()
            .ok_or_else(|| "pickle stack underflow".into())
    }
    fn pop_mark(&mut self) -> Pr<Vec<Value>> {
        let at = self
            .stack
            .iter()
            .rposition(|v| matches!(v, Value::Mark))
            .ok_or("pickle: MARK not found")?;
        let items = self.stack.split_off(at + 1);
        self.stack.pop();
        Ok(items)
    }
    fn top(&mut self) -> Pr<&mut Value> {
        self.stack
            .last_mut()
            .ok_or_else(|| "pickle stack underflow".into())
    }
    fn set_items(&mut self, items: Vec<Value>) -> Pr<()> {
        if !items.len().is_multiple_of(2) {
            return Err("pickle: odd SETITEMS".into());
        }
        match self.top()? {
            Value::Dict(d) => {
                let mut it = items.into_iter();
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    d.push((k, v));
                }
                Ok(())
            }
            other => Err(format!("pickle: SETITEMS on {other:?}")),
        }
    }

    fn run(mut self) -> Pr<Value> {
        loop {
            let op = self.u8()?;
            match op {
                0x80 => {
                    self.u8()?;
                }
                0x95 => {
                    self.take(8)?;
                }
                b'}' => self.stack.push(Value::Dict(Vec::new())),
                b']' => self.stack.push(Value::List(Vec::new())),
                b')' => self.stack.push(Value::Tuple(Vec::new())),
                b'(' => self.stack.push(Value::Mark),
                b'N' => self.stack.push(Value::None),
                0x88 => self.stack.push(Value::Bool(true)),
                0x89 => self.stack.push(Value::Bool(false)),
                b'K' => {
                    let v = self.u8()?;
                    self.stack.push(Value::Int(v.into()))
                }
                b'M' => {
                    let v = self.u16()?;
                    self.stack.push(Value::Int(v.into()))
                }
                b'J' => {
                    let v = self.u32()? as i32;
                    self.stack.push(Value::Int(v.into()))
                }
                0x8a => {
                    let n = self.u8()? as usize;
                    let b = self.take(n)?;
                    if n > 8 {
                        return Err(format!("pickle: LONG1 of {n} bytes"));
                    }
                    let mut v: i64 = 0;
                    for (i, &byte) in b.iter().enumerate() {
                        v |= i64::from(byte) << (8 * i);
                    }
                    if n > 0 && n < 8 && b[n - 1] & 0x80 != 0 {
                        v -= 1i64 << (8 * n);
                    }
                    self.stack.push(Value::Int(v))
                }
                b'G' => {
                    let b = self.take(8)?;
                    let mut a = [0u8; 8];
                    a.copy_from_slice(b);
                    self.stack.push(Value::Float(f64::from_be_bytes(a)))
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    let v = self.string(n)?;
                    self.stack.push(v)
                }
                0x8c | b'U' => {
                    let n = self.u8()? as usize;
                    let v = self.string(n)?;
                    self.stack.push(v)
                }
                b'T' => {
                    let n = self.u32()? as usize;
                    let v = self.string(n)?;
                    self.stack.push(v)
                }
                0x8d => {
                    let b = self.take(8)?;
                    let mut a = [0u8; 8];
                    a.copy_from_slice(b);
                    let n = usize::try_from(u64::from_le_bytes(a)).map_err(|e| e.to_string())?;
                    let v = self.string(n)?;
                    self.stack.push(v)
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.stack.push(Value::Global(module, name))
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module, name) {
                        (Value::Str(m), Value::Str(n)) => self.stack.push(Value::Global(m, n)),
                        _ => return Err("pickle: STACK_GLOBAL without strings".into()),
                    }
                }
                b'q' => {
                    let i = self.u8()?.into();
                    let v = self.top()?.clone();
                    self.memo.insert(i, v);
                }
                b'r' => {
                    let i = self.u32()?;
                    let v = self.top()?.clone();
                    self.memo.insert(i, v);
                }
                0x94 => {
                    let i = self.memo.len() as u32;
                    let v = self.top()?.clone();
                    self.memo.insert(i, v);
                }
                b'h' | b'j' => {
                    let i = if op == b'h' {
                        self.u8()?.into()
                    } else {
                        self.u32()?
                    };
                    let v = self
                        .memo
                        .get(&i)
                        .cloned()
                        .ok_or_else(|| format!("pickle: memo {i} missing"))?;
                    self.stack.push(v)
                }
                b't' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Tuple(items))
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < n {
                        return Err("pickle stack underflow".into());
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.stack.push(Value::Tuple(items))
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::List(items))
                }
                b'a' => {
                    let v = self.pop()?;
                    match self.top()? {
                        Value::List(l) => l.push(v),
                        other => return Err(format!("pickle: APPEND on {other:?}")),
                    }
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    match self.top()? {
                        Value::List(l) => l.extend(items),
                        other => return Err(format!("pickle: APPENDS on {other:?}")),
                    }
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Dict(Vec::new()));
                    self.set_items(items)?;
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    self.set_items(vec![k, v])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    self.set_items(items)?;
                }
                b'R' | 0x81 => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let v = reduce(callable, args)?;
                    self.stack.push(v)
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let v = persistent_load(pid)?;
                    self.stack.push(v)
                }
                b'b' => {
                    // State of an OrderedDict (`_metadata`) or a tensor: not needed.
                    self.pop()?;
                }
                b'.' => return self.pop(),
                other => {
                    return Err(format!(
                        "unsupported pickle opcode 0x{other:02x} at byte {}",
                        self.pos - 1
                    ));
                }
            }
        }
    }
}

fn as_usize(v: &Value) -> Pr<usize> {
    match v {
        Value::Int(i) if *i >= 0 => Ok(*i as usize),
        other => Err(format!("expected a non-negative integer, got {other:?}")),
    }
}

fn as_usizes(v: &Value) -> Pr<Vec<usize>> {
    match v {
        Value::Tuple(items) | Value::List(items) => items.iter().map(as_usize).collect(),
        other => Err(format!("expected a tuple of integers, got {other:?}")),
    }
}

fn reduce(callable: Value, args: Value) -> Pr<Value> {
    let Value::Global(module, name) = callable else {
        return Err(format!("pickle: REDUCE on {callable:?}"));
    };
    let args = match args {
        Value::Tuple(a) => a,
        other => return Err(format!("pickle: REDUCE arguments {other:?}")),
    };
    match (module.as_str(), name.as_str()) {
        ("collections", "OrderedDict") | ("builtins", "dict") => Ok(Value::Dict(Vec::new())),
        ("torch._utils", "_rebuild_tensor_v2") | ("torch._utils", "_rebuild_tensor") => {
            let [storage, offset, size, stride, ..] = args.as_slice() else {
                return Err("pickle: _rebuild_tensor_v2 with too few arguments".into());
            };
            let Value::Storage { dtype, key } = storage else {
                return Err(format!("pickle: tensor storage {storage:?}"));
            };
            Ok(Value::Tensor(TensorRef {
                dtype: *dtype,
                key: key.clone(),
                offset: as_usize(offset)?,
                shape: as_usizes(size)?,
                stride: as_usizes(stride)?,
            }))
        }
        ("torch._utils", "_rebuild_parameter") => match args.into_iter().next() {
            Some(t @ Value::Tensor(_)) => Ok(t),
            other => Err(format!("pickle: _rebuild_parameter of {other:?}")),
        },
        _ => Err(format!(
            "pickle calls {module}.{name}; only PyTorch tensor state dicts are readable"
        )),
    }
}

fn persistent_load(pid: Value) -> Pr<Value> {
    let Value::Tuple(items) = pid else {
        return Err(format!("pickle: persistent id {pid:?}"));
    };
    match items.as_slice() {
        [Value::Str(kind), Value::Global(_, class), key, ..] if kind == "storage" => {
            let dtype = storage_dtype(class)
                .ok_or_else(|| format!("unsupported tensor storage {class}"))?;
            let key = match key {
                Value::Str(s) => s.clone(),
                Value::Int(i) => i.to_string(),
                other => return Err(format!("pickle: storage key {other:?}")),
            };
            Ok(Value::Storage { dtype, key })
        }
        _ => Err(format!("pickle: persistent id {items:?}")),
    }
}

/// Reads a PyTorch state dict. Keys lose a leading `module.` (DDP) prefix.
pub fn read_state_dict(path: &Path) -> Result<Vec<RawTensor>> {
    let err = |m: String| ModelError::file(path, m);
    let file = std::fs::File::open(path).map_err(|e| ModelError::file(path, e))?;
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file)).map_err(|e| {
        err(format!(
            "not a PyTorch zip checkpoint ({e}); is it truncated or saved with the legacy format?"
        ))
    })?;
    let pkl_name = (0..zip.len())
        .filter_map(|i| zip.name_for_index(i).map(str::to_owned))
        .find(|n| n.ends_with("data.pkl"))
        .ok_or_else(|| err("no data.pkl in the archive".into()))?;
    let prefix = pkl_name.trim_end_matches("data.pkl").to_owned();
    let pickle = read_entry(&mut zip, &pkl_name).map_err(err)?;
    let root = Unpickler {
        data: &pickle,
        pos: 0,
        stack: Vec::new(),
        memo: Default::default(),
    }
    .run()
    .map_err(|e| err(format!("{pkl_name}: {e}")))?;
    let Value::Dict(items) = root else {
        return Err(err(format!("{pkl_name} holds no state dict")));
    };
    let mut storages: std::collections::HashMap<String, Vec<u8>> = Default::default();
    let mut out = Vec::with_capacity(items.len());
    for (k, v) in items {
        let Value::Str(name) = k else {
            return Err(err(format!("state dict key {k:?} is not a string")));
        };
        let name = name.strip_prefix("module.").unwrap_or(&name).to_owned();
        let Value::Tensor(t) = v else {
            return Err(err(format!("state dict entry {name} is not a tensor")));
        };
        if !storages.contains_key(&t.key) {
            let entry = format!("{prefix}data/{}", t.key);
            let bytes = read_entry(&mut zip, &entry).map_err(err)?;
            storages.insert(t.key.clone(), bytes);
        }
        let storage = &storages[&t.key];
        let data = gather(&t, storage)
            .map_err(|m| ModelError::tensor(&name, format!("{}: {m}", path.display())))?;
        out.push(RawTensor {
            name,
            dtype: t.dtype,
            shape: t.shape,
            data,
        });
    }
    Ok(out)
}

fn read_entry<R: Read + Seek>(zip: &mut zip::ZipArchive<R>, name: &str) -> Pr<Vec<u8>> {
    let mut entry = zip
        .by_name(name)
        .map_err(|e| format!("entry {name}: {e}"))?;
    let mut bytes = Vec::with_capacity(entry.size() as usize);
    entry
        .read_to_end(&mut bytes)
        .map_err(|e| format!("entry {name}: {e} (truncated or corrupt archive)"))?;
    Ok(bytes)
}

/// Copies a (possibly strided) tensor view out of its storage into row-major order.
fn gather(t: &TensorRef, storage: &[u8]) -> Pr<Vec<u8>> {
    let es = t.dtype.size();
    if t.shape.len() != t.stride.len() {
        return Err(format!(
            "shape {:?} and stride {:?} differ in rank",
            t.shape, t.stride
        ));
    }
    let overflow = || format!("shape {:?} / stride {:?} overflow", t.shape, t.stride);
    let numel = t
        .shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(overflow)?;
    if numel == 0 {
        return Ok(Vec::new());
    }
    // Largest element index the view touches, with checked arithmetic (shapes come from the file).
    let last = t
        .shape
        .iter()
        .zip(&t.stride)
        .try_fold(t.offset, |a, (&n, &s)| {
            a.checked_add((n - 1).checked_mul(s)?)
        })
        .ok_or_else(overflow)?;
    if last
        .checked_add(1)
        .and_then(|l| l.checked_mul(es))
        .is_none_or(|end| end > storage.len())
    {
        return Err(format!(
            "view (offset {}, shape {:?}, stride {:?}) exceeds its storage of {} bytes",
            t.offset,
            t.shape,
            t.stride,
            storage.len()
        ));
    }
    let mut out = Vec::with_capacity(numel * es);
    let mut index = vec![0usize; t.shape.len()];
    for _ in 0..numel {
        let e = t.offset
            + index
                .iter()
                .zip(&t.stride)
                .map(|(i, s)| i * s)
                .sum::<usize>();
        out.extend_from_slice(&storage[e * es..(e + 1) * es]);
        for d in (0..index.len()).rev() {
            index[d] += 1;
            if index[d] < t.shape[d] {
                break;
            }
            index[d] = 0;
        }
    }
    Ok(out)
}

/// Writes `tensors` as a PyTorch state dict (`torch.save(OrderedDict)` format), one storage each.
pub fn write_state_dict(path: &Path, tensors: &[RawTensor]) -> Result<()> {
    let err = |e: &dyn std::fmt::Display| ModelError::file(path, e);
    let archive = path
        .file_stem()
        .and_then(|s| s.to_str())
        .map(|s| s.replace(|c: char| !c.is_ascii_alphanumeric() && c != '_', "_"))
        .unwrap_or_else(|| "archive".into());
    let mut p = vec![0x80, 2];
    let global = |p: &mut Vec<u8>, m: &str, n: &str| {
        p.push(b'c');
        p.extend_from_slice(format!("{m}\n{n}\n").as_bytes());
    };
    let string = |p: &mut Vec<u8>, s: &str| {
        p.push(b'X');
        p.extend_from_slice(&(s.len() as u32).to_le_bytes());
        p.extend_from_slice(s.as_bytes());
    };
    let int = |p: &mut Vec<u8>, v: usize| {
        p.push(b'J');
        p.extend_from_slice(&(v as i32).to_le_bytes());
    };
    global(&mut p, "collections", "OrderedDict");
    p.extend_from_slice(b")R(");
    for (i, t) in tensors.iter().enumerate() {
        if t.shape.iter().any(|&d| d > i32::MAX as usize) {
            return Err(err(&format!("tensor {} too large", t.name)));
        }
        string(&mut p, &t.name);
        global(&mut p, "torch._utils", "_rebuild_tensor_v2");
        p.extend_from_slice(b"((");
        string(&mut p, "storage");
        global(&mut p, "torch", storage_class(t.dtype));
        string(&mut p, &i.to_string());
        string(&mut p, "cpu");
        int(&mut p, t.shape.iter().product());
        p.extend_from_slice(b"tQ");
        int(&mut p, 0);
        p.push(b'(');
        for &d in &t.shape {
            int(&mut p, d);
        }
        p.extend_from_slice(b"t(");
        let mut stride = vec![1usize; t.shape.len()];
        for d in (0..t.shape.len().saturating_sub(1)).rev() {
            stride[d] = stride[d + 1] * t.shape[d + 1];
        }
        for &s in &stride {
            int(&mut p, s);
        }
        p.extend_from_slice(b"t\x89");
        global(&mut p, "collections", "OrderedDict");
        p.extend_from_slice(b")RtR");
    }
    p.extend_from_slice(b"u.");

    let file = std::fs::File::create(path).map_err(|e| err(&e))?;
    let mut zip = zip::ZipWriter::new(std::io::BufWriter::new(file));
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Stored)
        .with_alignment(64);
    let mut add = |name: String, bytes: &[u8]| -> Result<()> {
        zip.start_file(name, options).map_err(|e| err(&e))?;
        zip.write_all(bytes).map_err(|e| err(&e))
    };
    add(format!("{archive}/data.pkl"), &p)?;
    add(format!("{archive}/byteorder"), b"little")?;
    for (i, t) in tensors.iter().enumerate() {
        add(format!("{archive}/data/{i}"), &t.data)?;
    }
    add(format!("{archive}/version"), b"3\n")?;
    zip.finish().map_err(|e| err(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<RawTensor> {
        vec![
            RawTensor {
                name: "fc1.weight".into(),
                dtype: DType::F32,
                shape: vec![2, 3],
                data: (0..6u8).flat_map(|i| f32::from(i).to_le_bytes()).collect(),
            },
            RawTensor {
                name: "model.fc2.bias".into(),
                dtype: DType::BF16,
                shape: vec![4],
                data: (0..4u8)
                    .flat_map(|i| half::bf16::from_f32(f32::from(i)).to_le_bytes())
                    .collect(),
            },
        ]
    }

    #[test]
    fn round_trip() {
        let dir = std::env::temp_dir().join(format!("bitvla-pickle-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("head--1_checkpoint.pt");
        write_state_dict(&path, &sample()).unwrap();
        let back = read_state_dict(&path).unwrap();
        for (a, b) in sample().iter().zip(&back) {
            assert_eq!(
                (&a.name, a.dtype, &a.shape, &a.data),
                (&b.name, b.dtype, &b.shape, &b.data)
            );
        }
        // A truncated archive is an error naming the file, not a panic.
        let bytes = std::fs::read(&path).unwrap();
        for cut in [10, bytes.len() / 2, bytes.len() - 30] {
            std::fs::write(&path, &bytes[..cut]).unwrap();
            let e = read_state_dict(&path).unwrap_err().to_string();
            assert!(e.contains("head--1_checkpoint.pt"), "{e}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn strided_views_are_gathered() {
        // A transposed 2×3 view of a 3×2 storage.
        let storage: Vec<u8> = (0..6u8).collect();
        let t = TensorRef {
            dtype: DType::U8,
            key: "0".into(),
            offset: 0,
            shape: vec![2, 3],
            stride: vec![1, 2],
        };
        assert_eq!(gather(&t, &storage).unwrap(), vec![0, 2, 4, 1, 3, 5]);
        let bad = TensorRef {
            offset: 3,
            ..t.clone()
        };
        assert!(gather(&bad, &storage).is_err());
        let huge = TensorRef {
            shape: vec![1 << 40, 1 << 40],
            stride: vec![1 << 40, 1],
            ..t
        };
        assert!(gather(&huge, &storage).unwrap_err().contains("overflow"));
    }

    #[test]
    fn foreign_callables_are_refused() {
        let mut p = vec![0x80, 2, b'c'];
        p.extend_from_slice(b"os\nsystem\n");
        p.extend_from_slice(b"(X\x02\x00\x00\x00lstR.");
        let e = Unpickler {
            data: &p,
            pos: 0,
            stack: vec![],
            memo: Default::default(),
        }
        .run()
        .unwrap_err();
        assert!(e.contains("os.system"), "{e}");
    }
}
