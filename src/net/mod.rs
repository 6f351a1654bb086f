//! Connections: bytes -> frames -> session -> replies -> bytes.
//!
//! - `command`: frames -> typed client commands, borrowed from the frame.
//! - `session`: the protocol state machine of one connection, free of I/O.
//! - `connection`: the I/O shell that drives a session over a socket on its shard.

pub mod command;
pub mod connection;
pub mod session;
