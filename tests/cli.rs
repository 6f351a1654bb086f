//! Black-box tests of the `weir` binary's offline commands: the real executable, real files.
//!
//! `weir inspect` runs the broker's own frame decoder over a file, so these also show that a
//! malformed frame is reported with its byte offset and a typed reason, and that the frames
//! before it were decoded.

use std::path::PathBuf;
use std::process::{Command, Output};

use bytes::BytesMut;
use weir_protocol::{samples, Encoder, WireLimits, PROTOCOL_VERSION};

fn weir(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(args)
        .output()
        .expect("run weir")
}

fn temp_file(name: &str, bytes: &[u8]) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("cli-{}-{name}", std::process::id()));
    std::fs::write(&path, bytes).expect("write temp file");
    path
}

fn sample_stream() -> BytesMut {
    let mut enc = Encoder::new(WireLimits::DEFAULT);
    let mut out = BytesMut::new();
    for frame in samples::frames() {
        enc.encode(&frame, &mut out).unwrap();
    }
    out
}

#[test]
fn version_names_the_broker_and_protocol_versions() {
    let out = weir(&["--version"]);
    assert!(out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        stdout.trim(),
        format!(
            "weir {} (protocol {PROTOCOL_VERSION})",
            env!("CARGO_PKG_VERSION")
        )
    );
}

#[test]
fn inspect_prints_every_frame_of_a_valid_stream() {
    let path = temp_file("valid", &sample_stream());
    let out = weir(&["inspect", path.to_str().unwrap()]);
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<_> = stdout.lines().collect();
    let bodies = samples::bodies();
    assert_eq!(lines.len(), bodies.len());
    for (line, body) in lines.iter().zip(&bodies) {
        let name = body.body_type().variant_name().unwrap();
        assert!(line.contains(&format!("body_type: {name}")), "{line}");
    }
    assert!(lines[0].starts_with("@0 "), "{}", lines[0]);
}

#[test]
fn inspect_reports_the_offset_and_reason_of_a_malformed_frame() {
    let mut stream = sample_stream();
    let good = stream.len();
    // A frame whose length is plausible but whose bytes are not a flatbuffer.
    stream.extend_from_slice(&16u32.to_le_bytes());
    stream.extend_from_slice(&[0xAB; 16]);
    let path = temp_file("garbage", &stream);
    let out = weir(&["inspect", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains(&format!("frame at byte {good}: malformed frame")),
        "{stderr}"
    );
    assert_eq!(
        String::from_utf8(out.stdout).unwrap().lines().count(),
        samples::bodies().len()
    );
}

#[test]
fn inspect_reports_an_oversized_length_and_a_truncated_tail() {
    let path = temp_file("oversized", &u32::MAX.to_le_bytes());
    let out = weir(&["inspect", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("exceeds frame_size_max"), "{stderr}");

    let stream = sample_stream();
    let path = temp_file("truncated", &stream[..stream.len() - 3]);
    let out = weir(&["inspect", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains("trailing bytes do not form a whole frame"),
        "{stderr}"
    );
}

#[test]
fn inspect_of_a_missing_file_names_it() {
    let out = weir(&["inspect", "/nonexistent/weir-frames"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8(out.stderr)
        .unwrap()
        .contains("/nonexistent/weir-frames"));
}
