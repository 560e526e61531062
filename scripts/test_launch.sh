#!/usr/bin/env bash
# The launch files under ROS 2's own launch (tests/launch/test_launch.py), from the colcon install
# of scripts/test_colcon.sh, as `ros2 launch bitvla_ros FILE` runs them on a robot. The launcher:
# a system `ros2 launch` when there is one; else ROS 2's launch/launch_ros sources (Jazzy,
# unmodified) in shared/tools/ros2-launch beside the repository (BITVLA_ROS2_LAUNCH names another
# copy), since the wheels ship none. Without either the test says it was skipped and why (with
# BITVLA_REQUIRE_ROS=1, as in CI, that is a failure). Prints 'launch: N passed, M failed'.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
# shellcheck disable=SC1091
. .ros/env
install="$root/.ros/colcon_ws/install"
if [ ! -f "$install/setup.sh" ]; then
  echo "test_launch.sh: no colcon install in $install: run scripts/test_colcon.sh first" >&2
  exit 1
fi
# The package as colcon installed it (launch files, config, node), not the bare interfaces.
AMENT_PREFIX_PATH=$(tr ':' '\n' <<<"$AMENT_PREFIX_PATH" | grep -v "/.ros/interfaces$" | paste -sd: -)
export AMENT_PREFIX_PATH
set +u
# shellcheck disable=SC1091
. "$install/setup.sh"
set -u

if command -v ros2 >/dev/null 2>&1 && ros2 launch --help >/dev/null 2>&1; then
  launcher='["ros2", "launch"]'
  echo "launcher: the system's ros2 launch ($(command -v ros2))"
else
  tool="${BITVLA_ROS2_LAUNCH:-$root/../shared/tools/ros2-launch/ros2-launch}"
  if [ ! -f "$tool" ]; then
    echo "launch: SKIPPED: no 'ros2 launch' on PATH and no ROS 2 launch sources at $tool" \
      "(set BITVLA_ROS2_LAUNCH to a ros2-launch runner)" >&2
    if [ "${BITVLA_REQUIRE_ROS:-0}" = "1" ]; then
      echo "error: the launch tests are required (BITVLA_REQUIRE_ROS=1)" >&2
      exit 1
    fi
    echo "launch: 0 passed, 0 failed, 1 skipped"
    exit 0
  fi
  # launch's two PyPI dependencies, into the ROS 2 Python.
  python3 -m pip install --quiet --disable-pip-version-check osrf-pycommon==2.0.2 lark==1.2.2
  launcher="[\"$(command -v python3)\", \"$tool\"]"
  echo "launcher: ROS 2 Jazzy's launch from $tool"
fi
export BITVLA_LAUNCH="$launcher"
export BITVLA_BIN="$install/bitvla_ros/lib/bitvla_ros/bitvla"
export ROS_DOMAIN_ID=$(( (RANDOM % 100) + 101 ))
export MUJOCO_GL=osmesa
python3 tests/launch/test_launch.py
