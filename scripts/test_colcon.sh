#!/usr/bin/env bash
# colcon packaging: `colcon build` of this package (build type ament_cargo: colcon-ros-cargo and
# cargo-ament-build from PyPI) in a scratch workspace, then checks the installed layout that
# `ros2 launch bitvla_ros ...` and `ros2 run bitvla_ros bitvla_node` rely on, and that the
# installed node starts. Needs scripts/setup_ros.sh first (it sources .ros/env).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
# shellcheck disable=SC1091
. .ros/env
python3 -m pip install --quiet --disable-pip-version-check \
  colcon-core==0.21.3 colcon-ros==0.5.0 colcon-cargo==0.2.0 colcon-ros-cargo==0.2.0 cargo-ament-build==0.1.11
ws="$root/.ros/colcon_ws"
rm -rf "$ws/src" "$ws/install" "$ws/log"
mkdir -p "$ws/src" "$ws/build"
ln -sfn "$root" "$ws/src/bitvla_ros"
# The node's release build from scripts/test_ros.sh (same flags and features) serves as
# colcon's cargo cache: the target directory colcon names is pointed at it.
mkdir -p "$CARGO_TARGET_DIR"
ln -sfn "$CARGO_TARGET_DIR" "$ws/build/bitvla_ros"
cd "$ws"
colcon build --base-paths src --packages-select bitvla_ros \
  --cargo-args --release --features ros 2>&1 | grep -v "^{\"packages\"" | tail -n 20
install="$ws/install/bitvla_ros"
fail=0
for f in lib/bitvla_ros/bitvla_node lib/bitvla_ros/bitvla share/bitvla_ros/package.xml \
         share/bitvla_ros/launch/bitvla_real.launch.py share/bitvla_ros/launch/bitvla_sim.launch.py \
         share/bitvla_ros/config/real_arm.yaml share/bitvla_ros/config/sim_arm.yaml \
         share/bitvla_ros/msg/ActionChunk.msg \
         share/ament_index/resource_index/packages/bitvla_ros; do
  if [ -e "$install/$f" ]; then echo "ok   installed $f"; else echo "FAIL missing $f"; fail=1; fi
done
# The installed node runs (no LD_PRELOAD): without a model it must exit with the parameter error.
out=$("$install/lib/bitvla_ros/bitvla_node" 2>&1 || true)
if grep -q "model_path is empty" <<<"$out"; then echo "ok   installed bitvla_node starts"; else
  echo "FAIL installed bitvla_node: $out"; fail=1; fi
passed=$(( fail == 0 ? 1 : 0 ))
echo "colcon: $passed passed, $fail failed"
exit $fail
