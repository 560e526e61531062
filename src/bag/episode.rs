//! A small synthetic episode as a rosbag2 MCAP bag (the demo's input, tests, benchmarks): a
//! rendered third-person camera (raw rgb8) and optionally a wrist camera (JPEG), instructions at
//! given times, joint states, and a recorded "expert" action per control step.

use super::msgs::{CompressedImage, Float64MultiArray, Header, Image, JointState, StringMsg};
use super::writer::{BagWriter, WriteError};
use std::borrow::Cow;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct EpisodeSpec {
    /// Bag time of the first message [ns].
    pub start_ns: u64,
    pub duration_s: f64,
    pub camera_hz: f64,
    pub width: u32,
    pub height: u32,
    /// Also a wrist camera, JPEG on `/camera/wrist/image_raw/compressed`.
    pub wrist: bool,
    /// (time after start [s], text) on `/instruction`.
    pub instructions: Vec<(f64, String)>,
    /// Joint positions on `/joint_states` at the camera rate.
    pub joints: usize,
    /// Seven-dimensional actions on `/expert/action` (Float64MultiArray) at this rate (0: none).
    pub action_hz: f64,
}

impl Default for EpisodeSpec {
    fn default() -> Self {
        Self {
            start_ns: 1_700_000_000_000_000_000,
            duration_s: 3.0,
            camera_hz: 10.0,
            width: 320,
            height: 240,
            wrist: true,
            instructions: vec![
                (
                    0.0,
                    "pick up the black bowl and place it on the plate".into(),
                ),
                (1.6, "put the cream cheese in the bowl".into()),
            ],
            joints: 8,
            action_hz: 20.0,
        }
    }
}

pub const CAMERA_TOPIC: &str = "/camera/image_raw";
pub const WRIST_TOPIC: &str = "/camera/wrist/image_raw/compressed";
pub const ACTION_TOPIC: &str = "/expert/action";

/// A frame of a table scene with a block that slides as `phase` goes from 0 to 1.
pub fn render(width: u32, height: u32, phase: f64, wrist: bool) -> Vec<u8> {
    let mut px = Vec::with_capacity(width as usize * height as usize * 3);
    let (bx, by) = (
        (0.2 + 0.6 * phase) * f64::from(width),
        (0.6 - 0.2 * phase) * f64::from(height),
    );
    let half = f64::from(width.min(height)) * if wrist { 0.2 } else { 0.08 };
    for y in 0..height {
        for x in 0..width {
            let (fx, fy) = (f64::from(x), f64::from(y));
            let table = fy > 0.45 * f64::from(height);
            let mut c = if table {
                [150, 110, 70]
            } else {
                [200, 205, 215]
            };
            if (fx - bx).abs() < half && (fy - by).abs() < half {
                c = if wrist { [30, 30, 30] } else { [200, 40, 40] };
            }
            // A little texture so frames are not flat.
            let n = ((x * 7 + y * 13) % 11) as u8;
            px.extend(c.iter().map(|&v: &u8| v.saturating_add(n)));
        }
    }
    px
}

/// Writes the episode to `path` (bag directory, or `.mcap`); returns the path and message count.
pub fn write_episode(path: &Path, spec: &EpisodeSpec) -> Result<(PathBuf, u64), WriteError> {
    let mut w = BagWriter::create(path)?;
    let ns = |t: f64| spec.start_ns + (t * 1e9).round() as u64;
    // Messages go in time order: gather (time, writer) events, then write them sorted.
    enum Event {
        Frame(usize),
        Instruction(usize),
        Action(usize),
    }
    let mut events: Vec<(u64, u8, Event)> = Vec::new();
    let frames = (spec.duration_s * spec.camera_hz).floor() as usize + 1;
    for i in 0..frames {
        // Offset from the control grid, as real camera clocks are.
        events.push((ns(i as f64 / spec.camera_hz + 0.0123), 1, Event::Frame(i)));
    }
    for (i, (t, _)) in spec.instructions.iter().enumerate() {
        events.push((ns(*t), 0, Event::Instruction(i)));
    }
    if spec.action_hz > 0.0 {
        let n = (spec.duration_s * spec.action_hz).floor() as usize + 1;
        for i in 0..n {
            events.push((ns(i as f64 / spec.action_hz + 0.001), 2, Event::Action(i)));
        }
    }
    events.sort_by_key(|(t, order, _)| (*t, *order));
    let io = |e: std::io::Error| WriteError::Io {
        path: path.display().to_string(),
        source: e,
    };
    for (t, _, event) in events {
        match event {
            Event::Instruction(i) => {
                let data = spec.instructions[i].1.clone();
                w.write("/instruction", t, &StringMsg { data })?;
            }
            Event::Frame(i) => {
                let phase = i as f64 / frames.max(2).saturating_sub(1) as f64;
                let header = Header::new(t as i64, "camera");
                let data = render(spec.width, spec.height, phase, false);
                w.write(
                    CAMERA_TOPIC,
                    t,
                    &Image {
                        header: header.clone(),
                        height: spec.height,
                        width: spec.width,
                        encoding: "rgb8".into(),
                        is_bigendian: 0,
                        step: spec.width * 3,
                        data: Cow::Owned(data),
                    },
                )?;
                if spec.wrist {
                    let (ww, wh) = (spec.width / 2, spec.height / 2);
                    let raw = render(ww, wh, phase, true);
                    let mut jpeg = Vec::new();
                    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 90)
                        .encode(&raw, ww, wh, image::ExtendedColorType::Rgb8)
                        .map_err(|e| io(std::io::Error::other(e)))?;
                    w.write(
                        WRIST_TOPIC,
                        t,
                        &CompressedImage {
                            header: Header::new(t as i64, "wrist_camera"),
                            format: "rgb8; jpeg compressed bgr8".into(),
                            data: Cow::Owned(jpeg),
                        },
                    )?;
                }
                if spec.joints > 0 {
                    w.write(
                        "/joint_states",
                        t,
                        &JointState {
                            header,
                            name: (0..spec.joints).map(|j| format!("joint_{j}")).collect(),
                            position: (0..spec.joints)
                                .map(|j| 0.1 * j as f64 + 0.2 * phase)
                                .collect(),
                            ..Default::default()
                        },
                    )?;
                }
            }
            Event::Action(i) => {
                let s = i as f64 / spec.action_hz;
                let data = vec![
                    0.3,
                    -0.1 + 0.05 * s,
                    0.0,
                    0.0,
                    0.0,
                    0.1 * (s * 2.0).sin(),
                    if s < spec.duration_s / 2.0 { -1.0 } else { 1.0 },
                ];
                w.write(ACTION_TOPIC, t, &Float64MultiArray::vector("action", data))?;
            }
        }
    }
    let count = w.count();
    Ok((w.finish()?, count))
}
