#!/usr/bin/env bash
# bitvla_node against a real ROS 2 graph: sets up ROS 2 Jazzy from the wheels (setup_ros.sh),
# builds the node with the `ros` feature, and runs tests/ros/test_node.py (rclpy peers).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_ros.sh
# shellcheck disable=SC1091
. .ros/env
cargo clippy --quiet --features ros --bins --lib -- -D warnings
cargo build --release --quiet --features ros --bins
export ROS_DOMAIN_ID=$(( (RANDOM % 100) + 101 ))
python3 tests/ros/test_node.py
