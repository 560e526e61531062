#!/usr/bin/env bash
# The whole test suite: formatting, lints, the native tests (every SIMD kernel this CPU supports
# against the scalar reference), and the aarch64 kernels under qemu-user.
#
# On a fresh Debian machine it installs what the aarch64 run needs (rust-std for the target, the
# cross linker, qemu-user) when it can (root + apt). Without them it says loudly that the aarch64
# kernels were not tested; with BITVLA_REQUIRE_AARCH64=1 (CI) that is a failure. Then it replays
# bags written by the independent `rosbags` package (a Python venv it creates). Last, it sets up
# ROS 2 Jazzy from the Python wheels and tests bitvla_node in a real graph (BITVLA_REQUIRE_ROS=1
# makes a setup failure fatal).
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

# Every cargo test run is logged so the totals can be printed as one closing line.
log=$(mktemp)
trap 'rm -f "$log"' EXIT
run_tests() { cargo test --quiet --all-targets "$@" 2>&1 | tee -a "$log"; }
summary() {
  awk '/^test result:/ || /^ros: [0-9]+ passed/ || /^bags: [0-9]+ passed/ || /^colcon: [0-9]+ passed/ || /^sim: [0-9]+ passed/ || /^launch: [0-9]+ passed/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
       END { printf "summary: %d passed, %d failed\n", p, f }' "$log"
}

# A setup step that could not run: fatal when $1 (e.g. BITVLA_REQUIRE_ROS) is 1, as in CI;
# otherwise a loud warning that $2 was not tested.
skipped() {
  if [ "${!1:-0}" = "1" ]; then
    echo "error: $2 is required ($1=1) but could not be set up (see above)" >&2
    exit 1
  fi
  echo "WARNING: $2 NOT tested: setup failed (see above)." >&2
}

# bitvla_node in a real ROS 2 graph (ROS 2 Jazzy from the Python wheels; needs x86_64 + CPython
# 3.11 for the wheels). With BITVLA_REQUIRE_ROS=1 (CI) a setup failure is a failure.
ros_tests() {
  step "bitvla_node against a real ROS 2 graph"
  if ! scripts/setup_ros.sh; then
    skipped BITVLA_REQUIRE_ROS "the ROS 2 node"
    return 0
  fi
  if ! scripts/test_ros.sh 2>&1 | tee -a "$log"; then
    echo "error: the ROS 2 node tests failed" >&2
    summary
    exit 1
  fi
  step "the simulated arm in closed loop with the node"
  if ! scripts/test_sim.sh 2>&1 | tee -a "$log"; then
    echo "error: the simulated-arm tests failed" >&2
    summary
    exit 1
  fi
  prune target/ros
  step "colcon packaging: colcon build and the installed layout"
  if ! scripts/test_colcon.sh 2>&1 | tee -a "$log"; then
    echo "error: the colcon packaging check failed" >&2
    summary
    exit 1
  fi
  prune target/ros-colcon
  step "the launch files under ROS 2's launch, from the colcon install"
  if ! scripts/test_launch.sh 2>&1 | tee -a "$log"; then
    echo "error: the launch tests failed" >&2
    summary
    exit 1
  fi
}

# CI machines have little disk: with BITVLA_PRUNE_TARGETS=1 (.ci/run) each phase's build output
# is deleted once no later phase needs it, so the peak is one phase's, not the sum of all.
prune() {
  if [ "${BITVLA_PRUNE_TARGETS:-0}" = "1" ]; then
    rm -rf "$@"
    echo "(pruned $*; $(df -h --output=avail . | tail -1 | tr -d ' ') free)"
  fi
}

step "disk: $(df -h --output=avail . | tail -1 | tr -d ' ') free on $(df --output=target . | tail -1)"
free_kb=$(df --output=avail -k . | tail -1 | tr -d ' ')
if [ "$free_kb" -lt $((4 * 1024 * 1024)) ]; then
  echo "WARNING: under 4 GB free; the suite's builds need about 3 GB with BITVLA_PRUNE_TARGETS=1" \
    "and several more without it. Free space (e.g. 'cargo clean') if a link step fails." >&2
fi

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy (all targets, warnings are errors)"
cargo clippy --all-targets --quiet -- -D warnings

step "cargo test (native: $(uname -m))"
run_tests
prune target/debug

step "aarch64 kernels under qemu-user"
if ! scripts/setup_cross.sh; then
  skipped BITVLA_REQUIRE_AARCH64 "the aarch64 build (cross toolchain)"
else
  run_tests --target aarch64-unknown-linux-gnu
  prune target/aarch64-unknown-linux-gnu
fi

step "headless Chromium for the HTML report"
if ! scripts/setup_browser.sh; then
  skipped BITVLA_REQUIRE_BROWSER "the HTML report in a browser"
fi

step "bitvla replay against bags written and read by rosbags"
if ! scripts/test_bags.sh 2>&1 | tee -a "$log"; then
  echo "error: the bag replay tests failed" >&2
  summary
  exit 1
fi

ros_tests
summary
