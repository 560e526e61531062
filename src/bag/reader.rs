//! Reading rosbag2 bags: a bag directory (`metadata.yaml` naming its MCAP or sqlite3 files, split
//! bags included), a bare `.mcap` file, or a bare `.db3` file. Messages are visited in storage
//! order with their serialized (CDR) bytes. A file that is truncated or corrupt part-way is read up to the damage and
//! reported as a warning; a bag that cannot be opened at all is an error.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum BagError {
    #[error("{path}: {message}")]
    Open { path: String, message: String },
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

fn open_err(path: &Path, message: impl Into<String>) -> BagError {
    BagError::Open {
        path: path.display().to_string(),
        message: message.into(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Storage {
    Mcap,
    Sqlite3,
}

/// A topic with its type, as the bag declares it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Connection {
    /// Unique per (topic, type) within the bag.
    pub id: usize,
    pub topic: String,
    /// `pkg/msg/Type`.
    pub type_name: String,
    /// `cdr` for ROS 2.
    pub encoding: String,
}

/// One stored message.
pub struct BagMessage<'a> {
    pub connection: &'a Connection,
    /// Receive time [ns since the epoch, or since the start for simulated time].
    pub log_time: u64,
    pub data: &'a [u8],
}

/// What a read saw.
#[derive(Debug, Clone, Default)]
pub struct ReadSummary {
    pub messages: u64,
    pub bytes: u64,
    /// Damage found and skipped (file, position, error).
    pub warnings: Vec<String>,
}

/// An opened bag (files checked, nothing read yet).
pub struct BagReader {
    path: PathBuf,
    files: Vec<(PathBuf, Storage)>,
}

#[derive(serde::Deserialize)]
struct MetadataFile {
    rosbag2_bagfile_information: BagMetadata,
}

#[derive(serde::Deserialize)]
struct BagMetadata {
    storage_identifier: String,
    #[serde(default)]
    relative_file_paths: Vec<String>,
    #[serde(default)]
    compression_mode: Option<String>,
    #[serde(default)]
    compression_format: Option<String>,
}

fn storage_of(path: &Path) -> Option<Storage> {
    match path.extension()?.to_str()? {
        "mcap" => Some(Storage::Mcap),
        "db3" => Some(Storage::Sqlite3),
        _ => None,
    }
}

impl BagReader {
    pub fn open(path: &Path) -> Result<Self, BagError> {
        let files = if path.is_dir() {
            let meta_path = path.join("metadata.yaml");
            let files = match std::fs::read_to_string(&meta_path) {
                Ok(text) => {
                    let meta: MetadataFile = serde_yaml::from_str(&text).map_err(|e| {
                        open_err(&meta_path, format!("not a rosbag2 metadata file: {e}"))
                    })?;
                    let m = meta.rosbag2_bagfile_information;
                    let compressed =
                        |v: &Option<String>| v.as_deref().is_some_and(|s| !s.is_empty());
                    if compressed(&m.compression_mode) || compressed(&m.compression_format) {
                        return Err(open_err(
                            &meta_path,
                            "file-level compression (rosbag2 compression_mode) is not supported: \
                             decompress with `ros2 bag decompress`, or record MCAP with chunk \
                             compression (storage preset zstd_fast)",
                        ));
                    }
                    let storage = match m.storage_identifier.as_str() {
                        "mcap" => Storage::Mcap,
                        "sqlite3" => Storage::Sqlite3,
                        other => {
                            return Err(open_err(
                                &meta_path,
                                format!("storage {other:?} is not supported (mcap, sqlite3)"),
                            ));
                        }
                    };
                    m.relative_file_paths
                        .iter()
                        .map(|f| (path.join(f), storage))
                        .collect::<Vec<_>>()
                }
                // No metadata.yaml (e.g. a copied directory): its storage files in name order.
                Err(_) => {
                    let mut files: Vec<_> = std::fs::read_dir(path)
                        .map_err(|source| BagError::Io {
                            path: path.display().to_string(),
                            source,
                        })?
                        .filter_map(|e| e.ok().map(|e| e.path()))
                        .filter_map(|p| storage_of(&p).map(|s| (p, s)))
                        .collect();
                    files.sort();
                    files
                }
            };
            if files.is_empty() {
                return Err(open_err(
                    path,
                    "no .mcap or .db3 files in the bag directory",
                ));
            }
            files
        } else {
            let storage = storage_of(path).ok_or_else(|| {
                open_err(
                    path,
                    "not a bag: expected a bag directory, a .mcap or a .db3 file",
                )
            })?;
            vec![(path.to_owned(), storage)]
        };
        for (f, _) in &files {
            if !f.is_file() {
                return Err(open_err(f, "storage file of the bag is missing"));
            }
        }
        Ok(Self {
            path: path.to_owned(),
            files,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn files(&self) -> &[(PathBuf, Storage)] {
        &self.files
    }

    /// Total size of the storage files [bytes].
    pub fn size(&self) -> u64 {
        self.files
            .iter()
            .filter_map(|(f, _)| std::fs::metadata(f).ok())
            .map(|m| m.len())
            .sum()
    }

    /// The topics the bag declares (from MCAP summaries and sqlite topic tables); None when a
    /// file has no summary (e.g. truncated), so the list may be incomplete.
    pub fn topics(&self) -> Option<Vec<(String, String)>> {
        let mut topics = Vec::new();
        for (file, storage) in &self.files {
            match storage {
                Storage::Mcap => {
                    let map = map_file(file).ok()?;
                    let summary = mcap::Summary::read(&map).ok()??;
                    for c in summary.channels.values() {
                        let ty = c.schema.as_ref().map_or(String::new(), |s| s.name.clone());
                        topics.push((c.topic.clone(), ty));
                    }
                }
                Storage::Sqlite3 => {
                    let db = open_db(file).ok()?;
                    let mut stmt = db.prepare("SELECT name, type FROM topics").ok()?;
                    let rows = stmt
                        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
                        .ok()?;
                    topics.extend(rows.flatten());
                }
            }
        }
        topics.sort();
        topics.dedup();
        Some(topics)
    }

    /// The message definitions the bag embeds, per (topic, type): MCAP schema records, and the
    /// sqlite3 `message_definitions` table of rosbag2 Iron and later (older sqlite bags carry
    /// none). Unreadable summaries give an empty list.
    pub fn definitions(&self) -> Vec<(String, String, String)> {
        let mut out = Vec::new();
        for (file, storage) in &self.files {
            match storage {
                Storage::Mcap => {
                    let Ok(map) = map_file(file) else { continue };
                    let Ok(Some(summary)) = mcap::Summary::read(&map) else {
                        continue;
                    };
                    for c in summary.channels.values() {
                        if let Some(s) = &c.schema {
                            let text = String::from_utf8_lossy(&s.data).into_owned();
                            out.push((c.topic.clone(), s.name.clone(), text));
                        }
                    }
                }
                Storage::Sqlite3 => {
                    let Ok(db) = open_db(file) else { continue };
                    let sql = "SELECT t.name, t.type, d.encoded_message_definition FROM topics t \
                               JOIN message_definitions d ON d.topic_type = t.type";
                    let Ok(mut stmt) = db.prepare(sql) else {
                        continue;
                    };
                    if let Ok(rows) =
                        stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get(1)?, r.get(2)?)))
                    {
                        out.extend(rows.flatten());
                    }
                }
            }
        }
        out.sort();
        out.dedup();
        out
    }

    /// Visits every message in storage order until `visit` breaks. Damage inside a file ends
    /// that file with a warning; the next file is still read.
    pub fn read(
        &self,
        mut visit: impl FnMut(BagMessage<'_>) -> ControlFlow<()>,
    ) -> Result<ReadSummary, BagError> {
        let mut summary = ReadSummary::default();
        let mut connections: HashMap<(String, String, String), Arc<Connection>> = HashMap::new();
        let mut intern = |topic: &str, ty: &str, enc: &str| {
            let key = (topic.to_owned(), ty.to_owned(), enc.to_owned());
            let next = connections.len();
            Arc::clone(connections.entry(key).or_insert_with(|| {
                Arc::new(Connection {
                    id: next,
                    topic: topic.to_owned(),
                    type_name: ty.to_owned(),
                    encoding: enc.to_owned(),
                })
            }))
        };
        for (file, storage) in &self.files {
            let flow = match storage {
                Storage::Mcap => read_mcap(file, &mut intern, &mut visit, &mut summary)?,
                Storage::Sqlite3 => read_sqlite(file, &mut intern, &mut visit, &mut summary)?,
            };
            if flow.is_break() {
                break;
            }
        }
        Ok(summary)
    }
}

fn map_file(path: &Path) -> Result<memmap2::Mmap, BagError> {
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

type Intern<'x> = dyn FnMut(&str, &str, &str) -> Arc<Connection> + 'x;

/// Per-file state of the MCAP record walk.
struct McapWalk<'p> {
    path: &'p Path,
    schemas: HashMap<u16, String>,
    by_channel: HashMap<u16, Arc<Connection>>,
    count: u64,
    /// The damage that ended the fast pass (the rest of the file is skipped; the salvage pass
    /// reports its own).
    damage: Option<String>,
    /// Messages to pass over (already visited by the fast pass).
    skip: u64,
    /// Chunks read but not yet decompressed and walked (fast pass).
    pending: Vec<(mcap::records::ChunkHeader, Vec<u8>)>,
    /// Decompression buffers, one per pending chunk, reused.
    scratch: Vec<Vec<u8>>,
    /// Largest decompressed chunk accepted.
    limit: usize,
}

impl<'p> McapWalk<'p> {
    fn new(path: &'p Path, limit: usize, skip: u64) -> Self {
        Self {
            path,
            schemas: HashMap::new(),
            by_channel: HashMap::new(),
            count: 0,
            damage: None,
            skip,
            pending: Vec::new(),
            scratch: Vec::new(),
            limit,
        }
    }

    /// Decompresses the pending chunks in parallel, then visits their records in order. A
    /// damaged chunk ends the file after the records of the chunks before it.
    fn flush(
        &mut self,
        intern: &mut Intern<'_>,
        visit: &mut dyn FnMut(BagMessage<'_>) -> ControlFlow<()>,
        summary: &mut ReadSummary,
    ) -> ControlFlow<()> {
        use rayon::prelude::*;
        if self.pending.is_empty() {
            return ControlFlow::Continue(());
        }
        let n = self.pending.len();
        self.scratch
            .resize_with(n.max(self.scratch.len()), Vec::new);
        let limit = self.limit;
        let results: Vec<Result<(), String>> = self
            .pending
            .par_iter()
            .zip(self.scratch.par_iter_mut())
            .map(|((header, data), buf)| decompress_chunk(header, data, limit, buf))
            .collect();
        self.pending.clear();
        let scratch = std::mem::take(&mut self.scratch);
        let mut flow = ControlFlow::Continue(());
        'chunks: for (result, buf) in results.into_iter().zip(&scratch).take(n) {
            if let Err(e) = result {
                self.damage = Some(self.damaged(&e));
                break;
            }
            for item in chunk_records(buf) {
                match item
                    .and_then(|(op, body)| mcap::parse_record(op, body).map_err(|e| e.to_string()))
                {
                    Ok(r) => {
                        if self.record(r, intern, visit, summary).is_break() {
                            flow = ControlFlow::Break(());
                            break 'chunks;
                        }
                    }
                    Err(e) => {
                        self.damage = Some(self.damaged(&e));
                        break 'chunks;
                    }
                }
            }
        }
        self.scratch = scratch;
        flow
    }

    fn damaged(&self, e: &dyn std::fmt::Display) -> String {
        format!(
            "{}: damaged after {} messages ({e}); the rest of this file is skipped",
            self.path.display(),
            self.count
        )
    }

    /// One schema, channel or message record; Err(warning) ends the file.
    fn record(
        &mut self,
        record: mcap::records::Record<'_>,
        intern: &mut Intern<'_>,
        visit: &mut dyn FnMut(BagMessage<'_>) -> ControlFlow<()>,
        summary: &mut ReadSummary,
    ) -> ControlFlow<()> {
        use mcap::records::Record;
        match record {
            Record::Schema { header, .. } => {
                self.schemas.insert(header.id, header.name);
            }
            Record::Channel(c) => {
                let ty = self.schemas.get(&c.schema_id).map_or("", String::as_str);
                self.by_channel
                    .insert(c.id, intern(&c.topic, ty, &c.message_encoding));
            }
            Record::Message { header, data } => {
                let Some(connection) = self.by_channel.get(&header.channel_id) else {
                    summary.warnings.push(format!(
                        "{}: message {} names unknown channel {}; skipped",
                        self.path.display(),
                        self.count,
                        header.channel_id
                    ));
                    return ControlFlow::Continue(());
                };
                self.count += 1;
                if self.skip > 0 {
                    self.skip -= 1;
                    return ControlFlow::Continue(());
                }
                summary.messages += 1;
                summary.bytes += data.len() as u64;
                return visit(BagMessage {
                    connection,
                    log_time: header.log_time,
                    data: &data,
                });
            }
            _ => {}
        }
        ControlFlow::Continue(())
    }
}

/// A chunk's records, decompressed in one call (the `mcap` crate's streaming decompressor
/// reads zstd at about half the speed).
fn decompress_chunk(
    header: &mcap::records::ChunkHeader,
    data: &[u8],
    limit: usize,
    scratch: &mut Vec<u8>,
) -> Result<(), String> {
    {
        let size = usize::try_from(header.uncompressed_size)
            .ok()
            .filter(|&n| n <= limit)
            .ok_or_else(|| {
                format!(
                    "chunk claims {} uncompressed bytes, over the {limit}-byte limit",
                    header.uncompressed_size
                )
            })?;
        scratch.clear();
        match header.compression.as_str() {
            "" => scratch.extend_from_slice(data),
            "zstd" => {
                scratch.reserve(size);
                let mut d = zstd::bulk::Decompressor::new().map_err(|e| e.to_string())?;
                d.decompress_to_buffer(data, scratch)
                    .map_err(|e| format!("zstd chunk: {e}"))?;
            }
            "lz4" => {
                use std::io::Read;
                let mut d = lz4::Decoder::new(data).map_err(|e| format!("lz4 chunk: {e}"))?;
                (&mut d)
                    .take(size as u64 + 1)
                    .read_to_end(scratch)
                    .map_err(|e| format!("lz4 chunk: {e}"))?;
            }
            other => return Err(format!("chunk compression {other:?} is not supported")),
        }
        if scratch.len() != size {
            return Err(format!(
                "chunk decompressed to {} bytes, its header says {size}",
                scratch.len()
            ));
        }
        Ok(())
    }
}

/// Splits a chunk's records: opcode (u8), length (u64 LE), body.
fn chunk_records(buf: &[u8]) -> impl Iterator<Item = Result<(u8, &[u8]), String>> {
    let mut pos = 0usize;
    std::iter::from_fn(move || {
        if pos >= buf.len() {
            return None;
        }
        let head = buf.get(pos..pos + 9);
        let Some(head) = head else {
            pos = buf.len();
            return Some(Err("truncated record header in a chunk".into()));
        };
        let len = u64::from_le_bytes(head[1..9].try_into().unwrap_or([0xff; 8]));
        let start = pos + 9;
        let end = usize::try_from(len)
            .ok()
            .and_then(|l| start.checked_add(l))
            .filter(|&e| e <= buf.len());
        match end {
            Some(end) => {
                pos = end;
                Some(Ok((head[0], &buf[start..end])))
            }
            None => {
                pos = buf.len();
                Some(Err(format!(
                    "chunk record of {len} bytes overruns its chunk"
                )))
            }
        }
    })
}

/// The largest record (or decompressed chunk) accepted from a file of `len` bytes: a damaged
/// chunk header claiming terabytes must be an error, not an allocation that aborts the process.
fn record_limit(len: usize) -> usize {
    len.saturating_mul(64).clamp(64 << 20, 4 << 30)
}

fn read_mcap(
    path: &Path,
    intern: &mut Intern<'_>,
    visit: &mut dyn FnMut(BagMessage<'_>) -> ControlFlow<()>,
    summary: &mut ReadSummary,
) -> Result<ControlFlow<()>, BagError> {
    use mcap::records::Record;
    use mcap::sans_io::{LinearReadEvent, LinearReader, LinearReaderOptions};
    let map = map_file(path)?;
    if map.len() < 8 || &map[..8] != mcap::MAGIC {
        return Err(open_err(
            path,
            "not an MCAP file (no MCAP magic at the start)",
        ));
    }
    let mut walk = McapWalk::new(path, record_limit(map.len()), 0);
    let mut reader = LinearReader::new_with_options(
        LinearReaderOptions::default()
            .with_skip_end_magic(true)
            .with_emit_chunks(true)
            .with_record_length_limit(walk.limit),
    );
    let mut rest: &[u8] = &map;
    let batch = 2 * rayon::current_num_threads();
    while let Some(event) = reader.next_event() {
        let record = match event {
            Ok(LinearReadEvent::ReadRequest(need)) => {
                let n = need.min(rest.len());
                reader.insert(n).copy_from_slice(&rest[..n]);
                reader.notify_read(n);
                rest = &rest[n..];
                continue;
            }
            Ok(LinearReadEvent::Record { opcode, data }) => mcap::parse_record(opcode, data),
            Err(e) => Err(e),
        };
        // Chunks are decompressed in parallel batches and walked in order; anything else
        // (damage, the end of the data, a record outside chunks) first walks the batch.
        let chunk = matches!(record, Ok(Record::Chunk { .. }));
        if !chunk || walk.pending.len() >= batch {
            let flow = walk.flush(intern, visit, summary);
            if flow.is_break() || walk.damage.is_some() {
                return salvage(path, walk, flow, intern, visit, summary);
            }
        }
        match record {
            Ok(Record::Chunk { header, data }) => walk.pending.push((header, data.into_owned())),
            Ok(Record::DataEnd(_) | Record::Footer(_)) => break,
            Ok(other) => {
                if walk.record(other, intern, visit, summary).is_break() {
                    return Ok(ControlFlow::Break(()));
                }
            }
            Err(e) => {
                walk.damage = Some(walk.damaged(&e));
                return salvage(
                    path,
                    walk,
                    ControlFlow::Continue(()),
                    intern,
                    visit,
                    summary,
                );
            }
        }
    }
    let flow = walk.flush(intern, visit, summary);
    salvage(path, walk, flow, intern, visit, summary)
}

/// After damage in the fast pass: reads the file again with the streaming reader, which also
/// yields the records of a chunk cut short, passing over the messages already visited.
fn salvage(
    path: &Path,
    fast: McapWalk<'_>,
    flow: ControlFlow<()>,
    intern: &mut Intern<'_>,
    visit: &mut dyn FnMut(BagMessage<'_>) -> ControlFlow<()>,
    summary: &mut ReadSummary,
) -> Result<ControlFlow<()>, BagError> {
    let Some(damage) = fast.damage else {
        return Ok(flow);
    };
    if flow.is_break() {
        return Ok(flow);
    }
    use mcap::sans_io::{LinearReadEvent, LinearReader, LinearReaderOptions};
    let map = map_file(path)?;
    let mut reader = LinearReader::new_with_options(
        LinearReaderOptions::default()
            .with_skip_end_magic(true)
            .with_record_length_limit(record_limit(map.len())),
    );
    let mut walk = McapWalk::new(path, record_limit(map.len()), fast.count);
    let mut rest: &[u8] = &map;
    while let Some(event) = reader.next_event() {
        let record = match event {
            Ok(LinearReadEvent::ReadRequest(need)) => {
                let n = need.min(rest.len());
                reader.insert(n).copy_from_slice(&rest[..n]);
                reader.notify_read(n);
                rest = &rest[n..];
                continue;
            }
            Ok(LinearReadEvent::Record { opcode, data }) => mcap::parse_record(opcode, data),
            Err(e) => Err(e),
        };
        match record {
            Ok(mcap::records::Record::DataEnd(_) | mcap::records::Record::Footer(_)) => break,
            Ok(r) => {
                if walk.record(r, intern, visit, summary).is_break() {
                    return Ok(ControlFlow::Break(()));
                }
            }
            Err(e) => {
                summary.warnings.push(walk.damaged(&e));
                return Ok(ControlFlow::Continue(()));
            }
        }
    }
    // The streaming reader got past what stopped the fast one: report the first damage.
    summary.warnings.push(damage);
    Ok(ControlFlow::Continue(()))
}

fn open_db(path: &Path) -> Result<rusqlite::Connection, BagError> {
    let db = rusqlite::Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| open_err(path, format!("cannot open as sqlite3: {e}")))?;
    Ok(db)
}

fn read_sqlite(
    path: &Path,
    intern: &mut Intern<'_>,
    visit: &mut dyn FnMut(BagMessage<'_>) -> ControlFlow<()>,
    summary: &mut ReadSummary,
) -> Result<ControlFlow<()>, BagError> {
    let db = open_db(path)?;
    let bad = |e: rusqlite::Error| open_err(path, format!("not a rosbag2 sqlite3 file: {e}"));
    let mut topics: HashMap<i64, Arc<Connection>> = HashMap::new();
    {
        let mut stmt = db
            .prepare("SELECT id, name, type, serialization_format FROM topics")
            .map_err(bad)?;
        let mut rows = stmt.query([]).map_err(bad)?;
        while let Some(row) = rows.next().map_err(bad)? {
            let id: i64 = row.get(0).map_err(bad)?;
            let name: String = row.get(1).map_err(bad)?;
            let ty: String = row.get(2).map_err(bad)?;
            let enc: String = row.get(3).map_err(bad)?;
            topics.insert(id, intern(&name, &ty, &enc));
        }
    }
    let mut stmt = db
        .prepare("SELECT topic_id, timestamp, data FROM messages ORDER BY timestamp, id")
        .map_err(bad)?;
    let mut rows = stmt.query([]).map_err(bad)?;
    let mut count = 0u64;
    loop {
        let row = match rows.next() {
            Ok(Some(row)) => row,
            Ok(None) => break,
            Err(e) => {
                summary.warnings.push(format!(
                    "{}: damaged after {count} messages ({e}); the rest of this file is skipped",
                    path.display()
                ));
                break;
            }
        };
        let fields = (|| -> rusqlite::Result<(i64, i64, &[u8])> {
            Ok((row.get(0)?, row.get(1)?, row.get_ref(2)?.as_blob()?))
        })();
        let (topic_id, timestamp, data) = match fields {
            Ok(f) => f,
            Err(e) => {
                summary
                    .warnings
                    .push(format!("{}: message {count}: {e}; skipped", path.display()));
                continue;
            }
        };
        let Some(connection) = topics.get(&topic_id) else {
            summary.warnings.push(format!(
                "{}: message {count} names unknown topic id {topic_id}; skipped",
                path.display()
            ));
            continue;
        };
        count += 1;
        summary.messages += 1;
        summary.bytes += data.len() as u64;
        let flow = visit(BagMessage {
            connection,
            log_time: u64::try_from(timestamp).unwrap_or(0),
            data,
        });
        if flow.is_break() {
            return Ok(flow);
        }
    }
    Ok(ControlFlow::Continue(()))
}
