#!/usr/bin/env python3
"""The package's launch files under ROS 2's own launch, as users start them.

Run by scripts/test_launch.sh, which finds the launcher (a system `ros2 launch`, else ROS 2's
launch/launch_ros sources in shared/tools/ros2-launch) and puts the colcon install of this
package (scripts/test_colcon.sh) on the ament index, so `PKG FILE` resolves to
share/bitvla_ros/launch as it does on a robot. The launcher's command line comes in
BITVLA_LAUNCH (JSON list). Prints 'launch: N passed, M failed'.
"""

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import rclpy
from PIL import Image as PilImage
from geometry_msgs.msg import PoseStamped, TwistStamped
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import CompressedImage, Image, JointState
from std_msgs.msg import String
from trajectory_msgs.msg import JointTrajectory

from bitvla_ros.msg import PolicyStatus

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = json.loads(os.environ["BITVLA_LAUNCH"])
BITVLA = os.environ["BITVLA_BIN"]
INSTRUCTION = "pick up the black bowl and place it on the plate"
UR_JOINTS = ["shoulder_pan_joint", "shoulder_lift_joint", "elbow_joint", "wrist_1_joint", "wrist_2_joint",
             "wrist_3_joint"]


class Launch:
    """`ros2 launch bitvla_ros FILE ARGS...` in its own process group, its output in a log file."""

    def __init__(self, work, name, file, *args):
        self.log_path = work / f"{name}.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([*LAUNCH, "bitvla_ros", file, *args], stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def output(self):
        self.log.flush()
        return self.log_path.read_text()

    def descendants(self):
        """PIDs of the processes the launch started (from /proc)."""
        parents = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
                parents[int(stat.parent.name)] = int(fields[1])
            except (OSError, IndexError, ValueError):
                continue
        found, frontier = set(), {self.proc.pid}
        while frontier:
            frontier = {pid for pid, ppid in parents.items() if ppid in frontier} - found
            found |= frontier
        return found

    def interrupt(self, within):
        """Ctrl-C as a terminal sends it (SIGINT to the process group); the exit status and the
        seconds until the launch and every process it started are gone."""
        children = self.descendants()
        start = time.monotonic()
        os.killpg(self.proc.pid, signal.SIGINT)
        try:
            rc = self.proc.wait(timeout=within + 10)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"the launch did not end within {within + 10} s of SIGINT")
        while any(Path(f"/proc/{pid}").exists() for pid in children) and time.monotonic() - start < within + 10:
            time.sleep(0.05)
        left = [pid for pid in children if Path(f"/proc/{pid}").exists()]
        return rc, time.monotonic() - start, left

    def wait(self, timeout):
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"the launch did not exit within {timeout} s:\n{self.output()[-3000:]}")

    def kill(self):
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


class Peer:
    def __init__(self):
        self.node = rclpy.create_node("bitvla_launch_test")
        self.status, self.poses = [], []
        self.node.create_subscription(PolicyStatus, "/bitvla_node/status", self.status.append, 10)
        self.node.create_subscription(PoseStamped, "/ee_pose", self.poses.append, 10)
        self.instruction = self.node.create_publisher(String, "/instruction", 10)

    def instruct(self, publish=None):
        """Publishes the instruction until the node's status shows it (a message sent the moment
        discovery first matches can miss a subscription still being set up on the other side)."""
        self.status.clear()
        for _ in range(30):
            self.instruction.publish(String(data=INSTRUCTION))
            if self.spin(1.0, lambda: self.status and self.status[-1].instruction == INSTRUCTION, publish):
                return
        raise AssertionError("the node never took the instruction")

    def spin(self, seconds, until=lambda: False, publish=None):
        end = time.monotonic() + seconds
        while time.monotonic() < end and not until():
            if publish:
                publish()
            rclpy.spin_once(self.node, timeout_sec=0.05)
        return until()


def camera_frames(peer, cam_topic, wrist_topic):
    """Publishers of a raw third-person and a JPEG wrist camera; returns a function sending one
    frame of each (the node finds the transports by type: the profiles use `auto`)."""
    third = np.asarray(PilImage.open(ROOT / "tests/golden/third_person.png").convert("RGB"))
    buf = io.BytesIO()
    PilImage.open(ROOT / "tests/golden/wrist.png").convert("RGB").save(buf, format="JPEG")
    cam = peer.node.create_publisher(Image, cam_topic, qos_profile_sensor_data)
    wrist = peer.node.create_publisher(CompressedImage, wrist_topic, qos_profile_sensor_data) if wrist_topic else None
    joints = peer.node.create_publisher(JointState, "/joint_states", 10)

    def send():
        img = Image(height=third.shape[0], width=third.shape[1], encoding="rgb8", step=third.shape[1] * 3,
                    data=third.tobytes())
        cam.publish(img)
        if wrist:
            wrist.publish(CompressedImage(format="jpeg", data=buf.getvalue()))
        # Eight positions (the tiny policy's proprio), the UR profile's joints among them.
        joints.publish(JointState(name=UR_JOINTS + ["finger_left", "finger_right"], position=[0.0] * 8))

    return send


def main():
    work = Path(tempfile.mkdtemp(prefix="bitvla-launch-"))
    model = work / "tiny"
    subprocess.run([BITVLA, "make-tiny", "--out", model], check=True, capture_output=True)
    rclpy.init()
    peer = Peer()
    results = []

    def check(name, fn):
        start = time.monotonic()
        try:
            fn()
            results.append((name, None))
            print(f"ok   {name} ({time.monotonic() - start:.1f} s)", flush=True)
        except Exception as e:  # noqa: BLE001 - report every failure, run the rest
            results.append((name, e))
            print(f"FAIL {name}\n{traceback.format_exc()}", flush=True)

    def sim_launch_moves_the_arm_and_sigint_ends_both():
        launch = Launch(work, "sim", "bitvla_sim.launch.py", f"model_path:={model}")
        try:
            ready = peer.spin(120, lambda: peer.instruction.get_subscription_count() > 0 and peer.poses
                              and peer.status and peer.status[-1].camera_age_s >= 0)
            assert ready, f"sim or node did not come up:\n{launch.output()[-3000:]}"
            # Node names reach the graph separately from topics: wait for both.
            names = lambda: {n for n, _ in peer.node.get_node_names_and_namespaces()}
            assert peer.spin(30, lambda: {"sim_arm", "bitvla_node"} <= names()), names()
            peer.spin(1.0)
            start = peer.poses[-1].pose.position
            peer.instruct()

            def moved():
                p = peer.poses[-1].pose.position
                return np.linalg.norm([p.x - start.x, p.y - start.y, p.z - start.z]) > 0.01
            assert peer.spin(60, moved), f"the end effector did not move:\n{launch.output()[-3000:]}"
            assert len(launch.descendants()) >= 2
        except BaseException:
            launch.kill()
            raise
        rc, seconds, left = launch.interrupt(within=5)
        out = launch.output()
        assert rc == 0, f"exit status {rc} after SIGINT:\n{out[-3000:]}"
        assert seconds <= 5.0 and not left, (seconds, left)
        assert "process has died" not in out, out[-3000:]

    def real_launch_is_a_dry_run_with_each_profile():
        profiles = [
            # (config argument, extra launch arguments, command type, the real command topic)
            (None, ["wrist_camera_topic:=/lt/wrist/compressed"], TwistStamped, "/servo_node/delta_twist_cmds"),
            ("franka_servo.yaml", ["wrist_camera_topic:=/lt/wrist/compressed"], TwistStamped,
             "/servo_node/delta_twist_cmds"),
            ("ur_joint_trajectory.yaml", [], JointTrajectory, "/scaled_joint_trajectory_controller/joint_trajectory"),
        ]
        for config, extra, msg_type, real_topic in profiles:
            args = [f"model_path:={model}", "camera_topic:=/lt/cam", *extra]
            if config:
                args.append(f"config:={ROOT / 'config' / config}")
            dry, real = [], []
            subs = [peer.node.create_subscription(msg_type, "/bitvla_node/dry_run/command", dry.append, 10),
                    peer.node.create_subscription(msg_type, real_topic, real.append, 10)]
            wrist = next((a.split(":=")[1] for a in extra if a.startswith("wrist_camera_topic")), None)
            send = camera_frames(peer, "/lt/cam", wrist)
            launch = Launch(work, f"real_{config or 'default'}", "bitvla_real.launch.py", *args)
            try:
                up = peer.spin(60, lambda: peer.instruction.get_subscription_count() > 0)
                assert up, f"{config}: the node did not come up:\n{launch.output()[-3000:]}"
                peer.spin(0.5, publish=send)
                peer.instruct(publish=send)
                got = peer.spin(60, lambda: len(dry) >= 5, publish=send)
                assert got, f"{config}: no dry-run commands:\n{launch.output()[-3000:]}"
                assert not real, f"{config}: a dry run published on {real_topic}"
                out = launch.output()
                assert "subscribed as raw" in out, out[-3000:]
                if wrist:
                    assert "subscribed as compressed" in out, out[-3000:]
                assert "dry_run = true" in out, out[-3000:]
            except BaseException:
                launch.kill()
                raise
            finally:
                for s in subs:
                    peer.node.destroy_subscription(s)
            rc, seconds, left = launch.interrupt(within=5)
            assert rc == 0 and not left, (config, rc, left, launch.output()[-2000:])

    def bad_arguments_are_clear_errors_and_the_launch_fails():
        bad_params = work / "bad_params.yaml"
        bad_params.write_text("bitvla_node:\n  ros__parameters:\n    control_rate_hz: fast\n")
        cases = [
            # (name, arguments, the error that must appear: launch's, or the node's own)
            ("no model_path", [], "missing required argument 'model_path'"),
            ("a boolean argument that is not one", [f"model_path:={model}", "dry_run:=maybe"],
             "launch argument dry_run:='maybe' is not a boolean"),
            ("a checkpoint that is not there", [f"model_path:={work / 'missing'}"],
             f"loading the policy from {work / 'missing'}"),
            ("a parameter of the wrong type in the parameter file", [f"model_path:={model}", f"config:={bad_params}"],
             "Invalid type for parameter control_rate_hz"),
        ]
        for name, args, error in cases:
            launch = Launch(work, "bad", "bitvla_real.launch.py", *args)
            rc = launch.wait(60)
            out = launch.output()
            assert rc == 1, f"{name}: exit status {rc}:\n{out[-3000:]}"
            assert error in out, f"{name}: no {error!r} in:\n{out[-3000:]}"
            assert "Traceback" not in out and "panicked" not in out, f"{name}:\n{out[-3000:]}"
            line = next(line.strip() for line in out.splitlines() if error in line)
            print(f"     {name}: exit {rc}; {line}", flush=True)

    for name, fn in [
        ("bitvla_sim.launch.py: both nodes up, an instruction moves the arm, SIGINT ends both within 5 s, exit 0",
         sim_launch_moves_the_arm_and_sigint_ends_both),
        ("bitvla_real.launch.py with its defaults and each arm profile: dry-run commands only",
         real_launch_is_a_dry_run_with_each_profile),
        ("bad launch arguments and parameters: clear errors, non-zero exit",
         bad_arguments_are_clear_errors_and_the_launch_fails),
    ]:
        check(name, fn)
    failed = [n for n, e in results if e]
    if failed:
        print(f"logs kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    print(f"launch: {len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
