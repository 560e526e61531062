#!/usr/bin/env python3
"""The whole loop without a robot: the simulated arm and bitvla_node started as
launch/bitvla_sim.launch.py starts them (same parameter file, simulation time), an instruction
typed on /instruction, and a report of what the arm did.

    scripts/sim_demo.sh [--model M] [--instruction TEXT] [--seconds S] [--json]

Without --model it writes the tiny random checkpoint (`bitvla make-tiny`): the arm moves, but
not purposefully. Also measures the sim's camera rate, its real-time factor and the latency
from the instruction to the first end-effector motion (the numbers issue 7 asks for).
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import rclpy
from geometry_msgs.msg import PoseStamped, TwistStamped
from rclpy.qos import qos_profile_sensor_data
from rosgraph_msgs.msg import Clock
from sensor_msgs.msg import Image
from std_msgs.msg import String

from bitvla_ros.msg import ActionChunk, PolicyStatus

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")) / "release"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="checkpoint directory or .bitvla file (default: a tiny random one)")
    ap.add_argument("--instruction", default="pick up the red cube and place it on the plate")
    ap.add_argument("--seconds", type=float, default=8.0, help="wall-clock seconds after the instruction")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bitvla-sim-demo-"))
    model = args.model
    if not model:
        model = work / "tiny"
        subprocess.run([BIN / "bitvla", "make-tiny", "--out", model], check=True, capture_output=True)
    logs = [open(work / "sim.log", "w"), open(work / "node.log", "w")]
    sim = subprocess.Popen([sys.executable, ROOT / "sim" / "sim_arm.py", "--ros-args", "-p", "use_sim_time:=true"],
                           stdout=logs[0], stderr=subprocess.STDOUT)
    node = subprocess.Popen([BIN / "bitvla_node", "--ros-args", "--params-file", ROOT / "config" / "sim_arm.yaml",
                             "-p", f"model_path:={model}"], stdout=logs[1], stderr=subprocess.STDOUT)
    rclpy.init()
    n = rclpy.create_node("sim_demo")
    images, poses, twists, chunks, clock, status = [], [], [], [], [], []
    n.create_subscription(PolicyStatus, "/bitvla_node/status", status.append, 10)
    n.create_subscription(Image, "/sim/agentview/image_raw", lambda m: images.append(time.monotonic()),
                          qos_profile_sensor_data)
    n.create_subscription(PoseStamped, "/ee_pose", poses.append, 10)
    n.create_subscription(TwistStamped, "/servo_node/delta_twist_cmds", twists.append, 10)
    n.create_subscription(ActionChunk, "/bitvla_node/action_chunk", chunks.append, 10)
    n.create_subscription(Clock, "/clock", lambda m: clock.append((time.monotonic(), m.clock.sec + m.clock.nanosec * 1e-9)), 10)
    instruction = n.create_publisher(String, "/instruction", 10)

    def spin(seconds, until=lambda: False):
        end = time.monotonic() + seconds
        while time.monotonic() < end and not until():
            rclpy.spin_once(n, timeout_sec=0.02)
        return until()

    def pos(p):
        return np.array([p.pose.position.x, p.pose.position.y, p.pose.position.z])

    try:
        # Ready: the node ticks on the sim's clock and has camera frames (its status says so).
        ready = spin(90, lambda: instruction.get_subscription_count() > 0 and poses and status
                     and status[-1].camera_age_s >= 0)
        if not ready:
            raise SystemExit(f"the sim or the node did not come up; logs in {work}")
        spin(1.0)
        start = pos(poses[-1])
        images.clear()
        t_wall = time.monotonic()
        sim_t0 = clock[-1][1]
        instruction.publish(String(data=args.instruction))
        first_motion = None
        end = t_wall + args.seconds
        while time.monotonic() < end:
            rclpy.spin_once(n, timeout_sec=0.02)
            if first_motion is None and poses and np.linalg.norm(pos(poses[-1]) - start) > 0.002:
                first_motion = time.monotonic() - t_wall
        wall = time.monotonic() - t_wall
        sim_dt = clock[-1][1] - sim_t0
        track = np.array([pos(p) for p in poses])
        path = float(np.linalg.norm(np.diff(track, axis=0), axis=1).sum()) if len(track) > 1 else 0.0
        moving = [m for m in twists if any([m.twist.linear.x, m.twist.linear.y, m.twist.linear.z])]
        report = {
            "instruction": args.instruction,
            "model": str(model),
            "policy_calls": len(chunks),
            "mean_inference_latency_s": float(np.mean([c.inference_latency_s for c in chunks])) if chunks else None,
            "twist_commands": len(twists),
            "moving_commands": len(moving),
            "ee_start_m": start.round(3).tolist(),
            "ee_end_m": pos(poses[-1]).round(3).tolist(),
            "ee_path_m": round(path, 3),
            "camera_rate_hz": round(len(images) / wall, 1),
            "sim_real_time_factor": round(sim_dt / wall, 2),
            "instruction_to_first_motion_s": None if first_motion is None else round(first_motion, 3),
        }
    finally:
        for p in (node, sim):
            p.send_signal(signal.SIGINT)
        for p in (node, sim):
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
        if not args.model:
            shutil.rmtree(model, ignore_errors=True)  # ~100 MB; the logs stay
    if args.json:
        print(json.dumps(report))
    else:
        print(f"instruction: {report['instruction']!r} (model {report['model']})")
        latency = report["mean_inference_latency_s"]
        latency = "n/a" if latency is None else f"{latency * 1e3:.1f} ms"
        print(f"  {report['policy_calls']} policy calls, mean latency {latency}")
        print(f"  {report['twist_commands']} twist commands ({report['moving_commands']} moving)")
        print(f"  end effector {report['ee_start_m']} -> {report['ee_end_m']} m, path {report['ee_path_m']} m")
        print(f"  cameras {report['camera_rate_hz']} Hz (2 x 224x224), sim {report['sim_real_time_factor']}x real time, "
              f"first motion {report['instruction_to_first_motion_s']} s after the instruction")
        print(f"  logs: {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
