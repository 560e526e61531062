#!/usr/bin/env python3
"""bitvla_node in a real ROS 2 graph (rclpy peers from the Jazzy wheels).

Run by scripts/test_ros.sh (after scripts/setup_ros.sh): starts the node on the tiny model as a
separate process, feeds it camera frames and an instruction, and checks what it publishes.
Prints 'N passed, M failed'.
"""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from geometry_msgs.msg import PoseStamped, TwistStamped
from PIL import Image as PilImage
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import CompressedImage, Image, JointState
from rosgraph_msgs.msg import Clock
from std_msgs.msg import Bool, Float32MultiArray, String

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")) / "release"
INSTRUCTION = "pick up the black bowl and place it on the plate"


def is_zero(m):
    t = m.twist
    return not any([t.linear.x, t.linear.y, t.linear.z, t.angular.x, t.angular.y, t.angular.z])


def raw_image(arr):
    msg = Image()
    msg.height, msg.width = arr.shape[:2]
    msg.encoding = "rgb8"
    msg.step = msg.width * 3
    msg.data = arr.tobytes()
    return msg


class Peer:
    def __init__(self):
        self.node = rclpy.create_node("bitvla_test_peer")
        self.cam = self.node.create_publisher(Image, "/test/cam", qos_profile_sensor_data)
        self.wrist = self.node.create_publisher(CompressedImage, "/test/wrist/compressed", qos_profile_sensor_data)
        self.instruction = self.node.create_publisher(String, "/test/instruction", 10)
        self.estop = self.node.create_publisher(Bool, "/test/estop", 10)
        self.twists, self.chunks, self.diagnostics, self.poses = [], [], [], []
        self.ee_pose = self.node.create_publisher(PoseStamped, "/test/ee_pose", 10)
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self.diagnostics.append, 10)
        self.node.create_subscription(PoseStamped, "/test/pose", self.poses.append, 10)
        self.node.create_subscription(TwistStamped, "/test/twist", lambda m: self.twists.append((time.monotonic(), m)), 10)
        self.node.create_subscription(Float32MultiArray, "/bitvla_node/action_chunk", self.chunks.append, 10)

    def spin_for(self, seconds, publish=None):
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if publish:
                publish()
            rclpy.spin_once(self.node, timeout_sec=0.05)

    def wait(self, what, seconds, cond, publish=None):
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if cond():
                return
            self.spin_for(0.1, publish)
        raise AssertionError(f"timed out waiting for {what}")


def check_launch_files(declared):
    """ros2 launch is not installable from the wheels: check the launch files statically against
    what the running node declares (executable, parameter names and types, files they name)."""
    import ast
    for path in sorted((ROOT / "launch").glob("*.launch.py")):
        tree = ast.parse(path.read_text())
        nodes = [c for c in ast.walk(tree) if isinstance(c, ast.Call) and getattr(c.func, "id", "") == "Node"]
        assert nodes, f"{path.name}: no Node action"
        for call in nodes:
            kw = {k.arg: k.value for k in call.keywords}
            assert ast.literal_eval(kw["package"]) == "bitvla_ros", path.name
            assert ast.literal_eval(kw["executable"]) == "bitvla_node", path.name
            assert (BIN / "bitvla_node").exists()
            for item in kw["parameters"].elts:
                if isinstance(item, ast.Dict):
                    for key in item.keys:
                        name = ast.literal_eval(key)
                        assert name in declared, f"{path.name}: parameter {name} is not declared by the node"
        for call in ast.walk(tree):
            if isinstance(call, ast.Call) and getattr(call.func, "id", "") == "DeclareLaunchArgument":
                for k in call.keywords:
                    if k.arg == "default_value" and isinstance(k.value, ast.Call):
                        # os.path.join(share, "config", "X.yaml")
                        parts = [ast.literal_eval(a) for a in k.value.args[1:]]
                        assert (ROOT.joinpath(*parts)).is_file(), f"{path.name}: {parts} missing"


def main():
    third = np.asarray(PilImage.open(ROOT / "tests/golden/third_person.png").convert("RGB"))
    wrist_png = (ROOT / "tests/golden/wrist.png").read_bytes()
    work = Path(tempfile.mkdtemp(prefix="bitvla-ros-"))
    model = work / "tiny"
    subprocess.run([BIN / "bitvla", "make-tiny", "--out", model], check=True, capture_output=True)
    expected = json.loads(subprocess.run(
        [BIN / "bitvla", "run", "--model", model, "--image", ROOT / "tests/golden/third_person.png",
         "--wrist-image", ROOT / "tests/golden/wrist.png", "--instruction", INSTRUCTION,
         "--proprio", ",".join(["0"] * 8), "--threads", "1", "--json"],
        check=True, capture_output=True, text=True).stdout)

    log = open(work / "node.log", "w")
    node = subprocess.Popen(
        [BIN / "bitvla_node", "--ros-args", "-p", f"model_path:={model}", "-p", "threads:=1",
         "-p", "camera_topic:=/test/cam", "-p", "wrist_camera_topic:=/test/wrist/compressed",
         "-p", "wrist_camera_transport:=compressed", "-p", "instruction_topic:=/test/instruction",
         "-p", "estop_topic:=/test/estop", "-p", "command_topic:=/test/twist", "-p", "dry_run:=false",
         "-p", "frame_id:=tool0", "-p", "stale_after_s:=2.0"],
        stdout=log, stderr=subprocess.STDOUT)
    rclpy.init()
    peer = Peer()
    frames = lambda: (peer.cam.publish(raw_image(third)),
                      peer.wrist.publish(CompressedImage(format="png", data=wrist_png)))
    results = []

    def check(name, fn):
        try:
            fn()
            results.append((name, None))
            print(f"ok   {name}")
        except Exception:  # noqa: BLE001 - report every failure, keep going
            results.append((name, traceback.format_exc()))
            print(f"FAIL {name}\n{traceback.format_exc()}")

    def first_chunk_equals_bitvla_run():
        peer.wait("the node's subscriptions", 20, lambda: peer.node.count_subscribers("/test/instruction") > 0)
        peer.spin_for(1.5, frames)
        assert not peer.twists and not peer.chunks, "output before any instruction"
        peer.instruction.publish(String(data=INSTRUCTION))
        peer.wait("an action chunk", 60, lambda: peer.chunks, frames)
        got = np.array(peer.chunks[0].data, dtype=np.float32)
        want = np.array(expected["actions"], dtype=np.float32)
        assert got.shape == want.shape, (got.shape, want.shape)
        assert np.array_equal(got, want), np.abs(got - want).max()
        dims = [(d.label, d.size) for d in peer.chunks[0].layout.dim]
        assert dims == [("step", 8), ("action", 7)], dims

    def commands_are_the_mapped_actions():
        moving = lambda: [(t, m) for t, m in peer.twists if not is_zero(m)]
        peer.wait("twist commands", 30, lambda: len(moving()) >= 5, frames)
        rows = np.array(expected["actions"], dtype=np.float64).reshape(8, 7)
        for _, m in moving()[:5]:
            assert m.header.frame_id == "tool0"
            v = np.array([m.twist.linear.x, m.twist.linear.y, m.twist.linear.z,
                          m.twist.angular.x, m.twist.angular.y, m.twist.angular.z])
            # 20 Hz: 0.05 m and 0.5 rad per unit and step -> x1 m/s and x10 rad/s per unit.
            mapped = np.hstack([rows[:, :3] * 1.0, rows[:, 3:6] * 10.0])
            assert np.min(np.abs(mapped - v).max(axis=1)) < 1e-4, v

    def rate_is_20_hz():
        peer.twists.clear()
        peer.spin_for(3.0, frames)
        t = np.array([s for s, _ in peer.twists])
        assert len(t) > 40, len(t)
        gaps = np.diff(t)
        assert 0.04 < np.median(gaps) < 0.06, np.median(gaps)

    def estop_holds_output():
        peer.estop.publish(Bool(data=True))
        peer.spin_for(0.5, frames)
        peer.twists.clear()
        peer.spin_for(1.0, frames)
        assert not peer.twists, len(peer.twists)
        peer.estop.publish(Bool(data=False))
        peer.wait("commands after the e-stop is released", 30, lambda: peer.twists, frames)

    def malformed_frames_are_rejected_and_the_node_keeps_serving():
        bad = raw_image(third)
        bad.encoding = "yuv422"
        short = raw_image(third)
        short.data = short.data[:1000]
        huge = raw_image(third)
        huge.width, huge.height, huge.step = 100_000, 100_000, 300_000  # claims 30 GB
        narrow = raw_image(third)
        narrow.step = 10  # step shorter than a row
        for m in (bad, short, huge, narrow):
            peer.cam.publish(m)
        peer.wrist.publish(CompressedImage(format="jpeg", data=b"\xff\xd8 not a jpeg"))
        peer.instruction.publish(String(data="   "))
        peer.spin_for(0.5)
        peer.twists.clear()
        peer.wait("commands after malformed frames", 30, lambda: peer.twists, frames)
        assert node.poll() is None
        text = (work / "node.log").read_text()
        assert "yuv422" in text and "rejected frame" in text, text[-2000:]
        assert text.count("rejected frame") >= 5, text[-2000:]
        assert "100000" in text and "empty instruction ignored" in text, text[-2000:]

    def a_new_instruction_replaces_the_chunk():
        other = "open the top drawer"
        want = json.loads(subprocess.run(
            [BIN / "bitvla", "run", "--model", model, "--image", ROOT / "tests/golden/third_person.png",
             "--wrist-image", ROOT / "tests/golden/wrist.png", "--instruction", other,
             "--proprio", ",".join(["0"] * 8), "--threads", "1", "--json"],
            check=True, capture_output=True, text=True).stdout)["actions"]
        peer.chunks.clear()
        peer.instruction.publish(String(data=other))
        want = np.array(want, dtype=np.float32)
        peer.wait("a chunk for the new instruction", 30,
                  lambda: any(np.array_equal(np.array(c.data, dtype=np.float32), want) for c in peer.chunks), frames)
        peer.instruction.publish(String(data=INSTRUCTION))
        peer.spin_for(0.5, frames)

    def diagnostics_report_latency_and_rejections():
        peer.diagnostics.clear()
        # The second status covers a period with frames arriving throughout.
        peer.wait("diagnostics", 5, lambda: len(peer.diagnostics) >= 2, frames)
        status = peer.diagnostics[-1].status[0]
        values = {kv.key: kv.value for kv in status.values}
        assert status.name == "bitvla_node: policy", status.name
        assert status.message == "executing", status.message
        assert float(values["inference_latency_p50_ms"]) > 0, values
        assert int(values["frames_rejected"]) >= 3, values
        assert int(values["chunks"]) >= 1 and int(values["commands_published"]) >= 5, values
        assert float(values["frames_per_s"]) > 5, values  # two cameras, ~20 frames/s each

    def stale_camera_holds_output():
        peer.spin_for(2.5)  # no frames for longer than stale_after_s
        peer.twists.clear()
        peer.spin_for(0.5)
        assert not peer.twists, len(peer.twists)

    def sigint_stops_within_2_s():
        node.send_signal(signal.SIGINT)
        assert node.wait(timeout=2.0) == 0

    def ee_pose_mode_moves_the_current_pose_by_the_delta():
        proc = subprocess.Popen(
            [BIN / "bitvla_node", "--ros-args", "-p", f"model_path:={model}", "-p", "threads:=1",
             "-p", "camera_topic:=/test/cam", "-p", "wrist_camera_topic:=/test/wrist/compressed",
             "-p", "wrist_camera_transport:=compressed", "-p", "instruction_topic:=/test/instruction",
             "-p", "command_mode:=ee_pose", "-p", "ee_pose_topic:=/test/ee_pose",
             "-p", "command_topic:=/test/pose", "-p", "dry_run:=false", "-p", "stale_after_s:=2.0"],
            stdout=log, stderr=subprocess.STDOUT)
        try:
            current = PoseStamped()
            current.pose.position.x, current.pose.position.z = 0.4, 0.3
            current.pose.orientation.w = 1.0
            peer.poses.clear()
            publish = lambda: (frames(), peer.ee_pose.publish(current))
            peer.wait("the node", 20, lambda: peer.node.count_subscribers("/test/ee_pose") > 0)
            peer.spin_for(1.0, publish)
            peer.instruction.publish(String(data=INSTRUCTION))
            peer.wait("pose targets", 60, lambda: len(peer.poses) >= 3, publish)
            rows = np.array(expected["actions"], dtype=np.float64).reshape(8, 7)
            for m in peer.poses[:3]:
                p = np.array([m.pose.position.x, m.pose.position.y, m.pose.position.z])
                want = np.array([0.4, 0.0, 0.3]) + 0.05 * rows[:, :3]
                assert np.min(np.abs(want - p).max(axis=1)) < 1e-5, p
                q = m.pose.orientation
                angle = 2 * np.arccos(min(1.0, abs(q.w)))
                assert np.min(np.abs(0.5 * np.linalg.norm(rows[:, 3:6], axis=1) - angle)) < 1e-4, angle
        finally:
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=5) == 0

    def joint_modes_command_the_current_positions_plus_the_delta():
        from std_msgs.msg import Float64MultiArray
        from trajectory_msgs.msg import JointTrajectory
        names = [f"j{i}" for i in range(6)]
        current = [0.1, -0.2, 0.3, -0.4, 0.5, -0.6]
        rows = np.array(expected["actions"], dtype=np.float64).reshape(8, 7)
        js = peer.node.create_publisher(JointState, "/test/joint_states_j", qos_profile_sensor_data)
        for mode, msg_type in (("joint_trajectory", JointTrajectory), ("joint_positions", Float64MultiArray)):
            got, grip = [], []
            sub = peer.node.create_subscription(msg_type, f"/test/{mode}", got.append, 10)
            gsub = peer.node.create_subscription(Float64MultiArray, "/test/gripper", grip.append, 10)
            proc = subprocess.Popen(
                [BIN / "bitvla_node", "--ros-args", "-p", f"model_path:={model}", "-p", "threads:=1",
                 "-p", "camera_topic:=/test/cam", "-p", "wrist_camera_topic:=/test/wrist/compressed",
                 "-p", "wrist_camera_transport:=compressed", "-p", "instruction_topic:=/test/instruction",
                 "-p", f"command_mode:={mode}", "-p", "joint_names:=" + ",".join(names),
                 "-p", "joint_states_topic:=/test/joint_states_j", "-p", "joint_max:=" + ",".join(["3.0"] * 6),
                 "-p", "joint_min:=" + ",".join(["-3.0"] * 6),
                 "-p", f"command_topic:=/test/{mode}", "-p", "dry_run:=false", "-p", "stale_after_s:=2.0",
                 "-p", "gripper_topic:=/test/gripper", "-p", "gripper_scale:=0.04", "-p", "gripper_offset:=0.04",
                 "-p", "gripper:=libero"],
                stdout=log, stderr=subprocess.STDOUT)
            try:
                # Names in another order than joint_names: matched by name.
                state = JointState(name=list(reversed(names)), position=list(reversed(current)))
                publish = lambda: (frames(), js.publish(state))
                peer.wait("the node", 20, lambda: peer.node.count_subscribers("/test/joint_states_j") > 0)
                peer.spin_for(1.0, publish)
                assert not got, "commands before an instruction"
                peer.instruction.publish(String(data=INSTRUCTION))
                peer.wait(f"{mode} commands", 60, lambda: len(got) >= 3, publish)
                want = np.array(current) + 0.05 * rows[:, :6]
                for m in got[:3]:
                    if mode == "joint_trajectory":
                        assert list(m.joint_names) == names and len(m.points) == 1, m
                        assert (m.points[0].time_from_start.sec, m.points[0].time_from_start.nanosec) == (0, 50_000_000)
                        pos = np.array(m.points[0].positions)
                    else:
                        assert [(d.label, d.size) for d in m.layout.dim] == [("joints", 6)], m.layout
                        pos = np.array(m.data)
                    assert np.min(np.abs(want - pos).max(axis=1)) < 1e-6, pos
                # Gripper: offset + scale x the libero-mapped last dimension (-1 open, +1 close).
                peer.wait("gripper commands", 10, lambda: grip, publish)
                assert all(list(g.data) in ([0.0], [0.08]) for g in grip), [list(g.data) for g in grip]
            finally:
                proc.send_signal(signal.SIGINT)
                assert proc.wait(timeout=5) == 0
                peer.node.destroy_subscription(sub)
                peer.node.destroy_subscription(gsub)

    def sim_time_stamps_follow_clock():
        clock = peer.node.create_publisher(Clock, "/clock", 10)
        proc = subprocess.Popen(
            [BIN / "bitvla_node", "--ros-args", "-p", f"model_path:={model}", "-p", "threads:=1",
             "-p", "camera_topic:=/test/cam", "-p", "wrist_camera_topic:=/test/wrist/compressed",
             "-p", "wrist_camera_transport:=compressed", "-p", "instruction_topic:=/test/instruction",
             "-p", "command_topic:=/test/twist", "-p", "dry_run:=false", "-p", "use_sim_time:=true"],
            stdout=log, stderr=subprocess.STDOUT)
        try:
            sim = [1000.0]

            def publish():
                sim[0] += 0.01
                msg = Clock()
                msg.clock.sec, msg.clock.nanosec = int(sim[0]), int((sim[0] % 1) * 1e9)
                clock.publish(msg)
                frames()

            peer.twists.clear()
            peer.wait("the node", 20, lambda: peer.node.count_subscribers("/clock") > 0)
            peer.spin_for(1.0, publish)
            peer.instruction.publish(String(data=INSTRUCTION))
            peer.wait("commands in simulation time", 60, lambda: peer.twists, publish)
            stamp = peer.twists[-1][1].header.stamp
            assert 1000 <= stamp.sec < 2000, stamp
        finally:
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=5) == 0

    def a_bag_played_into_the_node_matches_the_offline_replay():
        from rosbags.rosbag2 import Reader
        from rosbags.typesys import Stores, get_typestore
        bag = work / "episode"
        subprocess.run([BIN / "bitvla", "make-episode", "--out", bag, "--duration-s", "3"],
                       check=True, capture_output=True)
        params = work / "live.yaml"
        params.write_text((ROOT / "config/replay_demo.yaml").read_text().replace(
            "    dry_run: true", "    dry_run: false\n    use_sim_time: true\n    fixed_latency_s: 0.1\n"
            "    threads: 1").replace("/servo_node/delta_twist_cmds", "/test/live_twist"))
        offline = work / "offline"
        subprocess.run([BIN / "bitvla", "replay", "--bag", bag, "--model", model, "--params", params,
                        "--out", offline, "--json"], check=True, capture_output=True)
        ts = get_typestore(Stores.ROS2_JAZZY)
        want = []
        with Reader(offline) as r:
            for c, t, raw in r.messages():
                if c.topic == "/test/live_twist":
                    m = ts.deserialize_cdr(raw, c.msgtype)
                    want.append((m.header.stamp.sec * 10**9 + m.header.stamp.nanosec,
                                 (m.twist.linear.x, m.twist.linear.y, m.twist.linear.z,
                                  m.twist.angular.x, m.twist.angular.y, m.twist.angular.z)))
        assert len(want) > 50, len(want)
        got = []
        sub = peer.node.create_subscription(TwistStamped, "/test/live_twist", lambda m: got.append(
            (m.header.stamp.sec * 10**9 + m.header.stamp.nanosec,
             (m.twist.linear.x, m.twist.linear.y, m.twist.linear.z,
              m.twist.angular.x, m.twist.angular.y, m.twist.angular.z))), 100)
        proc = subprocess.Popen([BIN / "bitvla_node", "--ros-args", "--params-file", params,
                                 "-p", f"model_path:={model}"], stdout=log, stderr=subprocess.STDOUT)
        try:
            peer.wait("the node", 20, lambda: peer.node.count_subscribers("/camera/image_raw") > 0
                      and peer.node.count_publishers("/test/live_twist") > 0)
            player = subprocess.Popen([sys.executable, ROOT / "scripts/play_bag.py", bag, "--rate", "0.25",
                                       "--settle-ms", "10", "--clock"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            while player.poll() is None:
                peer.spin_for(0.1)
            assert player.returncode == 0, player.stdout.read()
            peer.spin_for(1.0)
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=5)
            peer.node.destroy_subscription(sub)
        assert [t for t, _ in got] == [t for t, _ in want], (len(got), len(want), got[:3], want[:3])
        differ = [(i, g, w) for i, ((_, g), (_, w)) in enumerate(zip(got, want)) if g != w]
        assert not differ, f"{len(differ)} of {len(got)} commands differ, first: {differ[:2]}"

    def one_camera_with_joint_states_proprio():
        joints = [0.1, -0.2, 0.3, 0.05, -0.4, 0.6, 0.02, -0.02, 9.9]  # a ninth joint is ignored
        want = json.loads(subprocess.run(
            [BIN / "bitvla", "run", "--model", model, "--image", ROOT / "tests/golden/third_person.png",
             "--instruction", INSTRUCTION, "--proprio", ",".join(str(v) for v in joints[:8]),
             "--threads", "1", "--json"], check=True, capture_output=True, text=True).stdout)["actions"]
        js = peer.node.create_publisher(JointState, "/test/joint_states", qos_profile_sensor_data)
        proc = subprocess.Popen(
            [BIN / "bitvla_node", "--ros-args", "-p", f"model_path:={model}", "-p", "threads:=1",
             "-p", "camera_topic:=/test/cam", "-p", "instruction_topic:=/test/instruction",
             "-p", "proprio_source:=joint_states", "-p", "joint_states_topic:=/test/joint_states",
             "-p", "command_topic:=/test/twist", "-p", "stale_after_s:=2.0"],
            stdout=log, stderr=subprocess.STDOUT)
        try:
            peer.chunks.clear()
            publish = lambda: (peer.cam.publish(raw_image(third)),
                               js.publish(JointState(name=[f"j{i}" for i in range(9)], position=joints)))
            peer.wait("the node", 20, lambda: peer.node.count_subscribers("/test/joint_states") > 0)
            peer.spin_for(1.0, publish)
            peer.instruction.publish(String(data=INSTRUCTION))
            peer.wait("a chunk", 60, lambda: peer.chunks, publish)
            got = np.array(peer.chunks[0].data, dtype=np.float32)
            assert np.array_equal(got, np.array(want, dtype=np.float32)), np.abs(got - np.array(want)).max()
        finally:
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=5) == 0

    def config_files_declare_only_known_parameters_and_real_arm_is_dry_run():
        from rcl_interfaces.srv import GetParameters, ListParameters
        for config in sorted(str(p.relative_to(ROOT)) for p in (ROOT / "config").glob("*.yaml")):
            keys = {}
            for line in (ROOT / config).read_text().splitlines():
                line = line.split("#")[0].rstrip()
                if line.startswith("    ") and ":" in line:
                    k, v = line.strip().split(":", 1)
                    keys[k] = v.strip().strip('"')
            proc = subprocess.Popen(
                [BIN / "bitvla_node", "--ros-args", "--params-file", ROOT / config,
                 "-p", f"model_path:={model}", "-p", "camera_topic:=/test/cam",
                 "-p", "wrist_camera_topic:=/test/wrist/compressed", "-p", "wrist_camera_transport:=compressed",
                 "-p", "instruction_topic:=/test/instruction", "-p", "command_topic:=/test/twist"],
                stdout=log, stderr=subprocess.STDOUT)
            try:
                def call(client, request):
                    # The previous node's services can linger in the graph for a moment:
                    # retry until the new node answers.
                    end = time.monotonic() + 30
                    while time.monotonic() < end:
                        if client.wait_for_service(timeout_sec=2):
                            fut = client.call_async(request)
                            rclpy.spin_until_future_complete(peer.node, fut, timeout_sec=2)
                            if fut.result() is not None:
                                return fut.result()
                    raise AssertionError("no answer from the parameter services")

                client = peer.node.create_client(ListParameters, "/bitvla_node/list_parameters")
                declared = set(call(client, ListParameters.Request()).result.names)
                unknown = set(keys) - declared
                assert not unknown, f"{config}: undeclared parameters {unknown}"
                check_launch_files(declared)
                get = peer.node.create_client(GetParameters, "/bitvla_node/get_parameters")
                dry, rate = call(get, GetParameters.Request(names=["dry_run", "control_rate_hz"])).values
                assert dry.bool_value == (keys["dry_run"] == "true"), (config, dry)
                assert rate.double_value == float(keys["control_rate_hz"]), (config, rate)
                if config.endswith("real_arm.yaml"):
                    # Dry run: commands appear on ~/dry_run/command, never on the command topic.
                    preview = []
                    peer.node.create_subscription(TwistStamped, "/bitvla_node/dry_run/command", preview.append, 10)
                    peer.twists.clear()
                    peer.instruction.publish(String(data=INSTRUCTION))
                    peer.wait("dry-run commands", 60, lambda: preview, frames)
                    assert not peer.twists, "a dry-run node published on the command topic"
            finally:
                proc.send_signal(signal.SIGINT)
                proc.wait(timeout=5)

    for name, fn in [
        ("first chunk equals bitvla run", first_chunk_equals_bitvla_run),
        ("commands are the mapped actions", commands_are_the_mapped_actions),
        ("control rate 20 Hz", rate_is_20_hz),
        ("e-stop holds output", estop_holds_output),
        ("malformed frames are rejected, the node keeps serving", malformed_frames_are_rejected_and_the_node_keeps_serving),
        ("a new instruction replaces the chunk", a_new_instruction_replaces_the_chunk),
        ("diagnostics report latency and rejections", diagnostics_report_latency_and_rejections),
        ("stale camera holds output", stale_camera_holds_output),
        ("SIGINT stops within 2 s", sigint_stops_within_2_s),
        ("ee_pose mode: current pose + delta", ee_pose_mode_moves_the_current_pose_by_the_delta),
        ("one camera, joint_states proprio: chunk equals bitvla run", one_camera_with_joint_states_proprio),
        ("joint_trajectory and joint_positions modes: current positions + delta",
         joint_modes_command_the_current_positions_plus_the_delta),
        ("use_sim_time: stamps follow /clock", sim_time_stamps_follow_clock),
        ("a bag played into the node (sim time, fixed latency) equals bitvla replay",
         a_bag_played_into_the_node_matches_the_offline_replay),
        ("config and launch files: known parameters; the real-arm profile is a dry run",
         config_files_declare_only_known_parameters_and_real_arm_is_dry_run),
    ]:
        check(name, fn)
    if node.poll() is None:
        node.kill()
    log.close()
    failed = [n for n, e in results if e]
    if failed:
        print((work / "node.log").read_text()[-3000:])
    print(f"ros: {len(results) - len(failed)} passed, {len(failed)} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
