//! Black-box tests of `weir serve`: the real binary, real sockets, a temporary data directory.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use common::{temp_dir, weir_command, Broker, Client};
use weir_protocol::wire::{self, BodyT, ErrorCode};
use weir_protocol::PROTOCOL_VERSION;

#[test]
fn a_client_handshakes_and_pings_on_the_main_port_and_every_shard_port() {
    let dir = temp_dir("serve-handshake");
    let broker = Broker::start(&dir, &[]);
    let mut c = broker.connect();
    let w = c.handshake();
    assert_eq!(w.protocol_version, PROTOCOL_VERSION);
    assert_eq!(w.broker_version.as_deref(), Some(env!("CARGO_PKG_VERSION")));
    assert_eq!(w.shard_ports.as_deref(), Some(&broker.shard_ports[..]));
    assert_eq!(usize::from(w.shard_count), broker.shard_ports.len());
    assert!(w.shard < w.shard_count);
    assert_eq!(w.durability, wire::Durability::Always);
    let limits = w.limits.expect("limits in Welcome");
    assert_eq!(limits.message_size_max, 960 * 1024);

    let mut ping = wire::PingT::default();
    ping.payload = 0xfeed;
    assert!(
        matches!(c.request(BodyT::Ping(Box::new(ping))), BodyT::Pong(p) if p.payload == 0xfeed)
    );

    for shard in 0..broker.shard_ports.len() {
        let mut s = broker.connect_shard(shard);
        let w = s.handshake();
        assert_eq!(
            usize::from(w.shard),
            shard,
            "the shard port of shard {shard} reached shard {}",
            w.shard
        );
    }
    assert!(std::fs::read_to_string(dir.join("layout.toml"))
        .unwrap()
        .contains("shards = "));
}

#[test]
fn a_malformed_frame_closes_only_its_own_connection() {
    let dir = temp_dir("serve-malformed");
    let broker = Broker::start(&dir, &[]);
    let mut good = broker.connect();
    good.handshake();

    let mut bad = broker.connect();
    bad.handshake();
    bad.send_raw(&16u32.to_le_bytes());
    bad.send_raw(&[0xAB; 16]);
    let e = bad.expect_error(ErrorCode::MalformedFrame);
    assert!(e.close);
    assert!(e.message.unwrap().contains("malformed frame"));
    bad.expect_closed();

    let mut huge = broker.connect();
    huge.send_raw(&u32::MAX.to_le_bytes());
    let e = huge.expect_error(ErrorCode::FrameTooLarge);
    assert!(e.message.unwrap().contains("exceeds frame_size_max"));
    huge.expect_closed();

    // A truncated frame: half a Ping, then the peer shuts its side. Nothing is acted on; the
    // broker closes that connection when the stream ends mid-frame.
    let mut cut = broker.connect();
    cut.handshake();
    let mut half = bytes::BytesMut::new();
    weir_protocol::Encoder::new(weir_protocol::WireLimits::DEFAULT)
        .encode(
            &weir_protocol::frame(9, BodyT::Ping(Box::default())),
            &mut half,
        )
        .unwrap();
    cut.send_raw(&half[..half.len() / 2]);
    cut.stream.shutdown(std::net::Shutdown::Write).unwrap();
    cut.expect_closed();

    let mut ping = wire::PingT::default();
    ping.payload = 7;
    assert!(matches!(good.request(BodyT::Ping(Box::new(ping))), BodyT::Pong(p) if p.payload == 7));
    let mut fresh = broker.connect();
    fresh.handshake();
}

#[test]
fn protocol_rules_are_enforced_with_clear_errors() {
    let dir = temp_dir("serve-rules");
    let broker = Broker::start(&dir, &[]);

    let mut early = broker.connect();
    early.send(BodyT::Ping(Box::default()));
    let e = early.expect_error(ErrorCode::UnexpectedFrame);
    assert!(e.message.unwrap().contains("expected Hello"));
    early.expect_closed();

    let mut old = broker.connect();
    let mut hello = wire::HelloT::default();
    hello.protocol_version = PROTOCOL_VERSION + 1;
    old.send(BodyT::Hello(Box::new(hello)));
    let e = old.expect_error(ErrorCode::ProtocolVersion);
    assert!(e
        .message
        .unwrap()
        .contains(&format!("speaks weir protocol {PROTOCOL_VERSION}")));
    old.expect_closed();

    let mut c = broker.connect();
    c.handshake();
    let id = c.send(BodyT::Close(Box::default()));
    let reply = c.recv().unwrap();
    assert_eq!(reply.request_id, id);
    assert!(matches!(reply.body, BodyT::Ok(_)));
    c.expect_closed();
}

#[test]
fn sigterm_tells_clients_and_exits_zero() {
    let dir = temp_dir("serve-sigterm");
    let broker = Broker::start(&dir, &[]);
    let mut c = broker.connect();
    c.handshake();
    let (status, stderr) = broker.terminate();
    assert!(status.success(), "exit status {status}; stderr: {stderr}");
    let e = c.expect_error(ErrorCode::ShuttingDown);
    assert!(e.close);
    c.expect_closed();
}

#[test]
fn bad_configuration_names_the_key_and_exits_non_zero() {
    let dir = temp_dir("serve-badconfig");
    let run = |args: &[&str]| {
        let out = weir_command()
            .arg("serve")
            .arg("--data-dir")
            .arg(&dir)
            .args(args)
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8(out.stderr).unwrap())
    };
    let (code, err) = run(&["--fsync", "sometimes"]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("--fsync: 'sometimes' is not one of always, interval:MS, never"),
        "{err}"
    );

    let config = dir.join("bad.toml");
    std::fs::write(&config, "[limits]\nprefetch_default = 0\n").unwrap();
    let (code, err) = run(&["--config", config.to_str().unwrap()]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("limits.prefetch_default: must be at least 1"),
        "{err}"
    );

    let (code, err) = run(&["--cpus", "0,4095", "--listen", "127.0.0.1:0"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("cpus: CPU 4095 is not one this process may use"),
        "{err}"
    );
}

#[test]
fn a_data_directory_of_another_shard_count_is_refused() {
    let dir = temp_dir("serve-layout");
    let broker = Broker::start(&dir, &["--cpus", "0"]);
    let (status, _) = broker.terminate();
    assert!(status.success());
    let out = weir_testkit::Serve::new(env!("CARGO_BIN_EXE_weir"))
        .data_dir(&dir)
        .args(["--cpus", "0,1"])
        .command()
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("holds the queues of 1 shards, but this configuration runs 2"),
        "{err}"
    );
}

#[test]
fn a_shard_over_its_connection_limit_refuses_with_a_reason() {
    let dir = temp_dir("serve-connlimit");
    let config = dir.join("weir.toml");
    std::fs::write(
        &config,
        "cpus = [0]\n[limits]\nconnections_per_shard_max = 2\n",
    )
    .unwrap();
    let broker = Broker::start(&dir, &["--config", config.to_str().unwrap()]);
    let mut a = broker.connect();
    a.handshake();
    let mut b = broker.connect();
    b.handshake();
    let mut c = Client::connect(broker.listen);
    let e = c.expect_error(ErrorCode::ConnectionLimit);
    assert!(e.message.unwrap().contains("connections_per_shard_max = 2"));
    c.expect_closed();
    // The refused connection cost the others nothing.
    let mut ping = wire::PingT::default();
    ping.payload = 1;
    assert!(matches!(
        b.request(BodyT::Ping(Box::new(ping))),
        BodyT::Pong(_)
    ));
    assert!(matches!(
        a.request(BodyT::Ping(Box::default())),
        BodyT::Pong(_)
    ));
}

#[test]
fn a_connection_without_hello_by_the_deadline_is_told_and_closed() {
    let dir = temp_dir("serve-hello-deadline");
    let config = dir.join("weir.toml");
    std::fs::write(&config, "[limits]\nhandshake_timeout_ms = 300\n").unwrap();
    let broker = Broker::start(&dir, &["--config", config.to_str().unwrap()]);
    // Says Hello in time: stays open past the deadline.
    let mut talker = broker.connect();
    talker.handshake();
    // Never says anything: closed (the harness's read timeout bounds the wait).
    let mut silent = Client::connect(broker.listen);
    let e = silent.expect_error(ErrorCode::ConnectionLimit);
    assert_eq!(e.message.as_deref(), Some("no Hello within 300 ms"));
    assert!(e.close);
    silent.expect_closed();
    // The silent one's deadline has passed, so the talker's has too; sleeping longer still
    // makes the condition certain (it creates it, it does not wait for the broker).
    std::thread::sleep(std::time::Duration::from_millis(900));
    assert!(matches!(
        talker.request(BodyT::Ping(Box::default())),
        BodyT::Pong(_)
    ));
}

#[test]
#[cfg_attr(
    not(debug_assertions),
    ignore = "WEIR_TEST_PANIC_SHARD exists only in debug builds"
)]
fn a_panicking_shard_ends_the_whole_process() {
    use std::os::unix::process::ExitStatusExt;
    const SIGABRT: i32 = 6;
    let serve = weir_testkit::Serve::new(env!("CARGO_BIN_EXE_weir"))
        .data_dir(temp_dir("serve-fail-stop"))
        .args(["--cpus", "0,1"])
        .env("WEIR_TEST_PANIC_SHARD", "1")
        .ready_timeout(common::TIMEOUT);
    let mut broker = serve.start().unwrap_or_else(|e| panic!("{e}"));
    // Only shard 1 panics (on accepting this); without fail-stop shard 0 would go on serving.
    let _doomed = std::net::TcpStream::connect((broker.listen.ip(), broker.shard_ports[1]))
        .expect("connect to shard 1");
    let status = broker
        .wait_exit(common::TIMEOUT)
        .expect("the broker exits when a shard panics, not only that shard's thread");
    assert_eq!(status.signal(), Some(SIGABRT), "{status}");
    let stderr = broker.stderr();
    assert!(stderr.contains("panics on purpose"), "{stderr}");
    assert!(stderr.contains("fail-stop"), "{stderr}");
    // No "nothing listens on its port any more" check: the process is gone (its exit status
    // says so), and a test running alongside may already have been given the freed port.
}

/// Runs a `weir serve` expected to refuse to start: its exit code and stderr. One that starts
/// instead (prints its ready line) is killed and fails the test rather than hang it.
fn expect_refusal(mut cmd: Command) -> (Option<i32>, String) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    if line.starts_with(weir_testkit::READY_PREFIX) {
        let _ = child.kill();
        let _ = child.wait();
        panic!("the second broker started: {line}");
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A queue declared through one connection is seen through fresh ones: the broker is the one
/// listening, whichever connection the kernel hands it.
fn assert_serves(broker: &Broker, queue: &str) {
    let mut c = broker.connect();
    c.handshake();
    c.declare(queue);
    for _ in 0..4 {
        let mut fresh = broker.connect();
        fresh.handshake();
        let info = fresh.info(queue);
        assert!(matches!(info, BodyT::QueueInfo(_)), "{queue}: {info:?}");
    }
}

#[test]
fn a_second_broker_on_a_data_directory_in_use_is_refused_naming_the_holder() {
    let dir = temp_dir("serve-dirlock");
    let a = Broker::start(&dir, &[]);
    assert_serves(&a, "before");
    let b = weir_testkit::Serve::new(env!("CARGO_BIN_EXE_weir"))
        .data_dir(&dir)
        .command();
    let (code, err) = expect_refusal(b);
    assert_eq!(code, Some(1), "{err}");
    let expected = format!(
        "data directory {} is in use by another weir (pid {})",
        dir.display(),
        a.pid().unwrap()
    );
    assert!(err.contains(&expected), "{err}");
    assert_serves(&a, "after");
}

#[test]
fn a_crashed_broker_leaves_no_stale_lock_on_its_data_directory() {
    let dir = temp_dir("serve-stalelock");
    let a = Broker::start(&dir, &[]);
    assert_serves(&a, "kept");
    let dir = a.crash();
    let b = Broker::start(&dir, &[]);
    let mut c = b.connect();
    c.handshake();
    assert!(matches!(c.info("kept"), BodyT::QueueInfo(_)));
}

#[test]
fn a_port_another_broker_listens_on_is_refused_naming_the_address() {
    let a = Broker::start(&temp_dir("serve-port-a"), &[]);
    let dir_b = temp_dir("serve-port-b");
    let serve_b = |listen: &str, shard_port_base: u16| {
        let mut cmd = weir_command();
        cmd.args(["serve", "--listen", listen, "--shard-port-base"])
            .arg(shard_port_base.to_string())
            .arg("--data-dir")
            .arg(&dir_b)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null());
        cmd
    };

    let (code, err) = expect_refusal(serve_b(&a.listen.to_string(), 0));
    assert_eq!(code, Some(1), "{err}");
    let expected = format!(
        "listen: address {} is in use (by another process?)",
        a.listen
    );
    assert!(err.contains(&expected), "{err}");

    let shard_port = a.shard_ports[0];
    let (code, err) = expect_refusal(serve_b("127.0.0.1:0", shard_port));
    assert_eq!(code, Some(1), "{err}");
    let expected = format!("shard 0 port: address 127.0.0.1:{shard_port} is in use");
    assert!(err.contains(&expected), "{err}");

    assert_serves(&a, "still-a");
}
