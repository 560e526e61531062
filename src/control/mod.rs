//! Plain-Rust control core shared by the ROS node and the offline replay (one scheduler, one
//! safety layer, one command mapping; only the clock differs): action chunks in, one gated
//! command per control tick out.

pub mod core;
pub mod mapping;
pub mod safety;
pub mod scheduler;

pub use core::{Command, CommandMode, ControlCore, CoreConfig, CoreStats, TickOutput};
pub use mapping::{EeScales, pose_target, twist};
pub use safety::{Hold, SafetyConfig, SafetyInputs};
pub use scheduler::{ChunkScheduler, SchedulerConfig, Tick};
