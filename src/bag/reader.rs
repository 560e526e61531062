//! Reading rosbag2 bags: a bag directory (`metadata.yaml` naming its MCAP or sqlite3 files, split
//! bags included), a bare `.mcap` file, or a bare `.db3` file. Messages are visited in log-time
//! order, across chunks and split files, as rosbag2 plays them, with their serialized (CDR)
//! bytes. A file that is truncated or corrupt part-way is read up to the damage and reported as
//! a warning; a bag that cannot be opened at all is an error.

use super::mcap_file::{Decompressed, Intern, McapFile, SpanMessage, map_file};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
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
    /// The most decompressed chunk data held at once [bytes]: the read's memory, which
    /// depends on how chunks overlap in time, not on the bag's size.
    pub peak_buffered_bytes: u64,
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

    /// Visits every message in log-time order, across chunks and files (as rosbag2 plays a
    /// bag), until `visit` breaks. Equal times keep the order of the files and of storage.
    /// Memory holds the chunks whose time ranges overlap the current time, plus a few
    /// decompressed ahead, not the bag. Damage inside a file is a warning; the rest is read.
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
        // Every file is opened before the first message: one that cannot be read at all is an
        // error, not a replay that stops half-way.
        let mut mcaps = Vec::new();
        let mut sqlites = Vec::new();
        for (rank, (file, storage)) in self.files.iter().enumerate() {
            match storage {
                Storage::Mcap => {
                    let mut f = McapFile::open(file, &mut intern)?;
                    summary.warnings.append(&mut f.warnings);
                    mcaps.push((rank, f));
                }
                Storage::Sqlite3 => sqlites.push((rank, SqliteFile::open(file, &mut intern)?)),
            }
        }
        std::thread::scope(|scope| {
            let streams = sqlites
                .into_iter()
                .map(|(rank, f)| f.stream(rank, scope))
                .collect();
            Merge::new(mcaps, streams).run(&mut intern, &mut visit, &mut summary);
        });
        Ok(summary)
    }
}

fn open_db(path: &Path) -> Result<rusqlite::Connection, BagError> {
    let db = rusqlite::Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| open_err(path, format!("cannot open as sqlite3: {e}")))?;
    Ok(db)
}

/// A rosbag2 sqlite3 file: its topics, and its messages in (timestamp, id) order.
struct SqliteFile {
    path: PathBuf,
    db: rusqlite::Connection,
    topics: HashMap<i64, Arc<Connection>>,
}

/// One row of a sqlite3 file's messages, or the damage that ended them.
enum SqlItem {
    Row {
        topic_id: i64,
        timestamp: i64,
        data: Vec<u8>,
    },
    Damaged(String),
}

/// A rosbag2 sqlite3 file's messages in log-time order (ties in insertion order).
const MESSAGES_IN_TIME_ORDER: &str =
    "SELECT topic_id, timestamp, data FROM messages ORDER BY timestamp, id";

/// Rows in flight from a file's reader thread (a few frames at most).
const SQL_QUEUE: usize = 16;

impl SqliteFile {
    fn open(path: &Path, intern: &mut Intern<'_>) -> Result<Self, BagError> {
        let db = open_db(path)?;
        let bad = |e: rusqlite::Error| open_err(path, format!("not a rosbag2 sqlite3 file: {e}"));
        let mut topics = HashMap::new();
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
        // The query is prepared here so that a file without a messages table is an error now.
        db.prepare(MESSAGES_IN_TIME_ORDER).map_err(bad)?;
        Ok(Self {
            path: path.to_owned(),
            db,
            topics,
        })
    }

    /// The file's messages, read on a thread of `scope` (a statement borrows its connection, so
    /// it stays on one thread), through a short queue: the merge pulls rows as it needs them.
    fn stream<'s>(self, rank: usize, scope: &'s std::thread::Scope<'s, '_>) -> SqlStream {
        let (tx, rx) = std::sync::mpsc::sync_channel(SQL_QUEUE);
        let Self { path, db, topics } = self;
        let display = path.display().to_string();
        scope.spawn(move || {
            let result = (|| -> Result<(), (u64, rusqlite::Error)> {
                let mut stmt = db.prepare(MESSAGES_IN_TIME_ORDER).map_err(|e| (0, e))?;
                let mut rows = stmt.query([]).map_err(|e| (0, e))?;
                let mut count = 0u64;
                while let Some(row) = rows.next().map_err(|e| (count, e))? {
                    let item = match (|| -> rusqlite::Result<SqlItem> {
                        Ok(SqlItem::Row {
                            topic_id: row.get(0)?,
                            timestamp: row.get(1)?,
                            data: row.get_ref(2)?.as_blob()?.to_vec(),
                        })
                    })() {
                        Ok(item) => item,
                        Err(e) => {
                            SqlItem::Damaged(format!("{display}: message {count}: {e}; skipped"))
                        }
                    };
                    count += 1;
                    if tx.send(item).is_err() {
                        return Ok(()); // the reader stopped
                    }
                }
                Ok(())
            })();
            if let Err((count, e)) = result {
                let _ = tx.send(SqlItem::Damaged(format!(
                    "{display}: damaged after {count} messages ({e}); the rest of this file is \
                     skipped"
                )));
            }
        });
        SqlStream {
            rank,
            path,
            rx,
            topics,
            head: None,
            count: 0,
        }
    }
}

struct SqlStream {
    rank: usize,
    path: PathBuf,
    rx: std::sync::mpsc::Receiver<SqlItem>,
    topics: HashMap<i64, Arc<Connection>>,
    /// The next message: (time, connection, data).
    head: Option<(u64, Arc<Connection>, Vec<u8>)>,
    count: usize,
}

impl SqlStream {
    /// Pulls the next message into `head`, passing damage and unknown topics to `warnings`.
    fn advance(&mut self, warnings: &mut Vec<String>) {
        self.head = None;
        while let Ok(item) = self.rx.recv() {
            match item {
                SqlItem::Row {
                    topic_id,
                    timestamp,
                    data,
                } => {
                    let Some(connection) = self.topics.get(&topic_id) else {
                        warnings.push(format!(
                            "{}: message {} names unknown topic id {topic_id}; skipped",
                            self.path.display(),
                            self.count
                        ));
                        self.count += 1;
                        continue;
                    };
                    self.count += 1;
                    let t = u64::try_from(timestamp).unwrap_or(0);
                    self.head = Some((t, Arc::clone(connection), data));
                    return;
                }
                SqlItem::Damaged(w) => warnings.push(w),
            }
        }
    }
}

/// Where a message waits in the merge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Source {
    /// MCAP file (index into the merge's files), span, message index in the loaded span.
    Mcap(usize, usize, usize),
    /// sqlite3 stream (index into the merge's streams).
    Sql(usize),
}

/// The heap's order: log time, then the file's place in the bag, then storage order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    time: u64,
    rank: usize,
    span: usize,
    index: usize,
    source: Source,
}

/// A loaded span: its bytes (decompressed; empty for loose records, read from the map) and
/// its messages sorted by time.
struct Loaded {
    bytes: Vec<u8>,
    messages: Vec<SpanMessage>,
}

/// The k-way merge of every file's messages by log time (see [`BagReader::read`]).
struct Merge {
    files: Vec<(usize, McapFile)>,
    /// Every MCAP span as (file, span), by start time, then file rank, then storage order.
    order: Vec<(usize, usize)>,
    next: usize,
    /// Spans decompressed ahead of their turn (in parallel).
    ready: HashMap<(usize, usize), Decompressed>,
    loaded: HashMap<(usize, usize), Loaded>,
    streams: Vec<SqlStream>,
    heap: BinaryHeap<Reverse<Key>>,
    buffered: usize,
}

impl Merge {
    fn new(files: Vec<(usize, McapFile)>, streams: Vec<SqlStream>) -> Self {
        let mut order: Vec<(usize, usize)> = files
            .iter()
            .enumerate()
            .flat_map(|(f, (_, file))| (0..file.spans.len()).map(move |s| (f, s)))
            .collect();
        order.sort_by_key(|&(f, s)| (files[f].1.spans[s].start, files[f].0, s));
        Self {
            files,
            order,
            next: 0,
            ready: HashMap::new(),
            loaded: HashMap::new(),
            streams,
            heap: BinaryHeap::new(),
            buffered: 0,
        }
    }

    fn run(
        &mut self,
        intern: &mut Intern<'_>,
        visit: &mut dyn FnMut(BagMessage<'_>) -> ControlFlow<()>,
        summary: &mut ReadSummary,
    ) {
        for k in 0..self.streams.len() {
            self.pull_sql(k, &mut summary.warnings);
        }
        loop {
            // Load every span that may hold a message as early as the earliest one waiting.
            while let Some(&(f, s)) = self.order.get(self.next) {
                let start = self.files[f].1.spans[s].start;
                if self.heap.peek().is_some_and(|Reverse(k)| k.time < start) {
                    break;
                }
                self.next += 1;
                self.load(f, s, intern, summary);
            }
            let Some(Reverse(key)) = self.heap.pop() else {
                break;
            };
            let flow = match key.source {
                Source::Mcap(f, s, i) => self.visit_mcap(f, s, i, visit, summary),
                Source::Sql(k) => {
                    let flow = match &self.streams[k].head {
                        Some((time, connection, data)) => {
                            summary.messages += 1;
                            summary.bytes += data.len() as u64;
                            visit(BagMessage {
                                connection,
                                log_time: *time,
                                data,
                            })
                        }
                        None => ControlFlow::Continue(()),
                    };
                    self.pull_sql(k, &mut summary.warnings);
                    flow
                }
            };
            if flow.is_break() {
                return;
            }
        }
    }

    fn pull_sql(&mut self, k: usize, warnings: &mut Vec<String>) {
        let stream = &mut self.streams[k];
        stream.advance(warnings);
        if let Some((time, _, _)) = &stream.head {
            self.heap.push(Reverse(Key {
                time: *time,
                rank: stream.rank,
                span: 0,
                index: stream.count,
                source: Source::Sql(k),
            }));
        }
    }

    fn visit_mcap(
        &mut self,
        f: usize,
        s: usize,
        i: usize,
        visit: &mut dyn FnMut(BagMessage<'_>) -> ControlFlow<()>,
        summary: &mut ReadSummary,
    ) -> ControlFlow<()> {
        let (rank, file) = &self.files[f];
        let Some(loaded) = self.loaded.get(&(f, s)) else {
            return ControlFlow::Continue(());
        };
        let m = &loaded.messages[i];
        let flow = match file.channel(m.channel) {
            Some(connection) => {
                let span = &file.spans[s];
                let data = file
                    .span_bytes(span, &loaded.bytes)
                    .get(m.data.clone())
                    .unwrap_or_default();
                summary.messages += 1;
                summary.bytes += data.len() as u64;
                visit(BagMessage {
                    connection,
                    log_time: m.log_time,
                    data,
                })
            }
            None => {
                summary.warnings.push(format!(
                    "{}: a message at {} ns names unknown channel {}; skipped",
                    file.path.display(),
                    m.log_time,
                    m.channel
                ));
                ControlFlow::Continue(())
            }
        };
        if let Some(next) = loaded.messages.get(i + 1) {
            self.heap.push(Reverse(Key {
                time: next.log_time,
                rank: *rank,
                span: s,
                index: i + 1,
                source: Source::Mcap(f, s, i + 1),
            }));
        } else if let Some(done) = self.loaded.remove(&(f, s)) {
            self.buffered -= done.bytes.len();
            let span = &file.spans[s];
            if !span.compressed() {
                file.release(span); // loose records are read from the map until now
            }
        }
        flow
    }

    /// Loads a span (decompressing it, and the next few in parallel, unless done already).
    fn load(&mut self, f: usize, s: usize, intern: &mut Intern<'_>, summary: &mut ReadSummary) {
        use rayon::prelude::*;
        if self.files[f].1.spans[s].compressed() && !self.ready.contains_key(&(f, s)) {
            let batch = 2 * rayon::current_num_threads();
            let ahead: Vec<(usize, usize)> = std::iter::once((f, s))
                .chain(self.order[self.next..].iter().copied())
                .filter(|&(g, t)| {
                    self.files[g].1.spans[t].compressed() && !self.ready.contains_key(&(g, t))
                })
                .take(batch)
                .collect();
            let files = &self.files;
            let decoded: Vec<Decompressed> = ahead
                .par_iter()
                .map(|&(g, t)| files[g].1.decompress(&files[g].1.spans[t]))
                .collect();
            for (key, d) in ahead.into_iter().zip(decoded) {
                self.buffered += d.bytes.len();
                self.ready.insert(key, d);
            }
            summary.peak_buffered_bytes = summary.peak_buffered_bytes.max(self.buffered as u64);
        }
        let decompressed = self.ready.remove(&(f, s)).unwrap_or_default();
        let held = decompressed.bytes.len();
        let (rank, file) = &mut self.files[f];
        let span = file.spans[s].clone();
        let (bytes, messages) = file.load(&span, decompressed, intern, &mut summary.warnings);
        if span.compressed() {
            file.release(&span); // its records live in `bytes` now
        }
        self.buffered = self.buffered - held + bytes.len();
        if let Some(first) = messages.first() {
            self.heap.push(Reverse(Key {
                time: first.log_time,
                rank: *rank,
                span: s,
                index: 0,
                source: Source::Mcap(f, s, 0),
            }));
            self.loaded.insert((f, s), Loaded { bytes, messages });
        } else {
            self.buffered -= bytes.len();
        }
    }
}
