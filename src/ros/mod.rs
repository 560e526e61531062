//! The thin r2r adapter of `bitvla_node` (feature `ros`): parameters, subscriptions, publishers
//! and the control timer. Everything it decides with lives below it and is tested without ROS:
//! `obs` decodes frames, `runtime` runs the policy on its own thread, `control::ControlCore`
//! decides (the same core `bitvla replay` drives with bag time).

use crate::bag::msgs;
use crate::control::{Command, CommandMode, ControlCore, CoreConfig};
use crate::model::{GripperMapping, Policy, PolicyOptions};
use crate::obs::{self, ImageOptions};
use crate::params::{CameraTransport, NODE_NAME, NodeParams};
use crate::runtime::InferenceWorker;
use anyhow::Context;
use futures::executor::LocalPool;
use futures::prelude::*;
use futures::task::LocalSpawnExt;
use image::RgbImage;
use r2r::QosProfile;
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

// `use_sim_time` needs r2r built with rosgraph_msgs; without it r2r ignores the parameter and the
// node would silently run on wall time. r2r 0.9.7's build script also drops this support when it
// reuses its cached bindings (a target dir built before with another AMENT_PREFIX_PATH or
// IDL_PACKAGE_FILTER): `cargo clean -p r2r` (or one target dir per ROS environment) fixes that.
r2r::assert_compiled_with_use_sim_time_support!();

/// Under simulation time, at most this much missed time is caught up tick by tick [s].
const MAX_CATCH_UP_S: u64 = 2;

/// Runs `bitvla_node` until the process is stopped.
pub fn run_node() -> anyhow::Result<()> {
    let ctx = r2r::Context::create()?;
    let mut node = r2r::Node::create(ctx, NODE_NAME, "")?;
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
            cache_dir: p.cache_dir(),
            ..Default::default()
        },
    )
    .with_context(|| format!("loading the policy from {}", p.model_path))?;
    let config = CoreConfig::from_params(&p, policy.action_dim(), policy.proprio_dim())
        .map_err(anyhow::Error::msg)?;
    r2r::log_info!(
        &logger,
        "policy loaded: {} actions x {} dims, unnorm key {}, proprio {:?}; dry_run = {}",
        policy.horizon(),
        policy.action_dim(),
        policy.unnorm_key(),
        policy.proprio_dim(),
        p.dry_run
    );
    let worker = InferenceWorker::spawn(policy, usize::try_from(p.threads).unwrap_or(0))?;
    let mode = config.mode;
    let dt = config.dt;
    let (config_needs_joints, config_needs_pose) =
        (config.needs_joint_states(), config.needs_ee_pose());
    let joint_names = config.joints.names.clone();
    let core = Rc::new(RefCell::new(ControlCore::new(config)));
    // Set by a new instruction: tick now (ask for a chunk at once, not up to a period later).
    let kick = Rc::new(std::cell::Cell::new(false));

    let mut pool = LocalPool::new();
    let spawner = pool.spawner();
    spawner.spawn_local(param_handler)?;
    let clock = node.get_ros_clock();
    let now_time = move || clock.lock().ok().and_then(|mut c| c.get_now().ok());
    let now_s: NowS = {
        let now_time = now_time.clone();
        Rc::new(move || now_time().map(|d| d.as_secs_f64()))
    };

    // Cameras: a forced transport is subscribed now; `auto` once the graph shows a publisher
    // of the topic, with the type it offers (re-checked as publishers come and go).
    let mut cameras = Vec::new();
    for (slot, (topic, param, transport)) in [
        (&p.camera_topic, "camera_transport", &p.camera_transport),
        (
            &p.wrist_camera_topic,
            "wrist_camera_transport",
            &p.wrist_camera_transport,
        ),
    ]
    .into_iter()
    .enumerate()
    {
        if topic.is_empty() {
            continue;
        }
        let transport = CameraTransport::parse(param, transport).map_err(anyhow::Error::msg)?;
        let mut camera = Camera {
            slot,
            topic: resolve_topic_name(topic),
            param,
            transport,
            subscribed: None,
            reported: None,
        };
        if transport != CameraTransport::Auto {
            camera.subscribe(&mut node, transport, &core, &logger, &now_s, &spawner)?;
        } else {
            r2r::log_info!(
                &logger,
                "{param} auto: waiting for a publisher on {} to choose raw or compressed",
                camera.topic
            );
        }
        cameras.push(camera);
    }
    {
        let sub = node
            .subscribe::<r2r::std_msgs::msg::String>(&p.instruction_topic, QosProfile::default())?;
        let core = Rc::clone(&core);
        let log = logger.clone();
        let kick = Rc::clone(&kick);
        spawner.spawn_local(sub.for_each(move |m| {
            if core.borrow_mut().on_instruction(&m.data) {
                kick.set(true);
                r2r::log_info!(&log, "instruction: {:?}", m.data.trim());
            } else {
                r2r::log_error!(&log, "empty instruction ignored");
            }
            future::ready(())
        }))?;
    }
    {
        let sub =
            node.subscribe::<r2r::std_msgs::msg::Bool>(&p.estop_topic, QosProfile::default())?;
        let core = Rc::clone(&core);
        spawner.spawn_local(sub.for_each(move |m| {
            core.borrow_mut().on_estop(m.data);
            future::ready(())
        }))?;
    }
    if config_needs_joints {
        let sub = node.subscribe::<r2r::sensor_msgs::msg::JointState>(
            &p.joint_states_topic,
            QosProfile::sensor_data(),
        )?;
        let core = Rc::clone(&core);
        spawner.spawn_local(sub.for_each(move |m| {
            core.borrow_mut().on_joint_states(&m.name, &m.position);
            future::ready(())
        }))?;
    }
    if config_needs_pose {
        let sub = node.subscribe::<r2r::geometry_msgs::msg::PoseStamped>(
            &p.ee_pose_topic,
            QosProfile::default(),
        )?;
        let core = Rc::clone(&core);
        spawner.spawn_local(sub.for_each(move |m| {
            let (t, q) = (m.pose.position, m.pose.orientation);
            let rotation = nalgebra::UnitQuaternion::from_quaternion(nalgebra::Quaternion::new(
                q.w, q.x, q.y, q.z,
            ));
            core.borrow_mut()
                .on_ee_pose(nalgebra::Isometry3::from_parts(
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
    let (mut twist_pub, mut pose_pub, mut trajectory_pub, mut positions_pub) =
        (None, None, None, None);
    match mode {
        CommandMode::EePose => {
            pose_pub = Some(
                node.create_publisher::<r2r::geometry_msgs::msg::PoseStamped>(&command_topic, qos)?,
            );
        }
        CommandMode::EeDeltaTwist => {
            twist_pub = Some(
                node.create_publisher::<r2r::geometry_msgs::msg::TwistStamped>(
                    &command_topic,
                    qos,
                )?,
            );
        }
        CommandMode::JointTrajectory => {
            trajectory_pub = Some(
                node.create_publisher::<r2r::trajectory_msgs::msg::JointTrajectory>(
                    &command_topic,
                    qos,
                )?,
            );
        }
        CommandMode::JointPositions => {
            positions_pub = Some(
                node.create_publisher::<r2r::std_msgs::msg::Float64MultiArray>(
                    &command_topic,
                    qos,
                )?,
            );
        }
    }
    let gripper_pub = if p.gripper_topic.is_empty() {
        None
    } else {
        let topic = if p.dry_run {
            "~/dry_run/gripper".to_owned()
        } else {
            p.gripper_topic.clone()
        };
        Some(
            node.create_publisher::<r2r::std_msgs::msg::Float64MultiArray>(
                &topic,
                QosProfile::default(),
            )?,
        )
    };
    let diagnostics_pub = node.create_publisher::<r2r::diagnostic_msgs::msg::DiagnosticArray>(
        "/diagnostics",
        QosProfile::default(),
    )?;
    let chunk_pub = node.create_publisher::<r2r::bitvla_ros::msg::ActionChunk>(
        "~/action_chunk",
        QosProfile::default(),
    )?;
    let status_pub = node.create_publisher::<r2r::bitvla_ros::msg::PolicyStatus>(
        "~/status",
        QosProfile::default(),
    )?;
    let sim_time = p.use_sim_time;
    // The loop polls every 2 ms and decides the ticks itself. Wall time: one tick per period,
    // and an immediate tick (restarting the period) when an instruction arrives or the first
    // chunk of an idle arm is ready, so neither waits up to a period. Simulation time: the ticks
    // that came due on the sim-time grid.
    let period = dt.min(0.002);
    let mut timer = node.create_wall_timer(Duration::from_secs_f64(period))?;
    let frame_id = p.frame_id.clone();
    let log = logger.clone();
    let control_core = Rc::clone(&core);
    spawner.spawn_local(async move {
        let core = control_core;
        // Under simulation time, control ticks sit on the grid of multiples of the period in
        // sim time, however /clock advances (a bag player, a paused simulator): the same ticks
        // `bitvla replay` runs, so a replayed bag gives the same commands.
        let dt_ns = (dt * 1e9).round().max(1.0) as u64;
        let mut next_tick: Option<u64> = None;
        let mut next_wall_tick: Option<f64> = None;
        loop {
            if timer.tick().await.is_err() {
                break;
            }
            let Some(clock_now) = now_time() else {
                continue;
            };
            let ticks: Vec<Duration> = if sim_time {
                let now_ns = clock_now.as_nanos() as u64;
                if now_ns == 0 {
                    continue; // no /clock yet
                }
                let next = next_tick.get_or_insert(now_ns.div_ceil(dt_ns) * dt_ns);
                if now_ns.saturating_sub(*next) > MAX_CATCH_UP_S * 1_000_000_000 {
                    r2r::log_warn!(
                        &log,
                        "simulation time jumped ahead; skipping the missed ticks"
                    );
                    *next = now_ns.div_ceil(dt_ns) * dt_ns;
                }
                let mut due = Vec::new();
                while *next <= now_ns {
                    due.push(Duration::from_nanos(*next));
                    *next += dt_ns;
                }
                due
            } else {
                let now = clock_now.as_secs_f64();
                let mut c = core.borrow_mut();
                while let Some(r) = worker.try_recv() {
                    c.on_response(r, now);
                }
                let start_now = kick.replace(false) || (!c.executing() && c.response_due(now));
                drop(c);
                let due = next_wall_tick.is_none_or(|t| now >= t - 0.001);
                if !(start_now || due) {
                    continue;
                }
                next_wall_tick = Some(match next_wall_tick {
                    Some(t) if !start_now && now - t < dt => t + dt,
                    _ => now + dt,
                });
                vec![clock_now]
            };
            for now_d in ticks {
                let now = now_d.as_secs_f64();
                let mut core = core.borrow_mut();
                while let Some(r) = worker.try_recv() {
                    core.on_response(r, now);
                }
                let out = core.tick(now);
                let status = core.status(now);
                drop(core);
                if let Some(request) = out.request {
                    worker.submit(request);
                }
                for (id, e) in &out.failures {
                    r2r::log_error!(&log, "policy call {id} failed: {e}");
                }
                for c in &out.chunks {
                    r2r::log_debug!(&log, "chunk {} after {:.0} ms", c.id, c.latency_s * 1e3);
                    let stamp_ns = (c.observation_stamp * 1e9).round() as i64;
                    let msg = action_chunk(c.message(stamp_ns, &frame_id));
                    if let Err(e) = chunk_pub.publish(&msg) {
                        r2r::log_error!(&log, "publishing the chunk: {e}");
                    }
                }
                let stamp_ns = now_d.as_nanos() as i64;
                if let Err(e) =
                    status_pub.publish(&policy_status(status.message(stamp_ns, &frame_id)))
                {
                    r2r::log_error!(&log, "publishing the status: {e}");
                }
                let header = r2r::std_msgs::msg::Header {
                    stamp: r2r::Clock::to_builtin_time(&now_d),
                    frame_id: frame_id.clone(),
                };
                let published = match (&out.command, &twist_pub, &pose_pub) {
                    (Some(Command::Twist { linear, angular }), Some(publisher), _) => publisher
                        .publish(&r2r::geometry_msgs::msg::TwistStamped {
                            header,
                            twist: r2r::geometry_msgs::msg::Twist {
                                linear: vector3(linear),
                                angular: vector3(angular),
                            },
                        }),
                    (
                        Some(Command::Pose {
                            position: t,
                            orientation: q,
                        }),
                        _,
                        Some(publisher),
                    ) => publisher.publish(&r2r::geometry_msgs::msg::PoseStamped {
                        header,
                        pose: r2r::geometry_msgs::msg::Pose {
                            position: r2r::geometry_msgs::msg::Point {
                                x: t[0],
                                y: t[1],
                                z: t[2],
                            },
                            orientation: r2r::geometry_msgs::msg::Quaternion {
                                x: q[0],
                                y: q[1],
                                z: q[2],
                                w: q[3],
                            },
                        },
                    }),
                    (Some(Command::Joints(positions)), _, _) => {
                        if let Some(publisher) = &trajectory_pub {
                            let (sec, nanosec) = crate::bag::msgs::split_time(dt);
                            publisher.publish(&r2r::trajectory_msgs::msg::JointTrajectory {
                                header,
                                joint_names: joint_names.clone(),
                                points: vec![r2r::trajectory_msgs::msg::JointTrajectoryPoint {
                                    positions: positions.clone(),
                                    time_from_start: r2r::builtin_interfaces::msg::Duration {
                                        sec,
                                        nanosec,
                                    },
                                    ..Default::default()
                                }],
                            })
                        } else if let Some(publisher) = &positions_pub {
                            publisher.publish(&float64_vector("joints", positions.clone()))
                        } else {
                            Ok(())
                        }
                    }
                    _ => Ok(()),
                };
                if let Err(e) = published {
                    r2r::log_error!(&log, "publishing the command: {e}");
                }
                if let (Some(publisher), Some(g)) = (&gripper_pub, out.gripper) {
                    let msg = float64_vector("gripper", vec![g]);
                    if let Err(e) = publisher.publish(&msg) {
                        r2r::log_error!(&log, "publishing the gripper command: {e}");
                    }
                }
                if out.hold_changed {
                    match &out.hold {
                        Some(hold) => r2r::log_info!(&log, "holding: {hold}"),
                        None => r2r::log_info!(&log, "executing"),
                    }
                }
                if let Some(d) = out.diagnostics {
                    let mut values: Vec<_> = d
                        .values
                        .into_iter()
                        .map(|(key, value)| r2r::diagnostic_msgs::msg::KeyValue { key, value })
                        .collect();
                    values.push(r2r::diagnostic_msgs::msg::KeyValue {
                        key: "observations_superseded".into(),
                        value: worker.superseded().to_string(),
                    });
                    let msg = r2r::diagnostic_msgs::msg::DiagnosticArray {
                        header: r2r::std_msgs::msg::Header {
                            stamp: r2r::Clock::to_builtin_time(&now_d),
                            frame_id: String::new(),
                        },
                        status: vec![r2r::diagnostic_msgs::msg::DiagnosticStatus {
                            level: d.level,
                            name: "bitvla_node: policy".into(),
                            message: d.message,
                            hardware_id: String::new(),
                            values,
                        }],
                    };
                    if let Err(e) = diagnostics_pub.publish(&msg) {
                        r2r::log_error!(&log, "publishing diagnostics: {e}");
                    }
                }
            }
        }
    })?;

    let stop = crate::process::stop_flag();
    let mut next_graph_check = std::time::Instant::now();
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        node.spin_once(Duration::from_millis(2));
        pool.run_until_stalled();
        if std::time::Instant::now() >= next_graph_check
            && cameras.iter().any(|c| c.transport == CameraTransport::Auto)
        {
            next_graph_check = std::time::Instant::now() + GRAPH_CHECK;
            match node.get_topic_names_and_types() {
                Ok(graph) => {
                    for camera in &mut cameras {
                        camera.follow_graph(&graph, &mut node, &core, &logger, &now_s, &spawner);
                    }
                }
                Err(e) => r2r::log_warn!(&logger, "reading the ROS graph's topics: {e}"),
            }
        }
    }
    r2r::log_info!(&logger, "shutting down");
    // Commands stop with the process (MoveIt Servo halts after its command timeout); an
    // inference in flight is not waited for.
    std::process::exit(0)
}

/// How often `auto` camera transports look at the graph's topic types.
const GRAPH_CHECK: Duration = Duration::from_millis(250);

type Core = Rc<RefCell<ControlCore>>;
type NowS = Rc<dyn Fn() -> Option<f64>>;

/// A camera subscription; with `auto`, resubscribed when the topic's type in the graph changes.
struct Camera {
    slot: usize,
    /// Fully qualified topic name, as the graph lists it.
    topic: String,
    /// The transport parameter's name (for messages).
    param: &'static str,
    transport: CameraTransport,
    /// The current subscription: its transport, and the handle that ends it.
    subscribed: Option<(CameraTransport, future::AbortHandle)>,
    /// The last graph state logged (types offered), so each change is logged once.
    reported: Option<Vec<String>>,
}

impl Camera {
    fn subscribe(
        &mut self,
        node: &mut r2r::Node,
        transport: CameraTransport,
        core: &Core,
        logger: &str,
        now_s: &NowS,
        spawner: &futures::executor::LocalSpawner,
    ) -> anyhow::Result<()> {
        if let Some((_, handle)) = self.subscribed.take() {
            handle.abort(); // drops the old stream: r2r removes its subscription
        }
        let slot = self.slot;
        let core = Rc::clone(core);
        let log = logger.to_owned();
        let now_s = Rc::clone(now_s);
        // Frames are timed by arrival in the node's clock (header stamps of drivers vary).
        let store = move |decoded: Result<RgbImage, obs::ImageError>| match decoded {
            Ok(img) => core
                .borrow_mut()
                .on_frame(slot, img, now_s().unwrap_or(0.0)),
            Err(e) => {
                core.borrow_mut().on_rejected_frame();
                r2r::log_error!(&log, "camera {slot}: rejected frame: {e}");
            }
        };
        let task: future::LocalBoxFuture<'static, ()> = if transport == CameraTransport::Compressed
        {
            let sub = node.subscribe::<r2r::sensor_msgs::msg::CompressedImage>(
                &self.topic,
                QosProfile::sensor_data(),
            )?;
            sub.for_each(move |m| {
                store(obs::decode_compressed(&m.data));
                future::ready(())
            })
            .boxed_local()
        } else {
            let sub = node.subscribe::<r2r::sensor_msgs::msg::Image>(
                &self.topic,
                QosProfile::sensor_data(),
            )?;
            sub.for_each(move |m| {
                store(obs::decode_raw(
                    &m.encoding,
                    m.width,
                    m.height,
                    m.step as usize,
                    &m.data,
                ));
                future::ready(())
            })
            .boxed_local()
        };
        let (task, handle) = future::abortable(task);
        spawner.spawn_local(task.map(|_| ()))?;
        self.subscribed = Some((transport, handle));
        Ok(())
    }

    /// `auto`: subscribes with the type the topic's publishers offer, once there are any, and
    /// again when it changes. A type that is not an image is an error in the log naming the
    /// parameter (the node keeps serving and keeps looking).
    fn follow_graph(
        &mut self,
        graph: &std::collections::HashMap<String, Vec<String>>,
        node: &mut r2r::Node,
        core: &Core,
        logger: &str,
        now_s: &NowS,
        spawner: &futures::executor::LocalSpawner,
    ) {
        if self.transport != CameraTransport::Auto {
            return;
        }
        let mut types = graph.get(&self.topic).cloned().unwrap_or_default();
        types.sort();
        let changed = self.reported.as_ref() != Some(&types);
        let (param, topic) = (self.param, self.topic.clone());
        let chosen = match &types[..] {
            [] => return, // no publisher (yet, or any more): keep what we have
            [ty] => CameraTransport::Auto.resolve(param, &topic, ty),
            several => Err(format!(
                "{param} auto: topic {topic} is offered with several types {several:?}; set                  {param} to raw or compressed"
            )),
        };
        if changed {
            self.reported = Some(types.clone());
        }
        match chosen {
            Ok(t) if self.subscribed.as_ref().map(|(s, _)| *s) != Some(t) => {
                match self.subscribe(node, t, core, logger, now_s, spawner) {
                    Ok(()) => r2r::log_info!(
                        logger,
                        "{param} auto: {topic} is published as {}; subscribed as {}",
                        types.join(", "),
                        t.name()
                    ),
                    Err(e) => r2r::log_error!(logger, "{param} auto: subscribing to {topic}: {e}"),
                }
            }
            Ok(_) => {}
            Err(e) if changed => r2r::log_error!(logger, "{e}"),
            Err(_) => {}
        }
    }
}

/// A topic parameter as the graph names it: absolute names as they are, relative ones under
/// the root namespace (the node runs in `/`), `~/x` under the node's name.
fn resolve_topic_name(topic: &str) -> String {
    if topic.starts_with('/') {
        topic.to_owned()
    } else if let Some(rest) = topic.strip_prefix("~/") {
        format!("/{NODE_NAME}/{rest}")
    } else {
        format!("/{topic}")
    }
}

/// A one-dimensional `Float64MultiArray` whose layout names its values (as
/// [`crate::bag::msgs::Float64MultiArray::vector`] writes it into bags).
fn float64_vector(label: &str, data: Vec<f64>) -> r2r::std_msgs::msg::Float64MultiArray {
    let n = data.len() as u32;
    r2r::std_msgs::msg::Float64MultiArray {
        layout: r2r::std_msgs::msg::MultiArrayLayout {
            dim: vec![r2r::std_msgs::msg::MultiArrayDimension {
                label: label.into(),
                size: n,
                stride: n,
            }],
            data_offset: 0,
        },
        data,
    }
}

fn vector3(v: &[f64; 3]) -> r2r::geometry_msgs::msg::Vector3 {
    r2r::geometry_msgs::msg::Vector3 {
        x: v[0],
        y: v[1],
        z: v[2],
    }
}

fn header(h: msgs::Header) -> r2r::std_msgs::msg::Header {
    r2r::std_msgs::msg::Header {
        stamp: r2r::builtin_interfaces::msg::Time {
            sec: h.stamp.sec,
            nanosec: h.stamp.nanosec,
        },
        frame_id: h.frame_id,
    }
}

/// The package's own `ActionChunk` (msg/ActionChunk.msg; types generated by the package's
/// CMake build and bound by r2r) from the ROS-free message the replay writes to bags.
fn action_chunk(m: msgs::ActionChunkMsg) -> r2r::bitvla_ros::msg::ActionChunk {
    r2r::bitvla_ros::msg::ActionChunk {
        header: header(m.header),
        sequence: m.sequence,
        instruction: m.instruction,
        unnorm_key: m.unnorm_key,
        horizon: m.horizon,
        dimension_names: m.dimension_names,
        normalized: m.normalized,
        actions: m.actions,
        inference_latency_s: m.inference_latency_s,
    }
}

/// The package's own `PolicyStatus` (msg/PolicyStatus.msg).
fn policy_status(m: msgs::PolicyStatusMsg) -> r2r::bitvla_ros::msg::PolicyStatus {
    r2r::bitvla_ros::msg::PolicyStatus {
        header: header(m.header),
        state: m.state,
        reason: m.reason,
        instruction: m.instruction,
        chunk_sequence: m.chunk_sequence,
        chunk_index: m.chunk_index,
        inferences: m.inferences,
        last_inference_latency_s: m.last_inference_latency_s,
        camera_age_s: m.camera_age_s,
        dry_run: m.dry_run,
    }
}
