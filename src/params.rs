//! The node's parameters, shared by `bitvla_node` (declared to ROS through r2r's `RosParams`
//! derive under the `ros` feature) and `bitvla replay`, which reads the same YAML parameter file
//! (the `ros__parameters` block) so that a replay is what the node would do on that robot.

use std::path::Path;

/// The node's parameters (`ros2 param` shows these descriptions).
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[cfg_attr(feature = "ros", derive(r2r::RosParams))]
#[serde(default, deny_unknown_fields)]
pub struct NodeParams {
    /// Checkpoint directory (published layout) or packed .bitvla file
    pub model_path: String,
    /// dataset_statistics.json key; empty selects the only one
    pub unnorm_key: String,
    /// Inference threads (0 = all cores)
    pub threads: i64,
    /// A checkpoint directory is converted into the packed-model cache on its first load and
    /// mapped from there on later starts (about a second instead of quantizing every weight
    /// again); false quantizes at every start
    pub packed_cache: bool,
    /// The packed-model cache directory; empty = $BITVLA_CACHE_DIR, else
    /// $XDG_CACHE_HOME/bitvla_ros/packed, else ~/.cache/bitvla_ros/packed
    pub packed_cache_dir: String,
    /// Third-person camera topic
    pub camera_topic: String,
    /// auto (the topic's type: sensor_msgs/Image or sensor_msgs/CompressedImage, looked up in
    /// the ROS graph once a publisher appears, or in the bag), raw (Image) or compressed
    /// (CompressedImage)
    pub camera_transport: String,
    /// Wrist camera topic; empty for a one-camera checkpoint
    pub wrist_camera_topic: String,
    /// auto, raw or compressed (see camera_transport)
    pub wrist_camera_transport: String,
    /// Instruction topic (std_msgs/String); a new instruction cancels the current chunk
    pub instruction_topic: String,
    /// E-stop topic (std_msgs/Bool); true holds all output
    pub estop_topic: String,
    /// none (zeros, out of distribution for LIBERO checkpoints), joint_states (positions in
    /// message order) or ee_pose (position and axis-angle rotation from ee_pose_topic, then
    /// zeros)
    pub proprio_source: String,
    /// sensor_msgs/JointState topic when proprio_source is joint_states
    pub joint_states_topic: String,
    /// ee_delta_twist: geometry_msgs/TwistStamped (MoveIt Servo, speed units); ee_pose:
    /// geometry_msgs/PoseStamped target = current pose (ee_pose_topic) + the predicted delta;
    /// joint_trajectory: trajectory_msgs/JointTrajectory (one point, one control period ahead)
    /// for a joint_trajectory_controller; joint_positions: std_msgs/Float64MultiArray for a
    /// forward position controller
    pub command_mode: String,
    /// Joint modes: the commanded joints, comma-separated (action dimension i drives joint i)
    pub joint_names: String,
    /// Joint modes: delta (target = current position from joint_states_topic + action x
    /// joint_scale_rad) or absolute (target = action)
    pub joint_action: String,
    /// Joint modes, delta: radians per unit action per control step
    pub joint_scale_rad: f64,
    /// Joint modes: lower position limits, comma-separated [rad] (empty: none)
    pub joint_min: String,
    /// Joint modes: upper position limits, comma-separated [rad] (empty: none)
    pub joint_max: String,
    /// Joint modes: largest change of a joint target from its current position per control
    /// step [rad] (0: no limit)
    pub max_joint_step_rad: f64,
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
    /// Per-dimension clamps, comma-separated (overrides max_abs_action; empty = unused)
    pub max_abs_action_per_dim: String,
    /// Ask for the next chunk this much earlier than the expected latency requires [s]
    pub replan_margin_s: f64,
    /// Gripper command topic (std_msgs/Float64MultiArray, one value = gripper_offset +
    /// gripper_scale x the gripper action); empty = no gripper output
    pub gripper_topic: String,
    /// Gripper command = gripper_offset + gripper_scale x the (mapped) last action dimension
    pub gripper_scale: f64,
    /// See gripper_scale
    pub gripper_offset: f64,
    /// ee_delta_twist: publish a zero twist each tick while waiting for the next chunk (keeps
    /// the command stream at the control rate) and while the e-stop is engaged (stops the arm
    /// at once, not after the controller's command timeout); other safety holds publish nothing
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
    /// Latency model of the scheduler: 0 uses each chunk when it arrives; > 0 uses it exactly
    /// this many seconds after its observation (or when it arrives, if later): deterministic
    /// command streams for replays and simulation tests [s]
    pub fixed_latency_s: f64,
}

/// An axis-aligned box in the base frame [m].
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[cfg_attr(feature = "ros", derive(r2r::RosParams))]
#[serde(default, deny_unknown_fields)]
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
            packed_cache: true,
            packed_cache_dir: String::new(),
            camera_topic: "/camera/image_raw".into(),
            camera_transport: "auto".into(),
            wrist_camera_topic: String::new(),
            wrist_camera_transport: "auto".into(),
            instruction_topic: "/instruction".into(),
            estop_topic: "/estop".into(),
            proprio_source: "none".into(),
            joint_states_topic: "/joint_states".into(),
            command_mode: "ee_delta_twist".into(),
            joint_names: String::new(),
            joint_action: "delta".into(),
            joint_scale_rad: 0.05,
            joint_min: String::new(),
            joint_max: String::new(),
            max_joint_step_rad: 0.0,
            ee_pose_topic: "/ee_pose".into(),
            workspace: Workspace::default(),
            command_topic: "/servo_node/delta_twist_cmds".into(),
            frame_id: "base_link".into(),
            control_rate_hz: 20.0,
            actions_per_chunk: 0,
            dry_run: true,
            stale_after_s: 0.5,
            max_abs_action: 0.0,
            max_abs_action_per_dim: String::new(),
            replan_margin_s: 0.05,
            gripper_topic: String::new(),
            gripper_scale: 1.0,
            gripper_offset: 0.0,
            hold_zero_twist: true,
            rotate_180: false,
            position_scale_m: 0.05,
            rotation_scale_rad: 0.5,
            gripper: "raw".into(),
            use_sim_time: false,
            fixed_latency_s: 0.0,
        }
    }
}

impl NodeParams {
    /// The packed-model cache to load through (`packed_cache`, `packed_cache_dir`), None when
    /// it is off or no default directory can be named (no $HOME).
    pub fn cache_dir(&self) -> Option<std::path::PathBuf> {
        if !self.packed_cache {
            return None;
        }
        if self.packed_cache_dir.is_empty() {
            crate::model::cache::default_dir()
        } else {
            Some(self.packed_cache_dir.clone().into())
        }
    }
}

/// `sensor_msgs/msg/Image`: the `raw` camera transport.
pub const IMAGE_TYPE: &str = "sensor_msgs/msg/Image";
/// `sensor_msgs/msg/CompressedImage`: the `compressed` camera transport.
pub const COMPRESSED_IMAGE_TYPE: &str = "sensor_msgs/msg/CompressedImage";

/// How a camera topic is subscribed (`camera_transport`, `wrist_camera_transport`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CameraTransport {
    /// `sensor_msgs/msg/Image`.
    Raw,
    /// `sensor_msgs/msg/CompressedImage` (JPEG or PNG).
    Compressed,
    /// Whichever of the two the topic carries (the ROS graph's or the bag's type).
    Auto,
}

impl CameraTransport {
    /// The value of the parameter `name`.
    pub fn parse(name: &str, value: &str) -> Result<Self, String> {
        match value {
            "raw" => Ok(Self::Raw),
            "compressed" => Ok(Self::Compressed),
            "auto" => Ok(Self::Auto),
            other => Err(format!("{name} {other:?}: auto, raw or compressed")),
        }
    }

    /// The transport for a topic of type `type_name` (`pkg/msg/Type`): `raw` and `compressed`
    /// as forced; `auto` from the type, an error naming `param` (the transport parameter) and
    /// `topic` when it is not an image type.
    pub fn resolve(self, param: &str, topic: &str, type_name: &str) -> Result<Self, String> {
        match (self, type_name) {
            (Self::Auto, IMAGE_TYPE) => Ok(Self::Raw),
            (Self::Auto, COMPRESSED_IMAGE_TYPE) => Ok(Self::Compressed),
            (Self::Auto, other) => Err(format!(
                "{param} auto: topic {topic} has type {other}, which is neither {IMAGE_TYPE} \
                 nor {COMPRESSED_IMAGE_TYPE}; point the camera topic parameter at an image \
                 topic"
            )),
            (forced, _) => Ok(forced),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Raw => "raw",
            Self::Compressed => "compressed",
            Self::Auto => "auto",
        }
    }
}

/// The name the node runs under (the key of its block in a parameter file).
pub const NODE_NAME: &str = "bitvla_node";

/// A parameter file that cannot be used, naming what to fix.
#[derive(Debug, thiserror::Error)]
pub enum ParamsError {
    #[error("reading the parameter file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("parameter file {path}: {message}")]
    Invalid { path: String, message: String },
}

impl NodeParams {
    /// Reads the `ros__parameters` of `bitvla_node` from a ROS 2 parameter file: the block under
    /// `bitvla_node`, `/bitvla_node` or the wildcard `/**` (the node's own block wins, as in
    /// rcl). Parameters not in the file keep their defaults; an unknown parameter or a value of
    /// the wrong type is an error that names it.
    pub fn from_yaml_file(path: &Path) -> Result<Self, ParamsError> {
        let text = std::fs::read_to_string(path).map_err(|source| ParamsError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_yaml_str(&text).map_err(|message| ParamsError::Invalid {
            path: path.display().to_string(),
            message,
        })
    }

    pub fn from_yaml_str(text: &str) -> Result<Self, String> {
        let doc: serde_yaml::Value = serde_yaml::from_str(text).map_err(|e| e.to_string())?;
        let top = doc
            .as_mapping()
            .ok_or("expected a mapping of node names to `ros__parameters` blocks")?;
        let mut merged = serde_yaml::Mapping::new();
        // Wildcard first, then the node's own block overrides key by key.
        for key in ["/**", NODE_NAME, &format!("/{NODE_NAME}")] {
            let Some(block) = top.get(key) else { continue };
            let params = block
                .get("ros__parameters")
                .and_then(serde_yaml::Value::as_mapping)
                .ok_or_else(|| format!("`{key}` has no `ros__parameters` mapping"))?;
            merge(&mut merged, params);
        }
        if merged.is_empty() && !top.is_empty() {
            let names: Vec<String> = top
                .keys()
                .filter_map(|k| k.as_str().map(str::to_owned))
                .collect();
            return Err(format!(
                "no block for {NODE_NAME} (or `/**`); the file has {names:?}"
            ));
        }
        serde_path_to_error::deserialize(serde_yaml::Value::Mapping(merged))
            .map_err(|e| format!("parameter `{}`: {}", e.path(), e.inner()))
    }
}

/// Merges nested mappings key by key (the node's own values over the wildcard's).
fn merge(into: &mut serde_yaml::Mapping, from: &serde_yaml::Mapping) {
    for (k, v) in from {
        match (into.get_mut(k), v) {
            (Some(serde_yaml::Value::Mapping(a)), serde_yaml::Value::Mapping(b)) => merge(a, b),
            _ => {
                into.insert(k.clone(), v.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_parameter_files_load() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
        let mut n = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "yaml") {
                let p = NodeParams::from_yaml_file(&path).unwrap();
                assert_ne!(p, NodeParams::default(), "{}", path.display());
                // Every profile is a valid configuration of the core (7-dim LIBERO actions).
                crate::control::CoreConfig::from_params(&p, 7, Some(8))
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                n += 1;
            }
        }
        assert!(n >= 5, "{n} parameter files");
    }

    #[test]
    fn camera_transport_auto_follows_the_type_and_names_the_parameter() {
        let auto = CameraTransport::parse("camera_transport", "auto").unwrap();
        assert_eq!(
            auto.resolve("camera_transport", "/c", IMAGE_TYPE),
            Ok(CameraTransport::Raw)
        );
        assert_eq!(
            auto.resolve("camera_transport", "/c", COMPRESSED_IMAGE_TYPE),
            Ok(CameraTransport::Compressed)
        );
        let e = auto
            .resolve("wrist_camera_transport", "/w", "std_msgs/msg/String")
            .unwrap_err();
        assert!(
            e.contains("wrist_camera_transport") && e.contains("/w") && e.contains("std_msgs"),
            "{e}"
        );
        // Forced transports stay forced (a mismatch is reported where the messages arrive).
        let raw = CameraTransport::parse("camera_transport", "raw").unwrap();
        assert_eq!(
            raw.resolve("camera_transport", "/c", COMPRESSED_IMAGE_TYPE),
            Ok(CameraTransport::Raw)
        );
        let e = CameraTransport::parse("camera_transport", "jpeg").unwrap_err();
        assert!(e.contains("camera_transport") && e.contains("auto"), "{e}");
        assert_eq!(NodeParams::default().camera_transport, "auto");
    }

    #[test]
    fn node_block_overrides_wildcard_and_errors_name_the_parameter() {
        let text = "/**:\n  ros__parameters:\n    control_rate_hz: 10.0\n    dry_run: false\n\
                    bitvla_node:\n  ros__parameters:\n    control_rate_hz: 5\n    workspace:\n      max_z: 0.9\n";
        let p = NodeParams::from_yaml_str(text).unwrap();
        assert_eq!(p.control_rate_hz, 5.0);
        assert!(!p.dry_run);
        assert_eq!(p.workspace.max_z, 0.9);
        assert_eq!(p.workspace.min_z, Workspace::default().min_z);

        let e = NodeParams::from_yaml_str("bitvla_node:\n  ros__parameters:\n    dry_run: 3\n")
            .unwrap_err();
        assert!(e.contains("dry_run"), "{e}");
        let e =
            NodeParams::from_yaml_str("bitvla_node:\n  ros__parameters:\n    camera_topik: /x\n")
                .unwrap_err();
        assert!(e.contains("camera_topik"), "{e}");
        let e = NodeParams::from_yaml_str("other_node:\n  ros__parameters: {}\n").unwrap_err();
        assert!(e.contains("other_node"), "{e}");
    }
}
