//! bitvla_ros: ternary (1.58-bit) BitVLA vision-language-action policies on ROS 2 robots.
//!
//! Layers (each uses only the layers below it; ROS only at the edge):
//! - [`kernels`]: ternary W1.58-A8 GEMM (packing, quantization, SIMD kernels, one dispatch) and
//!   the f32 operations of the model.
//! - [`obs`]: observation preprocessing (camera images to the policy's tensors).
//! - [`model`]: the BitVLA policy: checkpoints, forward pass, `Policy::predict`.
//! - [`runtime`]: the dedicated inference thread (latest-observation mailbox, results channel).
//! - [`control`]: chunk scheduling, the safety gate and command mapping, shared by the ROS node
//!   and the offline replay.
//! - [`replay`] and [`report`]: recorded episodes through the control core, offline, and the
//!   HTML page of a replay.
//! - [`bench`]: the benchmark harness behind `bitvla bench` (peak calibration, interleaving, JSON).

pub mod bag;
pub mod bench;
pub mod control;
pub mod kernels;
pub mod model;
pub mod obs;
pub mod params;
pub mod process;
pub mod replay;
pub mod report;
#[cfg(feature = "ros")]
pub mod ros;
pub mod runtime;
