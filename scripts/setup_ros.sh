#!/usr/bin/env bash
# ROS 2 Jazzy for bitvla_node on a fresh Debian machine, from the ros-jazzy-* Python wheels
# (shared/spec/ros2.md §2-3), idempotent. Writes .ros/env, which later commands source:
#
#   scripts/setup_ros.sh && . .ros/env && cargo build --release --features ros --bin bitvla_node
#
# When a system ROS 2 is already sourced (AMENT_PREFIX_PATH and ROS_DISTRO set, e.g.
# /opt/ros/jazzy/setup.bash), it writes an env file that keeps it and only selects the target dir.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
mkdir -p .ros
env_file=.ros/env

need_apt=()
command -v clang >/dev/null 2>&1 || dpkg -s libclang-dev >/dev/null 2>&1 || need_apt+=(libclang-dev)
if [ ${#need_apt[@]} -gt 0 ]; then
  apt-get update -qq && apt-get install -y -qq "${need_apt[@]}"
fi

if [ -n "${AMENT_PREFIX_PATH:-}" ] && [ -n "${ROS_DISTRO:-}" ] && [ ! -f .ros/venv/bin/python ]; then
  cat > "$env_file" <<ENV
# system ROS 2 ($ROS_DISTRO) was sourced when this was written
export CARGO_TARGET_DIR="$root/target/ros"
export IDL_PACKAGE_FILTER="std_msgs;sensor_msgs;geometry_msgs;trajectory_msgs;diagnostic_msgs;rosgraph_msgs;builtin_interfaces"
ENV
  echo "using the sourced ROS 2 $ROS_DISTRO; wrote $env_file"
  exit 0
fi

# The wheels are cp311: find a Python 3.11 with a shared libpython (needed at link time).
py=""
for cand in python3.11 python3; do
  if command -v "$cand" >/dev/null && "$cand" -c 'import sys; assert sys.version_info[:2] == (3, 11)' 2>/dev/null; then
    py=$(command -v "$cand"); break
  fi
done
if [ -z "$py" ]; then
  apt-get update -qq && apt-get install -y -qq python3.11 python3.11-venv libpython3.11-dev
  py=$(command -v python3.11)
fi
pylib=$("$py" -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR"))')
if [ ! -e "$pylib/libpython3.11.so" ]; then
  apt-get update -qq && apt-get install -y -qq libpython3.11-dev
  pylib=/usr/lib/$(gcc -print-multiarch)
fi

venv="$root/.ros/venv"
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
"$venv/bin/pip" install --quiet --upgrade pip
"$venv/bin/pip" install --quiet \
  ros-jazzy-rcl ros-jazzy-rcl-action ros-jazzy-std-msgs ros-jazzy-sensor-msgs \
  ros-jazzy-geometry-msgs ros-jazzy-trajectory-msgs ros-jazzy-diagnostic-msgs \
  ros-jazzy-rosgraph-msgs ros-jazzy-rmw-fastrtps-cpp ros-jazzy-rclpy numpy pillow \
  rosbags==0.11.9

# Fix 1: the wheels ship no librmw_implementation; r2r links it. A shim prefix points it at Fast DDS.
shim="$root/.ros/shim"
mkdir -p "$shim/lib"
ln -sf "$venv/lib/librmw_fastrtps_cpp.so" "$shim/lib/librmw_implementation.so"

roslibs=$(ls -d "$venv"/lib/python3.11/site-packages/ros_*.libs 2>/dev/null | paste -sd: -)
cat > "$env_file" <<ENV
# written by scripts/setup_ros.sh: ROS 2 Jazzy from the Python wheels in .ros/venv
export ROS_DISTRO=jazzy
export AMENT_PREFIX_PATH="$venv:$shim"
export IDL_PACKAGE_FILTER="std_msgs;sensor_msgs;geometry_msgs;trajectory_msgs;diagnostic_msgs;rosgraph_msgs;builtin_interfaces"
# Fix 2: the ROS libraries and their vendored dependencies, for build scripts and rclpy.
export LD_LIBRARY_PATH="$venv/lib:$roslibs\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
export PYTHONPATH="$venv/lib/python3.11/site-packages\${PYTHONPATH:+:\$PYTHONPATH}"
export PATH="$venv/bin:\$PATH"
export CARGO_TARGET_DIR="$root/target/ros"
# Fix 3: link libpython and embed the library paths (DT_RPATH, also for transitive
# dependencies) so bitvla_node runs without LD_PRELOAD. Own target dir: no rebuild of the rest.
export RUSTFLAGS="-L native=$pylib -C link-arg=-Wl,--no-as-needed -C link-arg=-lpython3.11 -C link-arg=-Wl,--as-needed -C link-arg=-Wl,--disable-new-dtags -C link-arg=-Wl,-rpath,$venv/lib:$roslibs:$pylib"
export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST
ENV
echo "ROS 2 Jazzy wheels in $venv; wrote $env_file"
