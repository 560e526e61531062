//! The thin r2r adapter of `bitvla_node` (feature `ros`): parameters, subscriptions, publishers
//! and the control timer. Everything it decides with lives below it and is tested without ROS:
//! `obs` decodes frames, `runtime` runs the policy on its own thread, `control` schedules chunks,
//! gates them and maps them to commands.

use crate::control::mapping::clamp_to_workspace;
use crate::control::{
    ChunkScheduler, EeScales, Hold, SafetyConfig, SafetyInputs, SchedulerConfig, pose_target, twist,
};
use crate::model::{GripperMapping, Observation, Policy, PolicyOptions};
use crate::obs::{self, ImageOptions};
use crate::runtime::{InferenceWorker, Request};
use anyhow::Context;
use futures::executor::LocalPool;
use futures::prelude::*;
use futures::task::LocalSpawnExt;
use image::RgbImage;
use r2r::{QosProfile, RosParams};
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The node's parameters (`ros2 param` shows these descriptions).
#[derive(RosParams, Debug, Clone)]
pub struct NodeParams {
    /// Checkpoint directory (published layout) or packed .bitvla file
    pub model_path: String,
    /// dataset_statistics.json key; empty selects the only one
    pub unnorm_key: String,
    /// Inference threads (0 = all cores)
    pub threads: i64,
    /// Third-person camera topic
    pub camera_topic: String,
    /// raw (sensor_msgs/Image) or compressed (sensor_msgs/CompressedImage)
    pub camera_transport: String,
    /// Wrist camera topic; empty for a one-camera checkpoint
    pub wrist_camera_topic: String,
    /// raw or compressed
    pub wrist_camera_transport: String,
    /// Instruction topic (std_msgs/String); a new instruction cancels the current chunk
    pub instruction_topic: String,
    /// E-stop topic (std_msgs/Bool); true holds all output
    pub estop_topic: String,
    /// none (zeros, out of distribution for LIBERO checkpoints) or joint_states
    pub proprio_source: String,
    /// sensor_msgs/JointState topic when proprio_source is joint_states
    pub joint_states_topic: String,
    /// ee_delta_twist: geometry_msgs/TwistStamped (MoveIt Servo, speed units); ee_pose:
    /// geometry_msgs/PoseStamped target = current pose (ee_pose_topic) + the predicted delta
    pub command_mode: String,
    /// Current end-effector pose (geometry_msgs/PoseStamped, base frame) for ee_pose
    pub ee_pose_topic: String,
    /// Workspace box for ee_pose targets (base frame)
    pub workspace: Workspace,
    /// Command topic
    pub command_topic: String,
    /// Frame of the commands
    pub frame_id: String,
    /// Control rate [Hz]; LIBERO policies were trained at 20 Hz
    pub control_rate_hz: f64,
    /// Execute at most this many actions of a chunk (0 = all)
    pub actions_per_chunk: i64,
    /// Publish commands on ~/dry_run/command instead of command_topic
    pub dry_run: bool,
    /// Hold when the newest camera frame is older than this [s]
    pub stale_after_s: f64,
    /// Clamp every action dimension to +-this before mapping (0 = no clamp)
    pub max_abs_action: f64,
    /// ee_delta_twist: publish a zero twist each tick while waiting for the next chunk (keeps
    /// the command stream at the control rate; safety holds publish nothing)
    pub hold_zero_twist: bool,
    /// Rotate camera images by 180 degrees (LIBERO simulator cameras)
    pub rotate_180: bool,
    /// Metres per unit action per control step
    pub position_scale_m: f64,
    /// Radians per unit action per control step
    pub rotation_scale_rad: f64,
    /// raw or libero
    pub gripper: String,
    /// Follow /clock (simulation time) for stamps and staleness
    pub use_sim_time: bool,
}

/// An axis-aligned box in the base frame [m].
#[derive(RosParams, Debug, Clone)]
pub struct Workspace {
    /// [m]
    pub min_x: f64,
    /// [m]
    pub min_y: f64,
    /// [m]
    pub min_z: f64,
    /// [m]
    pub max_x: f64,
    /// [m]
    pub max_y: f64,
    /// [m]
    pub max_z: f64,
}

impl Default for Workspace {
    fn default() -> Self {
        Self {
            min_x: -1.0,
            min_y: -1.0,
            min_z: 0.0,
            max_x: 1.0,
            max_y: 1.0,
            max_z: 1.5,
        }
    }
}

impl Default for NodeParams {
    fn default() -> Self {
        Self {
            model_path: String::new(),
            unnorm_key: String::new(),
            threads: 0,
            camera_topic: "/camera/image_raw".into(),
            camera_transport: "raw".into(),
            wrist_camera_topic: String::new(),
            wrist_camera_transport: "raw".into(),
            instruction_topic: "/instruction".into(),
            estop_topic: "/estop".into(),
            proprio_source: "none".into(),
            joint_states_topic: "/joint_states".into(),
            command_mode: "ee_delta_twist".into(),
            ee_pose_topic: "/ee_pose".into(),
            workspace: Workspace::default(),
            command_topic: "/servo_node/delta_twist_cmds".into(),
            frame_id: "base_link".into(),
            control_rate_hz: 20.0,
            actions_per_chunk: 0,
            dry_run: true,
            stale_after_s: 0.5,
            max_abs_action: 0.0,
            hold_zero_twist: true,
            rotate_180: false,
            position_scale_m: 0.05,
            rotation_scale_rad: 0.5,
            gripper: "raw".into(),
            use_sim_time: false,
        }
    }
}

#[derive(Default)]
struct Inputs {
    frames: [Option<(RgbImage, f64)>; 2],
    instruction: Option<String>,
    estop: bool,
    joints: Option<Vec<f32>>,
    ee_pose: Option<nalgebra::Isometry3<f64>>,
    rejected_frames: u64,
    frames_received: u64,
}

/// Runs `bitvla_node` until the process is stopped.
pub fn run_node() -> anyhow::Result<()> {
    let ctx = r2r::Context::create()?;
    let mut node = r2r::Node::create(ctx, "bitvla_node", "")?;
    let logger = node.logger().to_owned();
    let params = Arc::new(Mutex::new(NodeParams::default()));
    let (param_handler, _events) = node.make_derived_parameter_handler(params.clone())?;
    let p = params
        .lock()
        .map_err(|_| anyhow::anyhow!("parameter lock poisoned"))?
        .clone();
    anyhow::ensure!(
        !p.model_path.is_empty(),
        "parameter model_path is empty: set it (a checkpoint directory or a .bitvla file)"
    );
    let pose_mode = match p.command_mode.as_str() {
        "ee_delta_twist" => false,
        "ee_pose" => true,
        other => anyhow::bail!("command_mode {other:?} is not supported (ee_delta_twist, ee_pose)"),
    };
    let w = &p.workspace;
    let (ws_min, ws_max) = ([w.min_x, w.min_y, w.min_z], [w.max_x, w.max_y, w.max_z]);
    anyhow::ensure!(
        (0..3).all(|i| ws_min[i] <= ws_max[i]),
        "workspace: min {ws_min:?} must not exceed max {ws_max:?}"
    );
    let gripper: GripperMapping = p.gripper.parse().map_err(anyhow::Error::msg)?;
    let image_options = ImageOptions {
        rotate_180: p.rotate_180,
        center_crop: true,
    };
    let policy = Policy::load(
        std::path::Path::new(&p.model_path),
        PolicyOptions {
            unnorm_key: (!p.unnorm_key.is_empty()).then(|| p.unnorm_key.clone()),
            gripper,
            image_options: vec![image_options; 2],
            ..Default::default()
        },
    )
    .with_context(|| format!("loading the policy from {}", p.model_path))?;
    let proprio_dim = policy.proprio_dim();
    let action_dim = policy.action_dim();
    r2r::log_info!(
        &logger,
        "policy loaded: {} actions x {} dims, unnorm key {}, proprio {:?}; dry_run = {}",
        policy.horizon(),
        action_dim,
        policy.unnorm_key(),
        proprio_dim,
        p.dry_run
    );
    let worker = InferenceWorker::spawn(policy, usize::try_from(p.threads).unwrap_or(0))?;

    let mut pool = LocalPool::new();
    let spawner = pool.spawner();
    spawner.spawn_local(param_handler)?;
    let inputs = Rc::new(RefCell::new(Inputs::default()));

    let cameras = [
        (p.camera_topic.clone(), p.camera_transport.clone()),
        (
            p.wrist_camera_topic.clone(),
            p.wrist_camera_transport.clone(),
        ),
    ];
    for (slot, (topic, transport)) in cameras.into_iter().enumerate() {
        if topic.is_empty() {
            continue;
        }
        let state = Rc::clone(&inputs);
        let log = logger.clone();
        let clock = node.get_ros_clock();
        // Frames are timed by arrival in the node's clock (header stamps of drivers vary).
        let store = move |decoded: Result<RgbImage, obs::ImageError>| match decoded {
            Ok(img) => {
                let now = clock.lock().ok().and_then(|mut c| c.get_now().ok());
                let t = now.map_or(0.0, |d| d.as_secs_f64());
                let mut s = state.borrow_mut();
                s.frames[slot] = Some((img, t));
                s.frames_received += 1;
            }
            Err(e) => {
                state.borrow_mut().rejected_frames += 1;
                r2r::log_error!(&log, "camera {slot}: rejected frame: {e}");
            }
        };
        match transport.as_str() {
            "raw" => {
                let sub = node
                    .subscribe::<r2r::sensor_msgs::msg::Image>(&topic, QosProfile::sensor_data())?;
                spawner.spawn_local(sub.for_each(move |m| {
                    store(obs::decode_raw(
                        &m.encoding,
                        m.width,
                        m.height,
                        m.step as usize,
                        &m.data,
                    ));
                    future::ready(())
                }))?;
            }
            "compressed" => {
                let sub = node.subscribe::<r2r::sensor_msgs::msg::CompressedImage>(
                    &topic,
                    QosProfile::sensor_data(),
                )?;
                spawner.spawn_local(sub.for_each(move |m| {
                    store(obs::decode_compressed(&m.data));
                    future::ready(())
                }))?;
            }
            other => anyhow::bail!("camera transport {other:?} for {topic}: raw or compressed"),
        }
    }

    let scheduler = Rc::new(RefCell::new(ChunkScheduler::new(SchedulerConfig {
        control_dt: 1.0 / p.control_rate_hz,
        actions_per_chunk: usize::try_from(p.actions_per_chunk).unwrap_or(0),
        ..Default::default()
    })));
    {
        let sub = node
            .subscribe::<r2r::std_msgs::msg::String>(&p.instruction_topic, QosProfile::default())?;
        let state = Rc::clone(&inputs);
        let sched = Rc::clone(&scheduler);
        let log = logger.clone();
        spawner.spawn_local(sub.for_each(move |m| {
            let text = m.data.trim().to_owned();
            if text.is_empty() {
                r2r::log_error!(&log, "empty instruction ignored");
            } else {
                r2r::log_info!(&log, "instruction: {text:?}");
                state.borrow_mut().instruction = Some(text);
                sched.borrow_mut().cancel();
            }
            future::ready(())
        }))?;
    }
    {
        let sub =
            node.subscribe::<r2r::std_msgs::msg::Bool>(&p.estop_topic, QosProfile::default())?;
        let state = Rc::clone(&inputs);
        let sched = Rc::clone(&scheduler);
        spawner.spawn_local(sub.for_each(move |m| {
            state.borrow_mut().estop = m.data;
            if m.data {
                sched.borrow_mut().cancel();
            }
            future::ready(())
        }))?;
    }
    match p.proprio_source.as_str() {
        "none" => {}
        "joint_states" => {
            let sub = node.subscribe::<r2r::sensor_msgs::msg::JointState>(
                &p.joint_states_topic,
                QosProfile::sensor_data(),
            )?;
            let state = Rc::clone(&inputs);
            spawner.spawn_local(sub.for_each(move |m| {
                state.borrow_mut().joints = Some(m.position.iter().map(|&v| v as f32).collect());
                future::ready(())
            }))?;
        }
        other => anyhow::bail!("proprio_source {other:?}: none or joint_states"),
    }

    if pose_mode {
        let sub = node.subscribe::<r2r::geometry_msgs::msg::PoseStamped>(
            &p.ee_pose_topic,
            QosProfile::default(),
        )?;
        let state = Rc::clone(&inputs);
        spawner.spawn_local(sub.for_each(move |m| {
            let (t, q) = (m.pose.position, m.pose.orientation);
            let rotation = nalgebra::UnitQuaternion::from_quaternion(nalgebra::Quaternion::new(
                q.w, q.x, q.y, q.z,
            ));
            state.borrow_mut().ee_pose = Some(nalgebra::Isometry3::from_parts(
                nalgebra::Translation3::new(t.x, t.y, t.z),
                rotation,
            ));
            future::ready(())
        }))?;
    }

    let command_topic = if p.dry_run {
        "~/dry_run/command".to_owned()
    } else {
        p.command_topic.clone()
    };
    let qos = QosProfile::default();
    let (twist_pub, pose_pub) = if pose_mode {
        let publisher =
            node.create_publisher::<r2r::geometry_msgs::msg::PoseStamped>(&command_topic, qos)?;
        (None, Some(publisher))
    } else {
        let publisher =
            node.create_publisher::<r2r::geometry_msgs::msg::TwistStamped>(&command_topic, qos)?;
        (Some(publisher), None)
    };
    let diagnostics_pub = node.create_publisher::<r2r::diagnostic_msgs::msg::DiagnosticArray>(
        "/diagnostics",
        QosProfile::default(),
    )?;
    let chunk_pub = node.create_publisher::<r2r::std_msgs::msg::Float32MultiArray>(
        "~/action_chunk",
        QosProfile::default(),
    )?;
    let clock = node.get_ros_clock();
    let safety = SafetyConfig {
        max_abs: if p.max_abs_action > 0.0 {
            vec![p.max_abs_action as f32; action_dim]
        } else {
            Vec::new()
        },
        stale_after_s: p.stale_after_s,
    };
    let scales = EeScales {
        position_m: p.position_scale_m,
        rotation_rad: p.rotation_scale_rad,
    };
    let dt = 1.0 / p.control_rate_hz;
    let mut timer = node.create_wall_timer(Duration::from_secs_f64(dt))?;
    let frame_id = p.frame_id.clone();
    let hold_zero_twist = p.hold_zero_twist;
    let dry_run = p.dry_run;
    let diag_every = (p.control_rate_hz.round() as u64).max(1);
    let log = logger.clone();
    let state = Rc::clone(&inputs);
    spawner.spawn_local(async move {
        let mut sequence = 0u64;
        let mut last_hold: Option<Hold> = None;
        let mut status = String::from("starting");
        let (mut ticks, mut chunks, mut failed_calls, mut published) = (0u64, 0u64, 0u64, 0u64);
        let mut latencies: Vec<f64> = Vec::new();
        let mut last_error = String::new();
        loop {
            if timer.tick().await.is_err() {
                break;
            }
            let now = match clock.lock().ok().and_then(|mut c| c.get_now().ok()) {
                Some(d) => d,
                None => continue,
            };
            let now_s = now.as_secs_f64();
            let mut sched = scheduler.borrow_mut();
            while let Some(r) = worker.try_recv() {
                match r.result {
                    Ok(chunk) => {
                        let msg = r2r::std_msgs::msg::Float32MultiArray {
                            layout: r2r::std_msgs::msg::MultiArrayLayout {
                                dim: vec![
                                    r2r::std_msgs::msg::MultiArrayDimension {
                                        label: "step".into(),
                                        size: chunk.horizon as u32,
                                        stride: chunk.actions.len() as u32,
                                    },
                                    r2r::std_msgs::msg::MultiArrayDimension {
                                        label: "action".into(),
                                        size: chunk.action_dim as u32,
                                        stride: chunk.action_dim as u32,
                                    },
                                ],
                                data_offset: 0,
                            },
                            data: chunk.actions.clone(),
                        };
                        if let Err(e) = chunk_pub.publish(&msg) {
                            r2r::log_error!(&log, "publishing the chunk: {e}");
                        }
                        chunks += 1;
                        latencies.push(r.latency_s);
                        if latencies.len() > 100 {
                            latencies.remove(0);
                        }
                        let rows = chunk
                            .actions
                            .chunks(chunk.action_dim)
                            .map(<[f32]>::to_vec)
                            .collect();
                        sched.accept(r.id, rows, r.latency_s);
                        r2r::log_debug!(&log, "chunk {} after {:.0} ms", r.id, r.latency_s * 1e3);
                    }
                    Err(e) => {
                        failed_calls += 1;
                        r2r::log_error!(&log, "policy call {} failed: {e}", r.id);
                        last_error = e;
                    }
                }
            }
            let tick = sched.tick();
            let s = state.borrow();
            let newest = s.frames.iter().flatten().map(|f| f.1).reduce(f64::min);
            // Ask for a chunk only from fresh frames, with an instruction and no e-stop.
            let fresh = newest.is_some_and(|t| now_s - t <= safety.stale_after_s);
            let ready = s.frames[0].is_some() && fresh && s.instruction.is_some() && !s.estop;
            if tick.request_observation && ready {
                let images: Vec<RgbImage> =
                    s.frames.iter().flatten().map(|f| f.0.clone()).collect();
                let proprio = proprio_dim.map(|d| {
                    let mut v = s.joints.clone().unwrap_or_default();
                    v.resize(d, 0.0);
                    v
                });
                sequence += 1;
                worker.submit(Request {
                    id: sequence,
                    // The (oldest camera's) frame arrival in the node's clock.
                    stamp: newest.unwrap_or(now_s),
                    observation: Observation {
                        images,
                        instruction: s.instruction.clone().unwrap_or_default(),
                        proprio,
                    },
                });
                sched.requested();
            }
            let gate = safety.gate(
                now_s,
                SafetyInputs {
                    newest_frame: newest,
                    has_instruction: s.instruction.is_some(),
                    estop: s.estop,
                },
                tick.action.as_deref(),
            );
            drop(s);
            let header = r2r::std_msgs::msg::Header {
                stamp: r2r::Clock::to_builtin_time(&now),
                frame_id: frame_id.clone(),
            };
            match gate {
                Ok(action) => {
                    last_hold = None;
                    if let (Some(publisher), Some((v, w))) =
                        (&twist_pub, twist(&action, scales, dt))
                    {
                        let msg = r2r::geometry_msgs::msg::TwistStamped {
                            header,
                            twist: r2r::geometry_msgs::msg::Twist {
                                linear: r2r::geometry_msgs::msg::Vector3 {
                                    x: v[0],
                                    y: v[1],
                                    z: v[2],
                                },
                                angular: r2r::geometry_msgs::msg::Vector3 {
                                    x: w[0],
                                    y: w[1],
                                    z: w[2],
                                },
                            },
                        };
                        if let Err(e) = publisher.publish(&msg) {
                            r2r::log_error!(&log, "publishing the command: {e}");
                        }
                        published += 1;
                    } else if let Some(publisher) = &pose_pub {
                        let current = state.borrow().ee_pose;
                        match current.and_then(|c| pose_target(&c, &action, scales)) {
                            Some(mut target) => {
                                clamp_to_workspace(&mut target, ws_min, ws_max);
                                let (t, q) = (target.translation.vector, target.rotation);
                                let msg = r2r::geometry_msgs::msg::PoseStamped {
                                    header,
                                    pose: r2r::geometry_msgs::msg::Pose {
                                        position: r2r::geometry_msgs::msg::Point {
                                            x: t.x,
                                            y: t.y,
                                            z: t.z,
                                        },
                                        orientation: r2r::geometry_msgs::msg::Quaternion {
                                            x: q.i,
                                            y: q.j,
                                            z: q.k,
                                            w: q.w,
                                        },
                                    },
                                };
                                if let Err(e) = publisher.publish(&msg) {
                                    r2r::log_error!(&log, "publishing the command: {e}");
                                }
                                published += 1;
                            }
                            None => r2r::log_warn!(
                                &log,
                                "ee_pose mode: no current pose on the ee_pose topic yet; holding"
                            ),
                        }
                    }
                }
                Err(hold) => {
                    if hold == Hold::NoChunk
                        && hold_zero_twist
                        && let Some(publisher) = &twist_pub
                    {
                        let zero = r2r::geometry_msgs::msg::TwistStamped {
                            header: header.clone(),
                            twist: Default::default(),
                        };
                        if let Err(e) = publisher.publish(&zero) {
                            r2r::log_error!(&log, "publishing the hold command: {e}");
                        }
                    }
                    status = hold.to_string();
                    let changed = last_hold
                        .as_ref()
                        .is_none_or(|h| std::mem::discriminant(h) != std::mem::discriminant(&hold));
                    if changed {
                        r2r::log_info!(&log, "holding: {hold}");
                        last_hold = Some(hold);
                    }
                }
            }
            if last_hold.is_none() {
                status = if dry_run {
                    "executing (dry run)".into()
                } else {
                    "executing".into()
                };
            }
            ticks += 1;
            if ticks % diag_every == 0 {
                let s = state.borrow();
                let mut sorted = latencies.clone();
                sorted.sort_by(f64::total_cmp);
                let pct = |q: f64| {
                    sorted
                        .get(((sorted.len() as f64 - 1.0) * q).round() as usize)
                        .copied()
                };
                let fmt =
                    |v: Option<f64>| v.map_or("n/a".to_owned(), |x| format!("{:.1}", x * 1e3));
                let kv = |key: &str, value: String| r2r::diagnostic_msgs::msg::KeyValue {
                    key: key.into(),
                    value,
                };
                let level = if last_hold.is_some() { 1 } else { 0 };
                let msg = r2r::diagnostic_msgs::msg::DiagnosticArray {
                    header: r2r::std_msgs::msg::Header {
                        stamp: r2r::Clock::to_builtin_time(&now),
                        frame_id: String::new(),
                    },
                    status: vec![r2r::diagnostic_msgs::msg::DiagnosticStatus {
                        level,
                        name: "bitvla_node: policy".into(),
                        message: status.clone(),
                        hardware_id: String::new(),
                        values: vec![
                            kv("inference_latency_p50_ms", fmt(pct(0.5))),
                            kv("inference_latency_p95_ms", fmt(pct(0.95))),
                            kv("chunks", chunks.to_string()),
                            kv("failed_calls", failed_calls.to_string()),
                            kv("commands_published", published.to_string()),
                            kv("frames_received", s.frames_received.to_string()),
                            kv("frames_rejected", s.rejected_frames.to_string()),
                            kv("observations_superseded", worker.superseded().to_string()),
                            kv("stale_chunks", sched.stale_chunks.to_string()),
                            kv(
                                "camera_age_s",
                                newest.map_or("n/a".into(), |t| format!("{:.3}", now_s - t)),
                            ),
                            kv("last_error", last_error.clone()),
                            kv("dry_run", dry_run.to_string()),
                        ],
                    }],
                };
                if let Err(e) = diagnostics_pub.publish(&msg) {
                    r2r::log_error!(&log, "publishing diagnostics: {e}");
                }
            }
        }
    })?;

    let stop = shutdown_flag();
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        node.spin_once(Duration::from_millis(2));
        pool.run_until_stalled();
    }
    r2r::log_info!(&logger, "shutting down");
    // Commands stop with the process (MoveIt Servo halts after its command timeout); an
    // inference in flight is not waited for.
    std::process::exit(0)
}

/// Set by SIGINT / SIGTERM.
fn shutdown_flag() -> &'static std::sync::atomic::AtomicBool {
    use std::sync::atomic::AtomicBool;
    static STOP: AtomicBool = AtomicBool::new(false);
    extern "C" fn on_signal(_: libc::c_int) {
        STOP.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    &STOP
}
