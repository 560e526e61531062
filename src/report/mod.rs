//! Reports a person reads: the replay as a self-contained HTML page ([`html`]), from what the
//! replay kept while it ran ([`trace`]), with charts drawn by [`charts`].

pub mod charts;
pub mod html;
pub mod trace;

pub use trace::Trace;
