//! The thin r2r adapter of `bitvla_node` (feature `ros`): parameters, subscriptions, publishers
//! and the control timer. Everything it decides with lives below it and is tested without ROS:
//! `obs` decodes frames, `runtime` runs the policy on its own thread, `control` schedules chunks,
//! gates them and maps them to commands.

use crate::control::{
    ChunkScheduler, EeScales, Hold, SafetyConfig, SafetyInputs, SchedulerConfig, twist,
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
    /// ee_delta_twist: geometry_msgs/TwistStamped (MoveIt Servo, speed units)
    pub command_mode: String,
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
    /// Rotate camera images by 180 degrees (LIBERO simulator cameras)
    pub rotate_180: bool,
    /// Metres per unit action per control step
    pub position_scale_m: f64,
    /// Radians per unit action per control step
    pub rotation_scale_rad: f64,
    /// raw or libero
    pub gripper: String,
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
            command_topic: "/servo_node/delta_twist_cmds".into(),
            frame_id: "base_link".into(),
            control_rate_hz: 20.0,
            actions_per_chunk: 0,
            dry_run: true,
            stale_after_s: 0.5,
            max_abs_action: 0.0,
            rotate_180: false,
            position_scale_m: 0.05,
            rotation_scale_rad: 0.5,
            gripper: "raw".into(),
        }
    }
}

#[derive(Default)]
struct Inputs {
    frames: [Option<(RgbImage, f64)>; 2],
    instruction: Option<String>,
    estop: bool,
    joints: Option<Vec<f32>>,
    rejected_frames: u64,
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
    anyhow::ensure!(
        p.command_mode == "ee_delta_twist",
        "command_mode {:?} is not supported yet (ee_delta_twist)",
        p.command_mode
    );
    anyhow::ensure!(
        p.control_rate_hz > 0.0 && p.control_rate_hz <= 1000.0,
        "control_rate_hz {} must be in (0, 1000]",
        p.control_rate_hz
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
                state.borrow_mut().frames[slot] = Some((img, t));
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

    let command_topic = if p.dry_run {
        "~/dry_run/command".to_owned()
    } else {
        p.command_topic.clone()
    };
    let command_pub = node.create_publisher::<r2r::geometry_msgs::msg::TwistStamped>(
        &command_topic,
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
    let log = logger.clone();
    let state = Rc::clone(&inputs);
    spawner.spawn_local(async move {
        let mut sequence = 0u64;
        let mut last_hold: Option<Hold> = None;
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
                        let rows = chunk
                            .actions
                            .chunks(chunk.action_dim)
                            .map(<[f32]>::to_vec)
                            .collect();
                        sched.accept(r.id, rows, r.stamp, now_s, r.latency_s);
                        r2r::log_debug!(&log, "chunk {} after {:.0} ms", r.id, r.latency_s * 1e3);
                    }
                    Err(e) => r2r::log_error!(&log, "policy call {} failed: {e}", r.id),
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
                let stamp = s
                    .frames
                    .iter()
                    .flatten()
                    .map(|f| f.1)
                    .fold(f64::INFINITY, f64::min);
                let proprio = proprio_dim.map(|d| {
                    let mut v = s.joints.clone().unwrap_or_default();
                    v.resize(d, 0.0);
                    v
                });
                sequence += 1;
                worker.submit(Request {
                    id: sequence,
                    // Chunks align to the (oldest camera's) frame arrival in the node's clock.
                    stamp,
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
            match gate {
                Ok(action) => {
                    last_hold = None;
                    if let Some((v, w)) = twist(&action, scales, dt) {
                        let msg = r2r::geometry_msgs::msg::TwistStamped {
                            header: r2r::std_msgs::msg::Header {
                                stamp: r2r::Clock::to_builtin_time(&now),
                                frame_id: frame_id.clone(),
                            },
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
                        if let Err(e) = command_pub.publish(&msg) {
                            r2r::log_error!(&log, "publishing the command: {e}");
                        }
                    }
                }
                Err(hold) => {
                    let changed = last_hold
                        .as_ref()
                        .is_none_or(|h| std::mem::discriminant(h) != std::mem::discriminant(&hold));
                    if changed {
                        r2r::log_info!(&log, "holding: {hold}");
                        last_hold = Some(hold);
                    }
                }
            }
        }
    })?;

    loop {
        node.spin_once(Duration::from_millis(2));
        pool.run_until_stalled();
    }
}
