#!/usr/bin/env bash
# Builds bitvla_node and bitvla (cargo, feature `ros`) against the bitvla_ros interfaces installed
# in PREFIX and installs both binaries to PREFIX/lib/bitvla_ros. The install step of
# CMakeLists.txt calls it after installing the interfaces (`colcon build`); it also works by hand.
#
#   scripts/build_node.sh PREFIX DEFAULT_TARGET_DIR [cargo args, default --release]
#
# $CARGO_TARGET_DIR, when set (scripts/setup_ros.sh's env sets it), wins over DEFAULT_TARGET_DIR so
# that colcon reuses the project's ROS build.
set -euo pipefail
prefix=$1
default_target=$2
shift 2
[ $# -gt 0 ] || set -- --release
src=$(cd "$(dirname "$0")/.." && pwd)
[ -e "$prefix/share/ament_index/resource_index/rosidl_interfaces/bitvla_ros" ] || {
  echo "build_node.sh: no bitvla_ros interfaces installed in $prefix (build them first: colcon build, or scripts/setup_ros.sh)" >&2
  exit 1
}
case ":${AMENT_PREFIX_PATH:-}:" in
  *":$prefix:"*) ;;
  *) export AMENT_PREFIX_PATH="$prefix${AMENT_PREFIX_PATH:+:$AMENT_PREFIX_PATH}" ;;
esac
# r2r generates only the listed packages (no dependency resolution); without a filter it
# generates every package it finds, ours included.
if [ -n "${IDL_PACKAGE_FILTER:-}" ]; then
  case ";$IDL_PACKAGE_FILTER;" in
    *";bitvla_ros;"*) ;;
    *) export IDL_PACKAGE_FILTER="$IDL_PACKAGE_FILTER;bitvla_ros" ;;
  esac
fi
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$default_target}"
profile=debug
for a in "$@"; do [ "$a" = --release ] && profile=release; done
cargo build --manifest-path "$src/Cargo.toml" --features ros --bin bitvla_node --bin bitvla "$@"
mkdir -p "$prefix/lib/bitvla_ros"
for bin in bitvla_node bitvla; do
  install -m 755 "$CARGO_TARGET_DIR/$profile/$bin" "$prefix/lib/bitvla_ros/$bin"
done
echo "installed bitvla_node and bitvla to $prefix/lib/bitvla_ros"
