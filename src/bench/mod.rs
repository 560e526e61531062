//! Benchmarks behind `bitvla bench`: performance is reported as ratios against a baseline and a
//! calibrated peak measured in the same run, as JSON lines (never asserted in `cargo test`).

pub mod attention;
pub mod bag;
pub mod forward;
pub mod kernels;
pub mod machine;
pub mod peak;
