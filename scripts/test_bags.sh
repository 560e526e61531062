#!/usr/bin/env bash
# `bitvla replay` against bags written and read by an independent implementation: the Python
# `rosbags` package (pure Python, no ROS needed) in a project-local venv (.venv-bags).
# Idempotent. Prints 'bags: N passed, M failed'; exits non-zero on a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv-bags
if ! "$venv/bin/python" -c "import rosbags, PIL, numpy, mcap_ros2, lz4" 2>/dev/null; then
  echo "creating $venv (rosbags, Pillow, numpy)"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r tests/bags/requirements.txt
fi
cargo build --release --quiet --bin bitvla
"$venv/bin/python" tests/bags/test_replay.py "$@"
