//! Property tests of everything that parses bag bytes: the CDR decoders of every message type
//! the node consumes or produces, and the MCAP and sqlite3 readers, on arbitrary, truncated and
//! bit-flipped input. The property: an error or a value, never a panic, an abort or a huge
//! allocation; and valid messages round-trip exactly.

use bitvla_ros::bag::msgs::{
    ActionChunkMsg, BoolMsg, Clock, CompressedImage, DiagnosticArray, Float32MultiArray,
    Float64MultiArray, Header, Image, JointState, JointTrajectory, JointTrajectoryPoint,
    PolicyStatusMsg, PoseStamped, RosMessage, StringMsg, Time, TwistStamped, command_values,
    decode, encode,
};
use bitvla_ros::bag::{BagReader, BagWriter};
use proptest::prelude::*;
use std::borrow::Cow;
use std::ops::ControlFlow;

/// Decodes `data` as every type; returns how many decoded (the count is irrelevant: no panic is
/// the property).
fn decode_all(data: &[u8]) -> usize {
    fn ok<'a, M: RosMessage<'a>>(d: &'a [u8]) -> usize {
        usize::from(decode::<M>(d).is_ok())
    }
    ok::<Image>(data)
        + ok::<CompressedImage>(data)
        + ok::<JointState>(data)
        + ok::<StringMsg>(data)
        + ok::<BoolMsg>(data)
        + ok::<Float64MultiArray>(data)
        + ok::<Float32MultiArray>(data)
        + ok::<PoseStamped>(data)
        + ok::<TwistStamped>(data)
        + ok::<JointTrajectory>(data)
        + ok::<DiagnosticArray>(data)
        + ok::<Clock>(data)
        + ok::<ActionChunkMsg>(data)
        + ok::<PolicyStatusMsg>(data)
        + usize::from(matches!(
            command_values("geometry_msgs/msg/TwistStamped", data),
            Some(Ok(_))
        ))
}

fn samples() -> Vec<Vec<u8>> {
    vec![
        encode(&Image {
            header: Header::new(1_000_000_123, "cam"),
            height: 2,
            width: 2,
            encoding: "rgb8".into(),
            is_bigendian: 0,
            step: 6,
            data: Cow::Owned((0..12).collect()),
        }),
        encode(&JointState {
            header: Header::default(),
            name: vec!["a".into(), "b".into()],
            position: vec![0.5, -1.0],
            ..Default::default()
        }),
        encode(&JointTrajectory {
            header: Header::new(3, "base"),
            joint_names: vec!["j".into()],
            points: vec![JointTrajectoryPoint {
                positions: vec![1.0],
                time_from_start: Time::from_ns(5),
                ..Default::default()
            }],
        }),
        encode(&ActionChunkMsg {
            sequence: 7,
            instruction: "pick".into(),
            horizon: 1,
            dimension_names: vec!["dx".into()],
            normalized: vec![0.5],
            actions: vec![0.25],
            ..Default::default()
        }),
        encode(&StringMsg {
            data: "go left".into(),
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..256)) {
        decode_all(&data);
        let mut framed = vec![0u8, 1, 0, 0];
        framed.extend_from_slice(&data);
        decode_all(&framed);
    }

    #[test]
    fn truncated_and_flipped_messages_never_panic(
        which in 0usize..5,
        cut in any::<prop::sample::Index>(),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
    ) {
        let mut m = samples().swap_remove(which);
        for (at, v) in flips {
            let i = at.index(m.len());
            m[i] ^= v;
        }
        decode_all(&m);
        let n = cut.index(m.len() + 1);
        decode_all(&m[..n]);
    }

    #[test]
    fn valid_messages_round_trip(
        sec in any::<i32>(), nanosec in 0u32..1_000_000_000,
        frame in "[a-z_/]{0,12}", text in "\\PC{0,40}",
        data in proptest::collection::vec(any::<u8>(), 0..64),
        values in proptest::collection::vec(-1e6f64..1e6, 0..9),
    ) {
        let header = Header { stamp: Time { sec, nanosec }, frame_id: frame };
        let img = Image {
            header: header.clone(), height: 1, width: data.len() as u32,
            encoding: text.clone(), is_bigendian: 0, step: data.len() as u32,
            data: Cow::Owned(data.clone()),
        };
        let bytes = encode(&img);
        prop_assert_eq!(decode::<Image>(&bytes).unwrap(), img);
        let js = JointState { header, name: vec![text.clone(); values.len()], position: values.clone(), ..Default::default() };
        prop_assert_eq!(decode::<JointState>(&encode(&js)).unwrap(), js);
        let arr = Float64MultiArray { data: values, ..Default::default() };
        prop_assert_eq!(decode::<Float64MultiArray>(&encode(&arr)).unwrap(), arr);
        let status = PolicyStatusMsg { state: 3, reason: text.clone(), chunk_sequence: sec as u64, camera_age_s: -1.0, dry_run: true, ..Default::default() };
        prop_assert_eq!(decode::<PolicyStatusMsg>(&encode(&status)).unwrap(), status);
        prop_assert_eq!(decode::<StringMsg>(&encode(&StringMsg { data: text.clone() })).unwrap().data, text);
    }
}

fn tmp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("bitvla_fuzz_{}_{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A small valid MCAP bag's bytes.
fn mcap_bytes() -> Vec<u8> {
    let dir = tmp("src");
    let path = dir.join("b.mcap");
    let mut w = BagWriter::create(&path).unwrap();
    for i in 0..40u64 {
        w.write(
            "/instruction",
            i * 1000,
            &StringMsg {
                data: format!("step {i}"),
            },
        )
        .unwrap();
        w.write("/cmd", i * 1000 + 1, &TwistStamped::default())
            .unwrap();
    }
    w.finish().unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    bytes
}

fn read_everything(path: &std::path::Path) {
    if let Ok(bag) = BagReader::open(path) {
        let _ = bag.topics();
        let _ = bag.read(|m| {
            decode_all(m.data);
            ControlFlow::Continue(())
        });
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn damaged_mcap_files_never_panic(
        cut in any::<prop::sample::Index>(),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..8),
    ) {
        thread_local!(static GOOD: Vec<u8> = mcap_bytes());
        let mut bytes = GOOD.with(Clone::clone);
        for (at, v) in flips {
            let i = at.index(bytes.len());
            bytes[i] ^= v;
        }
        bytes.truncate(cut.index(bytes.len() + 1));
        let dir = tmp("mcap");
        let path = dir.join("x.mcap");
        std::fs::write(&path, &bytes).unwrap();
        read_everything(&path);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
fn damaged_sqlite_files_never_panic() {
    // A valid rosbag2 sqlite3 file built with the schema rosbag2 uses, then damaged.
    let dir = tmp("sqlite");
    let path = dir.join("good.db3");
    {
        let db = rusqlite::Connection::open(&path).unwrap();
        db.execute_batch(
            "CREATE TABLE topics(id INTEGER PRIMARY KEY, name TEXT NOT NULL, type TEXT NOT NULL,
               serialization_format TEXT NOT NULL, offered_qos_profiles TEXT NOT NULL,
               type_description_hash TEXT NOT NULL);
             CREATE TABLE messages(id INTEGER PRIMARY KEY, topic_id INTEGER NOT NULL,
               timestamp INTEGER NOT NULL, data BLOB NOT NULL);
             INSERT INTO topics VALUES (1, '/instruction', 'std_msgs/msg/String', 'cdr', '', '');",
        )
        .unwrap();
        for i in 0..200i64 {
            db.execute(
                "INSERT INTO messages(topic_id, timestamp, data) VALUES (?1, ?2, ?3)",
                rusqlite::params![
                    if i % 17 == 0 { 9 } else { 1 },
                    i,
                    encode(&StringMsg {
                        data: "x".repeat(i as usize)
                    })
                ],
            )
            .unwrap();
        }
    }
    let good = std::fs::read(&path).unwrap();
    let bag = BagReader::open(&path).unwrap();
    let mut n = 0;
    let summary = bag
        .read(|m| {
            assert!(decode::<StringMsg>(m.data).is_ok());
            n += 1;
            ControlFlow::Continue(())
        })
        .unwrap();
    assert_eq!(n, 200 - 12);
    assert_eq!(summary.warnings.len(), 12, "unknown topic ids are warnings");
    let mut state = 0x2545_f491_4f6c_dd1du64;
    for round in 0..60 {
        let mut bytes = good.clone();
        for _ in 0..(1 + round % 7) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let i = (state % bytes.len() as u64) as usize;
            bytes[i] ^= (state >> 32) as u8 | 1;
        }
        if round % 3 == 0 {
            bytes.truncate((state % bytes.len() as u64) as usize);
        }
        let p = dir.join(format!("bad{round}.db3"));
        std::fs::write(&p, &bytes).unwrap();
        read_everything(&p);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
