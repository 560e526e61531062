#!/usr/bin/env python3
"""The whole loop without a robot: the simulated arm and bitvla_node started as
launch/bitvla_sim.launch.py starts them (same parameter file, simulation time), an instruction
typed on /instruction, and a report of what the arm did.

    scripts/sim_demo.sh [--model M] [--instruction TEXT] [--seconds S] [--out DIR] [--json]

Without --model it writes the tiny random checkpoint (`bitvla make-tiny`): the arm moves, but
not purposefully. Also measures the sim's camera rate, its real-time factor and the latency
from the instruction to the first end-effector motion.

What it leaves in --out (default: a new temporary directory), and prints the paths of:
- agentview.gif: the third-person camera over the episode (every other frame, in sim time);
- ee_path.png: the end effector's path as the sim reported it (/ee_pose), top and side views;
- episode/: the episode recorded by sim/record.py (cameras, instruction, state, and the node's
  commands), and report.html: that episode replayed by `bitvla replay --html`, with the live
  node's commands drawn as the recorded ones.
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
from PIL import Image as PilImage
from PIL import ImageDraw, ImageFont
from geometry_msgs.msg import PoseStamped, TwistStamped
from rclpy.qos import qos_profile_sensor_data
from rosgraph_msgs.msg import Clock
from sensor_msgs.msg import Image
from std_msgs.msg import String

from bitvla_ros.msg import ActionChunk, PolicyStatus

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")) / "release"


TWIST = "/servo_node/delta_twist_cmds"
CAMERA_HZ = 20.0  # sim/sim_arm.py's default camera_rate_hz


def stamp(msg):
    return msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9


def write_gif(frames, path, frame_s):
    """The frames as an animated GIF (one shared palette, looping)."""
    if not frames:
        raise SystemExit("no camera frame arrived during the episode: no GIF to write")
    images = [PilImage.fromarray(f) for f in frames]
    palette = images[len(images) // 2].quantize(colors=255, method=PilImage.Quantize.MEDIANCUT)
    images = [im.quantize(palette=palette, dither=PilImage.Dither.NONE) for im in images]
    images[0].save(path, save_all=True, append_images=images[1:], duration=round(frame_s * 1000), loop=0,
                   optimize=False)


def write_path_png(track, path, title, panel=380, margin=48):
    """The end-effector positions [m] drawn from above (x, y) and from the side (x, z), on one
    scale per panel, with the start (green) and the end (red) marked."""
    font = ImageFont.load_default()
    img = PilImage.new("RGB", (2 * panel + 3 * margin, panel + 2 * margin + 20), "white")
    d = ImageDraw.Draw(img)
    d.text((margin, 8), f"end-effector path (sim /ee_pose): {title}"[:100], fill="black", font=font)
    for k, (j, name) in enumerate(((1, "y"), (2, "z"))):
        x0, y0 = margin + k * (panel + margin), margin + 20
        pts = track[:, [0, j]]
        lo, hi = pts.min(axis=0), pts.max(axis=0)
        span = max(float((hi - lo).max()), 0.02) * 1.2
        mid = (lo + hi) / 2
        px = lambda p: (x0 + (p[0] - mid[0]) / span * panel + panel / 2, y0 + panel / 2 - (p[1] - mid[1]) / span * panel)
        d.rectangle([x0, y0, x0 + panel, y0 + panel], outline=(160, 160, 160))
        for t in np.linspace(-0.4, 0.4, 5):
            gx, gy = px(mid + [t * span, 0])[0], px(mid + [0, t * span])[1]
            d.line([gx, y0, gx, y0 + panel], fill=(230, 230, 230))
            d.line([x0, gy, x0 + panel, gy], fill=(230, 230, 230))
            d.text((gx - 14, y0 + panel + 4), f"{mid[0] + t * span:.3f}", fill="black", font=font)
            d.text((x0 - 44, gy - 6), f"{mid[1] + t * span:.3f}", fill="black", font=font)
        d.text((x0 + panel / 2 - 40, y0 + panel + 18), f"x [m]  ({'top' if k == 0 else 'side'} view)",
               fill="black", font=font)
        d.text((x0 + 4, y0 + 4), f"{name} [m]", fill="black", font=font)
        if len(pts) > 1:
            d.line([px(p) for p in pts], fill=(31, 119, 180), width=2)
        for p, colour in ((pts[0], (44, 160, 44)), (pts[-1], (214, 39, 40))):
            cx, cy = px(p)
            d.ellipse([cx - 5, cy - 5, cx + 5, cy + 5], fill=colour)
    img.save(path)


def replay(model, work, html, latency_s):
    """The recorded episode through `bitvla replay` with the live node's parameters and
    (about) its latency, the live commands as the recorded actions: the HTML report."""
    latency_ms = 100.0 if latency_s is None else round(latency_s * 1e3, 1)
    cmd = [BIN / "bitvla", "replay", "--bag", work / "episode", "--model", model, "--params",
           ROOT / "config" / "sim_arm.yaml", "--recorded-topic", TWIST, "--latency", f"fixed:{latency_ms}",
           "--out", work / "replayed", "--report", work / "replay_report.json", "--html", html]
    p = subprocess.run(cmd, capture_output=True, text=True)
    (work / "replay.log").write_text(p.stdout + p.stderr)
    if p.returncode != 0:
        raise SystemExit(f"replaying the episode failed (exit {p.returncode}); see {work / 'replay.log'}:\n"
                         f"{p.stderr[-1500:]}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="checkpoint directory or .bitvla file (default: a tiny random one)")
    ap.add_argument("--instruction", default="pick up the red cube and place it on the plate")
    ap.add_argument("--seconds", type=float, default=8.0, help="wall-clock seconds after the instruction")
    ap.add_argument("--out", type=Path, help="directory for the GIF, the path PNG, the episode and its report")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        if (args.out / "episode").exists():
            raise SystemExit(f"{args.out / 'episode'} exists: choose another --out or remove it")
    work = args.out.resolve() if args.out else Path(tempfile.mkdtemp(prefix="bitvla-sim-demo-"))
    model = args.model
    if not model:
        model = work / "tiny"
        subprocess.run([BIN / "bitvla", "make-tiny", "--out", model], check=True, capture_output=True)
    logs = [open(work / "sim.log", "w"), open(work / "node.log", "w"), open(work / "record.log", "w")]
    sim = subprocess.Popen([sys.executable, ROOT / "sim" / "sim_arm.py", "--ros-args", "-p", "use_sim_time:=true"],
                           stdout=logs[0], stderr=subprocess.STDOUT)
    node = subprocess.Popen([BIN / "bitvla_node", "--ros-args", "--params-file", ROOT / "config" / "sim_arm.yaml",
                             "-p", f"model_path:={model}"], stdout=logs[1], stderr=subprocess.STDOUT)
    rclpy.init()
    n = rclpy.create_node("sim_demo")
    images, poses, twists, chunks, clock, status = [], [], [], [], [], []
    frames = []  # (sim time, 224x224x3) of the third-person camera, once the instruction is out
    recording = [False]

    def on_image(m):
        images.append(time.monotonic())
        if recording[0]:
            frames.append(np.frombuffer(bytes(m.data), np.uint8).reshape(m.height, m.step)[:, : m.width * 3]
                          .reshape(m.height, m.width, 3).copy())

    n.create_subscription(PolicyStatus, "/bitvla_node/status", status.append, 10)
    n.create_subscription(Image, "/sim/agentview/image_raw", on_image, qos_profile_sensor_data)
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

    recorder = None
    try:
        # Ready: the node ticks on the sim's clock and has camera frames (its status says so).
        ready = spin(90, lambda: instruction.get_subscription_count() > 0 and poses and status
                     and status[-1].camera_age_s >= 0)
        if not ready:
            raise SystemExit(f"the sim or the node did not come up; logs in {work}")
        # Record the episode (and the node's commands) from here on: the recorder subscribes once
        # the sim's clock runs; the instruction goes out once it listens too.
        recorder = subprocess.Popen([sys.executable, ROOT / "sim" / "record.py", "--out", work / "episode",
                                     "--seconds", "100000", "--extra", f"{TWIST}:geometry_msgs/msg/TwistStamped",
                                     "--extra", "/gripper/command:std_msgs/msg/Float64MultiArray"],
                                    stdout=logs[2], stderr=subprocess.STDOUT)
        if not spin(60, lambda: instruction.get_subscription_count() >= 2 or recorder.poll() is not None) \
                or recorder.poll() is not None:
            raise SystemExit(f"the episode recorder did not start; its log: {work / 'record.log'}")
        spin(1.0)
        start = pos(poses[-1])
        recording[0] = True
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
        recording[0] = False
        sim_dt = clock[-1][1] - sim_t0
        episode_poses = [p for p in poses if stamp(p) >= sim_t0]
        track = np.array([pos(p) for p in episode_poses]) if episode_poses else np.array([pos(poses[-1])])
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
        if recorder is not None:
            recorder.send_signal(signal.SIGTERM)
            recorder.wait(timeout=30)
            recorder = None
        gif = work / "agentview.gif"
        write_gif(frames[::2], gif, 2 / CAMERA_HZ)
        png = work / "ee_path.png"
        write_path_png(track, png, args.instruction)
        html = work / "report.html"
        replay(model, work, html, report["mean_inference_latency_s"])
        report.update({"gif": str(gif), "gif_frames": len(frames[::2]), "ee_path_png": str(png),
                       "episode_bag": str(work / "episode"), "html_report": str(html)})
    finally:
        if recorder is not None:
            recorder.kill()
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
        print(f"  camera GIF: {report['gif']} ({report['gif_frames']} frames)")
        print(f"  end-effector path: {report['ee_path_png']}")
        print(f"  episode: {report['episode_bag']}, its replay report: {report['html_report']}")
        print(f"  logs: {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
