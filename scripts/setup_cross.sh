#!/usr/bin/env bash
# Makes `cargo test --target aarch64-unknown-linux-gnu` work on x86-64 Debian: the target's std
# (rustup), the cross linker and qemu-user (apt; the runner is configured in .cargo/config.toml).
# Idempotent; exits non-zero with a reason when something cannot be installed.
set -uo pipefail

if [ "$(uname -m)" = "aarch64" ]; then
  echo "native aarch64: the normal test run covers the NEON kernels"
  exit 1
fi
if ! rustup target list --installed 2>/dev/null | grep -qx aarch64-unknown-linux-gnu; then
  echo "installing rust-std for aarch64-unknown-linux-gnu"
  rustup target add aarch64-unknown-linux-gnu || { echo "rustup could not add the aarch64 target"; exit 1; }
fi
if ! command -v aarch64-linux-gnu-gcc >/dev/null || ! command -v qemu-aarch64 >/dev/null \
   || [ ! -d /usr/aarch64-linux-gnu/lib ]; then
  if [ "$(id -u)" != "0" ] || ! command -v apt-get >/dev/null; then
    echo "need gcc-aarch64-linux-gnu, libc6-dev-arm64-cross and qemu-user (apt, as root)"
    exit 1
  fi
  echo "installing gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null && apt-get install -y -qq gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user >/dev/null \
    || { echo "apt-get could not install the cross toolchain"; exit 1; }
fi
exit 0
