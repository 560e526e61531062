#!/usr/bin/env python3
"""Records a simulated episode as a rosbag2 MCAP (rosbags writer, messages as they were on the
wire): both cameras, the instruction, joint states, the end-effector pose and the expert's
actions, stamped with simulation time (/clock). The input `bitvla replay --recorded-topic
/expert/action` was made for. Stops on SIGINT/SIGTERM or after --seconds of simulation time.

    python3 sim/record.py --out EPISODE_DIR [--seconds 12] [--extra TOPIC:TYPE ...]

--extra records more topics of standard types too, e.g. the node's commands
(`/servo_node/delta_twist_cmds:geometry_msgs/msg/TwistStamped`): `sim/demo.py` does, so its
report can draw what the live node commanded next to the replay.
"""

import argparse
import importlib
import signal
import sys
import time
from pathlib import Path

import rclpy
from geometry_msgs.msg import PoseStamped
from rclpy.qos import qos_profile_sensor_data
from rosbags.rosbag2 import StoragePlugin, Writer
from rosbags.typesys import Stores, get_typestore
from rosgraph_msgs.msg import Clock
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import Float64MultiArray, String

TOPICS = [
    ("/sim/agentview/image_raw", Image, "sensor_msgs/msg/Image", qos_profile_sensor_data),
    ("/sim/wrist/image_raw", Image, "sensor_msgs/msg/Image", qos_profile_sensor_data),
    ("/instruction", String, "std_msgs/msg/String", 10),
    ("/joint_states", JointState, "sensor_msgs/msg/JointState", qos_profile_sensor_data),
    ("/ee_pose", PoseStamped, "geometry_msgs/msg/PoseStamped", 10),
    ("/expert/action", Float64MultiArray, "std_msgs/msg/Float64MultiArray", 10),
]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--seconds", type=float, default=12.0, help="simulation seconds to record")
    ap.add_argument("--extra", action="append", default=[], metavar="TOPIC:TYPE",
                    help="another topic to record, e.g. /gripper/command:std_msgs/msg/Float64MultiArray")
    args = ap.parse_args()
    topics = list(TOPICS)
    for spec in args.extra:
        topic, _, msgtype = spec.partition(":")
        try:
            package, _, name = msgtype.split("/")
            cls = getattr(importlib.import_module(f"{package}.msg"), name)
        except (ValueError, ImportError, AttributeError) as e:
            print(f"error: --extra {spec!r}: expected TOPIC:package/msg/Type of an installed message ({e})",
                  file=sys.stderr)
            return 2
        topics.append((topic, cls, msgtype, 10))
    rclpy.init()
    node = rclpy.create_node("sim_recorder")
    store = get_typestore(Stores.ROS2_JAZZY)
    now = [0]
    start = [None]
    counts = {}
    stop = [False]
    signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__(0, True))

    def on_clock(m):
        now[0] = m.clock.sec * 1_000_000_000 + m.clock.nanosec
        if start[0] is None:
            start[0] = now[0]

    node.create_subscription(Clock, "/clock", on_clock, 10)
    # Subscribe to the data topics only once the clock runs: a message that arrived before it
    # would have no time stamp. Whoever waits for this recorder's subscriptions (the tests do)
    # thereby knows nothing it publishes will be dropped.
    deadline = time.monotonic() + 30.0
    while rclpy.ok() and start[0] is None and not stop[0]:
        if time.monotonic() > deadline:
            print("error: no /clock within 30 s: start the sim (sim/sim_arm.py) first", file=sys.stderr)
            return 2
        rclpy.spin_once(node, timeout_sec=0.05)
    with Writer(args.out, version=9, storage_plugin=StoragePlugin.MCAP) as bag:
        for topic, cls, msgtype, qos in topics:
            conn = bag.add_connection(topic, msgtype, typestore=store)

            def write(data, conn=conn, topic=topic):
                bag.write(conn, now[0], bytes(data))
                counts[topic] = counts.get(topic, 0) + 1
                if topic == "/instruction":
                    print(f"recorded an instruction at t={now[0] / 1e9:.3f} s", flush=True)

            node.create_subscription(cls, topic, write, qos, raw=True)
        try:
            while rclpy.ok() and not stop[0]:
                rclpy.spin_once(node, timeout_sec=0.05)
                if start[0] is not None and now[0] - start[0] >= args.seconds * 1e9:
                    break
        except KeyboardInterrupt:
            pass
    print(f"recorded {sum(counts.values())} messages to {args.out}: {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
