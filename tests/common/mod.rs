//! Test harness for black-box tests: the real `weir` binary on 127.0.0.1, ephemeral ports, a
//! temporary data directory, and a blocking protocol client over a real socket.
//!
//! Nothing here synchronises by sleeping: the broker says when it is ready (its ready line on
//! stdout), and every read has a timeout so a broken broker fails the test instead of hanging it.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use bytes::BytesMut;
use weir_protocol::wire::{self, BodyT, FrameT};
use weir_protocol::{Encoder, FrameDecoder, WireLimits, PROTOCOL_VERSION};

/// Longest any single wait may take before the test fails.
pub const TIMEOUT: Duration = Duration::from_secs(20);

/// A fresh directory under cargo's per-test temporary directory.
pub fn temp_dir(name: &str) -> PathBuf {
    weir_testkit::fresh_dir(env!("CARGO_TARGET_TMPDIR"), name)
}

pub fn weir_command() -> Command {
    Command::new(env!("CARGO_BIN_EXE_weir"))
}

/// A running broker (weir-testkit's), killed with SIGKILL when dropped; its data directory is
/// removed then unless the test failed.
pub struct Broker(weir_testkit::Broker);

impl std::ops::Deref for Broker {
    type Target = weir_testkit::Broker;
    fn deref(&self) -> &weir_testkit::Broker {
        &self.0
    }
}

impl Broker {
    /// Starts `weir serve` on ephemeral ports with `data_dir` and `extra` arguments, and waits for
    /// its ready line. `WEIR_TEST_LOG=filter` debugs a test: the broker logs at that filter to
    /// `weir.log` in its data directory.
    pub fn start(data_dir: &Path, extra: &[&str]) -> Broker {
        let mut serve = weir_testkit::Serve::new(env!("CARGO_BIN_EXE_weir"))
            .data_dir(data_dir)
            .args(extra)
            .ready_timeout(TIMEOUT);
        if let Ok(filter) = std::env::var("WEIR_TEST_LOG") {
            serve = serve
                .rust_log(filter)
                .stderr_to_file(data_dir.join("weir.log"));
        }
        Broker(serve.start().unwrap_or_else(|e| panic!("{e}")))
    }

    pub fn connect(&self) -> Client {
        Client::connect(self.listen)
    }

    pub fn connect_shard(&self, shard: usize) -> Client {
        Client::connect(SocketAddr::new(self.listen.ip(), self.shard_ports[shard]))
    }

    /// Kills the broker with SIGKILL (no shutdown at all) and hands back its data directory, kept
    /// for a broker started on it next.
    pub fn crash(mut self) -> PathBuf {
        self.0.kill();
        self.0.keep_data();
        self.0.data_dir.clone()
    }

    /// Sends SIGTERM and waits for the exit status. The data directory is kept.
    pub fn terminate(mut self) -> (std::process::ExitStatus, String) {
        self.0.keep_data();
        let stopped = self.0.stop(TIMEOUT);
        let status = stopped
            .status()
            .unwrap_or_else(|| panic!("no exit status: {stopped}"));
        (status, self.0.stderr())
    }
}

/// A blocking protocol client for tests.
pub struct Client {
    pub stream: TcpStream,
    rx: BytesMut,
    decoder: FrameDecoder,
    encoder: Encoder,
    next_request: u64,
    /// Pushes (deliveries, confirms, ...) that arrived while a reply was awaited.
    pushed: std::collections::VecDeque<FrameT>,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect(addr).expect("connect");
        stream.set_read_timeout(Some(TIMEOUT)).unwrap();
        stream.set_nodelay(true).unwrap();
        Client {
            stream,
            rx: BytesMut::new(),
            decoder: FrameDecoder::new(WireLimits::DEFAULT),
            encoder: Encoder::new(WireLimits::DEFAULT),
            next_request: 1,
            pushed: std::collections::VecDeque::new(),
        }
    }

    /// Sends a request with a fresh id; returns the id.
    pub fn send(&mut self, body: BodyT) -> u64 {
        let id = self.next_request;
        self.next_request += 1;
        let mut out = BytesMut::new();
        self.encoder
            .encode(&weir_protocol::frame(id, body), &mut out)
            .unwrap();
        self.stream.write_all(&out).unwrap();
        id
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    /// The next frame, or `None` at end of stream. Panics on a timeout.
    pub fn recv(&mut self) -> Option<FrameT> {
        if let Some(f) = self.pushed.pop_front() {
            return Some(f);
        }
        self.recv_wire()
    }

    fn recv_wire(&mut self) -> Option<FrameT> {
        loop {
            if let Some(frame) = self
                .decoder
                .decode(&mut self.rx)
                .expect("the broker sent a malformed frame")
            {
                return Some(frame.frame().unpack());
            }
            let mut chunk = [0u8; 65536];
            match self.stream.read(&mut chunk) {
                Ok(0) => return None,
                Ok(n) => self.rx.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return None,
                Err(e) => panic!("reading from the broker: {e}"),
            }
        }
    }

    /// Sends a request and returns its reply, checking the echoed id.
    /// Pushes that arrive first (request id 0: deliveries, confirms) are kept for `recv`.
    pub fn request(&mut self, body: BodyT) -> BodyT {
        let id = self.send(body);
        loop {
            let reply = self
                .recv_wire()
                .expect("the broker closed instead of replying");
            if reply.request_id == 0 && !matches!(reply.body, BodyT::Error(_)) {
                self.pushed.push_back(reply);
                continue;
            }
            assert_eq!(reply.request_id, id, "reply to another request: {reply:?}");
            return reply.body;
        }
    }

    /// `Hello` with our protocol version; returns the `Welcome`.
    pub fn handshake(&mut self) -> wire::WelcomeT {
        let mut hello = wire::HelloT::default();
        hello.protocol_version = PROTOCOL_VERSION;
        hello.client_name = Some("weir-tests".into());
        match self.request(BodyT::Hello(Box::new(hello))) {
            BodyT::Welcome(w) => *w,
            other => panic!("expected Welcome, got {other:?}"),
        }
    }

    /// Expects an `Error` frame with `code`; returns it.
    pub fn expect_error(&mut self, code: wire::ErrorCode) -> wire::ErrorT {
        match self.recv().map(|f| f.body) {
            Some(BodyT::Error(e)) if e.code == code => *e,
            other => panic!("expected an Error {code:?}, got {other:?}"),
        }
    }

    /// Expects the broker to close the connection.
    pub fn expect_closed(&mut self) {
        assert!(
            self.recv().is_none(),
            "expected the broker to close the connection"
        );
    }
}

/// A message body and its delivery as a consumer saw it.
#[derive(Debug, Clone)]
pub struct Got {
    pub consumer_tag: String,
    pub delivery_tag: u64,
    pub redelivered: bool,
    pub delivery_count: u32,
    pub body: Vec<u8>,
}

impl Client {
    pub fn declare(&mut self, name: &str) -> wire::QueueInfoT {
        let mut d = wire::DeclareQueueT::default();
        d.name = Some(name.to_string());
        d.durable = true;
        match self.request(BodyT::DeclareQueue(Box::new(d))) {
            BodyT::QueueInfo(i) => *i,
            other => panic!("declare {name}: {other:?}"),
        }
    }

    pub fn declare_with(&mut self, d: wire::DeclareQueueT) -> BodyT {
        self.request(BodyT::DeclareQueue(Box::new(d)))
    }

    pub fn info(&mut self, name: &str) -> BodyT {
        let mut g = wire::GetQueueInfoT::default();
        g.name = name.to_string();
        self.request(BodyT::GetQueueInfo(Box::new(g)))
    }

    /// Journal segment files in use, summed over every shard (from `GetStatus`).
    pub fn journal_segments(&mut self) -> u64 {
        let BodyT::Status(st) = self.request(BodyT::GetStatus(Box::default())) else {
            panic!("no Status")
        };
        st.counters
            .expect("Status carries counters")
            .into_iter()
            .filter(|c| c.name.ends_with(".journal.segments"))
            .map(|c| c.value)
            .sum()
    }

    /// Publishes one message per body to the default exchange (`queue` as the routing key),
    /// with sequence numbers starting at `first_seq`.
    pub fn publish(&mut self, queue: &str, first_seq: u64, bodies: &[&[u8]], mandatory: bool) {
        self.publish_with(queue, first_seq, bodies, mandatory, true)
    }

    /// As `publish`, choosing the messages' `persistent` property.
    pub fn publish_with(
        &mut self,
        queue: &str,
        first_seq: u64,
        bodies: &[&[u8]],
        mandatory: bool,
        persistent: bool,
    ) {
        let props = weir_protocol::MessageProps {
            persistent,
            ..Default::default()
        };
        let messages: Vec<bytes::Bytes> = bodies
            .iter()
            .map(|b| self.encoder.message(&props, b).unwrap())
            .collect();
        let items = messages
            .iter()
            .enumerate()
            .map(|(i, m)| weir_protocol::PublishItem {
                sequence: first_seq + i as u64,
                exchange: "",
                routing_key: queue,
                mandatory,
                message: m,
            });
        let mut out = BytesMut::new();
        self.encoder
            .publish(&mut out, 0, None, true, items)
            .unwrap();
        self.stream.write_all(&out).unwrap();
    }

    /// Reads until the sequences `first..=last` are all confirmed; returns the other frames seen.
    pub fn await_confirms(&mut self, first: u64, last: u64) -> Vec<FrameT> {
        self.await_confirms_with(first, last).0
    }

    /// As `await_confirms`, also returning the durability each sequence was confirmed with.
    pub fn await_confirms_with(
        &mut self,
        first: u64,
        last: u64,
    ) -> (Vec<FrameT>, Vec<wire::Durability>) {
        let mut confirmed = std::collections::BTreeMap::new();
        let mut others = Vec::new();
        while (first..=last).any(|s| !confirmed.contains_key(&s)) {
            let f = self.recv().expect("closed while waiting for confirms");
            match &f.body {
                BodyT::Confirm(c) => {
                    for r in &c.ranges {
                        for s in r.first..=r.last {
                            confirmed.insert(s, c.durability);
                        }
                    }
                }
                _ => others.push(f),
            }
        }
        (others, (first..=last).map(|s| confirmed[&s]).collect())
    }

    pub fn consume(
        &mut self,
        queue: &str,
        tag: &str,
        prefetch: u32,
        auto_ack: bool,
    ) -> wire::ConsumeOkT {
        let mut c = wire::ConsumeT::default();
        c.queue = queue.to_string();
        c.consumer_tag = Some(tag.to_string());
        c.prefetch = prefetch;
        c.auto_ack = auto_ack;
        match self.request(BodyT::Consume(Box::new(c))) {
            BodyT::ConsumeOk(ok) => *ok,
            other => panic!("consume {queue}: {other:?}"),
        }
    }

    /// Reads frames until `n` deliveries arrived; panics on anything but deliveries.
    pub fn deliveries(&mut self, n: usize) -> Vec<Got> {
        let mut got = Vec::new();
        while got.len() < n {
            let f = self.recv().expect("closed while waiting for deliveries");
            let BodyT::Deliver(d) = f.body else {
                panic!("expected deliveries, got {f:?}")
            };
            for x in d.deliveries {
                let m = weir_protocol::verify_message(&x.message, &WireLimits::DEFAULT)
                    .unwrap()
                    .unpack();
                got.push(Got {
                    consumer_tag: d.consumer_tag.clone().unwrap_or_default(),
                    delivery_tag: x.delivery_tag,
                    redelivered: x.redelivered,
                    delivery_count: x.delivery_count,
                    body: m.body.unwrap_or_default(),
                });
            }
        }
        got
    }

    /// Acks delivery tags (one range each), asking for a reply, and waits for it.
    pub fn ack(&mut self, tags: &[u64]) {
        let mut a = wire::AckT::default();
        a.ranges = tags
            .iter()
            .map(|t| wire::RangeT {
                first: *t,
                last: *t,
            })
            .collect();
        match self.request(BodyT::Ack(Box::new(a))) {
            BodyT::Ok(_) => {}
            other => panic!("ack: {other:?}"),
        }
    }
}

/// A queue name whose hash places it on `shard` of `shards`.
pub fn queue_on(shard: u16, shards: u16, prefix: &str) -> String {
    (0..)
        .map(|i| format!("{prefix}-{i}"))
        .find(|n| weir::mesh::types::placement(n, shards) == shard)
        .unwrap()
}

/// A one-shard broker with its data in `data` (e.g. on a loop-mounted small filesystem) and its config and log
/// in a temporary directory `name` outside it, with `limits` (lines of the `[limits]` table).
pub fn start_on_data_dir(data: &std::path::Path, name: &str, limits: &str) -> weir_testkit::Broker {
    let outside = temp_dir(name);
    let config = outside.join("weir.toml");
    std::fs::write(&config, format!("cpus = [0]\n[limits]\n{limits}\n")).unwrap();
    weir_testkit::Serve::new(env!("CARGO_BIN_EXE_weir"))
        .data_dir(data)
        .args(["--config", config.to_str().unwrap()])
        .rust_log("warn")
        .stderr_to_file(outside.join("weir.log"))
        .ready_timeout(TIMEOUT)
        .start()
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Runs `command` to its end with `stdin` as its input, at most `TIMEOUT` (then it is killed and
/// the test fails naming `what`). A writer thread feeds the input, so a command that does not
/// read it cannot block the test.
#[allow(dead_code)] // not every test binary runs commands
pub fn run_bounded(mut command: Command, stdin: &[u8], what: &str) -> std::process::Output {
    use std::process::Stdio;
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run weir");
    let pid = child.id();
    let mut input = child.stdin.take().expect("stdin piped");
    let stdin = stdin.to_vec();
    std::thread::spawn(move || {
        let _ = input.write_all(&stdin);
    });
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(TIMEOUT) {
        Ok(out) => out.expect("wait for weir"),
        Err(_) => {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            panic!("weir {what} did not finish within {TIMEOUT:?}");
        }
    }
}
