//! One MCAP file, prepared for reading in log-time order.
//!
//! Opening walks the data section's record headers on the memory map (nothing is decompressed):
//! each chunk becomes a [`Span`] with the log-time range its header states, and runs of messages
//! outside chunks (unchunked files) become spans of their own. A span's messages are loaded on
//! demand, sorted by log time ([`McapFile::load`]); the merge in `reader.rs` loads a span only
//! once the messages already loaded could be later than its start, so a bag is read with the
//! chunks that overlap in time in memory, not the whole bag.
//!
//! Channels come from the summary section (as rosbag2's indexed reader takes them), because a
//! chunk read early for its time may use a channel defined in a chunk stored before it. A file
//! without a readable summary (cut short while recording) has its chunks scanned once for their
//! schema and channel records first.
//!
//! Damage: a record that overruns the file ends the walk (a chunk cut short still yields the
//! records that decompress before the cut); a chunk that fails to decompress is skipped alone.
//! Each is one warning naming the file and the byte offset.

use super::reader::{BagError, Connection};
use mcap::records::op;
use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The connection registry of a whole bag: one [`Connection`] per (topic, type, encoding).
pub(super) type Intern<'x> = dyn FnMut(&str, &str, &str) -> Arc<Connection> + 'x;

/// Loose messages (outside chunks) per span, at most.
const LOOSE_SPAN_MESSAGES: usize = 4096;

/// A part of the data section whose messages are loaded together.
#[derive(Debug, Clone)]
pub(super) struct Span {
    /// Log-time range of its messages [ns], as its chunk header states it.
    pub start: u64,
    pub end: u64,
    /// Byte offset of its first record in the file.
    pub offset: usize,
    kind: SpanKind,
}

#[derive(Debug, Clone)]
enum SpanKind {
    /// A chunk: compressed records in `data`; `truncated` when the file ends inside it.
    Chunk {
        compression: String,
        uncompressed_size: u64,
        data: Range<usize>,
        truncated: bool,
    },
    /// Consecutive records outside chunks, stored as they are.
    Loose { records: Range<usize> },
}

impl Span {
    /// Whether loading needs a decompressed copy (see [`McapFile::decompress`]).
    pub fn compressed(&self) -> bool {
        matches!(self.kind, SpanKind::Chunk { .. })
    }
}

/// One message of a loaded span: where its data lies in the span's bytes.
#[derive(Debug, Clone)]
pub(super) struct SpanMessage {
    pub log_time: u64,
    pub channel: u16,
    pub data: Range<usize>,
}

pub(super) struct McapFile {
    pub path: PathBuf,
    map: memmap2::Mmap,
    pub spans: Vec<Span>,
    registry: Registry,
    /// Damage found while opening (the walk, the channel scan).
    pub warnings: Vec<String>,
    /// Largest decompressed chunk accepted [bytes].
    limit: usize,
}

pub(super) fn map_file(path: &Path) -> Result<memmap2::Mmap, BagError> {
    let f = std::fs::File::open(path).map_err(|source| BagError::Io {
        path: path.display().to_string(),
        source,
    })?;
    // SAFETY: the map is read-only; a bag modified while it is replayed is the user's error and
    // at worst yields garbage bytes, which every decoder checks.
    unsafe { memmap2::Mmap::map(&f) }.map_err(|source| BagError::Io {
        path: path.display().to_string(),
        source,
    })
}

/// The largest record (or decompressed chunk) accepted from a file of `len` bytes: a damaged
/// chunk header claiming terabytes must be an error, not an allocation that aborts the process.
fn record_limit(len: usize) -> usize {
    len.saturating_mul(64).clamp(64 << 20, 4 << 30)
}

/// Little-endian fields of a record body, bounds-checked.
struct Fields<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Fields<'a> {
    fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        let b = self.buf.get(self.pos..self.pos.checked_add(n)?)?;
        self.pos += n;
        Some(b)
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.bytes(2)?.try_into().ok()?))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.bytes(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.bytes(8)?.try_into().ok()?))
    }
    fn string(&mut self) -> Option<&'a str> {
        let n = self.u32()? as usize;
        std::str::from_utf8(self.bytes(n)?).ok()
    }
}

/// A chunk record's header, from a body that may be cut short after the header.
struct ChunkHead {
    start: u64,
    end: u64,
    uncompressed_size: u64,
    compression: String,
    compressed_size: u64,
    /// Offset of the compressed data in the body.
    data_at: usize,
}

impl ChunkHead {
    /// The span of this chunk: its record at `at`, its compressed data at `data` in the file.
    fn span(self, at: usize, data: Range<usize>, truncated: bool) -> Span {
        Span {
            start: self.start,
            end: self.end,
            offset: at,
            kind: SpanKind::Chunk {
                compression: self.compression,
                uncompressed_size: self.uncompressed_size,
                data,
                truncated,
            },
        }
    }
}

fn chunk_head(body: &[u8]) -> Option<ChunkHead> {
    let mut f = Fields { buf: body, pos: 0 };
    let start = f.u64()?;
    let end = f.u64()?;
    let uncompressed_size = f.u64()?;
    let _crc = f.u32()?;
    let compression = f.string()?.to_owned();
    let compressed_size = f.u64()?;
    Some(ChunkHead {
        start,
        end,
        uncompressed_size,
        compression,
        compressed_size,
        data_at: f.pos,
    })
}

/// A message record's log time, from its body (channel u16, sequence u32, log time u64, ...).
fn message_time(body: &[u8]) -> Option<u64> {
    let mut f = Fields { buf: body, pos: 6 };
    f.u64()
}

/// Splits records: opcode (u8), length (u64 LE), body. An overrun is an error (and the end).
fn records(buf: &[u8]) -> impl Iterator<Item = Result<(usize, u8, &[u8]), (usize, String)>> {
    let mut pos = 0usize;
    std::iter::from_fn(move || {
        if pos >= buf.len() {
            return None;
        }
        let Some(head) = buf.get(pos..pos + 9) else {
            let at = pos;
            pos = buf.len();
            return Some(Err((at, "truncated record header".into())));
        };
        let len = u64::from_le_bytes(head[1..9].try_into().unwrap_or([0xff; 8]));
        let start = pos + 9;
        let end = usize::try_from(len)
            .ok()
            .and_then(|l| start.checked_add(l))
            .filter(|&e| e <= buf.len());
        match end {
            Some(end) => {
                let at = pos;
                pos = end;
                Some(Ok((at, head[0], &buf[start..end])))
            }
            None => {
                let at = pos;
                pos = buf.len();
                Some(Err((
                    at,
                    format!("a record of {len} bytes overruns its container"),
                )))
            }
        }
    })
}

/// How the walk of a data section ended.
enum WalkEnd {
    /// At the data-end record (or the footer): the file is whole.
    DataEnd,
    /// At the end of the file, after a whole record.
    Eof,
    /// At damage: its byte offset and what is wrong.
    Damaged(usize, String),
}

struct Walked {
    spans: Vec<Span>,
    /// Schema and channel records outside chunks: offset, opcode, body.
    registrations: Vec<(usize, u8, Range<usize>)>,
    end: WalkEnd,
}

/// Walks the data section's record headers (from after the magic): chunks and runs of loose
/// messages become spans. A chunk cut short by the end of the file becomes a span marked
/// truncated, which loads what decompresses before the cut.
fn walk(map: &[u8]) -> Walked {
    let mut w = Walked {
        spans: Vec::new(),
        registrations: Vec::new(),
        end: WalkEnd::Eof,
    };
    let mut loose_count = 0usize;
    for item in records(&map[8..]) {
        let (at, opcode, body) = match item {
            Ok((at, opcode, body)) => (at + 8, opcode, body),
            Err((at, e)) => {
                let at = at + 8;
                if map.get(at) == Some(&op::CHUNK)
                    && let Some(body) = map.get(at + 9..)
                    && let Some(h) = chunk_head(body)
                {
                    let data_start = (at + 9 + h.data_at).min(map.len());
                    w.spans.push(h.span(at, data_start..map.len(), true));
                }
                w.end = WalkEnd::Damaged(at, e);
                return w;
            }
        };
        let body_at = at + 9;
        match opcode {
            op::CHUNK => match chunk_head(body) {
                Some(h) if h.compressed_size <= (body.len() - h.data_at) as u64 => {
                    let data_start = body_at + h.data_at;
                    let data = data_start..data_start + h.compressed_size as usize;
                    w.spans.push(h.span(at, data, false));
                }
                _ => {
                    w.end = WalkEnd::Damaged(at, "chunk header does not fit its record".into());
                    return w;
                }
            },
            op::MESSAGE => {
                let Some(t) = message_time(body) else {
                    w.end = WalkEnd::Damaged(at, "message record too short".into());
                    return w;
                };
                let end = body_at + body.len();
                match w.spans.last_mut() {
                    Some(Span {
                        start,
                        end: last,
                        kind: SpanKind::Loose { records },
                        ..
                    }) if records.end == at && loose_count < LOOSE_SPAN_MESSAGES => {
                        records.end = end;
                        *start = (*start).min(t);
                        *last = (*last).max(t);
                        loose_count += 1;
                    }
                    _ => {
                        w.spans.push(Span {
                            start: t,
                            end: t,
                            offset: at,
                            kind: SpanKind::Loose { records: at..end },
                        });
                        loose_count = 1;
                    }
                }
            }
            op::SCHEMA | op::CHANNEL => {
                w.registrations
                    .push((at, opcode, body_at..body_at + body.len()));
            }
            op::DATA_END | op::FOOTER => {
                w.end = WalkEnd::DataEnd;
                return w;
            }
            _ => {}
        }
    }
    w
}

/// The schema and channel records seen so far: channel id → the bag's connection.
#[derive(Default)]
struct Registry {
    schemas: HashMap<u16, String>,
    channels: HashMap<u16, Arc<Connection>>,
}

impl Registry {
    /// A schema or channel record, registered (other records are ignored).
    fn register(&mut self, opcode: u8, body: &[u8], intern: &mut Intern<'_>) -> Result<(), String> {
        match mcap::parse_record(opcode, body).map_err(|e| e.to_string())? {
            mcap::records::Record::Schema { header, .. } => {
                self.schemas.insert(header.id, header.name);
            }
            mcap::records::Record::Channel(c) => {
                let ty = self.schemas.get(&c.schema_id).map_or("", String::as_str);
                self.channels
                    .insert(c.id, intern(&c.topic, ty, &c.message_encoding));
            }
            _ => {}
        }
        Ok(())
    }
}

impl McapFile {
    /// Maps the file and indexes its data section (see the module doc).
    pub fn open(path: &Path, intern: &mut Intern<'_>) -> Result<Self, BagError> {
        let map = map_file(path)?;
        if map.len() < 8 || &map[..8] != mcap::MAGIC {
            return Err(BagError::Open {
                path: path.display().to_string(),
                message: "not an MCAP file (no MCAP magic at the start)".into(),
            });
        }
        let mut file = Self {
            path: path.to_owned(),
            limit: record_limit(map.len()),
            map,
            spans: Vec::new(),
            registry: Registry::default(),
            warnings: Vec::new(),
        };
        let _ = file.map.advise(memmap2::Advice::Sequential);
        let complete = file.walk(intern);
        let summarised = complete && file.summary_channels(intern);
        if !summarised {
            file.scan_channels(intern);
        }
        Ok(file)
    }

    fn damaged(&self, at: usize, e: &dyn std::fmt::Display) -> String {
        format!(
            "{}: damaged at byte {at} ({e}); the messages stored before it are read, the rest \
             of this file is skipped",
            self.path.display()
        )
    }

    /// Indexes the data section (see [`walk`]), registers the schema and channel records
    /// outside chunks, and reports where the walk stopped early. True when it reached the
    /// data-end record.
    fn walk(&mut self, intern: &mut Intern<'_>) -> bool {
        let walked = walk(&self.map);
        self.spans = walked.spans;
        for (at, opcode, body) in walked.registrations {
            if let Err(e) = self.registry.register(opcode, &self.map[body], intern) {
                let w = self.damaged(at, &e);
                self.warnings.push(w);
            }
        }
        match walked.end {
            WalkEnd::DataEnd => return true,
            WalkEnd::Damaged(at, e) => {
                let w = self.damaged(at, &e);
                self.warnings.push(w);
            }
            WalkEnd::Eof => self.warnings.push(format!(
                "{}: ends without its summary (the recording was cut short?); every complete \
                 record is read",
                self.path.display()
            )),
        }
        false
    }

    /// Channels from the summary section; false when it cannot be read or names none.
    fn summary_channels(&mut self, intern: &mut Intern<'_>) -> bool {
        let Ok(Some(summary)) = mcap::Summary::read(&self.map) else {
            return false;
        };
        for (id, c) in &summary.channels {
            let ty = c.schema.as_ref().map_or("", |s| s.name.as_str());
            self.registry
                .channels
                .insert(*id, intern(&c.topic, ty, &c.message_encoding));
        }
        !summary.channels.is_empty() || self.spans.is_empty()
    }

    /// Without a summary: the schema and channel records inside the chunks, in file order.
    fn scan_channels(&mut self, intern: &mut Intern<'_>) {
        use rayon::prelude::*;
        let batch = 2 * rayon::current_num_threads();
        let chunks: Vec<usize> = (0..self.spans.len())
            .filter(|&i| self.spans[i].compressed())
            .collect();
        for group in chunks.chunks(batch) {
            let decoded: Vec<_> = group
                .par_iter()
                .map(|&i| self.decompress(&self.spans[i]))
                .collect();
            for d in decoded {
                for (_, opcode, body) in records(&d.bytes).map_while(Result::ok) {
                    if matches!(opcode, op::SCHEMA | op::CHANNEL) {
                        let _ = self.registry.register(opcode, body, intern);
                    }
                }
            }
        }
    }

    /// A span's bytes for [`McapFile::load`]: a chunk decompressed (as much as decompresses,
    /// for one cut short); nothing for loose records, which are read from the map. Runs on
    /// any thread.
    pub fn decompress(&self, span: &Span) -> Decompressed {
        let SpanKind::Chunk {
            compression,
            uncompressed_size,
            data,
            truncated,
        } = &span.kind
        else {
            return Decompressed::default();
        };
        let mut bytes = Vec::new();
        let error = decompress_chunk(
            compression,
            *uncompressed_size,
            &self.map[data.clone()],
            self.limit,
            *truncated,
            &mut bytes,
        )
        .err();
        Decompressed { bytes, error }
    }

    /// The bytes a loaded span's messages point into.
    pub fn span_bytes<'a>(&'a self, span: &Span, decompressed: &'a [u8]) -> &'a [u8] {
        match &span.kind {
            SpanKind::Chunk { .. } => decompressed,
            SpanKind::Loose { records } => &self.map[records.clone()],
        }
    }

    /// A span's messages sorted by log time (file order among equal times), registering the
    /// schema and channel records it holds. Damage inside it is one warning; the messages
    /// before it are kept.
    pub fn load(
        &mut self,
        span: &Span,
        decompressed: Decompressed,
        intern: &mut Intern<'_>,
        warnings: &mut Vec<String>,
    ) -> (Vec<u8>, Vec<SpanMessage>) {
        let truncated = matches!(
            span.kind,
            SpanKind::Chunk {
                truncated: true,
                ..
            }
        );
        if let Some(e) = &decompressed.error
            && !truncated
        {
            warnings.push(format!(
                "{}: the chunk at byte {} is damaged ({e}); its messages are skipped",
                self.path.display(),
                span.offset
            ));
            return (Vec::new(), Vec::new());
        }
        let owned = decompressed.bytes;
        let mut messages = Vec::new();
        {
            // Not `span_bytes`: the registry below is borrowed apart from the map.
            let bytes = match &span.kind {
                SpanKind::Chunk { .. } => &owned[..],
                SpanKind::Loose { records } => &self.map[records.clone()],
            };
            for item in records(bytes) {
                let (at, opcode, body) = match item {
                    Ok(r) => r,
                    Err((_, e)) => {
                        // A chunk cut short by the end of the file was reported when opening.
                        if !truncated {
                            warnings.push(format!(
                                "{}: the chunk at byte {} is damaged after {} messages ({e}); \
                                 the rest of it is skipped",
                                self.path.display(),
                                span.offset,
                                messages.len()
                            ));
                        }
                        break;
                    }
                };
                match opcode {
                    op::MESSAGE => {
                        let mut f = Fields { buf: body, pos: 0 };
                        let (Some(channel), Some(_seq), Some(log_time), Some(_publish)) =
                            (f.u16(), f.u32(), f.u64(), f.u64())
                        else {
                            continue;
                        };
                        let data_at = at + 9 + f.pos;
                        messages.push(SpanMessage {
                            log_time,
                            channel,
                            data: data_at..at + 9 + body.len(),
                        });
                    }
                    op::SCHEMA | op::CHANNEL => {
                        let _ = self.registry.register(opcode, body, intern);
                    }
                    _ => {}
                }
            }
        }
        // Stable: equal log times keep their order in the file.
        messages.sort_by_key(|m| m.log_time);
        (owned, messages)
    }

    /// Drops the pages of a span the read is done with from this process's memory (the span
    /// decompressed, or its loose messages visited): reading a bag streams through its file
    /// instead of keeping every page it touched resident. The bytes stay in the kernel's page
    /// cache; a later access reads them back.
    pub fn release(&self, span: &Span) {
        let range = match &span.kind {
            SpanKind::Chunk { data, .. } => span.offset..data.end,
            SpanKind::Loose { records } => records.clone(),
        };
        // SAFETY: the map is a read-only shared mapping of a file: MADV_DONTNEED drops page-table
        // entries, and the next access faults the same bytes back in from the file, so memory
        // that any reference points into keeps its contents.
        let _ = unsafe {
            self.map.unchecked_advise_range(
                memmap2::UncheckedAdvice::DontNeed,
                range.start,
                range.len(),
            )
        };
    }

    pub fn channel(&self, id: u16) -> Option<&Arc<Connection>> {
        self.registry.channels.get(&id)
    }
}

/// A chunk's decompressed records (empty for loose records, read from the map), and why
/// decompression stopped early (if it did).
#[derive(Default)]
pub(super) struct Decompressed {
    pub bytes: Vec<u8>,
    pub error: Option<String>,
}

/// A chunk's records, decompressed in one call (the `mcap` crate's streaming decompressor reads
/// zstd at about half the speed). A chunk cut short (`partial`) is decompressed as far as its
/// data goes; `out` then holds what came out before the error.
fn decompress_chunk(
    compression: &str,
    uncompressed_size: u64,
    data: &[u8],
    limit: usize,
    partial: bool,
    out: &mut Vec<u8>,
) -> Result<(), String> {
    use std::io::Read;
    let size = usize::try_from(uncompressed_size)
        .ok()
        .filter(|&n| n <= limit)
        .ok_or_else(|| {
            format!(
                "chunk claims {uncompressed_size} uncompressed bytes, over the {limit}-byte limit"
            )
        })?;
    out.clear();
    match compression {
        "" => out.extend_from_slice(&data[..data.len().min(size)]),
        "zstd" if !partial => {
            out.reserve(size);
            let mut d = zstd::bulk::Decompressor::new().map_err(|e| e.to_string())?;
            d.decompress_to_buffer(data, out)
                .map_err(|e| format!("zstd chunk: {e}"))?;
        }
        "zstd" => {
            let mut d = zstd::stream::read::Decoder::new(data).map_err(|e| e.to_string())?;
            (&mut d)
                .take(size as u64)
                .read_to_end(out)
                .map_err(|e| format!("zstd chunk: {e}"))?;
        }
        "lz4" => {
            let mut d = lz4::Decoder::new(data).map_err(|e| format!("lz4 chunk: {e}"))?;
            (&mut d)
                .take(size as u64 + 1)
                .read_to_end(out)
                .map_err(|e| format!("lz4 chunk: {e}"))?;
        }
        other => return Err(format!("chunk compression {other:?} is not supported")),
    }
    if out.len() != size {
        return Err(format!(
            "chunk decompressed to {} bytes, its header says {size}",
            out.len()
        ));
    }
    Ok(())
}
