#!/usr/bin/env bash
# The simulated arm in closed loop with bitvla_node (tests/sim/test_sim.py): MuJoCo scene,
# cameras, controllers, e-stop, bad commands. Needs scripts/setup_ros.sh (ROS 2 wheels, mujoco,
# libosmesa6) and the node's release build (scripts/test_ros.sh builds it).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
. .ros/env
cargo build --release --quiet --features ros --bins
export ROS_DOMAIN_ID=$(( (RANDOM % 100) + 101 ))
export MUJOCO_GL=osmesa
python3 tests/sim/test_sim.py
