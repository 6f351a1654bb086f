//! Black-box tests of what an operator meets: `weir top`, the ready line's facts, JSON logs
//! with shard and connection spans, the errors a newcomer meets (RUST_LOG, memlock, config
//! files, a redeclare), and the CLI's publish options and nack/reject.
//!
//! Nothing waits by sleeping: a command's exit or the broker's ready line is the
//! synchronisation, a log line is polled for with a deadline, and every run is bounded by
//! `common::TIMEOUT`.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Instant;

use common::{temp_dir, Broker, TIMEOUT};
use serde_json::Value;

/// Runs `weir ARGS --server ADDR` with `stdin`, bounded by `TIMEOUT`.
fn weir_at(server: Option<SocketAddr>, args: &[&str], stdin: &[u8]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_weir"));
    command.args(args);
    if let Some(s) = server {
        command.arg("--server").arg(s.to_string());
    }
    finish(command, stdin, &format!("{args:?}"))
}

/// Runs `command` to its end, at most `TIMEOUT`.
fn finish(command: Command, stdin: &[u8], what: &str) -> Output {
    common::run_bounded(command, stdin, what)
}

fn weir(broker: &Broker, args: &[&str]) -> Output {
    weir_at(Some(broker.listen), args, b"")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

fn json(out: Output) -> Value {
    let t = ok(out);
    serde_json::from_str(t.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {t}"))
}

/// A queue with `n` persistent messages "m0".."m{n-1}".
fn queue_with(broker: &Broker, queue: &str, n: usize) {
    ok(weir(broker, &["queue", "declare", queue, "--durable"]));
    let lines: String = (0..n).map(|i| format!("m{i}\n")).collect();
    ok(weir_at(
        Some(broker.listen),
        &["publish", "--queue", queue],
        lines.as_bytes(),
    ));
}

fn info(broker: &Broker, queue: &str) -> Value {
    json(weir(broker, &["queue", "info", queue, "--json"]))
}

#[test]
fn top_shows_each_queue_with_its_depth_deepest_first_and_rates_from_the_second_sample() {
    let dir = temp_dir("top");
    let broker = Broker::start(&dir, &["--cpus", "0,1"]);
    queue_with(&broker, "orders", 5);
    queue_with(&broker, "audit", 2);

    let out = ok(weir(
        &broker,
        &["top", "--iterations", "2", "--interval", "0.1"],
    ));
    assert!(
        out.contains("(sample 1)") && out.contains("(sample 2)"),
        "{out}"
    );
    assert!(!out.contains("(sample 3)"), "{out}");
    let frames: Vec<&str> = out.split("weir top:").filter(|f| !f.is_empty()).collect();
    assert_eq!(frames.len(), 2, "{out}");
    for frame in &frames {
        let rows: Vec<Vec<&str>> = frame
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .filter(|w| w.first().is_some_and(|n| *n == "orders" || *n == "audit"))
            .collect();
        // Deepest first; READY is the third column (after QUEUE and SHARD).
        assert_eq!(rows.len(), 2, "{frame}");
        assert_eq!((rows[0][0], rows[0][2]), ("orders", "5"), "{frame}");
        assert_eq!((rows[1][0], rows[1][2]), ("audit", "2"), "{frame}");
        assert!(frame.contains("COMMITS/S"), "{frame}");
    }
    // The first sample has no rate yet; the second has one (the depth did not move).
    let ready_rate = |frame: &str| {
        let row: Vec<String> = frame
            .lines()
            .find(|l| l.starts_with("orders"))
            .unwrap()
            .split_whitespace()
            .map(String::from)
            .collect();
        row[7].clone()
    };
    assert_eq!(ready_rate(frames[0]), "-", "{}", frames[0]);
    assert_eq!(ready_rate(frames[1]), "+0.0", "{}", frames[1]);

    // --prefix narrows it; --json is one object per sample.
    let out = ok(weir(
        &broker,
        &[
            "top",
            "--iterations",
            "2",
            "--interval",
            "0.1",
            "--prefix",
            "ord",
            "--json",
        ],
    ));
    let samples: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert_eq!(samples.len(), 2, "{out}");
    for s in &samples {
        let queues = s["queues"].as_array().unwrap();
        assert_eq!(queues.len(), 1, "{s}");
        assert_eq!(queues[0]["name"], "orders");
        assert_eq!(queues[0]["messages_ready"], 5);
        assert_eq!(s["shards"].as_array().unwrap().len(), 2, "{s}");
    }
    assert!(samples[0]["queues"][0]["messages_ready_per_s"].is_null());
    assert_eq!(samples[1]["queues"][0]["messages_ready_per_s"], 0.0);
    assert!(samples[1]["shards"][0]["journal_commits_per_s"].is_number());
}

/// The ready line of `child`, read from its stdout within `TIMEOUT`.
fn ready_line_of(child: &mut Child) -> String {
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    rx.recv_timeout(TIMEOUT).expect("a ready line")
}

#[test]
fn the_ready_line_names_the_absolute_data_directory_new_or_recovered_and_the_fsync_interval() {
    let dir = temp_dir("ready-line");
    let broker = Broker::start(&dir, &["--cpus", "0,1", "--fsync", "interval:5"]);
    let line = broker.ready_line.clone();
    let absolute = std::fs::canonicalize(&dir).unwrap();
    assert!(line.contains("fsync interval 5 ms"), "{line}");
    assert!(
        line.contains(&format!(
            "data_dir {} (new: created empty",
            absolute.display()
        )),
        "{line}"
    );
    let dir = broker.crash();

    let broker = Broker::start(&dir, &["--cpus", "0,1"]);
    let line = broker.ready_line.clone();
    assert!(
        line.contains("(recovered: 0 durable queues, 0 messages)"),
        "not new the second time: {line}"
    );
    queue_with(&broker, "kept", 3);
    queue_with(&broker, "also-kept", 1);
    let dir = broker.crash();
    let broker = Broker::start(&dir, &["--cpus", "0,1"]);
    let line = broker.ready_line.clone();
    assert!(line.contains("fsync always"), "{line}");
    assert!(
        line.contains(&format!(
            "data_dir {} (recovered: 2 durable queues, 4 messages)",
            absolute.display()
        )),
        "{line}"
    );
    drop(broker);

    // The default is relative to the working directory: the line says where it really is.
    let cwd = temp_dir("ready-line-cwd");
    let mut child = Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(["serve", "--listen", "127.0.0.1:0", "--shard-port-base", "0"])
        .args(["--cpus", "0"])
        .current_dir(&cwd)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let line = ready_line_of(&mut child);
    let _ = child.kill();
    let _ = child.wait();
    let expected = std::fs::canonicalize(&cwd).unwrap().join("weir-data");
    assert!(
        line.contains(&format!("data_dir {} (new:", expected.display())),
        "{line}"
    );
    let _ = std::fs::remove_dir_all(&cwd);
}

#[test]
fn json_logs_carry_the_shard_and_the_connection_of_each_line() {
    let dir = temp_dir("json-logs");
    let log = dir.with_extension("log");
    let broker = weir_testkit::Serve::new(env!("CARGO_BIN_EXE_weir"))
        .data_dir(&dir)
        .args(["--cpus", "0,1", "--log-format", "json"])
        .rust_log("info")
        .stderr_to_file(&log)
        .ready_timeout(TIMEOUT)
        .start()
        .unwrap_or_else(|e| panic!("{e}"));
    let shard_1 = SocketAddr::new(broker.listen.ip(), broker.shard_ports[1]);
    let mut client = common::Client::connect(shard_1);
    client.handshake();

    // The connection's `hello` line is written as it is handled; poll the file for it.
    let deadline = Instant::now() + TIMEOUT;
    let (lines, hello) = loop {
        let content = std::fs::read_to_string(&log).unwrap_or_default();
        // Whole lines only: the last one may be half written.
        let whole = &content[..content.rfind('\n').map_or(0, |i| i + 1)];
        let lines: Vec<Value> = whole
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect();
        if let Some(h) = lines
            .iter()
            .find(|l| l["fields"]["message"] == "hello")
            .cloned()
        {
            break (lines, h);
        }
        assert!(Instant::now() < deadline, "no hello line in:\n{content}");
        std::thread::sleep(std::time::Duration::from_millis(10)); // a poll, bounded above
    };
    let spans = hello["spans"].as_array().expect("a span list");
    let shard = spans.iter().find(|s| s["name"] == "shard").expect("shard");
    assert_eq!(shard["shard"], 1, "{hello}");
    let connection = spans
        .iter()
        .find(|s| s["name"] == "connection")
        .expect("connection span");
    assert_eq!(
        connection["connection"].as_u64().map(|id| id >> 48),
        Some(1),
        "the connection id carries its shard: {hello}"
    );
    // Shard threads' own lines carry their shard too.
    assert!(
        lines
            .iter()
            .any(|l| l["fields"]["message"] == "serving" && l["span"]["shard"] == 0),
        "{lines:?}"
    );
    drop(broker);
    let _ = std::fs::remove_file(log);
}

/// `weir serve` that is expected to refuse to start: its output, within `TIMEOUT`.
fn serve_refused(data: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_weir"));
    command
        .args(["serve", "--listen", "127.0.0.1:0", "--shard-port-base", "0"])
        .args(["--cpus", "0", "--data-dir"])
        .arg(data)
        .args(args);
    for (k, v) in env {
        command.env(k, v);
    }
    let out = finish(command, b"", &format!("serve {args:?}"));
    assert!(!out.status.success(), "it started: {}", text(&out.stdout));
    out
}

#[test]
fn a_bad_rust_log_is_refused_naming_the_directive() {
    let dir = temp_dir("rust-log");
    let out = serve_refused(&dir, &[], &[("RUST_LOG", "info,weir=loud")]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("RUST_LOG: directive 'weir=loud' is not valid"),
        "{err}"
    );
}

#[test]
fn a_memlock_limit_too_low_is_said_and_names_limitmemlock_and_io_memory_bytes() {
    let dir = temp_dir("memlock");
    let mut command = Command::new(env!("CARGO_BIN_EXE_weir"));
    command
        .args(["serve", "--listen", "127.0.0.1:0", "--shard-port-base", "0"])
        .args(["--cpus", "0", "--data-dir"])
        .arg(&dir)
        .env("RUST_LOG", "warn");
    let limit = libc::rlimit {
        rlim_cur: 64 * 1024,
        rlim_max: 64 * 1024,
    };
    // SAFETY: setrlimit is async-signal-safe and touches only the child's own limits.
    unsafe {
        command.pre_exec(move || {
            if libc::setrlimit(libc::RLIMIT_MEMLOCK, &limit) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
    let out = finish(command, b"", "serve under a 64 KiB memlock limit");
    let err = text(&out.stderr);
    assert!(!out.status.success(), "it started: {}", text(&out.stdout));
    assert!(err.contains("RLIMIT_MEMLOCK) is 64 KiB"), "{err}");
    assert!(err.contains("LimitMEMLOCK"), "{err}");
    assert!(err.contains("io_memory_bytes"), "{err}");
    assert!(!err.contains("before recovering its journal"), "{err}");
}

#[test]
fn config_file_errors_name_the_file_and_the_key_users_write() {
    let dir = temp_dir("config-errors");
    let file = dir.with_extension("toml");
    for (content, key) in [
        ("[limits]\nprefetch_max = \"lots\"\n", "limits.prefetch_max"),
        (
            "[limits]\ncommit_bytes_max = 1000\n",
            "limits.commit_bytes_max",
        ),
        ("cpus = 3\n", "cpus"),
        ("log_format = \"xml\"\n", "log_format"),
    ] {
        std::fs::write(&file, content).unwrap();
        let out = serve_refused(&dir, &["--config", file.to_str().unwrap()], &[]);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(
            err.contains(&format!("{}: {key}: ", file.display())),
            "{content}: {err}"
        );
        for internal in ["CpusValue", "FileLimits", "limits.storage", "limits.wire"] {
            assert!(!err.contains(internal), "{content}: {err}");
        }
    }
    let _ = std::fs::remove_file(file);
}

#[test]
fn a_redeclare_with_other_properties_names_the_property_that_differs() {
    let dir = temp_dir("redeclare");
    let broker = Broker::start(&dir, &["--cpus", "0"]);
    ok(weir(&broker, &["queue", "declare", "jobs", "--durable"]));
    let out = weir(&broker, &["queue", "declare", "jobs", "--max-length", "10"]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("PreconditionFailed"),
        "the code is kept: {err}"
    );
    assert!(
        err.contains(
            "durable: existing true, requested false; max_length: existing none, requested 10"
        ),
        "{err}"
    );
}

#[test]
fn publish_sets_headers_priority_expiry_and_non_persistent() {
    let dir = temp_dir("publish-options");
    let broker = Broker::start(&dir, &["--cpus", "0"]);
    ok(weir(&broker, &["queue", "declare", "props", "--durable"]));
    ok(weir(
        &broker,
        &[
            "publish",
            "--queue",
            "props",
            "--message",
            "hi",
            "--header",
            "trace=abc",
            "--header",
            "tenant=7",
            "--priority",
            "3",
            "--expiration-ms",
            "600000",
            "--non-persistent",
        ],
    ));
    let d = json(weir(
        &broker,
        &["consume", "--queue", "props", "--count", "1", "--json"],
    ));
    assert_eq!(d["body"], "hi");
    assert_eq!(
        d["headers"],
        serde_json::json!([["trace", "abc"], ["tenant", "7"]])
    );
    assert_eq!(d["priority"], 3);
    assert_eq!(d["expiration_ms"], 600000);
    assert_eq!(d["persistent"], false);
    // Non-persistent: not journaled, so a crash takes it (a persistent one stays).
    ok(weir(
        &broker,
        &[
            "publish",
            "--queue",
            "props",
            "--message",
            "gone",
            "--non-persistent",
        ],
    ));
    ok(weir(
        &broker,
        &["publish", "--queue", "props", "--message", "kept"],
    ));
    let dir = broker.crash();
    let broker = Broker::start(&dir, &["--cpus", "0"]);
    let d = json(weir(
        &broker,
        &["consume", "--queue", "props", "--count", "1", "--json"],
    ));
    assert_eq!(d["body"], "kept");
    assert_eq!(info(&broker, "props")["messages_ready"], 0);
}

#[test]
fn publish_with_a_delay_holds_the_message_back() {
    let dir = temp_dir("publish-delay");
    let broker = Broker::start(&dir, &["--cpus", "0"]);
    ok(weir(&broker, &["queue", "declare", "later", "--durable"]));
    ok(weir(
        &broker,
        &[
            "publish",
            "--queue",
            "later",
            "--message",
            "x",
            "--delay-ms",
            "600000",
        ],
    ));
    let q = info(&broker, "later");
    assert_eq!(
        (&q["messages_ready"], &q["messages_delayed"]),
        (&0.into(), &1.into()),
        "{q}"
    );
}

#[test]
fn consume_can_nack_with_requeue_and_reject_to_the_dead_letter_exchange() {
    let dir = temp_dir("consume-settle");
    let broker = Broker::start(&dir, &["--cpus", "0,1"]);
    ok(weir(
        &broker,
        &[
            "exchange",
            "declare",
            "dlx",
            "--type",
            "fanout",
            "--durable",
        ],
    ));
    ok(weir(&broker, &["queue", "declare", "dead", "--durable"]));
    ok(weir(&broker, &["bind", "dead", "dlx"]));
    ok(weir(
        &broker,
        &[
            "queue",
            "declare",
            "work",
            "--durable",
            "--dead-letter-exchange",
            "dlx",
        ],
    ));
    ok(weir_at(
        Some(broker.listen),
        &["publish", "--queue", "work"],
        b"one\n",
    ));

    // --nack --requeue: printed, then back in its queue, redelivered next time.
    let out = ok(weir(
        &broker,
        &[
            "consume",
            "--queue",
            "work",
            "--count",
            "1",
            "--nack",
            "--requeue",
        ],
    ));
    assert_eq!(out, "one\n");
    assert_eq!(info(&broker, "work")["messages_ready"], 1);

    // --reject (no requeue): dead-lettered.
    let d = json(weir(
        &broker,
        &[
            "consume", "--queue", "work", "--count", "1", "--reject", "--json",
        ],
    ));
    assert_eq!(
        (&d["body"], &d["redelivered"]),
        (&"one".into(), &true.into())
    );
    let work = info(&broker, "work");
    assert_eq!(
        (&work["messages_ready"], &work["messages_unacked"]),
        (&0.into(), &0.into())
    );
    let d = json(weir(
        &broker,
        &[
            "consume", "--queue", "dead", "--count", "1", "--nack", "--json",
        ],
    ));
    assert_eq!(d["body"], "one");
    assert_eq!(d["deaths"][0]["reason"], "rejected", "{d}");
    // --nack without requeue on a queue with no dead-letter exchange drops it.
    assert_eq!(info(&broker, "dead")["messages_ready"], 0);

    let out = weir(&broker, &["consume", "--queue", "dead", "--requeue"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
}

#[test]
fn the_readme_lists_every_serve_option_and_variable() {
    let help = ok(weir_at(None, &["serve", "--help"], b""));
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let mut options: Vec<&str> = help
        .split_whitespace()
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(|w| w.trim_end_matches(|c: char| !(c.is_alphanumeric() || c == '-')))
        .collect();
    options.retain(|o| *o != "--help");
    options.dedup();
    assert!(options.contains(&"--shard-port-base"), "{help}");
    for option in options {
        assert!(
            readme.contains(option),
            "README.md does not mention {option}"
        );
    }
    for var in help
        .split(|c: char| !(c.is_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("WEIR_"))
    {
        assert!(readme.contains(var), "README.md does not mention {var}");
    }
}

#[test]
fn the_systemd_unit_sets_memlock_restart_and_an_absolute_data_directory() {
    let unit =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("ops/weir.service"))
            .unwrap();
    let value = |key: &str| {
        unit.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("no {key}= in ops/weir.service"))
    };
    assert_eq!(value("LimitMEMLOCK"), "infinity");
    assert_eq!(value("Restart"), "on-failure");
    assert!(!value("User").is_empty() && value("User") != "root");
    let exec = value("ExecStart");
    let data_dir = exec
        .split_whitespace()
        .skip_while(|w| *w != "--data-dir")
        .nth(1)
        .expect("ExecStart gives --data-dir");
    assert!(Path::new(data_dir).is_absolute(), "{exec}");
    assert!(Path::new(exec.split_whitespace().next().unwrap()).is_absolute());
    assert!(unit.contains("WEIR_CONFIG=/"), "a config file path");
}
