//! `bitvla replay`: a recorded episode through the node's exact logic, offline. The bag's
//! messages feed the same [`ControlCore`] the node runs (same scheduler, safety gate and command
//! mapping), ticked on the control-rate grid of bag time; what the node would have published
//! goes into an output bag, and a report says what happened.
//!
//! By default policy calls run inline and their results are used a fixed latency after the
//! observation (`--latency fixed:MS`), so the command stream depends only on the bag, the
//! model and the parameters: two runs, on any machines and thread counts, write identical
//! commands. `--latency measured` uses each call's measured duration instead; `--realtime` paces
//! by the bag clock and runs inference on the node's worker thread, as live.

use crate::bag::msgs::{
    self, BoolMsg, CompressedImage, DiagnosticArray, DiagnosticStatus, Header, Image, JointState,
    JointTrajectory, JointTrajectoryPoint, PoseStamped, StringMsg, TwistStamped, command_values,
    decode,
};
use crate::bag::{BagReader, BagWriter, Connection, ReadSummary};
use crate::control::core::{Command, CommandMode, ControlCore, CoreConfig, TickOutput, percentile};
use crate::model::Policy;
use crate::params::{CameraTransport, NODE_NAME, NodeParams};
use crate::report::Trace;
use crate::report::trace::TickPoint;
use crate::runtime::{InferenceWorker, Request, call};
use anyhow::Context;
use std::collections::{BTreeMap, HashMap};
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// When a chunk computed for an observation is used.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LatencyModel {
    /// This many seconds after the observation's control tick (deterministic).
    Fixed(f64),
    /// After the call's measured duration.
    Measured,
}

impl std::str::FromStr for LatencyModel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "measured" {
            return Ok(Self::Measured);
        }
        let ms = s
            .strip_prefix("fixed:")
            .and_then(|v| v.parse::<f64>().ok())
            .filter(|v| v.is_finite() && *v >= 0.0)
            .ok_or_else(|| {
                format!("latency {s:?}: expected fixed:MS (e.g. fixed:100) or measured")
            })?;
        Ok(Self::Fixed(ms / 1e3))
    }
}

impl std::fmt::Display for LatencyModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Fixed(s) => write!(f, "fixed:{}", s * 1e3),
            Self::Measured => write!(f, "measured"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ReplayOptions {
    pub params: NodeParams,
    pub latency: LatencyModel,
    pub realtime: bool,
    /// A topic with the actions that were executed when the bag was recorded.
    pub recorded_topic: Option<String>,
    /// An instruction in force from the start (bags recorded without one).
    pub instruction: Option<String>,
    pub threads: usize,
    pub progress: bool,
    /// Keep a [`Trace`] of every tick and call (for the HTML report).
    pub trace: bool,
}

/// One instruction seen in the bag.
#[derive(Debug, Clone, serde::Serialize)]
pub struct InstructionEvent {
    /// Seconds after the bag's first message.
    pub t_s: f64,
    pub text: String,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct LatencySummary {
    pub p50_ms: Option<f64>,
    pub p95_ms: Option<f64>,
    pub max_ms: Option<f64>,
}

/// Predicted vs recorded actions, aligned by time.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ActionComparison {
    pub topic: String,
    pub type_name: String,
    /// What was compared: the policy action (multi-array topics) or the command (twist/pose).
    pub against: String,
    pub pairs: u64,
    pub l1: Vec<f64>,
    pub rmse: Vec<f64>,
}

/// One command the replay published (for `--expect`).
#[derive(Debug, Clone, PartialEq)]
pub struct PublishedCommand {
    pub topic: String,
    pub log_time: u64,
    pub values: Vec<f64>,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ReplayReport {
    pub bag: String,
    pub output: String,
    /// The HTML report's path, when one was written.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub html: String,
    pub latency_model: String,
    pub realtime: bool,
    pub interrupted: bool,
    pub bag_messages: u64,
    pub bag_bytes: u64,
    pub bag_duration_s: f64,
    pub messages_per_topic: BTreeMap<String, u64>,
    pub instructions: Vec<InstructionEvent>,
    pub episodes: u64,
    pub inferences: u64,
    pub failed_inferences: u64,
    pub latency: LatencySummary,
    pub ticks: u64,
    pub commands: BTreeMap<String, u64>,
    pub chunks: u64,
    pub stale_chunks: u64,
    pub late_chunks: u64,
    pub holds: BTreeMap<String, u64>,
    pub frames_received: u64,
    pub frames_rejected: u64,
    pub messages_skipped: u64,
    pub recorded_vs_predicted: Option<ActionComparison>,
    /// The transport each camera topic was read with (`auto` resolved from the bag's types).
    pub camera_transports: BTreeMap<String, String>,
    pub warning_count: u64,
    /// Every warning, in order.
    pub warnings: Vec<String>,
    /// The warnings grouped by kind and topic, in the order each group first occurred.
    pub warning_summary: Vec<WarningGroup>,
    pub wall_s: f64,
    /// Wall time of the policy calls (preprocessing included).
    pub inference_s: f64,
    /// The image preprocessing (rotation, resize, crop, normalization) inside those calls.
    pub preprocess_s: f64,
    /// Share of the wall time outside the network: reading, decoding, preprocessing,
    /// scheduling, writing.
    pub overhead_fraction: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expect: Option<ExpectResult>,
}

/// Warnings of one kind on one topic (or about the bag's files, topic empty).
#[derive(Debug, Clone, serde::Serialize)]
pub struct WarningGroup {
    pub kind: String,
    pub topic: String,
    pub count: u64,
    /// Bag time of the first and last one, seconds after the bag's first message (None for
    /// warnings about the files).
    pub first_s: Option<f64>,
    pub last_s: Option<f64>,
    /// The first one in full.
    pub example: String,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ExpectResult {
    pub previous: String,
    pub tolerance: f64,
    pub compared: u64,
    pub max_abs_diff: f64,
    pub differences: Vec<String>,
    pub passed: bool,
}

/// Whether a recorded action topic of this type carries commands (`TwistStamped`,
/// `PoseStamped`: compared with the commands) rather than policy actions (multi-arrays, joint
/// trajectories: compared with the actions). The report and its charts follow this choice.
fn recorded_is_command(type_name: &str) -> bool {
    type_name.ends_with("Stamped")
}

/// What a bag topic is to the node.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Role {
    Camera { slot: usize, compressed: bool },
    Instruction,
    EStop,
    JointStates,
    EePose,
    Recorded,
    Ignored,
}

impl Role {
    fn expected_type(self) -> Option<&'static str> {
        Some(match self {
            Role::Camera {
                compressed: false, ..
            } => "sensor_msgs/msg/Image",
            Role::Camera {
                compressed: true, ..
            } => "sensor_msgs/msg/CompressedImage",
            Role::Instruction => "std_msgs/msg/String",
            Role::EStop => "std_msgs/msg/Bool",
            Role::JointStates => "sensor_msgs/msg/JointState",
            Role::EePose => "geometry_msgs/msg/PoseStamped",
            Role::Recorded | Role::Ignored => return None,
        })
    }
}

struct Replayer<'a> {
    opts: &'a ReplayOptions,
    core: ControlCore,
    out: Option<&'a mut BagWriter>,
    command_topic: String,
    gripper_topic: String,
    chunk_topic: String,
    dt_ns: u64,
    /// Ticks are at multiples of dt_ns; this is the next one.
    next_tick: u64,
    /// Bag time [ns] that core time 0 stands for.
    base_ns: u64,
    last_time: u64,
    /// Bag time of the first message [ns] (None before it).
    first_ns: Option<u64>,
    /// Durations of every policy call that returned a chunk.
    latencies_s: Vec<f64>,
    roles: HashMap<usize, Role>,
    /// The two cameras' transports (`auto` resolved per connection when the bag's summary
    /// did not say).
    transports: [CameraTransport; 2],
    /// Index into `report.warning_summary` per (kind, topic).
    groups: HashMap<(&'static str, String), usize>,
    report: ReplayReport,
    commands: Vec<PublishedCommand>,
    recorded: Option<(u64, Vec<f64>)>,
    recorded_type: String,
    sums: (Vec<f64>, Vec<f64>, u64),
    last_instruction: Option<String>,
    inline: Option<(Policy, rayon::ThreadPool)>,
    worker: Option<InferenceWorker>,
    wall_start: Instant,
    write_error: Option<anyhow::Error>,
    trace: Option<Trace>,
}

impl Replayer<'_> {
    /// Records a warning of `kind` on `topic` at bag time `t_ns` (None: about the files). The
    /// first of each kind and topic is logged as it happens; the rest are counted into its
    /// group, which the summary prints once.
    fn warn(&mut self, kind: &'static str, topic: &str, t_ns: Option<u64>, message: String) {
        let t_s = t_ns.map(|t| t.saturating_sub(self.first_ns.unwrap_or(t)) as f64 * 1e-9);
        self.report.warning_count += 1;
        match self.groups.get(&(kind, topic.to_owned())) {
            Some(&i) => {
                let g = &mut self.report.warning_summary[i];
                g.count += 1;
                if t_s.is_some() {
                    g.first_s = g.first_s.or(t_s);
                    g.last_s = t_s;
                }
            }
            None => {
                log::warn!("{message}");
                self.groups
                    .insert((kind, topic.to_owned()), self.report.warning_summary.len());
                self.report.warning_summary.push(WarningGroup {
                    kind: kind.to_owned(),
                    topic: topic.to_owned(),
                    count: 1,
                    first_s: t_s,
                    last_s: t_s,
                    example: message.clone(),
                });
            }
        }
        self.report.warnings.push(message);
    }

    /// Seconds after the bag's first message.
    fn bag_time(&self, ns: u64) -> f64 {
        ns.saturating_sub(self.first_ns.unwrap_or(ns)) as f64 * 1e-9
    }

    fn core_time(&self, ns: u64) -> f64 {
        (ns as i128 - self.base_ns as i128) as f64 * 1e-9
    }

    fn role(&mut self, c: &Connection) -> Role {
        if let Some(&r) = self.roles.get(&c.id) {
            return r;
        }
        let p = &self.opts.params;
        let t = c.topic.as_str();
        let camera = if t == p.camera_topic {
            Some((0, "camera_transport"))
        } else if !p.wrist_camera_topic.is_empty() && t == p.wrist_camera_topic {
            Some((1, "wrist_camera_transport"))
        } else {
            None
        };
        let mut role = if let Some((slot, param)) = camera {
            match self.transports[slot].resolve(param, t, &c.type_name) {
                Ok(transport) => {
                    self.report
                        .camera_transports
                        .insert(t.to_owned(), transport.name().to_owned());
                    Role::Camera {
                        slot,
                        compressed: transport == CameraTransport::Compressed,
                    }
                }
                Err(e) => {
                    self.warn(
                        "type_mismatch",
                        t,
                        None,
                        format!("{e}; its messages are skipped"),
                    );
                    Role::Ignored
                }
            }
        } else if t == p.instruction_topic {
            Role::Instruction
        } else if t == p.estop_topic {
            Role::EStop
        } else if self.core.config().needs_joint_states() && t == p.joint_states_topic {
            Role::JointStates
        } else if self.core.config().needs_ee_pose() && t == p.ee_pose_topic {
            Role::EePose
        } else if self.opts.recorded_topic.as_deref() == Some(t) {
            self.recorded_type.clone_from(&c.type_name);
            Role::Recorded
        } else {
            Role::Ignored
        };
        if c.encoding != "cdr" && role != Role::Ignored {
            self.warn(
                "encoding",
                t,
                None,
                format!(
                    "topic {t}: message encoding {:?} is not cdr; its messages are skipped",
                    c.encoding
                ),
            );
            role = Role::Ignored;
        }
        if let Some(expected) = role.expected_type()
            && c.type_name != expected
        {
            self.warn("type_mismatch", t, None, format!(
                "topic {t}: type {} in the bag, the node subscribes with {expected}; its messages are skipped",
                c.type_name
            ));
            role = Role::Ignored;
        }
        if role == Role::Recorded && command_values(&c.type_name, &[]).is_none() {
            self.warn(
                "type_mismatch",
                t,
                None,
                format!(
                    "recorded action topic {t}: type {} is not comparable (use Float64MultiArray, \
                 Float32MultiArray, TwistStamped, PoseStamped or JointTrajectory)",
                    c.type_name
                ),
            );
            role = Role::Ignored;
        }
        self.roles.insert(c.id, role);
        role
    }

    fn deliver(&mut self, role: Role, topic: &str, t_ns: u64, data: &[u8]) {
        let now = self.core_time(t_ns);
        let t_s = t_ns as f64 * 1e-9;
        let bad = |e: &dyn std::fmt::Display| format!("{topic} at {t_s:.3} s: {e}");
        match role {
            Role::Camera { slot, compressed } => {
                let decoded = if compressed {
                    decode::<CompressedImage>(data)
                        .map_err(|e| bad(&e))
                        .and_then(|m| crate::obs::decode_compressed(&m.data).map_err(|e| bad(&e)))
                } else {
                    decode::<Image>(data).map_err(|e| bad(&e)).and_then(|m| {
                        crate::obs::decode_raw(
                            &m.encoding,
                            m.width,
                            m.height,
                            m.step as usize,
                            &m.data,
                        )
                        .map_err(|e| bad(&e))
                    })
                };
                match decoded {
                    Ok(img) => self.core.on_frame(slot, img, now),
                    Err(e) => {
                        self.core.on_rejected_frame();
                        self.warn(
                            "rejected_frame",
                            topic,
                            Some(t_ns),
                            format!("rejected frame: {e}"),
                        );
                    }
                }
            }
            Role::Instruction => match decode::<StringMsg>(data) {
                Ok(m) => self.instruction(t_ns, &m.data),
                Err(e) => self.warn("undecodable", topic, Some(t_ns), bad(&e)),
            },
            Role::EStop => match decode::<BoolMsg>(data) {
                Ok(m) => self.core.on_estop(m.data),
                Err(e) => self.warn("undecodable", topic, Some(t_ns), bad(&e)),
            },
            Role::JointStates => match decode::<JointState>(data) {
                Ok(m) => self.core.on_joint_states(&m.name, &m.position),
                Err(e) => self.warn("undecodable", topic, Some(t_ns), bad(&e)),
            },
            Role::EePose => match decode::<PoseStamped>(data) {
                Ok(m) => {
                    let [x, y, z] = m.position;
                    let [qx, qy, qz, qw] = m.orientation;
                    let rotation = nalgebra::UnitQuaternion::from_quaternion(
                        nalgebra::Quaternion::new(qw, qx, qy, qz),
                    );
                    self.core.on_ee_pose(nalgebra::Isometry3::from_parts(
                        nalgebra::Translation3::new(x, y, z),
                        rotation,
                    ));
                }
                Err(e) => self.warn("undecodable", topic, Some(t_ns), bad(&e)),
            },
            Role::Recorded => match command_values(&self.recorded_type, data) {
                Some(Ok(v)) => {
                    let t = self.bag_time(t_ns);
                    if let Some(trace) = &mut self.trace {
                        trace.on_recorded(t, v.clone());
                    }
                    self.recorded = Some((t_ns, v));
                }
                Some(Err(e)) => self.warn("undecodable", topic, Some(t_ns), bad(&e)),
                None => {}
            },
            Role::Ignored => {}
        }
    }

    fn instruction(&mut self, t_ns: u64, text: &str) {
        let t_s = t_ns.saturating_sub(self.first_ns.unwrap_or(t_ns)) as f64 * 1e-9;
        if !self.core.on_instruction(text) {
            let topic = self.opts.params.instruction_topic.clone();
            self.warn(
                "empty_instruction",
                &topic,
                Some(t_ns),
                format!("empty instruction at {t_s:.3} s ignored"),
            );
            return;
        }
        let text = text.trim().to_owned();
        if self.last_instruction.as_deref() != Some(text.as_str()) {
            self.report.episodes += 1;
        }
        self.report.instructions.push(InstructionEvent {
            t_s,
            text: text.clone(),
        });
        self.last_instruction = Some(text);
    }

    /// Runs every control tick before `until` (ns, exclusive).
    fn ticks_until(&mut self, until: u64, stop: &AtomicBool) {
        while self.next_tick < until && !stop.load(Ordering::Relaxed) {
            let t = self.next_tick;
            self.next_tick += self.dt_ns;
            self.tick(t);
        }
    }

    fn tick(&mut self, t_ns: u64) {
        let now = self.core_time(t_ns);
        if let Some(worker) = &self.worker {
            // Real time: wait for the bag clock, taking chunks as the worker finishes them.
            let due = self.wall_start + Duration::from_secs_f64(now.max(0.0));
            while let Some(left) = due.checked_duration_since(Instant::now()) {
                if let Some(r) = worker.recv_timeout(left) {
                    self.core.on_response(r, now);
                }
            }
            while let Some(r) = worker.try_recv() {
                self.core.on_response(r, now);
            }
        }
        let out = self.core.tick(now);
        if let Some(request) = &out.request {
            let t = self.bag_time(t_ns);
            if let Some(trace) = &mut self.trace {
                trace.on_call(request.id, t, &request.observation.images);
            }
            self.run(request, now);
        }
        self.emit(t_ns, out);
    }

    fn run(&mut self, request: &Request, now: f64) {
        if let Some(worker) = &self.worker {
            worker.submit(request.clone());
            return;
        }
        let Some((policy, pool)) = &self.inline else {
            return;
        };
        let response = call(policy, pool, request);
        self.report.inference_s += response.latency_s;
        let arrival = match self.opts.latency {
            LatencyModel::Fixed(_) => now,
            LatencyModel::Measured => now + response.latency_s,
        };
        self.core.on_response(response, arrival);
    }

    fn write<'m, M: msgs::RosMessage<'m>>(&mut self, topic: &str, t_ns: u64, m: &M) {
        if let Some(out) = self.out.as_deref_mut()
            && self.write_error.is_none()
            && let Err(e) = out.write(topic, t_ns, m)
        {
            self.write_error = Some(e.into());
        }
    }

    fn emit(&mut self, t_ns: u64, out: TickOutput) {
        let p = &self.opts.params;
        let header = Header::new(t_ns as i64, &p.frame_id);
        let t_bag = self.bag_time(t_ns);
        for c in &out.chunks {
            self.latencies_s.push(c.latency_s);
            if let Some(trace) = &mut self.trace {
                trace.on_chunk(c.id, c.latency_s, c.chunk.step(0));
            }
            self.report.preprocess_s += c.chunk.timings.preprocess_ms / 1e3;
            let stamp = self.base_ns as i128 + (c.observation_stamp * 1e9).round() as i128;
            let msg = c.message(stamp as i64, &p.frame_id);
            let topic = self.chunk_topic.clone();
            self.write(&topic, t_ns, &msg);
        }
        for (id, e) in &out.failures {
            if let Some(trace) = &mut self.trace {
                trace.on_failure(*id, e);
            }
            let message = format!("policy call {id} failed: {e}");
            self.warn("policy_failed", "", Some(t_ns), message);
        }
        if let Some(command) = &out.command {
            let topic = self.command_topic.clone();
            match command {
                Command::Twist { linear, angular } => self.write(
                    &topic,
                    t_ns,
                    &TwistStamped {
                        header,
                        linear: *linear,
                        angular: *angular,
                    },
                ),
                Command::Pose {
                    position,
                    orientation,
                } => self.write(
                    &topic,
                    t_ns,
                    &PoseStamped {
                        header,
                        position: *position,
                        orientation: *orientation,
                    },
                ),
                Command::Joints(positions) => {
                    let config = self.core.config();
                    if config.mode == CommandMode::JointTrajectory {
                        let msg = JointTrajectory {
                            header,
                            joint_names: config.joints.names.clone(),
                            points: vec![JointTrajectoryPoint {
                                positions: positions.clone(),
                                time_from_start: msgs::Time::from_ns(self.dt_ns as i64),
                                ..Default::default()
                            }],
                        };
                        self.write(&topic, t_ns, &msg);
                    } else {
                        let msg = msgs::Float64MultiArray::vector("joints", positions.clone());
                        self.write(&topic, t_ns, &msg);
                    }
                }
            }
            *self.report.commands.entry(topic.clone()).or_default() += 1;
            self.commands.push(PublishedCommand {
                topic,
                log_time: t_ns,
                values: command.values(),
            });
            if let Some(g) = out.gripper {
                let topic = self.gripper_topic.clone();
                self.write(
                    &topic,
                    t_ns,
                    &msgs::Float64MultiArray::vector("gripper", vec![g]),
                );
                *self.report.commands.entry(topic).or_default() += 1;
            }
            // Predicted vs recorded, when an action was executed and a recent recording exists.
            if out.hold.is_none()
                && let Some((t_rec, recorded)) = &self.recorded
                && t_ns.saturating_sub(*t_rec) <= self.dt_ns
            {
                let predicted: Vec<f64> = if recorded_is_command(&self.recorded_type) {
                    command.values()
                } else {
                    out.action.iter().flatten().map(|&v| f64::from(v)).collect()
                };
                let n = predicted.len().min(recorded.len());
                let (l1, sq, pairs) = &mut self.sums;
                l1.resize(n.max(l1.len()), 0.0);
                sq.resize(n.max(sq.len()), 0.0);
                for i in 0..n {
                    let d = predicted[i] - recorded[i];
                    l1[i] += d.abs();
                    sq[i] += d * d;
                }
                *pairs += 1;
            }
        }
        let status = self.core.status(self.core_time(t_ns));
        if let Some(trace) = &mut self.trace {
            trace.on_tick(TickPoint {
                t_s: t_bag,
                action: out.action.clone(),
                command: out.command.as_ref().map(Command::values),
                hold: out.hold.as_ref().map(|h| h.kind()),
                chunk: status.chunk.map(|(seq, _)| seq),
            });
        }
        let status = status.message(t_ns as i64, &p.frame_id);
        self.write(&format!("/{NODE_NAME}/status"), t_ns, &status);
        if let Some(d) = out.diagnostics {
            let msg = DiagnosticArray {
                header: Header::new(t_ns as i64, ""),
                status: vec![DiagnosticStatus {
                    level: d.level,
                    name: format!("{NODE_NAME}: policy"),
                    message: d.message,
                    hardware_id: String::new(),
                    values: d.values,
                }],
            };
            self.write("/diagnostics", t_ns, &msg);
        }
    }
}

/// This package's messages (`bitvla_ros/msg/*`) in a bag whose embedded definition differs from
/// this build's `msg/` (a bag recorded with another version): named, never decoded.
pub fn foreign_definitions(bag: &BagReader) -> Vec<String> {
    bag.definitions()
        .into_iter()
        .filter(|(_, ty, def)| {
            ty.starts_with("bitvla_ros/") && msgs::same_definition(ty, def) != Some(true)
        })
        .map(|(topic, ty, _)| {
            let file = ty.rsplit('/').next().unwrap_or(&ty).to_owned();
            format!(
                "topic {topic}: the bag's definition of {ty} differs from this build's \
                 msg/{file}.msg (recorded by another version of bitvla_ros); its messages are not \
                 decoded"
            )
        })
        .collect()
}

/// The result of a replay: the report and the commands published (in order).
pub struct ReplayOutcome {
    pub report: ReplayReport,
    /// Every tick and call, when [`ReplayOptions::trace`] asked for it.
    pub trace: Option<Trace>,
    /// The topic the commands went to (the node's command topic, or its dry-run topic).
    pub command_topic: String,
    pub commands: Vec<PublishedCommand>,
}

/// Replays `bag` through the node's logic with `policy`, writing into `out` when given. Stops
/// early (with a valid partial output) when `stop` is set. The stages: map the bag's topics to
/// what the node subscribes ([`map_topics`]), set up the core and the policy
/// ([`Replayer::new`]), read the bag in log-time order ticking the core on the control grid and
/// writing what it publishes ([`Replayer::play`]), then the report ([`Replayer::finish`]).
pub fn replay(
    bag: &BagReader,
    policy: Policy,
    opts: &ReplayOptions,
    out: Option<&mut BagWriter>,
    stop: &AtomicBool,
) -> anyhow::Result<ReplayOutcome> {
    let transports = map_topics(bag, &opts.params, opts.instruction.is_some())?;
    let mut r = Replayer::new(bag, policy, opts, out, transports)?;
    let read = r.play(bag, stop)?;
    Ok(r.finish(read, stop))
}

/// Checks that the bag has the topics the parameters name, and resolves the cameras'
/// transports: `auto` takes the bag's type (an error naming the parameter when it is not an
/// image type). When a file has no readable summary the topics are not known up front: `auto`
/// is then resolved from each connection's type as its messages arrive.
fn map_topics(
    bag: &BagReader,
    p: &NodeParams,
    instruction_given: bool,
) -> anyhow::Result<[CameraTransport; 2]> {
    let mut transports = [
        CameraTransport::parse("camera_transport", &p.camera_transport)
            .map_err(anyhow::Error::msg)?,
        CameraTransport::parse("wrist_camera_transport", &p.wrist_camera_transport)
            .map_err(anyhow::Error::msg)?,
    ];
    let Some(topics) = bag.topics() else {
        return Ok(transports);
    };
    let names: Vec<&str> = topics.iter().map(|(t, _)| t.as_str()).collect();
    anyhow::ensure!(
        names.contains(&p.camera_topic.as_str()),
        "the bag has no camera topic {} (camera_topic); its topics: {names:?}. Set camera_topic \
         in the parameter file (--params)",
        p.camera_topic
    );
    if !p.wrist_camera_topic.is_empty() && !names.contains(&p.wrist_camera_topic.as_str()) {
        anyhow::bail!(
            "the bag has no wrist camera topic {} (wrist_camera_topic); its topics: {names:?}",
            p.wrist_camera_topic
        );
    }
    if !instruction_given && !names.contains(&p.instruction_topic.as_str()) {
        log::warn!(
            "the bag has no instruction topic {}: the replay holds throughout; pass \
             --instruction TEXT to give one",
            p.instruction_topic
        );
    }
    let cameras = [
        (&p.camera_topic, "camera_transport"),
        (&p.wrist_camera_topic, "wrist_camera_transport"),
    ];
    for (slot, (topic, param)) in cameras.into_iter().enumerate() {
        if transports[slot] != CameraTransport::Auto || topic.is_empty() {
            continue;
        }
        let types: Vec<&str> = topics
            .iter()
            .filter(|(t, _)| t == topic)
            .map(|(_, ty)| ty.as_str())
            .collect();
        // One type: resolved now (or an error). Several (a bag that recorded a retyped topic):
        // each connection is resolved as its messages arrive.
        if let [ty] = types[..] {
            transports[slot] = CameraTransport::Auto
                .resolve(param, topic, ty)
                .map_err(anyhow::Error::msg)?;
            log::info!(
                "{param} auto: {topic} is {ty} in the bag, read as {}",
                transports[slot].name()
            );
        }
    }
    Ok(transports)
}

impl<'a> Replayer<'a> {
    /// The core configured from the parameters (with the replay's latency model) and the
    /// policy on an inline pool, or on the node's worker thread for `--realtime`.
    fn new(
        bag: &BagReader,
        policy: Policy,
        opts: &'a ReplayOptions,
        out: Option<&'a mut BagWriter>,
        transports: [CameraTransport; 2],
    ) -> anyhow::Result<Self> {
        let p = &opts.params;
        let mut core_params = p.clone();
        core_params.fixed_latency_s = match opts.latency {
            LatencyModel::Fixed(s) => s,
            LatencyModel::Measured => 0.0,
        };
        let config =
            CoreConfig::from_params(&core_params, policy.action_dim(), policy.proprio_dim())
                .map_err(|e| anyhow::anyhow!("parameters: {e}"))?;
        let dt_ns = (1e9 / p.control_rate_hz).round().max(1.0) as u64;
        let trace = opts.trace.then(|| {
            let cameras = [&p.camera_topic, &p.wrist_camera_topic]
                .into_iter()
                .filter(|t| !t.is_empty())
                .cloned()
                .collect();
            Trace::for_core(&config, policy.action_dim(), cameras)
        });
        let (inline, worker) = if opts.realtime {
            let worker = InferenceWorker::spawn(policy, opts.threads)
                .context("starting the inference thread")?;
            (None, Some(worker))
        } else {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(opts.threads)
                .build()
                .context("building the inference thread pool")?;
            (Some((policy, pool)), None)
        };
        let dry = |topic: &str, own: &str| {
            if p.dry_run {
                format!("/{NODE_NAME}/dry_run/{own}")
            } else {
                topic.to_owned()
            }
        };
        Ok(Self {
            trace,
            opts,
            core: ControlCore::new(config),
            out,
            command_topic: dry(&p.command_topic, "command"),
            gripper_topic: dry(&p.gripper_topic, "gripper"),
            chunk_topic: format!("/{NODE_NAME}/action_chunk"),
            dt_ns,
            next_tick: 0,
            base_ns: 0,
            last_time: 0,
            first_ns: None,
            latencies_s: Vec::new(),
            roles: HashMap::new(),
            transports,
            groups: HashMap::new(),
            report: ReplayReport {
                bag: bag.path().display().to_string(),
                latency_model: opts.latency.to_string(),
                realtime: opts.realtime,
                ..Default::default()
            },
            commands: Vec::new(),
            recorded: None,
            recorded_type: String::new(),
            sums: (Vec::new(), Vec::new(), 0),
            last_instruction: None,
            inline,
            worker,
            wall_start: Instant::now(),
            write_error: None,
        })
    }

    /// Reads the bag in log-time order: each message runs the control ticks before its time,
    /// then is delivered; after the last one, the ticks up to its time. The bag's own damage
    /// comes back as warnings in the read summary.
    fn play(&mut self, bag: &BagReader, stop: &AtomicBool) -> anyhow::Result<ReadSummary> {
        let progress = if self.opts.progress {
            indicatif::ProgressBar::new(bag.size())
        } else {
            indicatif::ProgressBar::hidden()
        };
        progress.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} replay [{bar:30}] {bytes}/{total_bytes} {msg} ({eta})",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        for w in foreign_definitions(bag) {
            self.warn("definition", "", None, w);
        }
        let read = bag.read(|m| {
            if stop.load(Ordering::Relaxed) || self.write_error.is_some() {
                return ControlFlow::Break(());
            }
            progress.inc(m.data.len() as u64);
            self.message(m.connection, m.log_time, m.data, stop);
            if self.core.stats().ticks.is_multiple_of(20) {
                progress.set_message(format!(
                    "{} inferences, {} commands",
                    self.core.stats().requests,
                    self.core.stats().commands
                ));
            }
            ControlFlow::Continue(())
        })?;
        // The ticks up to and including the last message's time.
        self.ticks_until(self.last_time + 1, stop);
        progress.finish_and_clear();
        if let Some(e) = self.write_error.take() {
            return Err(e.context("writing the output bag"));
        }
        Ok(read)
    }

    /// One message of the bag, at log time `t` [ns].
    fn message(&mut self, connection: &Connection, mut t: u64, data: &[u8], stop: &AtomicBool) {
        if self.first_ns.is_none() {
            // The tick grid is absolute (multiples of the period), as the node's under sim time.
            self.first_ns = Some(t);
            self.next_tick = t.div_ceil(self.dt_ns) * self.dt_ns;
            self.base_ns = self.next_tick.saturating_sub(self.dt_ns);
            self.last_time = t;
            self.wall_start = Instant::now();
            if let Some(text) = &self.opts.instruction {
                self.instruction(t, text);
            }
        }
        // The reader delivers log-time order; a time going back can only come from a file
        // whose chunk headers misstate their time ranges.
        if t < self.last_time {
            let message = format!(
                "{} at {:.3} s: timestamp goes back {:.3} s; used as arriving at {:.3} s",
                connection.topic,
                t as f64 * 1e-9,
                (self.last_time - t) as f64 * 1e-9,
                self.last_time as f64 * 1e-9
            );
            self.warn("time_goes_back", &connection.topic, Some(t), message);
            t = self.last_time;
        }
        self.last_time = t;
        *self
            .report
            .messages_per_topic
            .entry(connection.topic.clone())
            .or_default() += 1;
        let role = self.role(connection);
        if role == Role::Ignored {
            self.report.messages_skipped += 1;
        }
        // Messages at a tick's time arrive before that tick.
        self.ticks_until(t, stop);
        self.deliver(role, &connection.topic, t, data);
    }

    /// The report of a finished (or interrupted) replay.
    fn finish(mut self, read: ReadSummary, stop: &AtomicBool) -> ReplayOutcome {
        for w in read.warnings {
            self.warn("bag", "", None, w);
        }
        if let Some(topic) = &self.opts.recorded_topic {
            self.compare_recorded(topic);
        }
        let stats = self.core.stats().clone();
        let ms = |v: Option<f64>| v.map(|s| (s * 1e3 * 1000.0).round() / 1000.0);
        let latencies = &self.latencies_s;
        let report = &mut self.report;
        report.interrupted = stop.load(Ordering::Relaxed);
        report.bag_messages = read.messages;
        report.bag_bytes = read.bytes;
        report.bag_duration_s = self
            .first_ns
            .map_or(0.0, |f| (self.last_time - f) as f64 * 1e-9);
        report.inferences = stats.requests;
        report.failed_inferences = stats.failed_calls;
        report.latency = LatencySummary {
            p50_ms: ms(percentile(latencies, 0.5)),
            p95_ms: ms(percentile(latencies, 0.95)),
            max_ms: ms(latencies.iter().copied().reduce(f64::max)),
        };
        if self.opts.realtime {
            report.inference_s = latencies.iter().sum();
        }
        report.ticks = stats.ticks;
        report.chunks = stats.chunks;
        report.stale_chunks = stats.stale_chunks;
        report.late_chunks = stats.late_responses;
        report.holds = stats
            .holds
            .iter()
            .map(|(k, v)| ((*k).to_owned(), *v))
            .collect();
        report.frames_received = stats.frames_received;
        report.frames_rejected = stats.frames_rejected;
        report.wall_s = self.wall_start.elapsed().as_secs_f64();
        report.overhead_fraction = if report.wall_s > 0.0 {
            ((report.wall_s - report.inference_s + report.preprocess_s) / report.wall_s)
                .clamp(0.0, 1.0)
        } else {
            0.0
        };
        ReplayOutcome {
            report: self.report,
            trace: self.trace,
            command_topic: self.command_topic,
            commands: self.commands,
        }
    }

    /// Predicted vs recorded actions on `topic`: the per-dimension means of the pairs summed
    /// while ticking, and a warning when no pair was found.
    fn compare_recorded(&mut self, topic: &str) {
        let (l1, sq, pairs) = &self.sums;
        let n = (*pairs).max(1) as f64;
        let pairs = *pairs;
        self.report.recorded_vs_predicted = Some(ActionComparison {
            topic: topic.to_owned(),
            type_name: self.recorded_type.clone(),
            against: if recorded_is_command(&self.recorded_type) {
                "command".into()
            } else {
                "action".into()
            },
            pairs,
            l1: l1.iter().map(|s| s / n).collect(),
            rmse: sq.iter().map(|s| (s / n).sqrt()).collect(),
        });
        if pairs == 0 {
            let message = format!(
                "recorded action topic {topic}: no recorded action within one control period of \
                 an executed command; nothing compared"
            );
            self.warn("not_compared", topic, None, message);
        }
    }
}

/// Compares this run's commands (on `topic`) with those on the same topic in a previous output
/// bag: same times and count, every value within `tolerance`.
pub fn compare_with(
    previous: &BagReader,
    topic: &str,
    commands: &[PublishedCommand],
    tolerance: f64,
) -> anyhow::Result<ExpectResult> {
    let mut old = Vec::new();
    let mut errors = Vec::new();
    previous.read(|m| {
        let t = m.connection.topic.as_str();
        if t == topic {
            match command_values(&m.connection.type_name, m.data) {
                Some(Ok(values)) => old.push(PublishedCommand {
                    topic: t.to_owned(),
                    log_time: m.log_time,
                    values,
                }),
                Some(Err(e)) => errors.push(format!("{t} at {}: {e}", m.log_time)),
                None => {}
            }
        }
        ControlFlow::Continue(())
    })?;
    let mut differences = errors;
    let mut max_abs_diff = 0.0f64;
    if old.len() != commands.len() {
        differences.push(format!(
            "{} commands now, {} in {}",
            commands.len(),
            old.len(),
            previous.path().display()
        ));
    }
    for (i, (a, b)) in commands.iter().zip(&old).enumerate() {
        if a.topic != b.topic || a.log_time != b.log_time || a.values.len() != b.values.len() {
            differences.push(format!(
                "command {i}: now {} at {} ns ({} values), before {} at {} ns ({} values)",
                a.topic,
                a.log_time,
                a.values.len(),
                b.topic,
                b.log_time,
                b.values.len()
            ));
            continue;
        }
        for (k, (x, y)) in a.values.iter().zip(&b.values).enumerate() {
            let d = (x - y).abs();
            let d = if d.is_nan() { f64::INFINITY } else { d };
            max_abs_diff = max_abs_diff.max(d);
            if d > tolerance {
                differences.push(format!(
                    "command {i} ({} at {} ns), value {k}: now {x}, before {y} (|diff| {d:.3e} > {tolerance:.3e})",
                    a.topic, a.log_time
                ));
            }
        }
    }
    let total = differences.len();
    differences.truncate(20);
    if total > 20 {
        differences.push(format!("... and {} more", total - 20));
    }
    Ok(ExpectResult {
        previous: previous.path().display().to_string(),
        tolerance,
        compared: commands.len().min(old.len()) as u64,
        max_abs_diff,
        passed: total == 0,
        differences,
    })
}

/// One line for a group of warnings: how many, where, when, and the first one.
fn warning_group_line(g: &WarningGroup) -> String {
    let what = if g.topic.is_empty() {
        g.kind.clone()
    } else {
        format!("{} on {}", g.kind, g.topic)
    };
    let when = match (g.first_s, g.last_s) {
        (Some(a), Some(b)) if g.count > 1 => format!(", {a:.3} s to {b:.3} s"),
        (Some(a), _) => format!(", at {a:.3} s"),
        _ => String::new(),
    };
    let times = if g.count == 1 {
        "once".to_owned()
    } else {
        format!("{} times", g.count)
    };
    format!("{what}: {times}{when}; first: {}", g.example)
}

/// The report as a few lines for a terminal.
pub fn summary(report: &ReplayReport) -> String {
    let mut s = String::new();
    let mut line = |l: String| {
        s.push_str(&l);
        s.push('\n');
    };
    line(format!(
        "replayed {} messages ({:.1} MB, {:.2} s of bag time) in {:.2} s{}",
        report.bag_messages,
        report.bag_bytes as f64 / 1e6,
        report.bag_duration_s,
        report.wall_s,
        if report.interrupted {
            " — interrupted, output is partial"
        } else {
            ""
        }
    ));
    let instructions: Vec<String> = report
        .instructions
        .iter()
        .map(|i| format!("{:.2} s {:?}", i.t_s, i.text))
        .collect();
    line(format!(
        "instructions: {} ({} episodes) {}",
        report.instructions.len(),
        report.episodes,
        instructions.join(", ")
    ));
    let f = |v: Option<f64>| v.map_or("n/a".into(), |x| format!("{x:.1}"));
    line(format!(
        "inferences: {} ({} failed), latency p50 {} ms, p95 {} ms [{}]; chunks {} (stale {}, late {})",
        report.inferences,
        report.failed_inferences,
        f(report.latency.p50_ms),
        f(report.latency.p95_ms),
        report.latency_model,
        report.chunks,
        report.stale_chunks,
        report.late_chunks
    ));
    for (topic, n) in &report.commands {
        line(format!("commands: {n} on {topic}"));
    }
    if !report.holds.is_empty() {
        let holds: Vec<String> = report
            .holds
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        line(format!(
            "ticks: {}, held: {}",
            report.ticks,
            holds.join(", ")
        ));
    }
    line(format!(
        "frames: {} decoded, {} rejected; {} messages on other topics",
        report.frames_received, report.frames_rejected, report.messages_skipped
    ));
    if let Some(c) = &report.recorded_vs_predicted {
        let fmt = |v: &[f64]| {
            v.iter()
                .map(|x| format!("{x:.4}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        line(format!(
            "vs recorded {} ({} pairs, {}): L1 [{}], RMSE [{}]",
            c.topic,
            c.pairs,
            c.against,
            fmt(&c.l1),
            fmt(&c.rmse)
        ));
    }
    if report.warning_count > 0 {
        line(format!(
            "warnings: {} ({} kinds; the report's `warnings` lists every one)",
            report.warning_count,
            report.warning_summary.len()
        ));
        for g in &report.warning_summary {
            line(format!("  {}", warning_group_line(g)));
        }
    }
    line(format!(
        "time: {:.2} s in policy calls ({:.2} s of it preprocessing); outside the network {:.1}% of wall time",
        report.inference_s,
        report.preprocess_s,
        report.overhead_fraction * 100.0
    ));
    if let Some(e) = &report.expect {
        line(format!(
            "expect {}: {} ({} commands compared, max |diff| {:.3e}, tolerance {:.3e})",
            e.previous,
            if e.passed { "same" } else { "DIFFERENT" },
            e.compared,
            e.max_abs_diff,
            e.tolerance
        ));
        for d in &e.differences {
            line(format!("  {d}"));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_models_parse() {
        assert_eq!("fixed:100".parse(), Ok(LatencyModel::Fixed(0.1)));
        assert_eq!("measured".parse(), Ok(LatencyModel::Measured));
        assert!("fixed:-1".parse::<LatencyModel>().is_err());
        assert!("100".parse::<LatencyModel>().is_err());
        assert_eq!(LatencyModel::Fixed(0.25).to_string(), "fixed:250");
    }
}
