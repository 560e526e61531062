//! The ROS 2 messages the node consumes and produces, with their CDR codecs and their `.msg`
//! definitions (for `ros2msg` schemas: the type's text, then each dependency's after a line of
//! 80 `=` and `MSG: pkg/Type`, first-seen order, as rosbag2 writes them).
//!
//! The standard definitions are those of ROS 2 Jazzy's common_interfaces, rcl_interfaces and
//! diagnostics (Apache-2.0), with comments stripped as `rosbags` writes them; the package's own
//! come from `msg/` verbatim.

use super::cdr::{CdrError, CdrReader, CdrWriter};
use std::borrow::Cow;

/// `(type, definition)`; types are `pkg/Type`.
const DEFINITIONS: &[(&str, &str)] = &[
    (
        "sensor_msgs/Image",
        "std_msgs/Header header\nuint32 height\nuint32 width\nstring encoding\nuint8 is_bigendian\nuint32 step\nuint8[] data",
    ),
    (
        "sensor_msgs/CompressedImage",
        "std_msgs/Header header\nstring format\nuint8[] data",
    ),
    (
        "sensor_msgs/JointState",
        "std_msgs/Header header\nstring[] name\nfloat64[] position\nfloat64[] velocity\nfloat64[] effort",
    ),
    (
        "std_msgs/Header",
        "builtin_interfaces/Time stamp\nstring frame_id",
    ),
    ("std_msgs/String", "string data"),
    ("std_msgs/Bool", "bool data"),
    (
        "std_msgs/Float64MultiArray",
        "MultiArrayLayout layout\nfloat64[] data",
    ),
    (
        "std_msgs/Float32MultiArray",
        "MultiArrayLayout layout\nfloat32[] data",
    ),
    (
        "std_msgs/MultiArrayLayout",
        "MultiArrayDimension[] dim\nuint32 data_offset",
    ),
    (
        "std_msgs/MultiArrayDimension",
        "string label\nuint32 size\nuint32 stride",
    ),
    ("builtin_interfaces/Time", "int32 sec\nuint32 nanosec"),
    ("builtin_interfaces/Duration", "int32 sec\nuint32 nanosec"),
    (
        "geometry_msgs/PoseStamped",
        "std_msgs/Header header\nPose pose",
    ),
    (
        "geometry_msgs/Pose",
        "Point position\nQuaternion orientation",
    ),
    ("geometry_msgs/Point", "float64 x\nfloat64 y\nfloat64 z"),
    (
        "geometry_msgs/Quaternion",
        "float64 x 0\nfloat64 y 0\nfloat64 z 0\nfloat64 w 1",
    ),
    (
        "geometry_msgs/TwistStamped",
        "std_msgs/Header header\nTwist twist",
    ),
    ("geometry_msgs/Twist", "Vector3 linear\nVector3 angular"),
    ("geometry_msgs/Vector3", "float64 x\nfloat64 y\nfloat64 z"),
    (
        "trajectory_msgs/JointTrajectory",
        "std_msgs/Header header\nstring[] joint_names\nJointTrajectoryPoint[] points",
    ),
    (
        "trajectory_msgs/JointTrajectoryPoint",
        "float64[] positions\nfloat64[] velocities\nfloat64[] accelerations\nfloat64[] effort\nbuiltin_interfaces/Duration time_from_start",
    ),
    (
        "diagnostic_msgs/DiagnosticArray",
        "std_msgs/Header header\nDiagnosticStatus[] status",
    ),
    (
        "diagnostic_msgs/DiagnosticStatus",
        "byte OK=0\nbyte WARN=1\nbyte ERROR=2\nbyte STALE=3\nbyte level\nstring name\nstring message\nstring hardware_id\nKeyValue[] values",
    ),
    ("diagnostic_msgs/KeyValue", "string key\nstring value"),
    ("rosgraph_msgs/Clock", "builtin_interfaces/Time clock"),
    (
        "bitvla_ros/ActionChunk",
        include_str!("../../msg/ActionChunk.msg"),
    ),
    (
        "bitvla_ros/PolicyStatus",
        include_str!("../../msg/PolicyStatus.msg"),
    ),
];

const PRIMITIVES: &[&str] = &[
    "bool", "byte", "char", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64",
    "uint64", "float32", "float64", "string", "wstring",
];

/// `sensor_msgs/msg/Image` or `sensor_msgs/Image` -> `sensor_msgs/Image`.
fn short_name(type_name: &str) -> String {
    type_name.replacen("/msg/", "/", 1)
}

/// A definition without comments, blank lines or trailing blanks.
fn strip(text: &str) -> String {
    text.lines()
        .map(|l| l.split('#').next().unwrap_or("").trim_end())
        .filter(|l| !l.trim().is_empty())
        .collect::<Vec<_>>()
        .join("\n")
}

/// The types a definition's fields use, qualified with `package` where written bare.
fn dependencies(package: &str, text: &str) -> Vec<String> {
    let mut deps = Vec::new();
    for line in text.lines() {
        let Some(ty) = line.split_whitespace().next() else {
            continue;
        };
        let base = ty.split(['[', '<']).next().unwrap_or(ty);
        if PRIMITIVES.contains(&base) {
            continue;
        }
        let full = if base.contains('/') {
            base.replacen("/msg/", "/", 1)
        } else {
            format!("{package}/{base}")
        };
        if !deps.contains(&full) {
            deps.push(full);
        }
    }
    deps
}

/// The `ros2msg` schema text of a type (`pkg/msg/Type` or `pkg/Type`) with its dependencies, or
/// None when the type is not one of ours.
/// Whether a definition embedded in a bag describes the same message as this build's definition
/// of `type_name`: the same fields in the same order and the same constants (comments, blank
/// lines, spacing and where writers put the constants aside). None when the type is unknown.
pub fn same_definition(type_name: &str, embedded: &str) -> Option<bool> {
    let ours = schema_text(type_name)?;
    let parse = |text: &str| -> (Vec<String>, Vec<String>) {
        let sep = "=".repeat(80);
        let lines = text
            .lines()
            .take_while(|l| l.trim() != sep)
            .map(|l| {
                let l = l.split('#').next().unwrap_or("");
                l.split_whitespace().collect::<Vec<_>>().join(" ")
            })
            .filter(|l| !l.is_empty());
        let (mut constants, fields): (Vec<String>, Vec<String>) =
            lines.partition(|l| l.contains('='));
        for c in &mut constants {
            c.retain(|ch| ch != ' ');
        }
        constants.sort();
        (fields, constants)
    };
    Some(parse(&ours) == parse(embedded))
}

pub fn schema_text(type_name: &str) -> Option<String> {
    let lookup = |name: &str| {
        DEFINITIONS
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, d)| strip(d))
    };
    let root = short_name(type_name);
    let mut text = lookup(&root)?;
    let mut seen = vec![root.clone()];
    // Depth-first, pre-order, first seen first (rosbag2's order).
    fn walk(
        name: &str,
        seen: &mut Vec<String>,
        text: &mut String,
        lookup: &dyn Fn(&str) -> Option<String>,
    ) -> Option<()> {
        let package = name.split('/').next().unwrap_or("");
        for dep in dependencies(package, &lookup(name)?) {
            if seen.contains(&dep) {
                continue;
            }
            seen.push(dep.clone());
            text.push('\n');
            text.push_str(&"=".repeat(80));
            text.push_str(&format!("\nMSG: {dep}\n"));
            text.push_str(&lookup(&dep)?);
            walk(&dep, seen, text, lookup)?;
        }
        Some(())
    }
    walk(&root, &mut seen, &mut text, &lookup)?;
    Some(text)
}

/// Seconds -> (sec, nanosec) as builtin_interfaces/Time (nanosec in [0, 1e9)).
pub fn split_time(t: f64) -> (i32, u32) {
    let ns = (t * 1e9).round() as i64;
    split_ns(ns)
}

/// Nanoseconds -> (sec, nanosec).
pub fn split_ns(ns: i64) -> (i32, u32) {
    (
        ns.div_euclid(1_000_000_000) as i32,
        ns.rem_euclid(1_000_000_000) as u32,
    )
}

/// A message type with a CDR codec.
pub trait RosMessage<'a>: Sized {
    /// `pkg/msg/Type`.
    const TYPE: &'static str;
    fn write(&self, w: &mut CdrWriter);
    fn read(r: &mut CdrReader<'a>) -> Result<Self, CdrError>;
}

/// Serialized bytes of a message, with the encapsulation header.
pub fn encode<'a, M: RosMessage<'a>>(m: &M) -> Vec<u8> {
    let mut w = CdrWriter::new();
    m.write(&mut w);
    w.into_bytes()
}

/// A message from its serialized bytes (checks that nothing but padding follows).
pub fn decode<'a, M: RosMessage<'a>>(data: &'a [u8]) -> Result<M, CdrError> {
    let mut r = CdrReader::new(data)?;
    let m = M::read(&mut r)?;
    r.finish(M::TYPE)?;
    Ok(m)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Time {
    pub sec: i32,
    pub nanosec: u32,
}

impl Time {
    pub fn from_ns(ns: i64) -> Self {
        let (sec, nanosec) = split_ns(ns);
        Self { sec, nanosec }
    }
    pub fn as_ns(self) -> i64 {
        i64::from(self.sec) * 1_000_000_000 + i64::from(self.nanosec)
    }
    fn write(&self, w: &mut CdrWriter) {
        w.i32(self.sec).u32(self.nanosec);
    }
    fn read(r: &mut CdrReader<'_>, field: &'static str) -> Result<Self, CdrError> {
        Ok(Self {
            sec: r.i32(field)?,
            nanosec: r.u32(field)?,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Header {
    pub stamp: Time,
    pub frame_id: String,
}

impl Header {
    pub fn new(stamp_ns: i64, frame_id: &str) -> Self {
        Self {
            stamp: Time::from_ns(stamp_ns),
            frame_id: frame_id.to_owned(),
        }
    }
    fn write(&self, w: &mut CdrWriter) {
        self.stamp.write(w);
        w.string(&self.frame_id);
    }
    fn read(r: &mut CdrReader<'_>) -> Result<Self, CdrError> {
        Ok(Self {
            stamp: Time::read(r, "header.stamp")?,
            frame_id: r.string("header.frame_id")?,
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Image<'a> {
    pub header: Header,
    pub height: u32,
    pub width: u32,
    pub encoding: String,
    pub is_bigendian: u8,
    pub step: u32,
    pub data: Cow<'a, [u8]>,
}

impl<'a> RosMessage<'a> for Image<'a> {
    const TYPE: &'static str = "sensor_msgs/msg/Image";
    fn write(&self, w: &mut CdrWriter) {
        self.header.write(w);
        w.u32(self.height)
            .u32(self.width)
            .string(&self.encoding)
            .u8(self.is_bigendian)
            .u32(self.step)
            .bytes(&self.data);
    }
    fn read(r: &mut CdrReader<'a>) -> Result<Self, CdrError> {
        Ok(Self {
            header: Header::read(r)?,
            height: r.u32("height")?,
            width: r.u32("width")?,
            encoding: r.string("encoding")?,
            is_bigendian: r.u8("is_bigendian")?,
            step: r.u32("step")?,
            data: Cow::Borrowed(r.bytes("data")?),
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct CompressedImage<'a> {
    pub header: Header,
    pub format: String,
    pub data: Cow<'a, [u8]>,
}

impl<'a> RosMessage<'a> for CompressedImage<'a> {
    const TYPE: &'static str = "sensor_msgs/msg/CompressedImage";
    fn write(&self, w: &mut CdrWriter) {
        self.header.write(w);
        w.string(&self.format).bytes(&self.data);
    }
    fn read(r: &mut CdrReader<'a>) -> Result<Self, CdrError> {
        Ok(Self {
            header: Header::read(r)?,
            format: r.string("format")?,
            data: Cow::Borrowed(r.bytes("data")?),
        })
    }
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct JointState {
    pub header: Header,
    pub name: Vec<String>,
    pub position: Vec<f64>,
    pub velocity: Vec<f64>,
    pub effort: Vec<f64>,
}

impl RosMessage<'_> for JointState {
    const TYPE: &'static str = "sensor_msgs/msg/JointState";
    fn write(&self, w: &mut CdrWriter) {
        self.header.write(w);
        w.string_seq(&self.name)
            .f64_seq(&self.position)
            .f64_seq(&self.velocity)
            .f64_seq(&self.effort);
    }
    fn read(r: &mut CdrReader<'_>) -> Result<Self, CdrError> {
        Ok(Self {
            header: Header::read(r)?,
            name: r.string_seq("name")?,
            position: r.f64_seq("position")?,
            velocity: r.f64_seq("velocity")?,
            effort: r.f64_seq("effort")?,
        })
    }
}

/// `std_msgs/String`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct StringMsg {
    pub data: String,
}

impl RosMessage<'_> for StringMsg {
    const TYPE: &'static str = "std_msgs/msg/String";
    fn write(&self, w: &mut CdrWriter) {
        w.string(&self.data);
    }
    fn read(r: &mut CdrReader<'_>) -> Result<Self, CdrError> {
        Ok(Self {
            data: r.string("data")?,
        })
    }
}

/// `std_msgs/Bool`.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct BoolMsg {
    pub data: bool,
}

impl RosMessage<'_> for BoolMsg {
    const TYPE: &'static str = "std_msgs/msg/Bool";
    fn write(&self, w: &mut CdrWriter) {
        w.bool(self.data);
    }
    fn read(r: &mut CdrReader<'_>) -> Result<Self, CdrError> {
        Ok(Self {
            data: r.bool("data")?,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct MultiArrayDimension {
    pub label: String,
    pub size: u32,
    pub stride: u32,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct MultiArrayLayout {
    pub dim: Vec<MultiArrayDimension>,
    pub data_offset: u32,
}

impl MultiArrayLayout {
    fn write(&self, w: &mut CdrWriter) {
        w.u32(self.dim.len() as u32);
        for d in &self.dim {
            w.string(&d.label).u32(d.size).u32(d.stride);
        }
        w.u32(self.data_offset);
    }
    fn read(r: &mut CdrReader<'_>) -> Result<Self, CdrError> {
        let n = r.seq_len("layout.dim", 12)?;
        let dim = (0..n)
            .map(|_| {
                Ok(MultiArrayDimension {
                    label: r.string("layout.dim.label")?,
                    size: r.u32("layout.dim.size")?,
                    stride: r.u32("layout.dim.stride")?,
                })
            })
            .collect::<Result<_, CdrError>>()?;
        Ok(Self {
            dim,
            data_offset: r.u32("layout.data_offset")?,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Float64MultiArray {
    pub layout: MultiArrayLayout,
    pub data: Vec<f64>,
}

impl Float64MultiArray {
    /// A one-dimensional array whose layout names what its values are.
    pub fn vector(label: &str, data: Vec<f64>) -> Self {
        let n = data.len() as u32;
        Self {
            layout: MultiArrayLayout {
                dim: vec![MultiArrayDimension {
                    label: label.into(),
                    size: n,
                    stride: n,
                }],
                data_offset: 0,
            },
            data,
        }
    }
}

impl RosMessage<'_> for Float64MultiArray {
    const TYPE: &'static str = "std_msgs/msg/Float64MultiArray";
    fn write(&self, w: &mut CdrWriter) {
        self.layout.write(w);
        w.f64_seq(&self.data);
    }
    fn read(r: &mut CdrReader<'_>) -> Result<Self, CdrError> {
        Ok(Self {
            layout: MultiArrayLayout::read(r)?,
            data: r.f64_seq("data")?,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Float32MultiArray {
    pub layout: MultiArrayLayout,
    pub data: Vec<f32>,
}

impl RosMessage<'_> for Float32MultiArray {
    const TYPE: &'static str = "std_msgs/msg/Float32MultiArray";
    fn write(&self, w: &mut CdrWriter) {
        self.layout.write(w);
        w.f32_seq(&self.data);
    }
    fn read(r: &mut CdrReader<'_>) -> Result<Self, CdrError> {
        Ok(Self {
            layout: MultiArrayLayout::read(r)?,
            data: r.f32_seq("data")?,
        })
    }
}

fn write3(w: &mut CdrWriter, v: &[f64; 3]) {
    w.f64(v[0]).f64(v[1]).f64(v[2]);
}

fn read3(r: &mut CdrReader<'_>, field: &'static str) -> Result<[f64; 3], CdrError> {
    Ok([r.f64(field)?, r.f64(field)?, r.f64(field)?])
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct PoseStamped {
    pub header: Header,
    pub position: [f64; 3],
    /// x, y, z, w.
    pub orientation: [f64; 4],
}

impl RosMessage<'_> for PoseStamped {
    const TYPE: &'static str = "geometry_msgs/msg/PoseStamped";
    fn write(&self, w: &mut CdrWriter) {
        self.header.write(w);
        write3(w, &self.position);
        for &q in &self.orientation {
            w.f64(q);
        }
    }
    fn read(r: &mut CdrReader<'_>) -> Result<Self, CdrError> {
        let header = Header::read(r)?;
        let position = read3(r, "pose.position")?;
        let o = "pose.orientation";
        Ok(Self {
            header,
            position,
            orientation: [r.f64(o)?, r.f64(o)?, r.f64(o)?, r.f64(o)?],
        })
    }
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct TwistStamped {
    pub header: Header,
    pub linear: [f64; 3],
    pub angular: [f64; 3],
}

impl RosMessage<'_> for TwistStamped {
    const TYPE: &'static str = "geometry_msgs/msg/TwistStamped";
    fn write(&self, w: &mut CdrWriter) {
        self.header.write(w);
        write3(w, &self.linear);
        write3(w, &self.angular);
    }
    fn read(r: &mut CdrReader<'_>) -> Result<Self, CdrError> {
        Ok(Self {
            header: Header::read(r)?,
            linear: read3(r, "twist.linear")?,
            angular: read3(r, "twist.angular")?,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct JointTrajectoryPoint {
    pub positions: Vec<f64>,
    pub velocities: Vec<f64>,
    pub accelerations: Vec<f64>,
    pub effort: Vec<f64>,
    pub time_from_start: Time,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct JointTrajectory {
    pub header: Header,
    pub joint_names: Vec<String>,
    pub points: Vec<JointTrajectoryPoint>,
}

impl RosMessage<'_> for JointTrajectory {
    const TYPE: &'static str = "trajectory_msgs/msg/JointTrajectory";
    fn write(&self, w: &mut CdrWriter) {
        self.header.write(w);
        w.string_seq(&self.joint_names);
        w.u32(self.points.len() as u32);
        for p in &self.points {
            w.f64_seq(&p.positions)
                .f64_seq(&p.velocities)
                .f64_seq(&p.accelerations)
                .f64_seq(&p.effort);
            p.time_from_start.write(w);
        }
    }
    fn read(r: &mut CdrReader<'_>) -> Result<Self, CdrError> {
        let header = Header::read(r)?;
        let joint_names = r.string_seq("joint_names")?;
        let n = r.seq_len("points", 24)?;
        let points = (0..n)
            .map(|_| {
                Ok(JointTrajectoryPoint {
                    positions: r.f64_seq("points.positions")?,
                    velocities: r.f64_seq("points.velocities")?,
                    accelerations: r.f64_seq("points.accelerations")?,
                    effort: r.f64_seq("points.effort")?,
                    time_from_start: Time::read(r, "points.time_from_start")?,
                })
            })
            .collect::<Result<_, CdrError>>()?;
        Ok(Self {
            header,
            joint_names,
            points,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct DiagnosticStatus {
    pub level: u8,
    pub name: String,
    pub message: String,
    pub hardware_id: String,
    pub values: Vec<(String, String)>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct DiagnosticArray {
    pub header: Header,
    pub status: Vec<DiagnosticStatus>,
}

impl RosMessage<'_> for DiagnosticArray {
    const TYPE: &'static str = "diagnostic_msgs/msg/DiagnosticArray";
    fn write(&self, w: &mut CdrWriter) {
        self.header.write(w);
        w.u32(self.status.len() as u32);
        for s in &self.status {
            w.u8(s.level)
                .string(&s.name)
                .string(&s.message)
                .string(&s.hardware_id);
            w.u32(s.values.len() as u32);
            for (k, v) in &s.values {
                w.string(k).string(v);
            }
        }
    }
    fn read(r: &mut CdrReader<'_>) -> Result<Self, CdrError> {
        let header = Header::read(r)?;
        let n = r.seq_len("status", 17)?;
        let status = (0..n)
            .map(|_| {
                let level = r.u8("status.level")?;
                let name = r.string("status.name")?;
                let message = r.string("status.message")?;
                let hardware_id = r.string("status.hardware_id")?;
                let m = r.seq_len("status.values", 8)?;
                let values = (0..m)
                    .map(|_| Ok((r.string("values.key")?, r.string("values.value")?)))
                    .collect::<Result<_, CdrError>>()?;
                Ok(DiagnosticStatus {
                    level,
                    name,
                    message,
                    hardware_id,
                    values,
                })
            })
            .collect::<Result<_, CdrError>>()?;
        Ok(Self { header, status })
    }
}

/// `rosgraph_msgs/Clock`.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Clock {
    pub clock: Time,
}

impl RosMessage<'_> for Clock {
    const TYPE: &'static str = "rosgraph_msgs/msg/Clock";
    fn write(&self, w: &mut CdrWriter) {
        self.clock.write(w);
    }
    fn read(r: &mut CdrReader<'_>) -> Result<Self, CdrError> {
        Ok(Self {
            clock: Time::read(r, "clock")?,
        })
    }
}

/// `bitvla_ros/ActionChunk` (msg/ActionChunk.msg).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ActionChunkMsg {
    pub header: Header,
    pub sequence: u64,
    pub instruction: String,
    pub unnorm_key: String,
    pub horizon: u32,
    pub dimension_names: Vec<String>,
    pub normalized: Vec<f32>,
    pub actions: Vec<f32>,
    pub inference_latency_s: f64,
}

impl RosMessage<'_> for ActionChunkMsg {
    const TYPE: &'static str = "bitvla_ros/msg/ActionChunk";
    fn write(&self, w: &mut CdrWriter) {
        self.header.write(w);
        w.u64(self.sequence)
            .string(&self.instruction)
            .string(&self.unnorm_key)
            .u32(self.horizon)
            .string_seq(&self.dimension_names)
            .f32_seq(&self.normalized)
            .f32_seq(&self.actions)
            .f64(self.inference_latency_s);
    }
    fn read(r: &mut CdrReader<'_>) -> Result<Self, CdrError> {
        Ok(Self {
            header: Header::read(r)?,
            sequence: r.u64("sequence")?,
            instruction: r.string("instruction")?,
            unnorm_key: r.string("unnorm_key")?,
            horizon: r.u32("horizon")?,
            dimension_names: r.string_seq("dimension_names")?,
            normalized: r.f32_seq("normalized")?,
            actions: r.f32_seq("actions")?,
            inference_latency_s: r.f64("inference_latency_s")?,
        })
    }
}

/// `bitvla_ros/PolicyStatus` (msg/PolicyStatus.msg).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PolicyStatusMsg {
    pub header: Header,
    pub state: u8,
    pub reason: String,
    pub instruction: String,
    pub chunk_sequence: u64,
    pub chunk_index: u32,
    pub inferences: u64,
    pub last_inference_latency_s: f64,
    pub camera_age_s: f64,
    pub dry_run: bool,
}

impl RosMessage<'_> for PolicyStatusMsg {
    const TYPE: &'static str = "bitvla_ros/msg/PolicyStatus";
    fn write(&self, w: &mut CdrWriter) {
        self.header.write(w);
        w.u8(self.state)
            .string(&self.reason)
            .string(&self.instruction)
            .u64(self.chunk_sequence)
            .u32(self.chunk_index)
            .u64(self.inferences)
            .f64(self.last_inference_latency_s)
            .f64(self.camera_age_s)
            .bool(self.dry_run);
    }
    fn read(r: &mut CdrReader<'_>) -> Result<Self, CdrError> {
        Ok(Self {
            header: Header::read(r)?,
            state: r.u8("state")?,
            reason: r.string("reason")?,
            instruction: r.string("instruction")?,
            chunk_sequence: r.u64("chunk_sequence")?,
            chunk_index: r.u32("chunk_index")?,
            inferences: r.u64("inferences")?,
            last_inference_latency_s: r.f64("last_inference_latency_s")?,
            camera_age_s: r.f64("camera_age_s")?,
            dry_run: r.bool("dry_run")?,
        })
    }
}

/// Names of action dimensions: LIBERO's seven end-effector deltas, or `a0`, `a1`, ...
pub fn dimension_names(dim: usize) -> Vec<String> {
    const LIBERO: [&str; 7] = ["dx", "dy", "dz", "droll", "dpitch", "dyaw", "gripper"];
    if dim == LIBERO.len() {
        LIBERO.iter().map(|s| (*s).to_owned()).collect()
    } else {
        (0..dim).map(|i| format!("a{i}")).collect()
    }
}

/// The numbers of a command message, in field order (for comparing command streams): twist
/// (linear, angular), pose (position, orientation x y z w), a multi-array's data, a trajectory's
/// first point's positions. None for other types.
pub fn command_values(type_name: &str, data: &[u8]) -> Option<Result<Vec<f64>, CdrError>> {
    Some(match short_name(type_name).as_str() {
        "geometry_msgs/TwistStamped" => decode::<TwistStamped>(data)
            .map(|m| m.linear.iter().chain(&m.angular).copied().collect()),
        "geometry_msgs/PoseStamped" => decode::<PoseStamped>(data)
            .map(|m| m.position.iter().chain(&m.orientation).copied().collect()),
        "std_msgs/Float64MultiArray" => decode::<Float64MultiArray>(data).map(|m| m.data),
        "std_msgs/Float32MultiArray" => decode::<Float32MultiArray>(data)
            .map(|m| m.data.iter().map(|&v| f64::from(v)).collect()),
        "trajectory_msgs/JointTrajectory" => decode::<JointTrajectory>(data).map(|m| {
            m.points
                .first()
                .map(|p| p.positions.clone())
                .unwrap_or_default()
        }),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn definitions_compare_by_fields_and_constants() {
        let ours = schema_text("bitvla_ros/msg/PolicyStatus").unwrap();
        assert_eq!(
            same_definition("bitvla_ros/msg/PolicyStatus", &ours),
            Some(true)
        );
        // rosbags writes the constants first and Header's stamp as `time`.
        let reordered = include_str!("../../msg/PolicyStatus.msg")
            .lines()
            .filter(|l| l.contains('='))
            .chain(
                include_str!("../../msg/PolicyStatus.msg")
                    .lines()
                    .filter(|l| !l.contains('=')),
            )
            .collect::<Vec<_>>()
            .join("\n")
            + "\n================================================================================\nMSG: std_msgs/Header\ntime stamp\nstring frame_id\n";
        assert_eq!(
            same_definition("bitvla_ros/msg/PolicyStatus", &reordered),
            Some(true)
        );
        let extra = format!(
            "{}\nfloat64 extra_field\n",
            include_str!("../../msg/ActionChunk.msg")
        );
        assert_eq!(
            same_definition("bitvla_ros/msg/ActionChunk", &extra),
            Some(false)
        );
        let swapped =
            include_str!("../../msg/ActionChunk.msg").replace("uint32 horizon", "uint64 horizon");
        assert_eq!(
            same_definition("bitvla_ros/msg/ActionChunk", &swapped),
            Some(false)
        );
        assert_eq!(same_definition("pkg/msg/Unknown", "int32 x"), None);
    }

    #[test]
    fn schema_text_concatenates_dependencies_in_first_seen_order() {
        let image = schema_text("sensor_msgs/msg/Image").unwrap();
        let sep = "=".repeat(80);
        assert!(image.starts_with("std_msgs/Header header\nuint32 height"));
        assert!(image.contains(&format!(
            "\n{sep}\nMSG: std_msgs/Header\nbuiltin_interfaces/Time stamp"
        )));
        assert!(image.ends_with(&format!(
            "{sep}\nMSG: builtin_interfaces/Time\nint32 sec\nuint32 nanosec"
        )));
        let twist = schema_text("geometry_msgs/TwistStamped").unwrap();
        let order: Vec<&str> = twist
            .lines()
            .filter_map(|l| l.strip_prefix("MSG: "))
            .collect();
        assert_eq!(
            order,
            [
                "std_msgs/Header",
                "builtin_interfaces/Time",
                "geometry_msgs/Twist",
                "geometry_msgs/Vector3"
            ]
        );
        let chunk = schema_text("bitvla_ros/msg/ActionChunk").unwrap();
        assert!(!chunk.contains('#'), "comments stripped");
        assert!(chunk.contains("float32[] normalized"));
        let status = schema_text("diagnostic_msgs/msg/DiagnosticArray").unwrap();
        assert!(status.contains("MSG: diagnostic_msgs/KeyValue"));
        assert!(schema_text("foo_msgs/msg/Bar").is_none());
    }

    #[test]
    fn messages_round_trip() {
        let img = Image {
            header: Header::new(1_500_000_001, "cam"),
            height: 2,
            width: 3,
            encoding: "rgb8".into(),
            is_bigendian: 0,
            step: 9,
            data: Cow::Owned((0..18).collect()),
        };
        let bytes = encode(&img);
        assert_eq!(decode::<Image>(&bytes).unwrap(), img);
        let traj = JointTrajectory {
            header: Header::new(-5, ""),
            joint_names: vec!["a".into(), "b".into()],
            points: vec![JointTrajectoryPoint {
                positions: vec![1.0, 2.0],
                time_from_start: Time::from_ns(50_000_000),
                ..Default::default()
            }],
        };
        assert_eq!(decode::<JointTrajectory>(&encode(&traj)).unwrap(), traj);
        assert_eq!(
            traj.header.stamp,
            Time {
                sec: -1,
                nanosec: 999_999_995
            }
        );
        let diag = DiagnosticArray {
            header: Header::default(),
            status: vec![DiagnosticStatus {
                level: 1,
                name: "n".into(),
                values: vec![("k".into(), "v".into())],
                ..Default::default()
            }],
        };
        assert_eq!(decode::<DiagnosticArray>(&encode(&diag)).unwrap(), diag);
        // A String decoded as an Image fails with the field named.
        let s = encode(&StringMsg {
            data: "hello".into(),
        });
        let e = decode::<Image>(&s).unwrap_err().to_string();
        assert!(e.contains("header.frame_id") || e.contains("height"), "{e}");
        // A TwistStamped decoded as a String leaves bytes over.
        assert!(decode::<StringMsg>(&encode(&TwistStamped::default())).is_err());
    }
}
