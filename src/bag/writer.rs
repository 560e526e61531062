//! Writing rosbag2 MCAP: profile `ros2`, one `ros2msg` schema per type (with its dependencies'
//! definitions), `cdr` channels carrying `offered_qos_profiles` and `topic_type_hash` metadata,
//! zstd-compressed chunks, the `rosbag2` metadata record, and `metadata.yaml` when the output is
//! a bag directory (any path not ending in `.mcap`).

use super::msgs::{RosMessage, encode, schema_text};
use std::collections::BTreeMap;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("{path}: {message}")]
    Bag { path: String, message: String },
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

struct Topic {
    channel: u16,
    type_name: String,
    count: u64,
}

pub struct BagWriter {
    dir: Option<PathBuf>,
    file: PathBuf,
    mcap: mcap::Writer<BufWriter<std::fs::File>>,
    schemas: BTreeMap<String, u16>,
    topics: BTreeMap<String, Topic>,
    start: Option<u64>,
    end: u64,
    count: u64,
}

#[derive(serde::Serialize)]
struct MetadataFile<'a> {
    rosbag2_bagfile_information: Metadata<'a>,
}

#[derive(serde::Serialize)]
struct Nanos {
    nanoseconds: u64,
}

#[derive(serde::Serialize)]
struct Since {
    nanoseconds_since_epoch: u64,
}

#[derive(serde::Serialize)]
struct TopicMetadata<'a> {
    name: &'a str,
    #[serde(rename = "type")]
    type_name: &'a str,
    serialization_format: &'a str,
    offered_qos_profiles: Vec<()>,
    type_description_hash: &'a str,
}

#[derive(serde::Serialize)]
struct TopicCount<'a> {
    topic_metadata: TopicMetadata<'a>,
    message_count: u64,
}

#[derive(serde::Serialize)]
struct FileInfo<'a> {
    path: &'a str,
    starting_time: Since,
    duration: Nanos,
    message_count: u64,
}

#[derive(serde::Serialize)]
struct Metadata<'a> {
    version: u32,
    storage_identifier: &'a str,
    duration: Nanos,
    starting_time: Since,
    message_count: u64,
    topics_with_message_count: Vec<TopicCount<'a>>,
    compression_format: &'a str,
    compression_mode: &'a str,
    relative_file_paths: Vec<&'a str>,
    files: Vec<FileInfo<'a>>,
    custom_data: BTreeMap<String, String>,
    ros_distro: &'a str,
}

impl BagWriter {
    /// Creates `path`: a bare MCAP file when it ends in `.mcap`, else a bag directory (which must
    /// not exist yet, or be empty) holding `<name>_0.mcap` and `metadata.yaml`.
    pub fn create(path: &Path) -> Result<Self, WriteError> {
        Self::create_with(path, true)
    }

    /// [`BagWriter::create`], choosing whether chunks are zstd-compressed.
    pub fn create_with(path: &Path, zstd: bool) -> Result<Self, WriteError> {
        let err = |message: String| WriteError::Bag {
            path: path.display().to_string(),
            message,
        };
        let io = |source| WriteError::Io {
            path: path.display().to_string(),
            source,
        };
        let (dir, file) = if path.extension().is_some_and(|e| e == "mcap") {
            (None, path.to_owned())
        } else {
            if path.exists() && std::fs::read_dir(path).map_err(io)?.next().is_some() {
                return Err(err(
                    "exists and is not empty: choose a new output path (or end it in .mcap)".into(),
                ));
            }
            std::fs::create_dir_all(path).map_err(io)?;
            let name = path
                .file_name()
                .map_or("bag".into(), |n| n.to_string_lossy().into_owned());
            (Some(path.to_owned()), path.join(format!("{name}_0.mcap")))
        };
        let f = std::fs::File::create(&file).map_err(io)?;
        let mcap = mcap::WriteOptions::new()
            .profile("ros2")
            .library(concat!("bitvla_ros-", env!("CARGO_PKG_VERSION")))
            .compression(zstd.then_some(mcap::Compression::Zstd))
            .create(BufWriter::new(f))
            .map_err(|e| err(e.to_string()))?;
        Ok(Self {
            dir,
            file,
            mcap,
            schemas: BTreeMap::new(),
            topics: BTreeMap::new(),
            start: None,
            end: 0,
            count: 0,
        })
    }

    fn err(&self, e: impl std::fmt::Display) -> WriteError {
        WriteError::Bag {
            path: self.file.display().to_string(),
            message: e.to_string(),
        }
    }

    /// Writes serialized bytes on `topic` (declared with `type_name` on first use; one type per
    /// topic), received at `log_time` [ns].
    pub fn write_raw(
        &mut self,
        topic: &str,
        type_name: &str,
        log_time: u64,
        data: &[u8],
    ) -> Result<(), WriteError> {
        let channel = match self.topics.get_mut(topic) {
            Some(t) if t.type_name == type_name => {
                t.count += 1;
                t.channel
            }
            Some(t) => {
                let message = format!(
                    "topic {topic} was declared as {} and cannot also carry {type_name}",
                    t.type_name
                );
                return Err(self.err(message));
            }
            None => {
                let schema = match self.schemas.get(type_name) {
                    Some(&id) => id,
                    None => {
                        let text = schema_text(type_name).ok_or_else(|| {
                            self.err(format!("no message definition for {type_name}"))
                        })?;
                        let id = self
                            .mcap
                            .add_schema(type_name, "ros2msg", text.as_bytes())
                            .map_err(|e| self.err(e))?;
                        self.schemas.insert(type_name.to_owned(), id);
                        id
                    }
                };
                let metadata = BTreeMap::from([
                    ("offered_qos_profiles".to_owned(), "[]".to_owned()),
                    ("topic_type_hash".to_owned(), String::new()),
                ]);
                let channel = self
                    .mcap
                    .add_channel(schema, topic, "cdr", &metadata)
                    .map_err(|e| self.err(e))?;
                self.topics.insert(
                    topic.to_owned(),
                    Topic {
                        channel,
                        type_name: type_name.to_owned(),
                        count: 1,
                    },
                );
                channel
            }
        };
        self.mcap
            .write_to_known_channel(
                &mcap::records::MessageHeader {
                    channel_id: channel,
                    sequence: u32::try_from(self.count).unwrap_or(u32::MAX),
                    log_time,
                    publish_time: log_time,
                },
                data,
            )
            .map_err(|e| self.err(e))?;
        self.start = Some(self.start.map_or(log_time, |s| s.min(log_time)));
        self.end = self.end.max(log_time);
        self.count += 1;
        Ok(())
    }

    /// Serializes and writes a message.
    pub fn write<'a, M: RosMessage<'a>>(
        &mut self,
        topic: &str,
        log_time: u64,
        message: &M,
    ) -> Result<(), WriteError> {
        self.write_raw(topic, M::TYPE, log_time, &encode(message))
    }

    /// Messages written so far.
    pub fn count(&self) -> u64 {
        self.count
    }

    fn metadata_yaml(&self) -> Result<String, WriteError> {
        let file_name = self
            .file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let start = self.start.unwrap_or(0);
        let duration = self.end.saturating_sub(start);
        let meta = MetadataFile {
            rosbag2_bagfile_information: Metadata {
                version: 9,
                storage_identifier: "mcap",
                duration: Nanos {
                    nanoseconds: duration,
                },
                starting_time: Since {
                    nanoseconds_since_epoch: start,
                },
                message_count: self.count,
                topics_with_message_count: self
                    .topics
                    .iter()
                    .map(|(name, t)| TopicCount {
                        topic_metadata: TopicMetadata {
                            name,
                            type_name: &t.type_name,
                            serialization_format: "cdr",
                            offered_qos_profiles: Vec::new(),
                            type_description_hash: "",
                        },
                        message_count: t.count,
                    })
                    .collect(),
                compression_format: "",
                compression_mode: "",
                relative_file_paths: vec![&file_name],
                files: vec![FileInfo {
                    path: &file_name,
                    starting_time: Since {
                        nanoseconds_since_epoch: start,
                    },
                    duration: Nanos {
                        nanoseconds: duration,
                    },
                    message_count: self.count,
                }],
                custom_data: BTreeMap::new(),
                ros_distro: "jazzy",
            },
        };
        serde_yaml::to_string(&meta).map_err(|e| self.err(e))
    }

    /// Writes the `rosbag2` metadata record, the MCAP summary and `metadata.yaml`.
    pub fn finish(mut self) -> Result<PathBuf, WriteError> {
        let yaml = self.metadata_yaml()?;
        // The record holds the BagMetadata itself (without the file's top-level key).
        let inner = yaml
            .strip_prefix("rosbag2_bagfile_information:\n")
            .map(|body| {
                body.lines()
                    .map(|l| l.strip_prefix("  ").unwrap_or(l))
                    .collect::<Vec<_>>()
                    .join("\n")
            })
            .unwrap_or_else(|| yaml.clone());
        self.mcap
            .write_metadata(&mcap::records::Metadata {
                name: "rosbag2".into(),
                metadata: BTreeMap::from([("serialized_metadata".to_owned(), inner)]),
            })
            .map_err(|e| self.err(e))?;
        self.mcap.finish().map_err(|e| self.err(e))?;
        if let Some(dir) = &self.dir {
            let meta = dir.join("metadata.yaml");
            std::fs::write(&meta, yaml).map_err(|source| WriteError::Io {
                path: meta.display().to_string(),
                source,
            })?;
            return Ok(dir.clone());
        }
        Ok(self.file.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::super::msgs::{StringMsg, TwistStamped, decode};
    use super::super::reader::BagReader;
    use super::*;

    #[test]
    fn written_bags_read_back() {
        let dir = std::env::temp_dir().join(format!("bitvla_bag_{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for out in [dir.join("b"), dir.join("c.mcap")] {
            let mut w = BagWriter::create(&out).unwrap();
            w.write("/instruction", 10, &StringMsg { data: "go".into() })
                .unwrap();
            w.write("/cmd", 20, &TwistStamped::default()).unwrap();
            assert!(w.write("/cmd", 30, &StringMsg::default()).is_err());
            let path = w.finish().unwrap();
            let bag = BagReader::open(&path).unwrap();
            let mut seen = Vec::new();
            bag.read(|m| {
                seen.push((m.connection.topic.clone(), m.log_time));
                if m.connection.topic == "/instruction" {
                    assert_eq!(decode::<StringMsg>(m.data).unwrap().data, "go");
                }
                std::ops::ControlFlow::Continue(())
            })
            .unwrap();
            assert_eq!(seen, [("/instruction".into(), 10), ("/cmd".into(), 20)]);
            let topics = bag.topics().unwrap();
            assert!(topics.contains(&("/cmd".into(), "geometry_msgs/msg/TwistStamped".into())));
        }
        assert!(dir.join("b/metadata.yaml").is_file());
        // A bag directory without metadata.yaml: its storage files in name order.
        std::fs::remove_file(dir.join("b/metadata.yaml")).unwrap();
        let bag = BagReader::open(&dir.join("b")).unwrap();
        assert_eq!(bag.files().len(), 1);
        assert!(BagWriter::create(&dir.join("b")).is_err(), "not empty");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A file cut inside a chunk: the fast pass stops at the damaged chunk, the salvage pass
    /// recovers the messages before the cut (uncompressed and zstd chunks), with one warning.
    #[test]
    fn truncated_chunks_are_salvaged_up_to_the_cut() {
        let dir = std::env::temp_dir().join(format!("bitvla_salvage_{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for zstd in [false, true] {
            let path = dir.join(format!("full_{zstd}.mcap"));
            let mut w = BagWriter::create_with(&path, zstd).unwrap();
            // ~6 MB of distinct messages: several chunks.
            for i in 0..600u64 {
                let data: String = (0..10_000)
                    .map(|k| char::from(b'a' + ((i + k) % 26) as u8))
                    .collect();
                w.write("/text", i, &StringMsg { data }).unwrap();
            }
            w.finish().unwrap();
            let bytes = std::fs::read(&path).unwrap();
            let cut = dir.join(format!("cut_{zstd}.mcap"));
            std::fs::write(&cut, &bytes[..bytes.len() * 2 / 3]).unwrap();
            let mut times = Vec::new();
            let summary = BagReader::open(&cut)
                .unwrap()
                .read(|m| {
                    let msg = decode::<StringMsg>(m.data).unwrap();
                    assert_eq!(msg.data.len(), 10_000);
                    times.push(m.log_time);
                    std::ops::ControlFlow::Continue(())
                })
                .unwrap();
            // In order, no message twice, most of what precedes the cut.
            assert!(times.windows(2).all(|w| w[1] == w[0] + 1), "zstd {zstd}");
            assert!(
                times.len() > 300 && times.len() < 600,
                "zstd {zstd}: {}",
                times.len()
            );
            assert_eq!(summary.warnings.len(), 1, "{:?}", summary.warnings);
            assert!(
                summary.warnings[0].contains("damaged"),
                "{:?}",
                summary.warnings
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
