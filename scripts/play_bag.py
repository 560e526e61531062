#!/usr/bin/env python3
"""Publish a rosbag2 bag (MCAP or sqlite3) into a live ROS 2 graph, like `ros2 bag play --clock`,
for machines without rosbag2 (e.g. ROS 2 from the Python wheels).

Each message is published as its recorded CDR bytes, paced by the recorded log times (scaled by
--rate). With --clock, /clock carries bag time: just before each message the clock is set to one
nanosecond before the message's time, so a node on simulation time sees every message stamped
at or before the control ticks that follow it, exactly as `bitvla replay` orders them.

    . .ros/env && python3 scripts/play_bag.py BAG [--rate 0.5] [--clock] [--topics /a /b]

With a full ROS 2 install, `ros2 bag play BAG --clock` does the same job.
"""

import argparse
import importlib
import sys
import time

import rclpy
from rclpy.qos import QoSProfile, qos_profile_sensor_data
from rosbags.rosbag2 import Reader
from rosgraph_msgs.msg import Clock

SENSOR_TYPES = {"sensor_msgs/msg/Image", "sensor_msgs/msg/CompressedImage", "sensor_msgs/msg/JointState"}


def message_class(msgtype):
    pkg, _, name = msgtype.split("/")
    return getattr(importlib.import_module(f"{pkg}.msg"), name)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bag")
    ap.add_argument("--rate", type=float, default=1.0, help="playback speed (0.5: half speed)")
    ap.add_argument("--clock", action="store_true", help="publish /clock with bag time")
    ap.add_argument("--topics", nargs="*", help="only these topics")
    ap.add_argument("--settle-ms", type=float, default=5.0,
                    help="pause after each message so it lands before the next clock step")
    ap.add_argument("--wait-subscribers", type=float, default=5.0,
                    help="seconds to wait for subscribers before playing")
    args = ap.parse_args()
    if args.rate <= 0:
        sys.exit("--rate must be > 0")

    rclpy.init()
    node = rclpy.create_node("bag_player")
    clock_pub = node.create_publisher(Clock, "/clock", 10) if args.clock else None
    with Reader(args.bag) as reader:
        publishers = {}
        for c in reader.connections:
            if args.topics and c.topic not in args.topics:
                continue
            try:
                cls = message_class(c.msgtype)
            except (ImportError, AttributeError, ValueError):
                print(f"skipping {c.topic}: type {c.msgtype} is not available here", file=sys.stderr)
                continue
            qos = qos_profile_sensor_data if c.msgtype in SENSOR_TYPES else QoSProfile(depth=10)
            publishers[c.id] = node.create_publisher(cls, c.topic, qos)
        deadline = time.monotonic() + args.wait_subscribers
        while time.monotonic() < deadline and not all(p.get_subscription_count() for p in publishers.values()):
            rclpy.spin_once(node, timeout_sec=0.05)

        def set_clock(ns):
            if clock_pub is not None:
                msg = Clock()
                msg.clock.sec, msg.clock.nanosec = divmod(ns, 1_000_000_000)
                clock_pub.publish(msg)

        start_wall = time.monotonic()
        first = last = None
        count = 0
        for c, t, raw in reader.messages():
            if c.id not in publishers:
                continue
            if first is None:
                first = t
            due = start_wall + (t - first) / 1e9 / args.rate
            while (left := due - time.monotonic()) > 0:
                time.sleep(min(left, 0.01))
            set_clock(t - 1)
            time.sleep(0.002)  # let the clock land before the message
            publishers[c.id].publish(bytes(raw))
            time.sleep(args.settle_ms / 1e3)
            count += 1
            last = t
        if last is not None:
            time.sleep(0.05)
            set_clock(last)
            time.sleep(0.05)
    print(f"published {count} messages")
    node.destroy_node()
    rclpy.shutdown()


if __name__ == "__main__":
    main()
