//! Bags are read in log-time order, as rosbag2 plays them: messages stored out of order inside
//! a chunk, chunks whose time ranges overlap, split files whose time ranges interleave (MCAP
//! and sqlite3 alike), with memory bounded by the overlap, not the bag.
//! (tests/bags/test_replay.py checks the same with bags written by the independent `rosbags`.)

use bitvla_ros::bag::msgs::{StringMsg, decode, encode};
use bitvla_ros::bag::{BagReader, BagWriter};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("bitvla_order_{}_{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A message whose text names its topic and time, `size` bytes long.
fn text(topic: &str, t: u64, size: usize) -> StringMsg {
    let mut data = format!("{topic}@{t};");
    while data.len() < size {
        data.push(char::from(b'a' + (data.len() % 26) as u8));
    }
    StringMsg { data }
}

/// Writes `(topic, time)` in the given (storage) order into a bare MCAP file.
fn write_mcap(path: &Path, events: &[(&str, u64)], size: usize, zstd: bool) {
    let mut w = BagWriter::create_with(path, zstd).unwrap();
    for &(topic, t) in events {
        w.write(topic, t, &text(topic, t, size)).unwrap();
    }
    w.finish().unwrap();
}

/// Reads every message: (topic, log time), checking each payload names its own topic and time.
fn read_all(path: &Path) -> (Vec<(String, u64)>, bitvla_ros::bag::ReadSummary) {
    let mut seen = Vec::new();
    let summary = BagReader::open(path)
        .unwrap()
        .read(|m| {
            let msg = decode::<StringMsg>(m.data).unwrap();
            let label = format!("{}@{};", m.connection.topic, m.log_time);
            assert!(
                msg.data.starts_with(&label),
                "{label} carries {:.40}",
                msg.data
            );
            seen.push((m.connection.topic.clone(), m.log_time));
            ControlFlow::Continue(())
        })
        .unwrap();
    (seen, summary)
}

fn sorted(events: &[(&str, u64)]) -> Vec<(String, u64)> {
    let mut v: Vec<(String, u64)> = events.iter().map(|&(t, s)| (t.to_owned(), s)).collect();
    v.sort_by_key(|e| e.1);
    v
}

#[test]
fn messages_out_of_order_inside_a_chunk_come_in_time_order() {
    let dir = tmp("in_chunk");
    // A camera at t, a joint state at t+1 written after the wrist image at t+2 (per-topic
    // queues), as recorders do.
    let mut events = Vec::new();
    for i in 0..50u64 {
        let t = 1_000 + i * 100;
        events.push(("/cam", t));
        events.push(("/wrist", t + 2));
        events.push(("/joints", t + 1));
    }
    for zstd in [false, true] {
        let path = dir.join(format!("b_{zstd}.mcap"));
        write_mcap(&path, &events, 64, zstd);
        let (seen, summary) = read_all(&path);
        assert_eq!(seen, sorted(&events), "zstd {zstd}");
        assert!(summary.warnings.is_empty(), "{:?}", summary.warnings);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `n` messages of /a every 10 ns stored first, then `n` of /b over the same times (5 ns
/// later): with large messages, chunks that overlap in time.
fn one_topic_after_the_other(n: u64) -> Vec<(&'static str, u64)> {
    let a = (0..n).map(|i| ("/a", i * 10));
    a.chain((0..n).map(|i| ("/b", i * 10 + 5))).collect()
}

#[test]
fn chunks_overlapping_in_time_are_merged() {
    let dir = tmp("overlap");
    // Each topic's 2 MB spans several chunks, and every chunk of /b overlaps chunks of /a.
    let events = one_topic_after_the_other(200);
    let path = dir.join("b.mcap");
    write_mcap(&path, &events, 10_000, false);
    let (seen, summary) = read_all(&path);
    assert_eq!(seen, sorted(&events));
    assert!(summary.warnings.is_empty(), "{:?}", summary.warnings);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn equal_times_keep_storage_order() {
    let dir = tmp("ties");
    let events = [("/x", 5), ("/y", 5), ("/x", 3), ("/z", 5), ("/y", 3)];
    let path = dir.join("b.mcap");
    write_mcap(&path, &events, 16, true);
    let (seen, _) = read_all(&path);
    let names: Vec<(&str, u64)> = seen.iter().map(|(t, s)| (t.as_str(), *s)).collect();
    assert_eq!(
        names,
        [("/x", 3), ("/y", 3), ("/x", 5), ("/y", 5), ("/z", 5)]
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A rosbag2 sqlite3 file (the schema rosbag2 writes) with the given messages.
fn write_db3(path: &Path, events: &[(&str, u64)]) {
    let db = rusqlite::Connection::open(path).unwrap();
    db.execute_batch(
        "CREATE TABLE topics(id INTEGER PRIMARY KEY, name TEXT NOT NULL, type TEXT NOT NULL,
           serialization_format TEXT NOT NULL, offered_qos_profiles TEXT NOT NULL);
         CREATE TABLE messages(id INTEGER PRIMARY KEY, topic_id INTEGER NOT NULL,
           timestamp INTEGER NOT NULL, data BLOB NOT NULL);
         CREATE INDEX timestamp_idx ON messages (timestamp ASC);",
    )
    .unwrap();
    let mut ids = std::collections::HashMap::new();
    for &(topic, t) in events {
        let next = ids.len() as i64 + 1;
        let id = *ids.entry(topic).or_insert_with(|| {
            db.execute(
                "INSERT INTO topics VALUES (?1, ?2, 'std_msgs/msg/String', 'cdr', '')",
                rusqlite::params![next, topic],
            )
            .unwrap();
            next
        });
        db.execute(
            "INSERT INTO messages(topic_id, timestamp, data) VALUES (?1, ?2, ?3)",
            rusqlite::params![id, t as i64, encode(&text(topic, t, 32))],
        )
        .unwrap();
    }
}

#[test]
fn split_files_whose_time_ranges_interleave_are_merged() {
    // Two files of one bag (no metadata.yaml: its storage files in name order), each holding
    // every other second of the episode: MCAP + MCAP, and MCAP + sqlite3.
    let first: Vec<(&str, u64)> = (0..40u64)
        .filter(|i| (i / 10) % 2 == 0)
        .map(|i| ("/cam", i * 100))
        .collect();
    let second: Vec<(&str, u64)> = (0..40u64)
        .filter(|i| (i / 10) % 2 == 1)
        .flat_map(|i| [("/cam", i * 100), ("/task", i * 100 + 50)])
        .collect();
    let all: Vec<(&str, u64)> = first.iter().chain(&second).copied().collect();
    for sqlite in [false, true] {
        let dir = tmp(&format!("split_{sqlite}"));
        write_mcap(&dir.join("ep_0.mcap"), &first, 100, true);
        if sqlite {
            write_db3(&dir.join("ep_1.db3"), &second);
        } else {
            write_mcap(&dir.join("ep_1.mcap"), &second, 100, true);
        }
        let (seen, summary) = read_all(&dir);
        assert_eq!(seen, sorted(&all), "sqlite {sqlite}");
        assert!(summary.warnings.is_empty(), "{:?}", summary.warnings);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// This process's resident file-backed memory [kB] (Linux; 0 elsewhere).
fn rss_file_kb() -> i64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("RssFile:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

#[test]
fn memory_holds_the_overlapping_chunks_not_the_bag() {
    let dir = tmp("memory");
    // 40 MB of messages in order: about 40 chunks of 1 MiB.
    let events: Vec<(&str, u64)> = (0..4_000u64).map(|i| ("/cam", i * 1000)).collect();
    let path = dir.join("b.mcap");
    write_mcap(&path, &events, 10_000, true);
    let (seen, summary) = read_all(&path);
    assert_eq!(seen.len(), 4_000);
    let total = summary.bytes;
    assert!(total > 39_000_000, "{total}");
    // A chunk being read plus the batch decompressed ahead of it (2 per thread).
    let chunks_held = 2 * rayon::current_num_threads() as u64 + 2;
    assert!(
        summary.peak_buffered_bytes <= chunks_held * 1_200_000,
        "held {} bytes of a {total}-byte bag",
        summary.peak_buffered_bytes
    );
    // The file's pages do not stay resident either: while an uncompressed bag is read through
    // the map, this process's file-backed memory stays about where it was.
    let raw = dir.join("raw.mcap");
    write_mcap(&raw, &events, 10_000, false);
    let before = rss_file_kb();
    let mut peak = before;
    let mut n = 0u64;
    BagReader::open(&raw)
        .unwrap()
        .read(|_| {
            n += 1;
            if n.is_multiple_of(100) {
                peak = peak.max(rss_file_kb());
            }
            ControlFlow::Continue(())
        })
        .unwrap();
    let grown_mb = (peak - before) as f64 / 1024.0;
    assert_eq!(n, 4_000);
    // qemu-user (the aarch64 run) takes madvise as a hint it may ignore: the residency is
    // checked natively on x86_64 only.
    if cfg!(target_arch = "x86_64") {
        assert!(
            grown_mb < 16.0,
            "{grown_mb} MB of a 40 MB file stayed resident"
        );
    } else {
        eprintln!("file residency not checked on this architecture (qemu-user ignores madvise)");
    }
    // Stopping early stops reading.
    let mut n = 0;
    BagReader::open(&path)
        .unwrap()
        .read(|_| {
            n += 1;
            if n == 10 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .unwrap();
    assert_eq!(n, 10);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_file_cut_inside_overlapping_chunks_keeps_what_precedes_the_cut() {
    let dir = tmp("cut");
    let events = one_topic_after_the_other(300);
    let path = dir.join("full.mcap");
    write_mcap(&path, &events, 10_000, true);
    let bytes = std::fs::read(&path).unwrap();
    let cut = dir.join("cut.mcap");
    std::fs::write(&cut, &bytes[..bytes.len() * 3 / 4]).unwrap();
    let (seen, summary) = read_all(&cut);
    // Every /a message, in time order with the /b ones that survived; none twice.
    assert!(seen.windows(2).all(|w| w[0].1 < w[1].1), "time order");
    assert_eq!(seen.iter().filter(|(t, _)| t == "/a").count(), 300);
    let b = seen.iter().filter(|(t, _)| t == "/b").count();
    assert!(b > 100 && b < 300, "{b}");
    assert_eq!(summary.warnings.len(), 1, "{:?}", summary.warnings);
    assert!(
        summary.warnings[0].contains("damaged"),
        "{:?}",
        summary.warnings
    );
    let _ = std::fs::remove_dir_all(&dir);
}
