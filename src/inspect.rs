//! `weir inspect`: decode a stream of length-prefixed frames from a file and print each one.
//!
//! Contract: runs on the calling thread, owns nothing beyond its buffers, touches no broker state.
//! It runs the broker's own decoder with the broker's default limits, so what it accepts or
//! refuses is what a live connection would: a malformed frame is reported with its offset and the
//! decoder's error, and decoding stops there, as a connection would close.

use std::io::Read;

use bytes::BytesMut;
use weir_protocol::{FrameDecoder, ProtocolError, WireLimits};

/// What `inspect` found, frame by frame, and why it stopped if it stopped early.
#[derive(Debug)]
pub struct Report {
    /// One line per frame: its offset, size and the decoded frame.
    pub frames: Vec<String>,
    /// The first error, with the offset of the frame that caused it.
    pub error: Option<(u64, ProtocolError)>,
    /// Bytes at the end that do not form a whole frame.
    pub trailing_bytes: usize,
}

/// Reads all of `input` and decodes it as a frame stream.
pub fn inspect(mut input: impl Read) -> std::io::Result<Report> {
    let decoder = FrameDecoder::new(WireLimits::DEFAULT);
    let mut buf = BytesMut::new();
    let mut report = Report {
        frames: Vec::new(),
        error: None,
        trailing_bytes: 0,
    };
    let mut offset = 0u64;
    let mut chunk = vec![0u8; 64 * 1024];
    let mut eof = false;
    loop {
        match decoder.decode(&mut buf) {
            Ok(Some(frame)) => {
                let size = frame.bytes().len() as u64;
                report
                    .frames
                    .push(format!("@{offset} {size} bytes: {:?}", frame.frame()));
                offset += size;
            }
            Ok(None) if !eof => {
                let n = input.read(&mut chunk)?;
                if n == 0 {
                    eof = true;
                } else {
                    buf.extend_from_slice(&chunk[..n]);
                }
            }
            Ok(None) => {
                report.trailing_bytes = buf.len();
                return Ok(report);
            }
            Err(e) => {
                report.error = Some((offset, e));
                return Ok(report);
            }
        }
    }
}
