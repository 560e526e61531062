#!/usr/bin/env bash
# colcon packaging: `colcon build` of this package (build type ament_cmake: CMakeLists.txt
# generates the interfaces in msg/, installs them, then builds the Rust binaries with cargo
# against them) in a scratch workspace; checks the installed layout that `ros2 launch bitvla_ros
# ...`, `ros2 run bitvla_ros bitvla_node` and Python/C++ users of the messages rely on, that the
# installed node starts, and that a .msg changed without rebuilding the interfaces stops the
# node's build. Needs scripts/setup_ros.sh first (it sources .ros/env).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
# shellcheck disable=SC1091
. .ros/env
python3 -m pip install --quiet --disable-pip-version-check \
  colcon-core==0.21.3 colcon-ros==0.5.0 colcon-cmake==0.2.30 colcon-library-path==0.2.1
# Only the wheels: the interfaces colcon builds must be the ones the node is built against.
AMENT_PREFIX_PATH=$(tr ':' '\n' <<<"$AMENT_PREFIX_PATH" | grep -v "/.ros/interfaces$" | paste -sd: -)
export AMENT_PREFIX_PATH
venv="$root/.ros/venv"
np_link=/opt/python/cp311-cp311/lib/python3.11/site-packages/numpy/_core/include
ws="$root/.ros/colcon_ws"
rm -rf "$ws"
mkdir -p "$ws/src"
ln -sfn "$root" "$ws/src/bitvla_ros"
cd "$ws"
# The cargo step builds in its own target dir: r2r 0.9.7 loses its sim-time support when its
# build script reruns in a target dir it already generated bindings in for another ROS
# environment (src/ros/mod.rs), and this environment differs from scripts/test_ros.sh's.
export CARGO_TARGET_DIR="$root/target/ros-colcon"
colcon build --base-paths src \
  --cmake-args -DPython3_EXECUTABLE="$venv/bin/python" -DPython3_NumPy_INCLUDE_DIR="$np_link" \
  -DBUILD_TESTING=OFF 2>&1 | tail -n 20
install="$ws/install/bitvla_ros"
fail=0
pass=0
ok() { echo "ok   $1"; pass=$((pass + 1)); }
bad() { echo "FAIL $1"; fail=$((fail + 1)); }
missing=()
for f in lib/bitvla_ros/bitvla_node lib/bitvla_ros/bitvla lib/bitvla_ros/sim_arm.py share/bitvla_ros/package.xml \
         share/bitvla_ros/launch/bitvla_real.launch.py share/bitvla_ros/launch/bitvla_sim.launch.py \
         share/bitvla_ros/config/real_arm.yaml share/bitvla_ros/config/sim_arm.yaml \
         share/bitvla_ros/msg/ActionChunk.msg share/bitvla_ros/msg/PolicyStatus.msg \
         share/ament_index/resource_index/packages/bitvla_ros \
         share/ament_index/resource_index/rosidl_interfaces/bitvla_ros \
         lib/libbitvla_ros__rosidl_typesupport_c.so lib/libbitvla_ros__rosidl_typesupport_cpp.so \
         include/bitvla_ros/bitvla_ros/msg/action_chunk.hpp \
         lib/python3.11/site-packages/bitvla_ros/msg/_action_chunk.py; do
  [ -e "$install/$f" ] || missing+=("$f")
done
if [ ${#missing[@]} -eq 0 ]; then ok "installed: binaries, launch, config, msg, C/C++/Python interfaces, ament index"
else bad "missing under install/bitvla_ros: ${missing[*]}"; fi
# The installed node runs without LD_PRELOAD or LD_LIBRARY_PATH: without a model it must exit
# with the parameter error.
out=$(env -u LD_LIBRARY_PATH "$install/lib/bitvla_ros/bitvla_node" 2>&1 || true)
if grep -q "model_path is empty" <<<"$out"; then ok "installed bitvla_node starts"
else bad "installed bitvla_node: $out"; fi
# The workspace's setup script (colcon-core writes setup.sh) makes the Python messages importable.
if out=$(env -u PYTHONPATH sh -c ". '$ws/install/setup.sh' && PYTHONPATH=\$PYTHONPATH:$venv/lib/python3.11/site-packages python3 -c 'from bitvla_ros.msg import ActionChunk, PolicyStatus; print(PolicyStatus.EXECUTING)'" 2>&1) && [ "$out" = 3 ]; then
  ok "install/setup.sh: from bitvla_ros.msg import ActionChunk, PolicyStatus"
else bad "python import through install/setup.sh: $out"; fi
# A .msg changed without rebuilding the interfaces: the node's build must stop, naming the file.
cd "$root"
cp msg/ActionChunk.msg "$ws/ActionChunk.msg.orig"
trap 'cp "$ws/ActionChunk.msg.orig" "$root/msg/ActionChunk.msg"' EXIT
echo "float64 added_field" >> msg/ActionChunk.msg
export AMENT_PREFIX_PATH="$install:$AMENT_PREFIX_PATH"
out=$(cargo build --release --quiet --features ros --bin bitvla_node 2>&1 || true)
cp "$ws/ActionChunk.msg.orig" msg/ActionChunk.msg
if grep -q "msg/ActionChunk.msg differs from the interface generated from it" <<<"$out"; then
  ok "a changed .msg stops the node's build until the interfaces are rebuilt"
else bad "changed .msg did not stop the build: $out"; fi
echo "colcon: $pass passed, $fail failed"
exit $((fail > 0))
