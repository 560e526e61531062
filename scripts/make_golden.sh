#!/usr/bin/env bash
# Regenerates tests/golden/ with the independent PyTorch + transformers reference
# (reference/generate_golden.py): creates a project-local venv with the pinned packages of
# reference/requirements.txt (about 3 GB with torch's CUDA wheels; CPU is enough), writes the tiny
# model with `bitvla make-tiny --seed 0` and runs the reference on it.
#
#   scripts/make_golden.sh            # then: cargo test --test golden_reference
#
# Needs python3 (>= 3.10; installed with apt when missing) and the package registry. CI does not run this; it runs the
# comparison against the committed golden files.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=.venv-reference
if [ ! -x "$venv/bin/python" ]; then
  if ! command -v python3 >/dev/null || ! python3 -m venv "$venv" 2>/dev/null; then
    rm -rf "$venv"
    apt-get update -qq && apt-get install -y -qq python3 python3-venv
    python3 -m venv "$venv"
  fi
fi
"$venv/bin/pip" install --quiet --upgrade pip
"$venv/bin/pip" install --quiet -r reference/requirements.txt

model=$(mktemp -d)
trap 'rm -rf "$model"' EXIT
cargo run --release --quiet -- make-tiny --out "$model" --seed 0
"$venv/bin/python" reference/generate_golden.py --model "$model" --out tests/golden --seed 0
echo "golden files written to tests/golden; check them with: cargo test --test golden_reference"
