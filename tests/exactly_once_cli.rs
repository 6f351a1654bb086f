//! `weir publish --producer-id`: the same lines published twice by the same idempotent producer
//! are stored once; the second run's confirms are duplicates. Two shards, the queue's owner
//! reached through the other shard's port too.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::{queue_on, temp_dir, Broker};
use serde_json::Value;

/// `weir ARGS --server ADDR --json` with `stdin`; the summary it prints.
fn weir_json(server: std::net::SocketAddr, args: &[&str], stdin: &[u8]) -> Value {
    let mut child = Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(args)
        .args(["--server", &server.to_string(), "--json"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run weir");
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().expect("wait for weir");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{args:?}: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

#[test]
fn exactly_once_publish_with_a_producer_id_twice_stores_the_lines_once() {
    let broker = Broker::start(&temp_dir("exactly-once-cli"), &["--cpus", "0,1"]);
    let q = queue_on(1, 2, "eo-cli");
    weir_json(broker.listen, &["queue", "declare", &q, "--durable"], b"");
    let lines: String = (0..200).map(|i| format!("line {i}\n")).collect();
    let publish = ["publish", "--queue", &q, "--producer-id", "9"];
    let first = weir_json(broker.listen, &publish, lines.as_bytes());
    assert_eq!(
        (first["confirmed"].as_u64(), first["duplicates"].as_u64()),
        (Some(200), Some(0))
    );
    let again = weir_json(broker.listen, &publish, lines.as_bytes());
    assert_eq!(
        (again["confirmed"].as_u64(), again["duplicates"].as_u64()),
        (Some(200), Some(200)),
        "{again}"
    );
    // Going on above the last sequence: new messages.
    let more = [
        &publish[..],
        &["--sequence-start", "201", "--message", "later"],
    ]
    .concat();
    let later = weir_json(broker.listen, &more, b"");
    assert_eq!(later["duplicates"].as_u64(), Some(0));
    let info = weir_json(broker.listen, &["queue", "info", &q], b"");
    assert_eq!(info["messages_ready"].as_u64(), Some(201), "{info}");
}
