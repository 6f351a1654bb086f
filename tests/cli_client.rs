//! Black-box tests of the client commands: the real `weir` binary (`queue`, `publish`,
//! `consume`, `status`) against a real broker on ephemeral ports.
//!
//! Nothing waits by sleeping: a command's exit is the synchronisation, and every run is
//! bounded by `common::TIMEOUT` (the command is killed and the test fails past it).

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;

use common::{temp_dir, Broker, TIMEOUT};
use serde_json::Value;

/// Runs `weir ARGS --server ADDR` (when `server` is given) with `stdin`, bounded by `TIMEOUT`.
fn weir_at(server: Option<SocketAddr>, args: &[&str], stdin: &[u8]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_weir"));
    command.args(args);
    if let Some(s) = server {
        command.arg("--server").arg(s.to_string());
    }
    common::run_bounded(command, stdin, &format!("{args:?}"))
}

fn weir(broker: &Broker, args: &[&str]) -> Output {
    weir_at(Some(broker.listen), args, b"")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts success and returns stdout.
fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        stdout(&out),
        stderr(&out)
    );
    stdout(&out)
}

fn json(out: Output) -> Value {
    let text = ok(out);
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// `queue info --json` of `name`.
fn info(broker: &Broker, name: &str) -> Value {
    json(weir(broker, &["queue", "info", name, "--json"]))
}

fn lines(n: usize) -> String {
    (0..n).map(|i| format!("line {i}\n")).collect()
}

#[test]
fn declare_then_list_shows_the_queue() {
    let broker = Broker::start(&temp_dir("cli-declare"), &[]);
    let out = ok(weir(&broker, &["queue", "declare", "orders", "--durable"]));
    assert!(out.contains("orders") && out.contains("durable"), "{out}");
    assert!(out.contains("ready"), "{out}");
    // Transient unless --durable, and redeclaring the same is fine.
    let t = json(weir(&broker, &["queue", "declare", "scratch", "--json"]));
    assert_eq!(t["durable"], false);
    assert_eq!(t["name"], "scratch");
    for field in ["shard", "messages_ready", "messages_unacked", "consumers"] {
        assert!(t[field].is_number(), "{field} in {t}");
    }
    ok(weir(&broker, &["queue", "declare", "orders", "--durable"]));

    let table = ok(weir(&broker, &["queue", "list"]));
    let rows: Vec<&str> = table.lines().collect();
    assert!(rows[0].starts_with("NAME"), "{table}");
    assert!(
        rows.iter()
            .any(|r| r.starts_with("orders ") && r.contains("yes")),
        "{table}"
    );
    assert!(rows.iter().any(|r| r.starts_with("scratch ")), "{table}");

    let listed = json(weir(
        &broker,
        &["queue", "list", "--prefix", "ord", "--json"],
    ));
    let listed = listed.as_array().expect("an array");
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["name"], "orders");
    assert_eq!(listed[0]["durable"], true);
    assert_eq!(listed[0]["messages_ready"], 0);

    // Redeclaring with other properties is the broker's refusal, in one line.
    let out = weir(&broker, &["queue", "declare", "orders"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.starts_with("weir queue declare: "), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn publish_stdin_then_consume_count_prints_the_lines_in_order_and_empties_the_queue() {
    let broker = Broker::start(&temp_dir("cli-roundtrip"), &[]);
    ok(weir(&broker, &["queue", "declare", "jobs", "--durable"]));
    let input = lines(100);
    let out = weir_at(
        Some(broker.listen),
        &["publish", "--queue", "jobs"],
        input.as_bytes(),
    );
    let summary = ok(out);
    assert!(
        summary.starts_with("published 100, confirmed 100, refused 0"),
        "{summary}"
    );
    assert_eq!(info(&broker, "jobs")["messages_ready"], 100);

    let printed = ok(weir(
        &broker,
        &["consume", "--queue", "jobs", "--count", "100"],
    ));
    assert_eq!(printed, input);
    let after = info(&broker, "jobs");
    assert_eq!(after["messages_ready"], 0, "{after}");
    assert_eq!(after["messages_unacked"], 0, "{after}");
    assert_eq!(after["consumers"], 0, "{after}");
}

#[test]
fn publish_json_summary_and_message_flag() {
    let broker = Broker::start(&temp_dir("cli-message"), &[]);
    ok(weir(&broker, &["queue", "declare", "greet", "--durable"]));
    let summary = json(weir(
        &broker,
        &[
            "publish",
            "--queue",
            "greet",
            "--message",
            "hello there",
            "--json",
        ],
    ));
    assert_eq!(summary["published"], 1);
    assert_eq!(summary["confirmed"], 1);
    assert_eq!(summary["refused"], 0);
    assert_eq!(summary["durability"], "always");

    // Input without a final newline: the last line is still a message; CRLF is stripped.
    let out = weir_at(
        Some(broker.listen),
        &["publish", "--queue", "greet"],
        b"second\r\nthird",
    );
    assert!(ok(out).starts_with("published 2, confirmed 2"));

    let out = weir(
        &broker,
        &["consume", "--queue", "greet", "--count", "3", "--json"],
    );
    let got: Vec<Value> = ok(out)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    let bodies: Vec<&str> = got.iter().map(|v| v["body"].as_str().unwrap()).collect();
    assert_eq!(bodies, ["hello there", "second", "third"]);
    for v in &got {
        assert_eq!(v["redelivered"], false);
        assert_eq!(v["delivery_count"], 1, "{v}");
        assert_eq!(v["routing_key"], "greet");
        assert!(v["delivery_tag"].is_u64());
    }
    assert_eq!(info(&broker, "greet")["messages_ready"], 0);
}

#[test]
fn publish_to_a_missing_queue_fails_clearly() {
    let broker = Broker::start(&temp_dir("cli-missing"), &[]);
    let out = weir_at(
        Some(broker.listen),
        &["publish", "--queue", "nowhere"],
        b"a\nb\n",
    );
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out).trim(),
        "weir publish: queue 'nowhere' not found"
    );

    let out = weir(&broker, &["consume", "--queue", "nowhere", "--count", "1"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out).trim(),
        "weir consume: queue 'nowhere' not found"
    );

    let out = weir(&broker, &["queue", "delete", "nowhere"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out).trim(),
        "weir queue delete: queue 'nowhere' not found"
    );
}

#[test]
fn a_line_over_the_message_size_limit_is_refused_alone() {
    let broker = Broker::start(&temp_dir("cli-oversized"), &[]);
    ok(weir(&broker, &["queue", "declare", "big", "--durable"]));
    let mut input = b"before\n".to_vec();
    input.extend(std::iter::repeat_n(b'x', 4 << 20));
    input.extend_from_slice(b"\nafter\n");
    let out = weir_at(Some(broker.listen), &["publish", "--queue", "big"], &input);
    assert_eq!(out.status.code(), Some(1));
    let summary = stdout(&out);
    assert!(
        summary.starts_with("published 3, confirmed 2, refused 1"),
        "{summary}"
    );
    let err = stderr(&out);
    assert!(
        err.starts_with("weir publish: 1 of 3 messages refused: "),
        "{err}"
    );
    assert_eq!(
        ok(weir(
            &broker,
            &["consume", "--queue", "big", "--count", "2"]
        )),
        "before\nafter\n"
    );
}

#[test]
fn consume_count_acks_exactly_what_it_printed() {
    let broker = Broker::start(&temp_dir("cli-count"), &[]);
    ok(weir(&broker, &["queue", "declare", "tasks", "--durable"]));
    let input = lines(10);
    ok(weir_at(
        Some(broker.listen),
        &["publish", "--queue", "tasks"],
        input.as_bytes(),
    ));

    let first = ok(weir(
        &broker,
        &["consume", "--queue", "tasks", "--count", "5"],
    ));
    assert_eq!(first, lines(5));
    let left = info(&broker, "tasks");
    assert_eq!(left["messages_ready"], 5, "{left}");
    assert_eq!(left["messages_unacked"], 0, "{left}");

    // The rest were never sent to the first consumer, so they are not redelivered; a
    // prefetch smaller than the count takes the acking path as well as the holding one.
    let rest = weir(
        &broker,
        &[
            "consume",
            "--queue",
            "tasks",
            "--count",
            "5",
            "--prefetch",
            "2",
            "--json",
        ],
    );
    let rest: Vec<Value> = ok(rest)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let bodies: Vec<String> = rest
        .iter()
        .map(|v| format!("{}\n", v["body"].as_str().unwrap()))
        .collect();
    assert_eq!(bodies.concat(), input[lines(5).len()..]);
    assert!(rest.iter().all(|v| v["redelivered"] == false), "{rest:?}");
    let left = info(&broker, "tasks");
    assert_eq!(left["messages_ready"], 0, "{left}");
    assert_eq!(left["messages_unacked"], 0, "{left}");
}

#[test]
fn consume_count_on_an_auto_delete_queue_ends_cleanly() {
    let broker = Broker::start(&temp_dir("cli-autodelete"), &[]);
    ok(weir(
        &broker,
        &["queue", "declare", "brief", "--auto-delete"],
    ));
    ok(weir_at(
        Some(broker.listen),
        &["publish", "--queue", "brief"],
        lines(5).as_bytes(),
    ));
    // The cancel after the third message deletes the queue (its last consumer went), before
    // the held acks arrive: that is not a failure, the queue cannot redeliver them.
    assert_eq!(
        ok(weir(
            &broker,
            &["consume", "--queue", "brief", "--count", "3"]
        )),
        lines(3)
    );
    let out = weir(&broker, &["queue", "info", "brief"]);
    assert_eq!(out.status.code(), Some(1), "auto-deleted");
}

#[test]
fn consume_without_count_runs_until_sigterm_and_acks_what_it_printed() {
    let broker = Broker::start(&temp_dir("cli-sigterm"), &[]);
    ok(weir(&broker, &["queue", "declare", "stream", "--durable"]));
    ok(weir_at(
        Some(broker.listen),
        &["publish", "--queue", "stream"],
        lines(20).as_bytes(),
    ));
    let mut child = Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(["consume", "--queue", "stream", "--server"])
        .arg(broker.listen.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id().to_string();
    let (tx, rx) = mpsc::channel();
    let out = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut got = Vec::new();
    while got.len() < 20 {
        match rx.recv_timeout(TIMEOUT) {
            Ok(line) => got.push(line),
            Err(_) => {
                let _ = child.kill();
                panic!("consume printed only {got:?}");
            }
        }
    }
    let expected: Vec<String> = (0..20).map(|i| format!("line {i}")).collect();
    assert_eq!(got, expected);
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let (tx, done) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = done
        .recv_timeout(TIMEOUT)
        .expect("consume did not exit after SIGTERM")
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let left = info(&broker, "stream");
    assert_eq!(left["messages_ready"], 0, "{left}");
    assert_eq!(left["messages_unacked"], 0, "{left}");
    assert_eq!(left["consumers"], 0, "{left}");
}

#[test]
fn delete_and_purge() {
    let broker = Broker::start(&temp_dir("cli-delete"), &[]);
    ok(weir(&broker, &["queue", "declare", "old", "--durable"]));
    ok(weir_at(
        Some(broker.listen),
        &["publish", "--queue", "old"],
        lines(7).as_bytes(),
    ));

    let out = weir(&broker, &["queue", "delete", "old", "--if-empty"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).starts_with("weir queue delete: "),
        "{}",
        stderr(&out)
    );

    let purged = json(weir(&broker, &["queue", "purge", "old", "--json"]));
    assert_eq!(purged["purged"], 7);
    assert_eq!(info(&broker, "old")["messages_ready"], 0);
    ok(weir_at(
        Some(broker.listen),
        &["publish", "--queue", "old", "--message", "x"],
        b"",
    ));
    assert_eq!(
        ok(weir(&broker, &["queue", "purge", "old"])),
        "purged 1 messages from queue 'old'\n"
    );

    let deleted = ok(weir(&broker, &["queue", "delete", "old", "--if-empty"]));
    assert!(deleted.contains("deleted queue 'old'"), "{deleted}");
    let listed = json(weir(&broker, &["queue", "list", "--json"]));
    assert_eq!(listed, Value::Array(vec![]));
    let out = weir(&broker, &["queue", "info", "old"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out).trim(),
        "weir queue info: queue 'old' not found"
    );
}

#[test]
fn status_shows_shards_and_queue_depths() {
    let broker = Broker::start(&temp_dir("cli-status"), &[]);
    ok(weir(&broker, &["queue", "declare", "alpha", "--durable"]));
    ok(weir(&broker, &["queue", "declare", "beta"]));
    ok(weir_at(
        Some(broker.listen),
        &["publish", "--queue", "alpha"],
        lines(3).as_bytes(),
    ));

    let text = ok(weir(&broker, &["status"]));
    assert!(text.contains("shards"), "{text}");
    for port in &broker.shard_ports {
        assert!(text.contains(&port.to_string()), "{text}");
    }
    assert!(text.contains("alpha") && text.contains("beta"), "{text}");
    let total = text.lines().find(|l| l.starts_with("total")).expect(&text);
    assert_eq!(
        total.split_whitespace().collect::<Vec<_>>(),
        ["total", "2", "3", "0", "0"],
        "{text}"
    );

    let s = json(weir(&broker, &["status", "--json"]));
    assert_eq!(s["shard_count"], broker.shard_ports.len());
    let ports: Vec<u64> = s["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["port"].as_u64().unwrap())
        .collect();
    let expected: Vec<u64> = broker.shard_ports.iter().map(|p| u64::from(*p)).collect();
    assert_eq!(ports, expected);
    assert_eq!(s["totals"]["queues"], 2);
    assert_eq!(s["totals"]["messages_ready"], 3);
    let alpha = s["queues"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["name"] == "alpha")
        .expect("alpha listed");
    assert_eq!(alpha["messages_ready"], 3);
    assert!(s["broker_version"].is_string());
    // From GetStatus: the broker's own counters agree with the queue lists.
    assert!(s["connections"].as_u64().unwrap() >= 1, "{s}");
    assert!(s["uptime_ms"].is_u64(), "{s}");
    let counters = s["counters"].as_object().expect("counters");
    let ready: u64 = counters
        .iter()
        .filter(|(k, _)| k.ends_with(".messages_ready"))
        .map(|(_, v)| v.as_u64().unwrap())
        .sum();
    assert_eq!(ready, 3, "{s}");
    assert!(text.contains("connections"), "{text}");
}

#[test]
fn a_bad_server_address_fails_with_a_clear_message() {
    let out = weir_at(None, &["queue", "list", "--server", "not-an-address"], b"");
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).starts_with("weir queue list: bad --server address 'not-an-address'"),
        "{}",
        stderr(&out)
    );

    // A port nobody listens on (bound, then released).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let out = weir_at(None, &["status", "--server", &addr], b"");
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.starts_with(&format!("weir status: cannot connect to {addr}: ")),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");

    let out = weir_at(
        None,
        &["publish", "--queue", "q", "--server", &addr],
        b"x\n",
    );
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn exchanges_bindings_and_publishing_through_an_exchange() {
    let broker = Broker::start(&temp_dir("cli-exchange"), &[]);
    let out = ok(weir(
        &broker,
        &[
            "exchange",
            "declare",
            "logs",
            "--type",
            "topic",
            "--durable",
        ],
    ));
    assert!(
        out.contains("'logs'") && out.contains("topic") && out.contains("durable"),
        "{out}"
    );
    let bad = weir(
        &broker,
        &[
            "exchange",
            "declare",
            "logs",
            "--type",
            "fanout",
            "--durable",
        ],
    );
    assert_eq!(bad.status.code(), Some(1));
    assert!(stderr(&bad).contains("topic"), "{}", stderr(&bad));
    let bad = weir(&broker, &["exchange", "declare", "x", "--type", "headers"]);
    assert_eq!(
        bad.status.code(),
        Some(2),
        "a kind clap refuses: {}",
        stderr(&bad)
    );
    for q in ["errors", "everything"] {
        ok(weir(&broker, &["queue", "declare", q, "--durable"]));
    }
    ok(weir(
        &broker,
        &["bind", "errors", "logs", "--key", "*.error"],
    ));
    let bound = json(weir(
        &broker,
        &["bind", "everything", "logs", "--key", "#", "--json"],
    ));
    assert_eq!(bound["bound"], true);

    let list = json(weir(&broker, &["exchange", "list", "--json"]));
    assert_eq!(list[0]["name"], "logs");
    assert_eq!(list[0]["kind"], "topic");
    assert_eq!(list[0]["bindings"], 2);
    let table = ok(weir(&broker, &["exchange", "bindings", "logs"]));
    assert!(
        table
            .lines()
            .any(|l| l.contains("errors") && l.contains("*.error")),
        "{table}"
    );
    let only = json(weir(
        &broker,
        &["exchange", "bindings", "--queue", "everything", "--json"],
    ));
    assert_eq!(only.as_array().map(Vec::len), Some(1), "{only}");
    assert_eq!(only[0]["binding_key"], "#");

    // Publishing through the exchange: the key decides.
    let summary = json(weir_at(
        Some(broker.listen),
        &[
            "publish",
            "--exchange",
            "logs",
            "--routing-key",
            "db.error",
            "--json",
        ],
        b"disk full\nreplica lag\n",
    ));
    assert_eq!(summary["confirmed"], 2, "{summary}");
    assert_eq!(summary["exchange"], "logs");
    ok(weir(
        &broker,
        &[
            "publish",
            "--exchange",
            "logs",
            "--routing-key",
            "db.info",
            "--message",
            "ok",
        ],
    ));
    assert_eq!(info(&broker, "errors")["messages_ready"], 2);
    assert_eq!(info(&broker, "everything")["messages_ready"], 3);

    // Mandatory and unroutable: refused (exit 1); without --mandatory, dropped and counted.
    ok(weir(
        &broker,
        &["unbind", "everything", "logs", "--key", "#"],
    ));
    let out = weir(
        &broker,
        &[
            "publish",
            "--exchange",
            "logs",
            "--routing-key",
            "db.info",
            "--mandatory",
            "--message",
            "x",
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(stdout(&out).contains("returned"), "{}", stdout(&out));
    ok(weir(
        &broker,
        &[
            "publish",
            "--exchange",
            "logs",
            "--routing-key",
            "db.info",
            "--message",
            "lost",
        ],
    ));
    let status = ok(weir(&broker, &["status"]));
    assert!(
        status.contains("unroutable  1 messages dropped"),
        "{status}"
    );
    assert!(status.contains("exchanges   1, bindings 1"), "{status}");
    let missing = weir(
        &broker,
        &["publish", "--exchange", "nope", "--message", "x"],
    );
    assert_eq!(missing.status.code(), Some(1));
    assert!(
        stderr(&missing).contains("exchange 'nope' not found"),
        "{}",
        stderr(&missing)
    );

    let in_use = weir(&broker, &["exchange", "delete", "logs", "--if-unused"]);
    assert_eq!(in_use.status.code(), Some(1), "{}", stderr(&in_use));
    ok(weir(&broker, &["exchange", "delete", "logs"]));
    assert_eq!(ok(weir(&broker, &["exchange", "list"])), "no exchanges\n");
}

#[test]
fn queue_arguments_from_the_cli_dead_letter_expired_messages() {
    let broker = Broker::start(&temp_dir("cli-dlx"), &[]);
    ok(weir(&broker, &["queue", "declare", "parked", "--durable"]));
    let out = ok(weir(
        &broker,
        &[
            "queue",
            "declare",
            "waiting",
            "--durable",
            "--message-ttl-ms",
            "100",
            "--max-length",
            "1000",
            "--dead-letter-exchange",
            "",
            "--dead-letter-routing-key",
            "parked",
        ],
    ));
    assert!(
        out.contains("message ttl") && out.contains("100ms"),
        "{out}"
    );
    assert!(out.contains("exchange '', key 'parked'"), "{out}");
    let info = info(&broker, "waiting");
    assert_eq!(info["message_ttl_ms"], 100);
    assert_eq!(info["max_length"], 1000);
    assert_eq!(info["dead_letter_routing_key"], "parked");
    ok(weir_at(
        Some(broker.listen),
        &["publish", "--queue", "waiting"],
        b"first\nsecond\n",
    ));
    // Nobody consumes `waiting`: after 100 ms its messages move to `parked`, where `consume`
    // waits for them (bounded by the harness's timeout).
    let got = ok(weir(
        &broker,
        &["consume", "--queue", "parked", "--count", "2"],
    ));
    assert_eq!(got, "first\nsecond\n");
    // With --json, a dead letter's line says where it died and why.
    ok(weir_at(
        Some(broker.listen),
        &["publish", "--queue", "waiting"],
        b"third\n",
    ));
    let line = json(weir(
        &broker,
        &["consume", "--queue", "parked", "--count", "1", "--json"],
    ));
    assert_eq!(line["body"], "third");
    let deaths = line["deaths"].as_array().expect("a history");
    assert_eq!(deaths.len(), 1, "{line}");
    assert_eq!(
        (
            &deaths[0]["queue"],
            &deaths[0]["reason"],
            &deaths[0]["count"]
        ),
        (
            &Value::from("waiting"),
            &Value::from("expired"),
            &Value::from(1)
        )
    );
    let bad = weir(
        &broker,
        &["queue", "declare", "x", "--dead-letter-routing-key", "k"],
    );
    assert_eq!(
        bad.status.code(),
        Some(2),
        "clap: the key needs the exchange"
    );
}

#[test]
fn queue_expiry_single_active_consumer_and_consumer_priority_from_the_cli() {
    let broker = Broker::start(&temp_dir("cli-expiry-sac"), &[]);
    let declare = [
        "queue",
        "declare",
        "ledger",
        "--durable",
        "--expires-ms",
        "600000",
        "--single-active-consumer",
        "--json",
    ];
    let q = json(weir(&broker, &declare));
    assert_eq!(q["expires_ms"], 600000, "{q}");
    assert_eq!(q["single_active_consumer"], true, "{q}");
    assert!(
        q["expires_in_ms"].as_u64().is_some_and(|l| l <= 600000),
        "{q}"
    );
    assert!(q["active_consumer"].is_null(), "{q}");
    let text = ok(weir(&broker, &["queue", "info", "ledger"]));
    assert!(
        text.contains("expires in") && text.contains("unless used"),
        "{text}"
    );
    assert!(
        text.contains("single active") && text.contains("no consumer"),
        "{text}"
    );

    let input = lines(3);
    let out = weir_at(
        Some(broker.listen),
        &["publish", "--queue", "ledger"],
        input.as_bytes(),
    );
    ok(out);
    let consume = [
        "consume",
        "--queue",
        "ledger",
        "--count",
        "3",
        "--priority",
        "-5",
    ];
    assert_eq!(ok(weir(&broker, &consume)), input);
    let after = info(&broker, "ledger");
    assert!(after["expires_in_ms"].is_number(), "unused again: {after}");

    // The broker's lower bound, in clap's words before any request.
    let out = weir(&broker, &["queue", "declare", "never", "--expires-ms", "0"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("--expires-ms"), "{}", stderr(&out));
}

#[test]
fn retry_delays_from_the_cli_are_declared_shown_and_refused_past_the_limit() {
    let broker = Broker::start(&temp_dir("cli-retry"), &[]);
    let out = ok(weir(
        &broker,
        &[
            "queue",
            "declare",
            "jobs",
            "--durable",
            "--retry-delays-ms",
            "1000,5000,30000",
        ],
    ));
    assert!(out.contains("1000ms, 5000ms, 30000ms"), "{out}");
    assert!(out.contains("retrying"), "{out}");
    let info = info(&broker, "jobs");
    assert_eq!(
        info["retry_delays_ms"],
        serde_json::json!([1000, 5000, 30000])
    );
    assert_eq!(info["messages_retrying"], 0);
    // Past delay_ms_max (a week): refused by the broker, naming the field.
    let bad = weir(
        &broker,
        &["queue", "declare", "late", "--retry-delays-ms", "604800001"],
    );
    assert_ne!(bad.status.code(), Some(0));
    assert!(
        stderr(&bad).contains("retry_delays_ms[0]"),
        "{}",
        stderr(&bad)
    );
}

#[test]
fn priority_queues_from_the_cli_deliver_higher_priorities_first() {
    let broker = Broker::start(&temp_dir("cli-priority"), &[]);
    let out = ok(weir(
        &broker,
        &[
            "queue",
            "declare",
            "jobs",
            "--durable",
            "--priority-max",
            "9",
        ],
    ));
    assert!(out.contains("priority max") && out.contains('9'), "{out}");
    assert_eq!(info(&broker, "jobs")["priority_max"], 9);
    ok(weir_at(
        Some(broker.listen),
        &["publish", "--queue", "jobs"],
        b"low 1\nlow 2\n",
    ));
    ok(weir_at(
        Some(broker.listen),
        &["publish", "--queue", "jobs", "--priority", "5"],
        b"high 1\nhigh 2\n",
    ));
    let got = ok(weir(
        &broker,
        &["consume", "--queue", "jobs", "--count", "4"],
    ));
    assert_eq!(got, "high 1\nhigh 2\nlow 1\nlow 2\n");
    let help = ok(weir_at(None, &["publish", "--help"], b""));
    assert!(help.contains("--priority"), "{help}");
}
