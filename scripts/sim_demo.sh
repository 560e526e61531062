#!/usr/bin/env bash
# The simulated arm and bitvla_node, started with the parameters launch/bitvla_sim.launch.py
# uses (`ros2 launch` is not installable from the wheels), an instruction typed, and a report of
# what the arm did (sim/demo.py). Sets up ROS 2 and MuJoCo from the wheels on first use.
#
#   scripts/sim_demo.sh [--model M] [--instruction TEXT] [--seconds S] [--json]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_ros.sh >&2
# shellcheck disable=SC1091
. .ros/env
# Cargo's own progress (the first build takes minutes): on stderr, so --json stays clean.
cargo build --release --features ros --bins >&2
export ROS_DOMAIN_ID=${ROS_DOMAIN_ID:-$(( (RANDOM % 100) + 101 ))}
export MUJOCO_GL=${MUJOCO_GL:-osmesa}
exec python3 sim/demo.py "$@"
