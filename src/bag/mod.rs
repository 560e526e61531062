//! rosbag2 without ROS: CDR codecs and message definitions ([`msgs`]), reading MCAP and sqlite3
//! bags ([`reader`]) and writing rosbag2 MCAP ([`writer`]).

pub mod cdr;
pub mod episode;
mod mcap_file;
pub mod msgs;
pub mod reader;
pub mod writer;

pub use reader::{BagError, BagMessage, BagReader, Connection, ReadSummary};
pub use writer::{BagWriter, WriteError};
