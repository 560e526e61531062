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
    let mut reader = LinearReader::new_with_options(
        LinearReaderOptions::default()
            .with_skip_end_magic(true)
            .with_record_length_limit(record_limit(map.len())),
    );
    let mut rest: &[u8] = &map;
    let mut schemas: HashMap<u16, String> = HashMap::new();
    let mut by_channel: HashMap<u16, Arc<Connection>> = HashMap::new();
    let mut count = 0u64;
    let damaged = |count: u64, e: &dyn std::fmt::Display| {
        format!(
            "{}: damaged after {count} messages ({e}); the rest of this file is skipped",
            path.display()
        )
    };
    while let Some(event) = reader.next_event() {
        let (opcode, data) = match event {
            Ok(LinearReadEvent::ReadRequest(need)) => {
                let n = need.min(rest.len());
                reader.insert(n).copy_from_slice(&rest[..n]);
                reader.notify_read(n);
                rest = &rest[n..];
                continue;
            }
            Ok(LinearReadEvent::Record { opcode, data }) => (opcode, data),
            Err(e) => {
                summary.warnings.push(damaged(count, &e));
                break;
            }
        };
        let record = match mcap::parse_record(opcode, data) {
            Ok(r) => r,
            Err(e) => {
                summary.warnings.push(damaged(count, &e));
                break;
            }
        };
        match record {
            Record::Schema { header, .. } => {
                schemas.insert(header.id, header.name);
            }
            Record::Channel(c) => {
                let ty = schemas.get(&c.schema_id).map_or("", String::as_str);
                by_channel.insert(c.id, intern(&c.topic, ty, &c.message_encoding));
            }
            Record::Message { header, data } => {
                let Some(connection) = by_channel.get(&header.channel_id) else {
                    summary.warnings.push(format!(
                        "{}: message {count} names unknown channel {}; skipped",
                        path.display(),
                        header.channel_id
                    ));
                    continue;
                };
                count += 1;
                summary.messages += 1;
                summary.bytes += data.len() as u64;
                let flow = visit(BagMessage {
                    connection,
                    log_time: header.log_time,
                    data: &data,
                });
                if flow.is_break() {
                    return Ok(flow);
                }
            }
            Record::DataEnd(_) | Record::Footer(_) => break,
            _ => {}
        }
    }
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
