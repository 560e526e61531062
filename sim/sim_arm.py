#!/usr/bin/env python3
"""A simulated arm for bitvla_node: a MuJoCo scene written here (a 6-DoF arm with a parallel
gripper built from primitives, a table, three colored cubes, a third-person and a wrist camera),
as a ROS 2 node (rclpy).

Publishes   <camera_topic>, <wrist_camera_topic>   sensor_msgs/Image rgb8 (camera_rate_hz, 20)
            <camera_topic>/compressed, ...         sensor_msgs/CompressedImage jpeg (compressed:=true)
            <joint_states_topic>                   sensor_msgs/JointState (state_rate_hz): the arm
                                                   joints, then finger_left/finger_right (m)
            <ee_pose_topic>                        geometry_msgs/PoseStamped (site "ee", world frame)
            /clock                                 rosgraph_msgs/Clock (use_sim_time:=true)
Accepts     <twist_topic>        geometry_msgs/TwistStamped: end-effector velocity in the world
                                 frame (MoveIt Servo style, what bitvla_node's ee_delta_twist mode
                                 publishes), tracked by damped least-squares differential IK
            <trajectory_topic>   trajectory_msgs/JointTrajectory: the first point's positions,
                                 by joint name
            <positions_topic>    std_msgs/Float64MultiArray: one position per arm joint, in order
            <gripper_topic>      std_msgs/Float64MultiArray: [finger opening in m, 0..0.08]
Bad commands (unknown joint names, wrong length, NaN or infinite values) are rejected with an
error naming what is wrong and the arm holds. Twist commands older than command_timeout_s stop
the arm (holds its position). `model_path:=FILE.xml` loads a user MJCF instead (it must have the
joints in `arm_joints`, a site `ee` and cameras named `third_person` and `wrist`).

Physics runs at 500 Hz; simulation time advances with it (with use_sim_time the sim may run
slower than real time when rendering is slow; without, it is paced to real time at best).
"""

import io
import math
import os
import sys
import threading
import time

os.environ.setdefault("MUJOCO_GL", "osmesa")

import mujoco  # noqa: E402
import numpy as np  # noqa: E402
import rclpy  # noqa: E402
from builtin_interfaces.msg import Time  # noqa: E402
from geometry_msgs.msg import PoseStamped, TwistStamped  # noqa: E402
from rclpy.node import Node  # noqa: E402
from rclpy.qos import qos_profile_sensor_data  # noqa: E402
from PIL import Image as PilImage  # noqa: E402
from rosgraph_msgs.msg import Clock  # noqa: E402
from sensor_msgs.msg import CompressedImage, Image, JointState  # noqa: E402
from std_msgs.msg import Float64MultiArray, Header  # noqa: E402
from trajectory_msgs.msg import JointTrajectory  # noqa: E402

ARM_JOINTS = ["joint1", "joint2", "joint3", "joint4", "joint5", "joint6"]
HOME = [0.0, -0.975, 1.244, 1.302, 0.0, 0.0]  # end effector at (0.45, 0, 0.2), pointing down

SCENE = """
<mujoco model="bitvla_sim_arm">
  <compiler angle="radian"/>
  <option timestep="0.002" integrator="implicitfast"/>
  <visual><global offwidth="640" offheight="480"/><quality shadowsize="0"/></visual>
  <default>
    <joint damping="1.0" armature="0.05"/>
    <geom friction="1.2 0.01 0.0001" solref="0.01 1"/>
    <position kp="300" kv="20" forcerange="-150 150"/>
    <default class="finger">
      <joint type="slide" range="0 0.04" damping="5"/>
      <position kp="500" kv="30" ctrlrange="0 0.04" forcerange="-40 40"/>
    </default>
  </default>
  <asset>
    <texture name="floor" type="2d" builtin="checker" rgb1=".25 .3 .35" rgb2=".3 .35 .4" width="128" height="128"/>
    <material name="floor" texture="floor" texrepeat="6 6"/>
  </asset>
  <worldbody>
    <light pos="0.4 0 2.0" dir="0 0 -1" diffuse="0.8 0.8 0.8"/>
    <light pos="1.5 -1 2" dir="-1 0.7 -1.4" diffuse="0.3 0.3 0.3"/>
    <geom name="floor" type="plane" pos="0 0 -0.75" size="3 3 0.1" material="floor"/>
    <geom name="table" type="box" pos="0.45 0 -0.025" size="0.45 0.6 0.025" rgba="0.62 0.48 0.33 1"/>
    <camera name="third_person" pos="1.25 0 0.65" xyaxes="0 1 0 -0.5 0 0.87" fovy="55"/>
    <body name="base" pos="0 0 0">
      <geom type="cylinder" pos="0 0 0.04" size="0.08 0.04" rgba="0.15 0.15 0.15 1"/>
      <body name="link1" pos="0 0 0.08">
        <joint name="joint1" axis="0 0 1" range="-2.9 2.9"/>
        <geom type="capsule" fromto="0 0 0 0 0 0.14" size="0.05" rgba="0.85 0.85 0.85 1"/>
        <body name="link2" pos="0 0 0.14">
          <joint name="joint2" axis="0 1 0" range="-1.7 1.7"/>
          <geom type="capsule" fromto="0 0 0 0.32 0 0" size="0.042" rgba="0.85 0.85 0.85 1"/>
          <body name="link3" pos="0.32 0 0">
            <joint name="joint3" axis="0 1 0" range="-2.6 2.6"/>
            <geom type="capsule" fromto="0 0 0 0.28 0 0" size="0.036" rgba="0.85 0.85 0.85 1"/>
            <body name="link4" pos="0.28 0 0">
              <joint name="joint4" axis="0 1 0" range="-2.0 2.0"/>
              <geom type="capsule" fromto="0 0 0 0.07 0 0" size="0.032" rgba="0.3 0.3 0.3 1"/>
              <body name="link5" pos="0.07 0 0">
                <joint name="joint5" axis="1 0 0" range="-2.9 2.9"/>
                <geom type="cylinder" fromto="0 0 0 0.04 0 0" size="0.03" rgba="0.85 0.85 0.85 1"/>
                <body name="hand" pos="0.04 0 0" euler="0 1.5708 0">
                  <joint name="joint6" axis="0 0 1" range="-2.9 2.9"/>
                  <geom type="box" pos="0 0 0.015" size="0.025 0.06 0.015" rgba="0.2 0.2 0.2 1"/>
                  <camera name="wrist" pos="0.05 0 0.0" xyaxes="0 1 0 1 0 0" fovy="75"/>
                  <site name="ee" pos="0 0 0.1" size="0.008" rgba="1 1 0 0"/>
                  <body name="finger_left" pos="0 0.005 0.03">
                    <joint name="finger_left" class="finger" axis="0 1 0"/>
                    <geom type="box" pos="0 0.008 0.04" size="0.012 0.006 0.04" rgba="0.7 0.7 0.7 1"/>
                  </body>
                  <body name="finger_right" pos="0 -0.005 0.03">
                    <joint name="finger_right" class="finger" axis="0 -1 0"/>
                    <geom type="box" pos="0 -0.008 0.04" size="0.012 0.006 0.04" rgba="0.7 0.7 0.7 1"/>
                  </body>
                </body>
              </body>
            </body>
          </body>
        </body>
      </body>
    </body>
    <body name="red_cube" pos="0.5 0.18 0.025"><freejoint/><geom type="box" size="0.025 0.025 0.025" rgba="0.85 0.1 0.1 1" mass="0.05"/></body>
    <body name="green_cube" pos="0.58 -0.12 0.025"><freejoint/><geom type="box" size="0.025 0.025 0.025" rgba="0.1 0.7 0.2 1" mass="0.05"/></body>
    <body name="blue_cube" pos="0.42 -0.02 0.025"><freejoint/><geom type="box" size="0.025 0.025 0.025" rgba="0.15 0.3 0.9 1" mass="0.05"/></body>
  </worldbody>
  <actuator>
    <position name="joint1" joint="joint1" ctrlrange="-2.9 2.9"/>
    <position name="joint2" joint="joint2" ctrlrange="-1.7 1.7"/>
    <position name="joint3" joint="joint3" ctrlrange="-2.6 2.6"/>
    <position name="joint4" joint="joint4" ctrlrange="-2.0 2.0"/>
    <position name="joint5" joint="joint5" ctrlrange="-2.9 2.9"/>
    <position name="joint6" joint="joint6" ctrlrange="-2.9 2.9"/>
    <position name="finger_left" class="finger" joint="finger_left"/>
    <position name="finger_right" class="finger" joint="finger_right"/>
  </actuator>
</mujoco>
"""


class SimError(Exception):
    """A problem with the scene or a command, said in words."""


class Arm:
    """The MuJoCo model and its controller, without ROS (tests drive it directly too)."""

    def __init__(self, xml=None, arm_joints=ARM_JOINTS, width=224, height=224,
                 max_linear=0.25, max_angular=1.0, max_joint_speed=1.5):
        try:
            self.model = mujoco.MjModel.from_xml_path(xml) if xml else mujoco.MjModel.from_xml_string(SCENE)
        except Exception as e:  # mujoco raises ValueError with the parser's message
            raise SimError(f"cannot load the MJCF {xml or '(built-in scene)'}: {e}") from None
        m = self.model
        self.data = mujoco.MjData(m)
        names = [mujoco.mj_id2name(m, mujoco.mjtObj.mjOBJ_JOINT, i) for i in range(m.njnt)]
        missing = [j for j in arm_joints if j not in names]
        if missing:
            raise SimError(f"the MJCF has no joints {missing} (arm_joints); it has {names}")
        for kind, name in ((mujoco.mjtObj.mjOBJ_SITE, "ee"), (mujoco.mjtObj.mjOBJ_CAMERA, "third_person"),
                           (mujoco.mjtObj.mjOBJ_CAMERA, "wrist")):
            if mujoco.mj_name2id(m, kind, name) < 0:
                raise SimError(f"the MJCF has no {kind.name[6:].lower()} named {name!r}")
        self.arm_joints = list(arm_joints)
        jids = [mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_JOINT, j) for j in arm_joints]
        self.qadr = np.array([m.jnt_qposadr[j] for j in jids])
        self.dadr = np.array([m.jnt_dofadr[j] for j in jids])
        self.lo = np.array([m.jnt_range[j][0] if m.jnt_limited[j] else -math.pi for j in jids])
        self.hi = np.array([m.jnt_range[j][1] if m.jnt_limited[j] else math.pi for j in jids])
        act_joint = {m.actuator_trnid[a][0]: a for a in range(m.nu)}
        missing_act = [j for j, jid in zip(arm_joints, jids) if jid not in act_joint]
        if missing_act:
            raise SimError(f"the MJCF has no position actuators for {missing_act}")
        self.act = np.array([act_joint[j] for j in jids])
        finger_ids = [mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_JOINT, f) for f in ("finger_left", "finger_right")]
        finger_ids = [j for j in finger_ids if j in act_joint]
        self.fingers = [act_joint[j] for j in finger_ids]
        self.finger_names = [mujoco.mj_id2name(m, mujoco.mjtObj.mjOBJ_JOINT, j) for j in finger_ids]
        self.finger_qadr = np.array([m.jnt_qposadr[j] for j in finger_ids], dtype=int)
        self.finger_dadr = np.array([m.jnt_dofadr[j] for j in finger_ids], dtype=int)
        self.site = mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_SITE, "ee")
        if xml is None:
            self.data.qpos[self.qadr] = HOME
        mujoco.mj_forward(m, self.data)
        self.target = self.data.qpos[self.qadr].copy()
        self.twist = np.zeros(6)
        self.twist_until = -1.0
        self.max_linear, self.max_angular, self.max_joint_speed = max_linear, max_angular, max_joint_speed
        self.renderer = mujoco.Renderer(m, height, width)
        self.jacp = np.zeros((3, m.nv))
        self.jacr = np.zeros((3, m.nv))
        self.lock = threading.Lock()

    # --- commands (validated; a bad command raises SimError and changes nothing but the hold) ---

    @staticmethod
    def _finite(values, what):
        v = np.asarray(values, dtype=np.float64)
        if not np.all(np.isfinite(v)):
            raise SimError(f"{what}: non-finite value {v[~np.isfinite(v)][0]}")
        return v

    def command_twist(self, linear, angular, timeout_s):
        try:
            v = self._finite(list(linear) + list(angular), "twist")
        except SimError:
            self.hold()
            raise
        lin, ang = v[:3], v[3:]
        # Clamp to the controller's limits (keeps the direction).
        n = np.linalg.norm(lin)
        if n > self.max_linear:
            lin = lin * (self.max_linear / n)
        n = np.linalg.norm(ang)
        if n > self.max_angular:
            ang = ang * (self.max_angular / n)
        self.twist = np.concatenate([lin, ang])
        self.twist_until = self.data.time + timeout_s

    def command_positions(self, positions, names=None):
        try:
            v = self._finite(positions, "joint positions")
            if names:
                unknown = [n for n in names if n not in self.arm_joints]
                if unknown:
                    raise SimError(f"unknown joint names {unknown} (the arm has {self.arm_joints})")
                if len(names) != len(v):
                    raise SimError(f"{len(names)} joint names but {len(v)} positions")
                target = self.target.copy()
                for n, p in zip(names, v):
                    target[self.arm_joints.index(n)] = p
            else:
                if len(v) != len(self.arm_joints):
                    raise SimError(f"{len(v)} positions for {len(self.arm_joints)} joints")
                target = v
        except SimError:
            self.hold()
            raise
        self.twist_until = -1.0
        self.target = np.clip(target, self.lo, self.hi)

    def command_gripper(self, values):
        v = self._finite(values, "gripper")
        if len(v) != 1:
            raise SimError(f"gripper: {len(v)} values, expected 1 (the opening in m)")
        for a in self.fingers:
            self.data.ctrl[a] = float(np.clip(v[0] / 2.0, 0.0, 0.04))

    def hold(self):
        """Stop: the twist ends and the position servo keeps its last setpoint. (Re-targeting the
        measured joints instead would let gravity pull the arm down by the servo's steady-state
        error at every rejected command.)"""
        self.twist_until = -1.0
        self.twist[:] = 0.0

    # --- simulation ---

    def step(self, n=1):
        m, d = self.model, self.data
        for _ in range(n):
            if d.time < self.twist_until:
                mujoco.mj_jacSite(m, d, self.jacp, self.jacr, self.site)
                j = np.vstack([self.jacp[:, self.dadr], self.jacr[:, self.dadr]])
                lam = 0.05
                dq = j.T @ np.linalg.solve(j @ j.T + lam * lam * np.eye(6), self.twist)
                dq = np.clip(dq, -self.max_joint_speed, self.max_joint_speed)
                self.target = np.clip(self.target + dq * m.opt.timestep, self.lo, self.hi)
            d.ctrl[self.act] = self.target
            mujoco.mj_step(m, d)

    def joints(self):
        """Arm joints, then the gripper's finger joints (each finger's opening in m)."""
        d = self.data
        names = self.arm_joints + self.finger_names
        qadr = np.concatenate([self.qadr, self.finger_qadr]).astype(int)
        dadr = np.concatenate([self.dadr, self.finger_dadr]).astype(int)
        return names, d.qpos[qadr].copy(), d.qvel[dadr].copy()

    def ee_pose(self):
        pos = self.data.site_xpos[self.site].copy()
        quat = np.zeros(4)
        mujoco.mju_mat2Quat(quat, self.data.site_xmat[self.site])
        return pos, quat  # w, x, y, z

    def render(self, camera):
        self.renderer.update_scene(self.data, camera)
        return self.renderer.render()


class Expert:
    """A scripted pick-and-place of one cube: above it, down, close, lift, over the place
    position, open. Returns the end-effector velocity for the arm's controller and the same step
    as a LIBERO-style action (dx, dy, dz, droll, dpitch, dyaw in action units, gripper -1 open /
    +1 closed), which is what the policy is trained to output."""

    PLACE = np.array([0.45, -0.25, 0.12])

    def __init__(self, arm, body, position_scale_m=0.05, rotation_scale_rad=0.5, dt=0.05):
        bid = mujoco.mj_name2id(arm.model, mujoco.mjtObj.mjOBJ_BODY, body)
        if bid < 0:
            raise SimError(f"expert_object {body!r}: no such body in the scene")
        self.arm, self.body, self.phase, self.hold_until, self.lift = arm, bid, 0, None, None
        self.scale, self.rot_scale, self.dt = position_scale_m, rotation_scale_rad, dt

    def step(self):
        """(linear velocity m/s, action vector) for the next control period."""
        arm = self.arm
        ee, _ = arm.ee_pose()
        cube = arm.data.xpos[self.body].copy()
        grip = -1.0
        if self.phase <= 2:
            self.lift = cube + [0, 0, 0.15]  # fixed once grasped: the cube then moves with the hand
        targets = [cube + [0, 0, 0.12], cube + [0, 0, 0.005], None, self.lift, self.PLACE, None, None]
        if self.phase in (2, 5):  # close / open the gripper in place
            grip = 1.0 if self.phase == 2 else -1.0
            if self.hold_until is None:
                self.hold_until = arm.data.time + 0.6
            if arm.data.time >= self.hold_until:
                self.phase, self.hold_until = self.phase + 1, None
            v = np.zeros(3)
        elif self.phase >= 6:
            v = np.zeros(3)
        else:
            grip = 1.0 if self.phase in (3, 4) else -1.0
            err = targets[self.phase] - ee
            v = np.clip(2.0 * err, -0.15, 0.15)
            if np.linalg.norm(err) < 0.01:
                self.phase += 1
        action = np.concatenate([v * self.dt / self.scale, np.zeros(3), [grip]])
        return v, action


def stamp(t):
    sec, nanosec = divmod(int(round(t * 1e9)), 1_000_000_000)
    return Time(sec=sec, nanosec=nanosec)


class SimNode(Node):
    def __init__(self):
        super().__init__("sim_arm")
        p = {
            "model_path": "", "camera_topic": "/sim/agentview/image_raw",
            "wrist_camera_topic": "/sim/wrist/image_raw", "joint_states_topic": "/joint_states",
            "ee_pose_topic": "/ee_pose", "twist_topic": "/servo_node/delta_twist_cmds",
            "trajectory_topic": "/arm_controller/joint_trajectory",
            "positions_topic": "/forward_position_controller/commands",
            "gripper_topic": "/gripper/command", "frame_id": "world",
            "camera_rate_hz": 20.0, "state_rate_hz": 50.0, "image_size": 224,
            "command_timeout_s": 0.25, "real_time": True, "compressed": False, "jpeg_quality": 90,
            # The scripted expert drives the arm instead of the policy when set (a body name).
            "expert_object": "", "expert_action_topic": "/expert/action", "expert_rate_hz": 20.0,
        }
        for k, v in p.items():
            self.declare_parameter(k, v)
        g = lambda k: self.get_parameter(k).value  # noqa: E731
        self.use_sim_time = self.get_parameter("use_sim_time").value
        self.arm = Arm(g("model_path") or None, width=g("image_size"), height=g("image_size"))
        self.frame_id = g("frame_id")
        self.timeout = g("command_timeout_s")
        self.real_time = g("real_time")
        self.cam_pub = self.create_publisher(Image, g("camera_topic"), qos_profile_sensor_data)
        self.wrist_pub = self.create_publisher(Image, g("wrist_camera_topic"), qos_profile_sensor_data)
        self.compressed_pubs = [
            self.create_publisher(CompressedImage, f"{g(t)}/compressed", qos_profile_sensor_data)
            for t in ("camera_topic", "wrist_camera_topic")] if g("compressed") else None
        self.jpeg_quality = g("jpeg_quality")
        self.js_pub = self.create_publisher(JointState, g("joint_states_topic"), qos_profile_sensor_data)
        self.pose_pub = self.create_publisher(PoseStamped, g("ee_pose_topic"), 10)
        self.clock_pub = self.create_publisher(Clock, "/clock", 10) if self.use_sim_time else None
        self.create_subscription(TwistStamped, g("twist_topic"), self.on_twist, 10)
        self.create_subscription(JointTrajectory, g("trajectory_topic"), self.on_trajectory, 10)
        self.create_subscription(Float64MultiArray, g("positions_topic"), self.on_positions, 10)
        self.create_subscription(Float64MultiArray, g("gripper_topic"), self.on_gripper, 10)
        self.expert = Expert(self.arm, g("expert_object")) if g("expert_object") else None
        self.expert_pub = self.create_publisher(Float64MultiArray, g("expert_action_topic"), 10) \
            if self.expert else None
        self.expert_period = 1.0 / g("expert_rate_hz")
        self.camera_period = 1.0 / g("camera_rate_hz")
        self.state_period = 1.0 / g("state_rate_hz")
        self.stats = {"frames": 0, "rejected_commands": 0, "commands": 0}
        self.running = True
        self.thread = threading.Thread(target=self.loop, daemon=True)

    def reject(self, e):
        self.stats["rejected_commands"] += 1
        self.get_logger().error(f"rejected command: {e}; holding")

    def on_twist(self, msg):
        with self.arm.lock:
            try:
                t = msg.twist
                self.arm.command_twist([t.linear.x, t.linear.y, t.linear.z],
                                       [t.angular.x, t.angular.y, t.angular.z], self.timeout)
                self.stats["commands"] += 1
            except SimError as e:
                self.reject(e)

    def on_trajectory(self, msg):
        with self.arm.lock:
            try:
                if not msg.points:
                    raise SimError("joint trajectory without points")
                self.arm.command_positions(list(msg.points[0].positions), list(msg.joint_names))
                self.stats["commands"] += 1
            except SimError as e:
                self.reject(e)

    def on_positions(self, msg):
        with self.arm.lock:
            try:
                self.arm.command_positions(list(msg.data))
                self.stats["commands"] += 1
            except SimError as e:
                self.reject(e)

    def on_gripper(self, msg):
        with self.arm.lock:
            try:
                self.arm.command_gripper(list(msg.data))
            except SimError as e:
                self.reject(e)

    def publish_state(self, t):
        names, q, dq = self.arm.joints()
        self.js_pub.publish(JointState(header=self.header(t), name=names, position=q.tolist(),
                                       velocity=dq.tolist()))
        pos, quat = self.arm.ee_pose()
        pose = PoseStamped(header=self.header(t))
        pose.pose.position.x, pose.pose.position.y, pose.pose.position.z = pos.tolist()
        pose.pose.orientation.w, pose.pose.orientation.x, pose.pose.orientation.y, pose.pose.orientation.z = \
            quat.tolist()
        self.pose_pub.publish(pose)

    def header(self, t):
        return Header(stamp=stamp(t) if self.use_sim_time else self.get_clock().now().to_msg(),
                      frame_id=self.frame_id)

    def publish_images(self, t):
        for i, (pub, cam) in enumerate(((self.cam_pub, "third_person"), (self.wrist_pub, "wrist"))):
            img = self.arm.render(cam)
            h, w = img.shape[:2]
            pub.publish(Image(header=self.header(t), height=h, width=w, encoding="rgb8",
                              is_bigendian=0, step=w * 3, data=img.tobytes()))
            if self.compressed_pubs:
                buf = io.BytesIO()
                PilImage.fromarray(img).save(buf, format="JPEG", quality=self.jpeg_quality)
                self.compressed_pubs[i].publish(CompressedImage(header=self.header(t), format="jpeg",
                                                                data=buf.getvalue()))
        self.stats["frames"] += 1

    def loop(self):
        try:
            self._loop()
        except Exception:  # noqa: BLE001 - at shutdown the context goes first; else report
            if self.running and rclpy.ok():
                raise

    def _loop(self):
        arm = self.arm
        dt = arm.model.opt.timestep
        start_wall, start_sim = time.monotonic(), arm.data.time
        next_cam = next_state = next_expert = arm.data.time
        while self.running and rclpy.ok():
            with arm.lock:
                if self.expert and arm.data.time >= next_expert:
                    v, action = self.expert.step()
                    arm.command_twist(v, [0.0, 0.0, 0.0], self.timeout)
                    arm.command_gripper([0.0 if action[6] > 0 else 0.08])
                    self.expert_pub.publish(Float64MultiArray(data=action.tolist()))
                    next_expert += self.expert_period
                arm.step(int(round(self.state_period / dt)))
                t = arm.data.time
                if self.clock_pub:
                    self.clock_pub.publish(Clock(clock=stamp(t)))
                if t >= next_state:
                    self.publish_state(t)
                    next_state += self.state_period
                render = t >= next_cam
            if render:
                self.publish_images(t)
                next_cam += self.camera_period
            if self.real_time:
                ahead = (t - start_sim) - (time.monotonic() - start_wall)
                if ahead > 0:
                    time.sleep(ahead)


def main():
    rclpy.init(args=sys.argv)
    try:
        node = SimNode()
    except SimError as e:
        print(f"sim_arm: {e}", file=sys.stderr)
        return 2
    node.thread.start()
    node.get_logger().info(f"simulated arm running ({len(node.arm.arm_joints)} joints, "
                           f"cameras at {1 / node.camera_period:.0f} Hz)")
    try:
        rclpy.spin(node)
    except (KeyboardInterrupt, rclpy.executors.ExternalShutdownException):
        pass
    node.running = False
    node.thread.join(timeout=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
