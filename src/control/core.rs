//! The node's decision logic in one clock-agnostic state machine, shared by `bitvla_node` (ROS
//! time) and `bitvla replay` (bag time): inputs are fed as they arrive, [`ControlCore::tick`] is
//! called once per control period and says what to submit to the policy, which command to
//! publish, why it holds, and when to publish diagnostics. Nothing here knows ROS or bags.

use crate::bag::msgs;
use crate::control::mapping::clamp_to_workspace;
use crate::control::{
    ChunkScheduler, EeScales, Hold, SafetyConfig, SafetyInputs, SchedulerConfig, pose_target, twist,
};
use crate::model::{ActionChunk, Observation};
use crate::params::NodeParams;
use crate::runtime::{Request, Response};
use image::RgbImage;
use nalgebra::Isometry3;
use std::collections::{BTreeMap, VecDeque};

/// Times closer than this are the same instant: absolute ROS times in f64 seconds carry about
/// 0.2 µs of rounding, and a response due at a tick must be used at that tick in every clock.
const TIME_EPS: f64 = 1e-6;

/// Calls whose durations the diagnostics' percentiles cover.
const RECENT_LATENCIES: usize = 100;

/// What the node publishes for an action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandMode {
    /// `geometry_msgs/TwistStamped` (MoveIt Servo, speed units).
    EeDeltaTwist,
    /// `geometry_msgs/PoseStamped`: the current end-effector pose plus the predicted delta.
    EePose,
    /// `trajectory_msgs/JointTrajectory` with one point one control period ahead.
    JointTrajectory,
    /// `std_msgs/Float64MultiArray` of joint positions (forward position controller).
    JointPositions,
}

impl CommandMode {
    pub fn ros_type(self) -> &'static str {
        match self {
            CommandMode::EeDeltaTwist => "geometry_msgs/msg/TwistStamped",
            CommandMode::EePose => "geometry_msgs/msg/PoseStamped",
            CommandMode::JointTrajectory => "trajectory_msgs/msg/JointTrajectory",
            CommandMode::JointPositions => "std_msgs/msg/Float64MultiArray",
        }
    }

    /// Names of [`Command::values`] in this mode (joint modes: the commanded joints).
    pub fn value_names(self, joint_names: &[String]) -> Vec<String> {
        let fields: &[&str] = match self {
            CommandMode::EeDeltaTwist => &[
                "linear.x",
                "linear.y",
                "linear.z",
                "angular.x",
                "angular.y",
                "angular.z",
            ],
            CommandMode::EePose => &[
                "position.x",
                "position.y",
                "position.z",
                "orientation.x",
                "orientation.y",
                "orientation.z",
                "orientation.w",
            ],
            CommandMode::JointTrajectory | CommandMode::JointPositions => {
                return joint_names.to_vec();
            }
        };
        fields.iter().map(|f| (*f).to_owned()).collect()
    }
}

/// One command for the arm, in the command frame.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// Linear [m/s] and angular [rad/s] velocity.
    Twist { linear: [f64; 3], angular: [f64; 3] },
    /// Target pose: position [m], orientation as a unit quaternion (x, y, z, w).
    Pose {
        position: [f64; 3],
        orientation: [f64; 4],
    },
    /// Joint position targets [rad], in the order of the `joint_names` parameter.
    Joints(Vec<f64>),
}

impl Command {
    /// The values in message field order (twist: linear, angular; pose: position, x y z w).
    pub fn values(&self) -> Vec<f64> {
        match self {
            Command::Twist { linear, angular } => linear.iter().chain(angular).copied().collect(),
            Command::Pose {
                position,
                orientation,
            } => position.iter().chain(orientation).copied().collect(),
            Command::Joints(p) => p.clone(),
        }
    }
}

/// A chunk that the scheduler took this tick (published on `~/action_chunk`).
#[derive(Debug, Clone)]
pub struct ChunkEvent {
    pub id: u64,
    /// Time of the observation the chunk was predicted from (caller's clock, seconds).
    pub observation_stamp: f64,
    pub instruction: String,
    pub latency_s: f64,
    pub chunk: ActionChunk,
}

impl ChunkEvent {
    /// The `bitvla_ros/msg/ActionChunk` the node publishes on `~/action_chunk` and the replay
    /// writes: stamped with the observation (`stamp_ns`, the caller's clock).
    pub fn message(&self, stamp_ns: i64, frame_id: &str) -> msgs::ActionChunkMsg {
        msgs::ActionChunkMsg {
            header: msgs::Header::new(stamp_ns, frame_id),
            sequence: self.id,
            instruction: self.instruction.clone(),
            unnorm_key: self.chunk.unnorm_key.clone(),
            horizon: self.chunk.horizon as u32,
            dimension_names: msgs::dimension_names(self.chunk.action_dim),
            normalized: self.chunk.normalized.clone(),
            actions: self.chunk.actions.clone(),
            inference_latency_s: self.latency_s,
        }
    }
}

/// A `/diagnostics` status.
#[derive(Debug, Clone, PartialEq)]
pub struct Diagnostics {
    /// 0 OK, 1 WARN (holding), 2 ERROR.
    pub level: u8,
    pub message: String,
    pub values: Vec<(String, String)>,
}

/// Everything one control tick decided.
#[derive(Debug, Default)]
pub struct TickOutput {
    /// An observation to run the policy on now (the caller submits it and later hands the
    /// response to [`ControlCore::on_response`]).
    pub request: Option<Request>,
    /// Chunks accepted this tick.
    pub chunks: Vec<ChunkEvent>,
    /// Failed policy calls released this tick (id, message).
    pub failures: Vec<(u64, String)>,
    /// The command to publish.
    pub command: Option<Command>,
    /// The (gated, clamped) policy action behind `command`, when one was executed.
    pub action: Option<Vec<f32>>,
    /// The gripper command for that action (gripper_offset + gripper_scale x last dimension),
    /// when a gripper topic is configured.
    pub gripper: Option<f64>,
    /// Why no (real) command goes out.
    pub hold: Option<Hold>,
    /// The hold reason differs from the previous tick's (log it).
    pub hold_changed: bool,
    pub diagnostics: Option<Diagnostics>,
}

/// The node's state at the last tick (`bitvla_ros/msg/PolicyStatus`), from
/// [`ControlCore::status`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Status {
    /// 1 waiting for an instruction, 2 inferring (first chunk), 3 executing, 4 holding.
    pub state: u8,
    pub reason: String,
    pub instruction: String,
    /// (chunk sequence, action index) executed this tick.
    pub chunk: Option<(u64, usize)>,
    pub inferences: u64,
    pub last_latency_s: Option<f64>,
    pub camera_age_s: Option<f64>,
    pub dry_run: bool,
}

impl Status {
    /// The `bitvla_ros/msg/PolicyStatus` the node publishes on `~/status` and the replay writes.
    pub fn message(&self, stamp_ns: i64, frame_id: &str) -> msgs::PolicyStatusMsg {
        msgs::PolicyStatusMsg {
            header: msgs::Header::new(stamp_ns, frame_id),
            state: self.state,
            reason: self.reason.clone(),
            instruction: self.instruction.clone(),
            chunk_sequence: self.chunk.map_or(0, |c| c.0),
            chunk_index: self.chunk.map_or(0, |c| c.1 as u32),
            inferences: self.inferences,
            last_inference_latency_s: self.last_latency_s.unwrap_or(0.0),
            camera_age_s: self.camera_age_s.unwrap_or(-1.0),
            dry_run: self.dry_run,
        }
    }
}

/// Counters over the whole run (the replay's report and the node's diagnostics).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CoreStats {
    pub ticks: u64,
    pub requests: u64,
    pub chunks: u64,
    pub failed_calls: u64,
    pub commands: u64,
    /// Responses that arrived after the fixed latency model had them due.
    pub late_responses: u64,
    pub stale_chunks: u64,
    pub frames_received: u64,
    pub frames_rejected: u64,
    pub instructions: u64,
    /// Ticks held, by reason ([`Hold::kind`]).
    pub holds: BTreeMap<&'static str, u64>,
}

#[derive(Default)]
struct Inputs {
    frames: [Option<(RgbImage, f64)>; 2],
    instruction: Option<String>,
    estop: bool,
    /// The latest joint_states message: names and positions.
    joints: Option<(Vec<String>, Vec<f64>)>,
    ee_pose: Option<Isometry3<f64>>,
}

/// Settings the core derives from the node's parameters (validated once).
#[derive(Debug, Clone)]
pub struct CoreConfig {
    pub mode: CommandMode,
    pub dt: f64,
    pub safety: SafetyConfig,
    pub scales: EeScales,
    pub workspace: ([f64; 3], [f64; 3]),
    pub hold_zero_twist: bool,
    pub fixed_latency_s: Option<f64>,
    pub dry_run: bool,
    pub scheduler: SchedulerConfig,
    pub proprio_dim: Option<usize>,
    /// joint_states or ee_pose (none: zeros).
    pub proprio_source: String,
    pub cameras: usize,
    pub joints: JointConfig,
    /// (scale, offset) of the gripper output, when a gripper topic is configured.
    pub gripper: Option<(f64, f64)>,
}

/// The joint command modes' settings.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JointConfig {
    pub names: Vec<String>,
    /// Targets are current + action x scale (else the action itself).
    pub delta: bool,
    pub scale_rad: f64,
    pub min: Vec<f64>,
    pub max: Vec<f64>,
    pub max_step_rad: f64,
}

/// A comma-separated list of numbers (r2r has no array parameters).
fn parse_list(name: &str, text: &str) -> Result<Vec<f64>, String> {
    text.split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| {
            t.parse::<f64>()
                .ok()
                .filter(|v| v.is_finite())
                .ok_or_else(|| format!("{name}: {t:?} is not a number"))
        })
        .collect()
}

impl CoreConfig {
    /// The node subscribes to joint_states (proprio or a joint command mode).
    pub fn needs_joint_states(&self) -> bool {
        self.proprio_source == "joint_states"
            || matches!(
                self.mode,
                CommandMode::JointTrajectory | CommandMode::JointPositions
            )
    }

    /// The node subscribes to the end-effector pose (proprio or the ee_pose mode).
    pub fn needs_ee_pose(&self) -> bool {
        self.proprio_source == "ee_pose" || self.mode == CommandMode::EePose
    }

    /// Checks the parameters that decide behaviour; the error names the parameter to fix.
    pub fn from_params(
        p: &NodeParams,
        action_dim: usize,
        proprio_dim: Option<usize>,
    ) -> Result<Self, String> {
        let mode = match p.command_mode.as_str() {
            "ee_delta_twist" => CommandMode::EeDeltaTwist,
            "ee_pose" => CommandMode::EePose,
            "joint_trajectory" => CommandMode::JointTrajectory,
            "joint_positions" => CommandMode::JointPositions,
            other => {
                return Err(format!(
                    "command_mode {other:?} is not supported (ee_delta_twist, ee_pose, \
                     joint_trajectory, joint_positions)"
                ));
            }
        };
        let joints = if matches!(
            mode,
            CommandMode::JointTrajectory | CommandMode::JointPositions
        ) {
            let names: Vec<String> = p
                .joint_names
                .split(',')
                .map(str::trim)
                .filter(|n| !n.is_empty())
                .map(str::to_owned)
                .collect();
            if names.is_empty() {
                return Err(format!(
                    "command_mode {}: set joint_names (comma-separated)",
                    p.command_mode
                ));
            }
            if names.len() > action_dim {
                return Err(format!(
                    "joint_names has {} joints, the policy's actions have {action_dim} dimensions",
                    names.len()
                ));
            }
            let delta = match p.joint_action.as_str() {
                "delta" => true,
                "absolute" => false,
                other => return Err(format!("joint_action {other:?}: delta or absolute")),
            };
            let min = parse_list("joint_min", &p.joint_min)?;
            let max = parse_list("joint_max", &p.joint_max)?;
            for (name, list) in [("joint_min", &min), ("joint_max", &max)] {
                if !list.is_empty() && list.len() != names.len() {
                    return Err(format!(
                        "{name} has {} values for {} joints",
                        list.len(),
                        names.len()
                    ));
                }
            }
            if min.iter().zip(&max).any(|(a, b)| a > b) {
                return Err("joint_min exceeds joint_max".into());
            }
            if !(p.max_joint_step_rad.is_finite() && p.max_joint_step_rad >= 0.0) {
                return Err("max_joint_step_rad must be >= 0".into());
            }
            JointConfig {
                names,
                delta,
                scale_rad: p.joint_scale_rad,
                min,
                max,
                max_step_rad: p.max_joint_step_rad,
            }
        } else {
            JointConfig::default()
        };
        if !(p.control_rate_hz.is_finite() && p.control_rate_hz > 0.0) {
            return Err(format!(
                "control_rate_hz must be > 0 (got {})",
                p.control_rate_hz
            ));
        }
        if !(p.stale_after_s.is_finite() && p.stale_after_s > 0.0) {
            return Err(format!(
                "stale_after_s must be > 0 (got {})",
                p.stale_after_s
            ));
        }
        if !(p.fixed_latency_s.is_finite() && p.fixed_latency_s >= 0.0) {
            return Err(format!(
                "fixed_latency_s must be >= 0 (got {})",
                p.fixed_latency_s
            ));
        }
        let w = &p.workspace;
        let (min, max) = ([w.min_x, w.min_y, w.min_z], [w.max_x, w.max_y, w.max_z]);
        if !(0..3).all(|i| min[i] <= max[i]) {
            return Err(format!(
                "workspace: min {min:?} must not exceed max {max:?}"
            ));
        }
        match p.proprio_source.as_str() {
            "none" | "joint_states" | "ee_pose" => {}
            other => {
                return Err(format!(
                    "proprio_source {other:?}: none, joint_states or ee_pose"
                ));
            }
        }
        for (name, transport) in [
            ("camera_transport", &p.camera_transport),
            ("wrist_camera_transport", &p.wrist_camera_transport),
        ] {
            crate::params::CameraTransport::parse(name, transport)?;
        }
        if p.camera_topic.is_empty() {
            return Err("camera_topic is empty: the policy needs the third-person camera".into());
        }
        let per_dim = parse_list("max_abs_action_per_dim", &p.max_abs_action_per_dim)?;
        let max_abs: Vec<f32> = if !per_dim.is_empty() {
            if per_dim.len() != action_dim || per_dim.iter().any(|&m| m <= 0.0) {
                return Err(format!(
                    "max_abs_action_per_dim needs {action_dim} positive values (got {:?})",
                    per_dim
                ));
            }
            per_dim.iter().map(|&m| m as f32).collect()
        } else if p.max_abs_action > 0.0 {
            vec![p.max_abs_action as f32; action_dim]
        } else {
            Vec::new()
        };
        if !(p.replan_margin_s.is_finite() && p.replan_margin_s >= 0.0) {
            return Err(format!(
                "replan_margin_s must be >= 0 (got {})",
                p.replan_margin_s
            ));
        }
        let dt = 1.0 / p.control_rate_hz;
        Ok(Self {
            mode,
            dt,
            safety: SafetyConfig {
                max_abs,
                stale_after_s: p.stale_after_s,
            },
            scales: EeScales {
                position_m: p.position_scale_m,
                rotation_rad: p.rotation_scale_rad,
            },
            workspace: (min, max),
            hold_zero_twist: p.hold_zero_twist,
            fixed_latency_s: (p.fixed_latency_s > 0.0).then_some(p.fixed_latency_s),
            dry_run: p.dry_run,
            scheduler: SchedulerConfig {
                control_dt: dt,
                actions_per_chunk: usize::try_from(p.actions_per_chunk).unwrap_or(0),
                replan_margin_s: p.replan_margin_s,
                ..Default::default()
            },
            gripper: (!p.gripper_topic.is_empty()).then_some((p.gripper_scale, p.gripper_offset)),
            proprio_dim,
            proprio_source: p.proprio_source.clone(),
            joints,
            cameras: if p.wrist_camera_topic.is_empty() {
                1
            } else {
                2
            },
        })
    }
}

/// The node's state machine. Times are seconds in the caller's clock.
pub struct ControlCore {
    config: CoreConfig,
    scheduler: ChunkScheduler,
    inputs: Inputs,
    /// Requests in flight: id -> (observation stamp, request time, instruction).
    in_flight: BTreeMap<u64, (f64, f64, String)>,
    /// Responses waiting for their release time (fixed latency model).
    pending: VecDeque<(f64, Response)>,
    sequence: u64,
    last_hold: Option<Hold>,
    /// (chunk id, action index) the last tick executed.
    last_source: Option<(u64, usize)>,
    /// Durations of the last [`RECENT_LATENCIES`] calls (diagnostics; bounded for a node that
    /// runs for weeks).
    recent_latencies: VecDeque<f64>,
    last_error: String,
    stats: CoreStats,
    diag_every: u64,
    /// (time, frames received) at the previous diagnostics, for the input rate.
    last_diag: Option<(f64, u64)>,
}

impl ControlCore {
    pub fn new(config: CoreConfig) -> Self {
        let diag_every = ((1.0 / config.dt).round() as u64).max(1);
        Self {
            scheduler: ChunkScheduler::new(config.scheduler.clone()),
            config,
            inputs: Inputs::default(),
            in_flight: BTreeMap::new(),
            pending: VecDeque::new(),
            sequence: 0,
            last_hold: None,
            last_source: None,
            recent_latencies: VecDeque::new(),
            last_error: String::new(),
            stats: CoreStats::default(),
            diag_every,
            last_diag: None,
        }
    }

    pub fn config(&self) -> &CoreConfig {
        &self.config
    }

    pub fn stats(&self) -> &CoreStats {
        &self.stats
    }

    /// A decoded camera frame (slot 0: third-person, 1: wrist), timed by arrival.
    pub fn on_frame(&mut self, slot: usize, frame: RgbImage, now: f64) {
        if let Some(s) = self.inputs.frames.get_mut(slot) {
            *s = Some((frame, now));
            self.stats.frames_received += 1;
        }
    }

    /// A frame that could not be decoded (counted; the previous frame stays).
    pub fn on_rejected_frame(&mut self) {
        self.stats.frames_rejected += 1;
    }

    /// A new instruction: cancels the current chunk. Returns false for an empty one (ignored).
    pub fn on_instruction(&mut self, text: &str) -> bool {
        let text = text.trim();
        if text.is_empty() {
            return false;
        }
        self.inputs.instruction = Some(text.to_owned());
        self.stats.instructions += 1;
        self.scheduler.cancel();
        true
    }

    pub fn on_estop(&mut self, engaged: bool) {
        self.inputs.estop = engaged;
        if engaged {
            self.scheduler.cancel();
        }
    }

    /// A joint_states message (names may be empty: then positions are taken in order).
    pub fn on_joint_states(&mut self, names: &[String], positions: &[f64]) {
        self.inputs.joints = Some((names.to_vec(), positions.to_vec()));
    }

    pub fn on_ee_pose(&mut self, pose: Isometry3<f64>) {
        self.inputs.ee_pose = Some(pose);
    }

    /// A finished policy call arriving at `now`. Under the fixed latency model it is used at
    /// the first tick at or after (request time + latency), or at arrival when that is later.
    pub fn on_response(&mut self, response: Response, now: f64) {
        let release = match (
            self.config.fixed_latency_s,
            self.in_flight.get(&response.id),
        ) {
            (Some(latency), Some(&(_, requested_at, _))) => {
                let due = requested_at + latency;
                if now > due + TIME_EPS {
                    self.stats.late_responses += 1;
                }
                due.max(now)
            }
            _ => now,
        };
        let at = self.pending.partition_point(|(t, _)| *t <= release);
        self.pending.insert(at, (release, response));
    }

    /// One control period at `now`.
    pub fn tick(&mut self, now: f64) -> TickOutput {
        let mut out = TickOutput::default();
        self.stats.ticks += 1;
        while self
            .pending
            .front()
            .is_some_and(|(t, _)| *t <= now + TIME_EPS)
        {
            let Some((_, r)) = self.pending.pop_front() else {
                break;
            };
            // The worker answers in order and drops requests superseded before they started.
            self.in_flight.retain(|&id, _| id >= r.id);
            let (observation_stamp, requested_at, instruction) = self
                .in_flight
                .remove(&r.id)
                .unwrap_or((r.stamp, now, String::new()));
            // The scheduler plans with the latency in this clock, request to use (under a fixed
            // latency model: the model's latency, not the call's wall time).
            let latency_in_clock = (now - requested_at).max(0.0);
            match r.result {
                Ok(chunk) => {
                    self.stats.chunks += 1;
                    if self.recent_latencies.len() == RECENT_LATENCIES {
                        self.recent_latencies.pop_front();
                    }
                    self.recent_latencies.push_back(r.latency_s);
                    let rows = chunk
                        .actions
                        .chunks(chunk.action_dim.max(1))
                        .map(<[f32]>::to_vec)
                        .collect();
                    // A chunk for an instruction that was replaced meanwhile is not executed.
                    if self.inputs.instruction.as_deref() == Some(instruction.as_str()) {
                        self.scheduler.accept(r.id, rows, latency_in_clock);
                    }
                    out.chunks.push(ChunkEvent {
                        id: r.id,
                        observation_stamp,
                        instruction,
                        latency_s: r.latency_s,
                        chunk,
                    });
                }
                Err(e) => {
                    self.stats.failed_calls += 1;
                    self.last_error.clone_from(&e);
                    out.failures.push((r.id, e));
                    // Let the scheduler ask again.
                    self.scheduler.cancel();
                }
            }
        }
        self.stats.stale_chunks = self.scheduler.stale_chunks;

        let tick = self.scheduler.tick();
        let newest = self.newest_frame();
        let s = &self.inputs;
        let fresh = newest.is_some_and(|t| now - t <= self.config.safety.stale_after_s);
        let ready = s.frames[0].is_some() && fresh && s.instruction.is_some() && !s.estop;
        if tick.request_observation && ready {
            let images: Vec<RgbImage> = s.frames.iter().flatten().map(|f| f.0.clone()).collect();
            let proprio = self.config.proprio_dim.map(|d| {
                let mut v: Vec<f32> = match self.config.proprio_source.as_str() {
                    "joint_states" => s
                        .joints
                        .iter()
                        .flat_map(|(_, p)| p)
                        .map(|&x| x as f32)
                        .collect(),
                    "ee_pose" => s
                        .ee_pose
                        .map(|e| {
                            let (t, r) = (e.translation.vector, e.rotation.scaled_axis());
                            [t.x, t.y, t.z, r.x, r.y, r.z].map(|x| x as f32).to_vec()
                        })
                        .unwrap_or_default(),
                    _ => Vec::new(),
                };
                v.resize(d, 0.0);
                v
            });
            let instruction = s.instruction.clone().unwrap_or_default();
            self.sequence += 1;
            let stamp = newest.unwrap_or(now);
            self.in_flight
                .insert(self.sequence, (stamp, now, instruction.clone()));
            out.request = Some(Request {
                id: self.sequence,
                stamp,
                observation: Observation {
                    images,
                    instruction,
                    proprio,
                },
            });
            self.stats.requests += 1;
            self.scheduler.requested();
        }
        let gate = self.config.safety.gate(
            now,
            SafetyInputs {
                newest_frame: newest,
                has_instruction: s.instruction.is_some(),
                estop: s.estop,
            },
            tick.action.as_deref(),
        );
        let hold = match gate {
            Ok(action) => match self.map(&action) {
                Some(command) => {
                    out.command = Some(command);
                    if let (Some((scale, offset)), Some(&g)) = (self.config.gripper, action.last())
                    {
                        out.gripper = Some(offset + scale * f64::from(g));
                    }
                    out.action = Some(action);
                    self.stats.commands += 1;
                    None
                }
                None if self.config.mode == CommandMode::EePose => Some(Hold::NoPose),
                None => Some(Hold::NoJointState),
            },
            Err(hold) => {
                if matches!(hold, Hold::NoChunk | Hold::EStop)
                    && self.config.hold_zero_twist
                    && self.config.mode == CommandMode::EeDeltaTwist
                {
                    out.command = Some(Command::Twist {
                        linear: [0.0; 3],
                        angular: [0.0; 3],
                    });
                    self.stats.commands += 1;
                }
                Some(hold)
            }
        };
        if let Some(h) = &hold {
            *self.stats.holds.entry(h.kind()).or_default() += 1;
        }
        self.last_source = if hold.is_none() { tick.source } else { None };
        out.hold_changed = match (&hold, &self.last_hold) {
            (Some(a), Some(b)) => a.kind() != b.kind(),
            (None, None) => false,
            _ => true,
        };
        self.last_hold.clone_from(&hold);
        out.hold = hold;
        if self.stats.ticks.is_multiple_of(self.diag_every) {
            out.diagnostics = Some(self.diagnostics(now, newest));
            self.last_diag = Some((now, self.stats.frames_received));
        }
        out
    }

    /// The state after the last tick, at `now` (that tick's time).
    pub fn status(&self, now: f64) -> Status {
        Status {
            state: match &self.last_hold {
                None => 3,
                Some(Hold::NoInstruction) => 1,
                Some(Hold::NoChunk) => 2,
                Some(_) => 4,
            },
            reason: self
                .last_hold
                .as_ref()
                .map_or(String::new(), ToString::to_string),
            instruction: self.inputs.instruction.clone().unwrap_or_default(),
            chunk: self.last_source,
            inferences: self.stats.requests,
            last_latency_s: self.recent_latencies.back().copied(),
            camera_age_s: self.newest_frame().map(|t| now - t),
            dry_run: self.config.dry_run,
        }
    }

    /// A chunk is being executed (ticks output its actions).
    pub fn executing(&self) -> bool {
        self.scheduler.remaining() > 0
    }

    /// A response would be used by a tick at `now`.
    pub fn response_due(&self, now: f64) -> bool {
        self.pending
            .front()
            .is_some_and(|(t, _)| *t <= now + TIME_EPS)
    }

    /// Requests whose responses have not been used yet.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// The oldest of the cameras' newest frame times (all configured cameras must have one).
    fn newest_frame(&self) -> Option<f64> {
        let mut oldest: Option<f64> = None;
        for f in &self.inputs.frames[..self.config.cameras] {
            let t = f.as_ref()?.1;
            oldest = Some(oldest.map_or(t, |o| o.min(t)));
        }
        oldest
    }

    fn map(&self, action: &[f32]) -> Option<Command> {
        match self.config.mode {
            CommandMode::EeDeltaTwist => twist(action, self.config.scales, self.config.dt)
                .map(|(linear, angular)| Command::Twist { linear, angular }),
            CommandMode::EePose => {
                let current = self.inputs.ee_pose?;
                let mut target = pose_target(&current, action, self.config.scales)?;
                let (min, max) = self.config.workspace;
                clamp_to_workspace(&mut target, min, max);
                let (t, q) = (target.translation.vector, target.rotation);
                Some(Command::Pose {
                    position: [t.x, t.y, t.z],
                    orientation: [q.i, q.j, q.k, q.w],
                })
            }
            CommandMode::JointTrajectory | CommandMode::JointPositions => {
                self.joint_targets(action).map(Command::Joints)
            }
        }
    }

    /// The current position of each commanded joint (matched by name, or in order when the
    /// joint_states message has no names).
    fn current_joints(&self) -> Option<Vec<f64>> {
        let (names, positions) = self.inputs.joints.as_ref()?;
        let j = &self.config.joints;
        if names.is_empty() {
            return positions.get(..j.names.len()).map(<[f64]>::to_vec);
        }
        j.names
            .iter()
            .map(|n| {
                names
                    .iter()
                    .position(|m| m == n)
                    .and_then(|i| positions.get(i).copied())
            })
            .collect()
    }

    /// Joint targets for an action: delta or absolute, stepped and limited. None when the
    /// current positions are needed and unknown.
    fn joint_targets(&self, action: &[f32]) -> Option<Vec<f64>> {
        let j = &self.config.joints;
        let current = self.current_joints();
        if (j.delta || j.max_step_rad > 0.0) && current.is_none() {
            return None;
        }
        let mut targets = Vec::with_capacity(j.names.len());
        for (i, &a) in action.iter().take(j.names.len()).enumerate() {
            let now = current.as_ref().map(|c| c[i]);
            let mut t = match now {
                Some(c) if j.delta => c + f64::from(a) * j.scale_rad,
                _ => f64::from(a),
            };
            if let (Some(c), true) = (now, j.max_step_rad > 0.0) {
                t = t.clamp(c - j.max_step_rad, c + j.max_step_rad);
            }
            if let (Some(&lo), Some(&hi)) = (j.min.get(i), j.max.get(i)) {
                t = t.clamp(lo, hi);
            }
            targets.push(t);
        }
        Some(targets)
    }

    fn diagnostics(&self, now: f64, newest: Option<f64>) -> Diagnostics {
        let recent: Vec<f64> = self.recent_latencies.iter().copied().collect();
        let fmt = |v: Option<f64>| v.map_or("n/a".to_owned(), |x| format!("{:.1}", x * 1e3));
        let kv = |k: &str, v: String| (k.to_owned(), v);
        let s = &self.stats;
        Diagnostics {
            level: u8::from(self.last_hold.is_some()),
            message: match (&self.last_hold, self.config.dry_run) {
                (Some(h), _) => h.to_string(),
                (None, true) => "executing (dry run)".into(),
                (None, false) => "executing".into(),
            },
            values: vec![
                kv("inference_latency_p50_ms", fmt(percentile(&recent, 0.5))),
                kv("inference_latency_p95_ms", fmt(percentile(&recent, 0.95))),
                kv("chunks", s.chunks.to_string()),
                kv("failed_calls", s.failed_calls.to_string()),
                kv("commands_published", s.commands.to_string()),
                kv("frames_received", s.frames_received.to_string()),
                kv(
                    "frames_per_s",
                    match self.last_diag {
                        Some((t, n)) if now > t => {
                            format!("{:.1}", (s.frames_received - n) as f64 / (now - t))
                        }
                        _ => "n/a".into(),
                    },
                ),
                kv("frames_rejected", s.frames_rejected.to_string()),
                kv("stale_chunks", s.stale_chunks.to_string()),
                kv(
                    "camera_age_s",
                    newest.map_or("n/a".into(), |t| format!("{:.3}", now - t)),
                ),
                kv("last_error", self.last_error.clone()),
                kv("dry_run", self.config.dry_run.to_string()),
            ],
        }
    }
}

/// The `q`-quantile (nearest rank) of unsorted values.
pub fn percentile(values: &[f64], q: f64) -> Option<f64> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted
        .get(((sorted.len() as f64 - 1.0) * q).round() as usize)
        .copied()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::StageTimings;

    fn chunk(n: usize, dim: usize, v: f32) -> ActionChunk {
        ActionChunk {
            horizon: n,
            action_dim: dim,
            normalized: vec![v; n * dim],
            actions: vec![v; n * dim],
            unnorm_key: "k".into(),
            gripper: "raw".into(),
            tokens: 0,
            timings: StageTimings::default(),
        }
    }

    fn core(fixed_latency_s: f64) -> ControlCore {
        let p = NodeParams {
            fixed_latency_s,
            ..Default::default()
        };
        ControlCore::new(CoreConfig::from_params(&p, 7, None).unwrap())
    }

    #[test]
    fn holds_until_ready_then_executes_the_chunk_after_the_fixed_latency() {
        let mut c = core(0.1);
        let out = c.tick(0.0);
        assert_eq!(out.hold, Some(Hold::NoInstruction));
        assert!(out.request.is_none());
        c.on_frame(0, RgbImage::new(4, 4), 0.01);
        assert!(c.on_instruction(" pick "));
        assert!(!c.on_instruction("  "));
        let out = c.tick(0.05);
        let req = out.request.expect("ready: asks for a chunk");
        assert_eq!(req.observation.instruction, "pick");
        assert_eq!(req.stamp, 0.01);
        // Zero twist while the first chunk is computed.
        assert_eq!(out.hold, Some(Hold::NoChunk));
        assert_eq!(
            out.command.as_ref().map(Command::values),
            Some(vec![0.0; 6])
        );
        c.on_response(
            Response {
                id: req.id,
                stamp: req.stamp,
                result: Ok(chunk(4, 7, 0.5)),
                latency_s: 0.01,
            },
            0.06,
        );
        c.on_frame(0, RgbImage::new(4, 4), 0.11);
        // Due at 0.15, not at 0.10.
        assert!(c.tick(0.10).chunks.is_empty());
        let out = c.tick(0.15);
        assert_eq!(out.chunks.len(), 1);
        assert_eq!(out.hold, None);
        assert!(out.hold_changed);
        let v = out.command.unwrap().values();
        assert!((v[0] - 0.5 * 0.05 / 0.05).abs() < 1e-12, "{v:?}");
        assert_eq!(c.stats().late_responses, 0);
        assert_eq!(c.stats().holds.get("no_chunk"), Some(&2));
    }

    #[test]
    fn joint_modes_step_from_the_current_positions_within_limits() {
        let p = NodeParams {
            command_mode: "joint_trajectory".into(),
            joint_names: "a, b".into(),
            joint_min: "-1,-1".into(),
            joint_max: "1,0.42".into(),
            max_joint_step_rad: 0.02,
            fixed_latency_s: 0.05,
            ..Default::default()
        };
        let mut c = ControlCore::new(CoreConfig::from_params(&p, 7, None).unwrap());
        assert!(c.config().needs_joint_states());
        c.on_frame(0, RgbImage::new(4, 4), 0.0);
        c.on_instruction("go");
        let req = c.tick(0.0).request.unwrap();
        let mut ch = chunk(2, 7, 0.0);
        for row in ch.actions.chunks_mut(7) {
            row.copy_from_slice(&[0.2, 0.3, 0., 0., 0., 0., 1.]);
        }
        c.on_response(
            Response {
                id: req.id,
                stamp: 0.0,
                result: Ok(ch),
                latency_s: 0.01,
            },
            0.0,
        );
        // No joint state yet: hold.
        assert_eq!(c.tick(0.05).hold, Some(Hold::NoJointState));
        // Names matched in any order; the extra joint is ignored.
        c.on_joint_states(&["b".into(), "x".into(), "a".into()], &[0.41, 9.0, 0.5]);
        let out = c.tick(0.10);
        // a: 0.5 + 0.2 x 0.05 = 0.51; b: 0.41 + 0.015, limited to 0.42.
        let v = out.command.unwrap().values();
        assert!(
            (v[0] - 0.51).abs() < 1e-6 && (v[1] - 0.42).abs() < 1e-12,
            "{v:?}"
        );
        for bad in [
            NodeParams {
                command_mode: "joint_positions".into(),
                ..Default::default()
            },
            NodeParams {
                command_mode: "joint_positions".into(),
                joint_names: "a,b".into(),
                joint_max: "1".into(),
                ..Default::default()
            },
            NodeParams {
                command_mode: "joint_positions".into(),
                joint_names: "a,b,c,d,e,f,g,h".into(),
                ..Default::default()
            },
        ] {
            assert!(CoreConfig::from_params(&bad, 7, None).is_err());
        }
    }

    #[test]
    fn failed_calls_and_stale_cameras_hold_without_stopping() {
        let mut c = core(0.0);
        c.on_frame(0, RgbImage::new(4, 4), 0.0);
        c.on_instruction("go");
        let req = c.tick(0.0).request.unwrap();
        c.on_response(
            Response {
                id: req.id,
                stamp: 0.0,
                result: Err("non-finite action".into()),
                latency_s: 0.01,
            },
            0.02,
        );
        let out = c.tick(0.05);
        assert_eq!(out.failures.len(), 1);
        assert!(out.request.is_some(), "asks again after a failure");
        let out = c.tick(1.0);
        assert!(matches!(out.hold, Some(Hold::StaleCamera { .. })));
        assert!(out.command.is_none());
        assert_eq!(c.stats().failed_calls, 1);
    }
}
