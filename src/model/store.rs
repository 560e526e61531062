//! Named tensors from checkpoint files: safetensors files memory-mapped (read tensor by tensor,
//! nothing copied until a tensor is asked for) and PyTorch sidecars (decoded into owned buffers).
//! Every accessor checks dtype, shape and finiteness and names the tensor and file on failure.

use super::{ModelError, Result};
use half::{bf16, f16};
use memmap2::Mmap;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// Element types the model files use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    BF16,
    F16,
    F32,
    U8,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::BF16 | DType::F16 => 2,
            DType::F32 => 4,
            DType::U8 => 1,
        }
    }

    fn from_safetensors(d: safetensors::Dtype) -> Option<Self> {
        match d {
            safetensors::Dtype::BF16 => Some(DType::BF16),
            safetensors::Dtype::F16 => Some(DType::F16),
            safetensors::Dtype::F32 => Some(DType::F32),
            safetensors::Dtype::U8 => Some(DType::U8),
            _ => None,
        }
    }

    pub fn to_safetensors(self) -> safetensors::Dtype {
        match self {
            DType::BF16 => safetensors::Dtype::BF16,
            DType::F16 => safetensors::Dtype::F16,
            DType::F32 => safetensors::Dtype::F32,
            DType::U8 => safetensors::Dtype::U8,
        }
    }
}

enum Buffer {
    /// A file mapped whole from offset 0, and the file, for reads that bypass the mapping.
    Mapped(Mmap, std::fs::File),
    Owned(Vec<u8>),
}

impl Buffer {
    fn bytes(&self) -> &[u8] {
        match self {
            Buffer::Mapped(m, _) => m,
            Buffer::Owned(v) => v,
        }
    }

    /// `out.len()` bytes from `offset` of the buffer. A mapped file is read with `pread`, which
    /// copies from the page cache without mapping anything: reading a 5 KB row through the
    /// mapping maps whatever the page cache holds around it, up to a whole 2 MB folio.
    fn read_at(&self, offset: usize, out: &mut [u8]) -> std::io::Result<()> {
        match self {
            Buffer::Mapped(_, file) => {
                use std::os::unix::fs::FileExt;
                file.read_exact_at(out, offset as u64)
            }
            Buffer::Owned(v) => {
                let src = v.get(offset..offset + out.len()).ok_or_else(|| {
                    std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "past the buffer")
                })?;
                out.copy_from_slice(src);
                Ok(())
            }
        }
    }
}

#[derive(Debug, Clone)]
struct Entry {
    dtype: DType,
    shape: Vec<usize>,
    buffer: usize,
    start: usize,
    end: usize,
}

/// A raw tensor to add to a store (used by the `.pt` reader).
#[derive(Debug, Clone)]
pub struct RawTensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

/// Tensors by name, over any number of files.
#[derive(Default)]
pub struct TensorStore {
    buffers: Vec<(PathBuf, Buffer)>,
    entries: BTreeMap<String, Entry>,
    metadata: HashMap<String, String>,
}

impl std::fmt::Debug for TensorStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TensorStore")
            .field(
                "files",
                &self.buffers.iter().map(|b| &b.0).collect::<Vec<_>>(),
            )
            .field("tensors", &self.entries.len())
            .finish()
    }
}

impl TensorStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Maps one safetensors file and registers its tensors (their names must be new).
    pub fn add_safetensors(&mut self, path: &Path) -> Result<()> {
        let file = std::fs::File::open(path).map_err(|e| ModelError::file(path, e))?;
        // SAFETY: the file is opened read-only; a checkpoint modified while it is mapped is the
        // one case memory mapping cannot protect against (as in every mmap-based loader).
        let map = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::file(path, e))?;
        let (header, meta) = safetensors::SafeTensors::read_metadata(&map).map_err(|e| {
            ModelError::file(
                path,
                format!("not a valid safetensors file ({e:?}); is it truncated? re-download it"),
            )
        })?;
        let data_start = 8 + header;
        let buffer = self.buffers.len();
        let mut tensors: Vec<_> = meta.tensors().into_iter().collect();
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, info) in tensors {
            let dtype = DType::from_safetensors(info.dtype).ok_or_else(|| {
                ModelError::tensor(
                    &name,
                    format!(
                        "dtype {:?} in {} is not supported (BF16, F16, F32, U8)",
                        info.dtype,
                        path.display()
                    ),
                )
            })?;
            let (start, end) = (
                data_start + info.data_offsets.0,
                data_start + info.data_offsets.1,
            );
            self.insert(
                name,
                Entry {
                    dtype,
                    shape: info.shape.clone(),
                    buffer,
                    start,
                    end,
                },
                path,
            )?;
        }
        if let Some(m) = meta.metadata() {
            self.metadata
                .extend(m.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        self.buffers
            .push((path.to_path_buf(), Buffer::Mapped(map, file)));
        Ok(())
    }

    /// Registers owned tensors read from `path`, each name prefixed with `prefix`.
    pub fn add_owned(&mut self, path: &Path, prefix: &str, tensors: Vec<RawTensor>) -> Result<()> {
        let buffer = self.buffers.len();
        let mut bytes = Vec::with_capacity(tensors.iter().map(|t| t.data.len()).sum());
        for t in tensors {
            let expected = t.shape.iter().product::<usize>() * t.dtype.size();
            if t.data.len() != expected {
                return Err(ModelError::tensor(
                    format!("{prefix}{}", t.name),
                    format!(
                        "{}: {} data bytes for shape {:?} {:?} (expected {expected})",
                        path.display(),
                        t.data.len(),
                        t.shape,
                        t.dtype
                    ),
                ));
            }
            let start = bytes.len();
            bytes.extend_from_slice(&t.data);
            self.insert(
                format!("{prefix}{}", t.name),
                Entry {
                    dtype: t.dtype,
                    shape: t.shape,
                    buffer,
                    start,
                    end: bytes.len(),
                },
                path,
            )?;
        }
        self.buffers
            .push((path.to_path_buf(), Buffer::Owned(bytes)));
        Ok(())
    }

    fn insert(&mut self, name: String, entry: Entry, path: &Path) -> Result<()> {
        let expected = entry.shape.iter().product::<usize>() * entry.dtype.size();
        if entry.end - entry.start != expected {
            return Err(ModelError::tensor(
                &name,
                format!(
                    "{}: {} bytes for shape {:?} {:?}",
                    path.display(),
                    entry.end - entry.start,
                    entry.shape,
                    entry.dtype
                ),
            ));
        }
        if let Some(previous) = self.entries.get(&name) {
            return Err(ModelError::tensor(
                &name,
                format!(
                    "appears twice: in {} and {}",
                    self.buffers[previous.buffer].0.display(),
                    path.display()
                ),
            ));
        }
        self.entries.insert(name, entry);
        Ok(())
    }

    /// Frees the tensors decoded into memory (the `.pt` sidecars) once the model holds its own
    /// copies; memory-mapped tensors stay available.
    pub fn drop_owned(&mut self) {
        let owned: Vec<usize> = (0..self.buffers.len())
            .filter(|&i| matches!(self.buffers[i].1, Buffer::Owned(_)))
            .collect();
        self.entries.retain(|_, e| !owned.contains(&e.buffer));
        for i in owned {
            self.buffers[i].1 = Buffer::Owned(Vec::new());
        }
    }

    /// Drops every mapped page from this process's resident set (they stay in the page cache).
    /// After loading, the model holds its own copies of what it computes with; only the
    /// embedding rows are read again, a few per call. A tensor's own release may leave pages
    /// at its edges mapped, and a freshly written file (a new cache entry) sits in the page
    /// cache in 2 MB folios that a touch maps whole: 85 MB of a packed file stayed resident
    /// after a load, against 28 MB for the same bytes copied by `cp`.
    pub fn release_mapped(&self) {
        for (path, buffer) in &self.buffers {
            if let Buffer::Mapped(map, _) = buffer {
                drop_pages(map, 0, map.len(), &path.display());
            }
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// String metadata of the safetensors headers (`__metadata__`), merged over files.
    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }

    fn entry(&self, name: &str) -> Result<&Entry> {
        self.entries.get(name).ok_or_else(|| {
            ModelError::tensor(
                name,
                format!(
                    "missing from the checkpoint ({})",
                    self.buffers
                        .iter()
                        .map(|b| b.0.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )
        })
    }

    pub fn shape(&self, name: &str) -> Result<&[usize]> {
        Ok(&self.entry(name)?.shape)
    }

    pub fn dtype(&self, name: &str) -> Result<DType> {
        Ok(self.entry(name)?.dtype)
    }

    /// The raw little-endian bytes of a tensor, after checking its shape.
    pub fn raw(&self, name: &str, shape: &[usize]) -> Result<(&[u8], DType)> {
        let e = self.entry(name)?;
        if e.shape != shape {
            return Err(ModelError::tensor(
                name,
                format!(
                    "shape {:?} in {}, expected {shape:?}",
                    e.shape,
                    self.buffers[e.buffer].0.display()
                ),
            ));
        }
        Ok((&self.buffers[e.buffer].1.bytes()[e.start..e.end], e.dtype))
    }

    /// Drops a memory-mapped tensor's pages from this process (they stay in the page cache and
    /// are re-read if touched again), so that loading or converting a model tensor by tensor
    /// never holds the whole mapped checkpoint in the resident set.
    pub fn release(&self, name: &str) {
        if let Some(e) = self.entries.get(name) {
            self.release_bytes(name, e, e.start, e.end);
        }
    }

    fn release_bytes(&self, name: &str, e: &Entry, start: usize, end: usize) {
        if let Buffer::Mapped(map, _) = &self.buffers[e.buffer].1 {
            drop_pages(map, start, end, &name);
        }
    }

    /// Feeds a tensor's bytes to `f` in pieces of at most 8 MiB (whole elements), releasing
    /// each mapped piece once consumed: decoding a tensor never holds its mapped pages and the
    /// decoded copy in full at the same time.
    fn for_pieces(
        &self,
        name: &str,
        shape: &[usize],
        mut f: impl FnMut(&[u8], DType) -> Result<()>,
    ) -> Result<()> {
        let (bytes, dtype) = self.raw(name, shape)?;
        let e = self.entry(name)?;
        const PIECE: usize = 8 << 20;
        for (i, piece) in bytes.chunks(PIECE).enumerate() {
            f(piece, dtype)?;
            let start = e.start + i * PIECE;
            self.release_bytes(name, e, start, start + piece.len());
        }
        Ok(())
    }

    /// A 2-D floating-point weight quantized to ternary codes straight from its stored bytes
    /// (no decoded copy), its mapped pages released afterwards.
    pub fn ternary(&self, name: &str, n: usize, k: usize) -> Result<crate::kernels::TernaryMatrix> {
        use super::KernelContext;
        use crate::kernels::RawWeights;
        let (bytes, dtype) = self.raw(name, &[n, k])?;
        let raw = match dtype {
            DType::BF16 => RawWeights::Bf16(bytes),
            DType::F16 => RawWeights::F16(bytes),
            DType::F32 => RawWeights::F32(bytes),
            DType::U8 => {
                return Err(ModelError::tensor(
                    name,
                    "is U8, expected a floating-point weight to quantize",
                ));
            }
        };
        let m = crate::kernels::TernaryMatrix::from_raw(raw, n, k).stage(name);
        self.release(name);
        m
    }

    /// A floating-point tensor as f32, checked for shape and finiteness.
    pub fn f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let mut values = Vec::with_capacity(shape.iter().product());
        self.for_pieces(name, shape, |piece, dtype| {
            values.extend(decode_f32(name, piece, dtype)?);
            Ok(())
        })?;
        check_finite(name, &values)?;
        Ok(values)
    }

    /// A BF16 tensor as stored, checked for shape and finiteness.
    pub fn bf16(&self, name: &str, shape: &[usize]) -> Result<Vec<bf16>> {
        let mut values = Vec::with_capacity(shape.iter().product());
        self.for_pieces(name, shape, |piece, dtype| {
            if dtype != DType::BF16 {
                return Err(ModelError::tensor(
                    name,
                    format!("is {dtype:?}, expected BF16"),
                ));
            }
            values.extend(
                piece
                    .chunks_exact(2)
                    .map(|b| bf16::from_le_bytes([b[0], b[1]])),
            );
            Ok(())
        })?;
        first_non_finite(name, &values, |v| v.is_finite())?;
        Ok(values)
    }

    /// Rows of a 2-D floating-point tensor (e.g. the embedding rows a prompt uses), reading only
    /// those rows.
    pub fn f32_rows(&self, name: &str, cols: usize, rows: &[usize]) -> Result<Vec<f32>> {
        let e = self.entry(name)?;
        if e.shape.len() != 2 || e.shape[1] != cols {
            return Err(ModelError::tensor(
                name,
                format!("shape {:?}, expected [*, {cols}]", e.shape),
            ));
        }
        let row_bytes = cols * e.dtype.size();
        let (path, buffer) = &self.buffers[e.buffer];
        let mut raw = vec![0u8; row_bytes];
        let mut out = Vec::with_capacity(rows.len() * cols);
        let mut previous = None;
        for &r in rows {
            if r >= e.shape[0] {
                return Err(ModelError::tensor(
                    name,
                    format!("row {r} requested, the tensor has {} rows", e.shape[0]),
                ));
            }
            if previous == Some(r) {
                // A run of one id (a prompt's 256 image placeholders per camera): read once.
                out.extend_from_within(out.len() - cols..);
                continue;
            }
            buffer
                .read_at(e.start + r * row_bytes, &mut raw)
                .map_err(|err| ModelError::file(path, format!("{name} row {r}: {err}")))?;
            let row = decode_f32(name, &raw, e.dtype)?;
            check_finite(&format!("{name} row {r}"), &row)?;
            out.extend_from_slice(&row);
            previous = Some(r);
        }
        Ok(out)
    }
}

/// Drops bytes `start..end` of a mapping from the resident set (MADV_DONTNEED); `what` names
/// them in the debug log should the kernel refuse.
fn drop_pages(map: &Mmap, start: usize, end: usize, what: &dyn std::fmt::Display) {
    if end <= start {
        return;
    }
    // SAFETY: a read-only, file-backed private mapping: MADV_DONTNEED only drops clean pages,
    // which are re-read from the (unchanged) file on the next access.
    let dropped = unsafe {
        map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start)
    };
    if let Err(err) = dropped {
        log::debug!("madvise(DONTNEED) on {what}: {err}");
    }
}

pub(crate) fn decode_f32(name: &str, bytes: &[u8], dtype: DType) -> Result<Vec<f32>> {
    Ok(match dtype {
        DType::BF16 => bytes
            .chunks_exact(2)
            .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        DType::F16 => bytes
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        DType::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        DType::U8 => {
            return Err(ModelError::tensor(
                name,
                "is U8, expected a floating-point tensor (BF16, F16 or F32)",
            ));
        }
    })
}

pub(crate) fn check_finite(name: &str, values: &[f32]) -> Result<()> {
    first_non_finite(name, values, |v| v.is_finite())
}

fn first_non_finite<T: std::fmt::Display>(
    name: &str,
    values: &[T],
    finite: impl Fn(&T) -> bool,
) -> Result<()> {
    match values.iter().position(|v| !finite(v)) {
        Some(i) => Err(ModelError::tensor(
            name,
            format!(
                "non-finite value {} at flat index {i}; the checkpoint is corrupt",
                values[i]
            ),
        )),
        None => Ok(()),
    }
}
