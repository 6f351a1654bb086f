//! Black-box tests of `weir-loadgen`: the real binary against a real `weir serve` on 127.0.0.1
//! with ephemeral ports and temporary data directories.
//!
//! Nothing here synchronises by sleeping: brokers say when they are ready (their ready line),
//! the loss test polls the queue's depth through weir-client until messages are there, and every
//! wait has a deadline so a broken run fails the test instead of hanging it. No test asserts a
//! time: these check behaviour (the report's contents and the exit code), not performance.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const DEADLINE: Duration = Duration::from_secs(60);

fn loadgen() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_weir-loadgen"));
    c.arg("--no-progress");
    c
}

fn temp_dir(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(name)
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("a temporary directory")
}

fn write_scenario(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write the scenario file");
    p
}

fn results(dir: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(dir.join("results.json")).expect("results.json written");
    serde_json::from_str(&text).expect("results.json is JSON")
}

/// Runs `cmd`, which must be refused before any load (exit code 2); returns its output and
/// standard error.
fn refused(cmd: &mut Command) -> (Output, String) {
    let out = cmd.output().expect("run weir-loadgen");
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out, stderr)
}

/// Runs `scenario` against a spawned debug broker, its report to `out_dir`, to the end.
fn run_spawned(scenario: &Path, out_dir: &Path) -> Output {
    let child = loadgen()
        .arg("--scenario")
        .arg(scenario)
        .arg("--spawn-broker")
        .arg("--weir-bin")
        .arg(weir_testkit::weir_binary())
        .arg("--out")
        .arg(out_dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start weir-loadgen");
    wait(Running(Some(child)))
}

fn show(out: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A weir-loadgen child killed if the test fails before waiting for it.
struct Running(Option<Child>);

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Waits for a child with a deadline; kills it past that (and fails).
fn wait(mut running: Running) -> Output {
    let mut child = running.0.take().expect("a running child");
    let start = Instant::now();
    loop {
        if child.try_wait().expect("wait for weir-loadgen").is_some() {
            return child
                .wait_with_output()
                .expect("collect weir-loadgen output");
        }
        if start.elapsed() > DEADLINE {
            let _ = child.kill();
            let out = child
                .wait_with_output()
                .expect("collect weir-loadgen output");
            panic!(
                "weir-loadgen did not finish within {DEADLINE:?}\n{}",
                show(&out)
            );
        }
        // Polling a child's exit status: the only wait std offers with a deadline.
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_short_scenario_against_a_spawned_broker_completes_without_loss() {
    let dir = temp_dir("lg-short-");
    let scenario = write_scenario(
        dir.path(),
        "short.toml",
        r#"
description = "a short steady run for the test suite"
producers = 2
consumers = 2
queues = 1
size = { min = 64, max = 512 }
batch = 4
prefetch = 50
ack_batch = 8

[[phases]]
name = "steady"
duration_s = 1.5
rate = 200

[[phases]]
name = "quiet"
duration_s = 20
rate = 0
"#,
    );
    let out_dir = dir.path().join("out");
    let out = run_spawned(&scenario, &out_dir);
    assert!(out.status.success(), "{}", show(&out));
    let r = results(&out_dir);
    let steady = &r["phases"][0];
    assert_eq!(steady["name"], "steady");
    for metric in ["confirm", "end_to_end"] {
        let n = steady["latency"][metric]["count"].as_u64().unwrap_or(0);
        assert!(n > 0, "empty {metric} histogram: {}", show(&out));
        assert!(steady["latency"][metric]["max_us"].as_u64().unwrap_or(0) > 0);
    }
    let check = &r["check"];
    assert_eq!(check["lost"], 0, "{}", show(&out));
    assert_eq!(check["duplicated"], 0);
    assert!(check["confirmed"].as_u64().unwrap_or(0) > 0);
    assert_eq!(check["confirmed"], check["delivered_unique"]);
    assert_eq!(r["backlog"]["drained"], true, "{}", show(&out));
    assert_eq!(r["publish_failures"], 0);
    for f in [
        "steady-confirm.hgrm",
        "steady-end_to_end.hgrm",
        "confirm.hlog",
        "end_to_end.hlog",
        "latency-steady.png",
        "latency-steady.svg",
        "timeline.png",
        "timeline.svg",
    ] {
        let len = std::fs::metadata(out_dir.join(f))
            .map(|m| m.len())
            .unwrap_or(0);
        assert!(len > 0, "{f} missing or empty");
    }
    // The interval log reads back: one histogram per second, adding up to every confirm.
    let log = std::fs::read(out_dir.join("confirm.hlog")).expect("confirm.hlog");
    let mut deserializer = hdrhistogram::serialization::Deserializer::new();
    let mut in_log = 0u64;
    for entry in hdrhistogram::serialization::interval_log::IntervalLogIterator::new(&log) {
        if let Ok(hdrhistogram::serialization::interval_log::LogEntry::Interval(i)) = entry {
            let bytes = base64_decode(i.encoded_histogram());
            let h: hdrhistogram::Histogram<u64> = deserializer
                .deserialize(&mut bytes.as_slice())
                .expect("an interval histogram decodes");
            in_log += h.len();
        }
    }
    let confirmed: u64 = r["phases"]
        .as_array()
        .expect("phases")
        .iter()
        .map(|p| p["latency"]["confirm"]["count"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(in_log, confirmed, "the interval log holds every confirm");
    let hgrm = std::fs::read_to_string(out_dir.join("steady-confirm.hgrm")).expect("hgrm");
    assert!(
        hgrm.contains("1/(1-Percentile)") && hgrm.contains("#[Max     ="),
        "{hgrm}"
    );
    // The spawned broker's data directory is gone: its path is in the report.
    let setup = r["broker_setup"].as_str().unwrap_or_default();
    let data = setup
        .split("data in ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .expect("the data directory is named in broker_setup");
    assert!(!Path::new(data).exists(), "{data} was left behind");
}

#[test]
fn chaos_sigkills_and_restarts_the_broker_and_every_confirmed_message_is_delivered() {
    let dir = temp_dir("lg-chaos-");
    let scenario = write_scenario(
        dir.path(),
        "chaos.toml",
        r#"
description = "a short run with kills for the test suite"
producers = 2
consumers = 2
queues = 2
size = { min = 32, max = 4096 }
batch = 4
prefetch = 50
ack_batch = 8
# Slower than the producers: a backlog is replayed at every restart.
consumer_rate = 80

[[phases]]
name = "steady"
duration_s = 3
rate = 200

[[phases]]
name = "quiet"
duration_s = 30
rate = 0
"#,
    );
    let out_dir = dir.path().join("out");
    let child = loadgen()
        .arg("--scenario")
        .arg(&scenario)
        .args(["--chaos", "--chaos-kills", "3", "--chaos-seed", "11"])
        .arg("--weir-bin")
        .arg(weir_testkit::weir_binary())
        .arg("--out")
        .arg(&out_dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start weir-loadgen");
    let out = wait(Running(Some(child)));
    assert!(out.status.success(), "{}", show(&out));
    let text = std::fs::read_to_string(out_dir.join("chaos.json")).expect("chaos.json written");
    let r: serde_json::Value = serde_json::from_str(&text).expect("chaos.json is JSON");
    assert_eq!(
        r["kills"].as_array().map(Vec::len),
        Some(3),
        "{}",
        show(&out)
    );
    for k in r["kills"].as_array().into_iter().flatten() {
        assert!(k["recovery_ms"].as_f64().unwrap_or(0.0) > 0.0, "{k}");
    }
    assert_eq!(r["lost"], 0, "{}", show(&out));
    assert_eq!(r["resurrected"], 0, "{}", show(&out));
    assert_eq!(r["never_published"], 0, "{}", show(&out));
    assert_eq!(r["drained"], true, "{}", show(&out));
    let confirmed = r["confirmed"].as_u64().unwrap_or(0);
    assert!(confirmed > 0, "{}", show(&out));
    assert!(
        r["delivered"].as_u64().unwrap_or(0) >= confirmed,
        "every confirmed message delivered: {}",
        show(&out)
    );
    assert!(
        r["reconnects"].as_u64().unwrap_or(0) > 0,
        "the clients reconnected"
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("lost 0,") && stdout.contains("recovery (SIGKILL -> ready): p50"),
        "{}",
        show(&out)
    );
    let data = r["data_dir"].as_str().expect("data_dir");
    assert!(
        !data.is_empty() && !Path::new(data).exists(),
        "{data} was left behind"
    );
}

/// Standard base64 (the interval log's encoding), decoded without another dependency.
fn base64_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("not base64: {c}"),
        }
    };
    let mut out = Vec::new();
    let clean: Vec<u8> = text
        .bytes()
        .filter(|c| *c != b'=' && !c.is_ascii_whitespace())
        .collect();
    for chunk in clean.chunks(4) {
        let mut acc = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            acc |= value(*c) << (18 - 6 * i);
        }
        let bytes = acc.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    out
}

/// A broker started by the test itself, so that the test can purge its queue behind the
/// loadgen's back.
fn start_broker() -> weir_testkit::Broker {
    weir_testkit::Serve::new(weir_testkit::weir_binary())
        .temp_data_dir(env!("CARGO_TARGET_TMPDIR"), "lg-broker-")
        .ready_timeout(DEADLINE)
        .start()
        .unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn the_loss_check_fails_when_messages_are_purged_behind_its_back() {
    let broker = start_broker();
    let listen = broker.listen.to_string();
    let dir = temp_dir("lg-loss-");
    // Consumers start only with the second phase: the first one's messages sit in the queue,
    // where the test purges some of them.
    let scenario = write_scenario(
        dir.path(),
        "lossy.toml",
        r#"
producers = 1
consumers = 1
consumers_start = "drain"

[[phases]]
name = "fill"
duration_s = 4
rate = 25

[[phases]]
name = "drain"
duration_s = 20
rate = 0
"#,
    );
    let out_dir = dir.path().join("out");
    let child = loadgen()
        .arg("--scenario")
        .arg(&scenario)
        .args(["--addr", &listen, "--queue-prefix", "lossy"])
        .arg("--out")
        .arg(&out_dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start weir-loadgen");
    let child = Running(Some(child));

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let purged = rt.block_on(async {
        let client = weir_client::Client::connect(broker.listen, Default::default())
            .await
            .expect("connect to the broker");
        let start = Instant::now();
        loop {
            // The loadgen declares the queue itself: NotFound until then.
            if let Ok(info) = client.queue_info("lossy-0").await {
                if info.messages_ready >= 5 {
                    break;
                }
            }
            assert!(start.elapsed() < DEADLINE, "no messages reached the queue");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let purged = client.purge("lossy-0").await.expect("purge");
        let _ = client.close().await;
        purged
    });
    assert!(purged > 0, "the purge found nothing to take");

    let out = wait(child);
    assert_eq!(out.status.code(), Some(3), "{}", show(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stdout.contains("!!! LOSS:"), "{}", show(&out));
    assert!(stderr.contains("!!! LOSS:"), "{}", show(&out));
    let r = results(&out_dir);
    let lost = r["check"]["lost"].as_u64().unwrap_or(0);
    assert!(
        lost > 0 && lost <= purged,
        "lost {lost}, purged {purged}\n{}",
        show(&out)
    );
    assert_eq!(r["backlog"]["drained"], true);
}

#[test]
fn an_invalid_scenario_file_is_refused_with_the_key_and_the_reason() {
    let dir = temp_dir("lg-bad-");
    let bad = write_scenario(
        dir.path(),
        "bad.toml",
        "producers = 1\n[[phases]]\nname = \"a\"\nduration_s = 1\nrate = 10\n\
         [[phases]]\nname = \"b\"\nduration_s = 1\nrate = -5\n",
    );
    let mut cmd = loadgen();
    cmd.arg("--scenario").arg(&bad);
    let (out, stderr) = refused(&mut cmd);
    assert!(
        stderr.contains("scenario bad.toml: phases[1].rate: must be >= 0 (got -5)"),
        "{}",
        show(&out)
    );

    let unknown = write_scenario(
        dir.path(),
        "unknown.toml",
        "producers = 1\nconsumer_rat = 10\n[[phases]]\nname = \"a\"\nduration_s = 1\nrate = 10\n",
    );
    let mut cmd = loadgen();
    cmd.arg("--scenario").arg(&unknown);
    let (out, stderr) = refused(&mut cmd);
    assert!(
        stderr.contains("unknown.toml") && stderr.contains("unknown field `consumer_rat`"),
        "{}",
        show(&out)
    );
}

#[test]
fn drain_after_restart_drains_a_backlog_before_and_after_a_restart_without_loss() {
    let dir = temp_dir("lg-restart-");
    let scenario = write_scenario(
        dir.path(),
        "restart.toml",
        r#"
description = "a tiny drain-after-restart for the test suite"
kind = "drain-after-restart"
idiom = "per-message"
size = 1024
in_flight = 200
prefetch = 200
backlog = 2000
drain_timeout_s = 45
"#,
    );
    let out_dir = dir.path().join("out");
    let out = run_spawned(&scenario, &out_dir);
    assert!(out.status.success(), "{}", show(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("raw O_DIRECT read  "), "{}", show(&out));
    assert!(stdout.contains("vs raw read"), "{}", show(&out));
    let r = results(&out_dir);
    // Two fills of 2000, each drained once: once hot, once from disk after the restart.
    let check = &r["check"];
    assert_eq!(check["lost"], 0, "{}", show(&out));
    assert_eq!(check["duplicated"], 0, "{}", show(&out));
    assert_eq!(check["confirmed"], 4000, "{}", show(&out));
    assert_eq!(check["delivered_unique"], 4000, "{}", show(&out));
    assert_eq!(check["deliveries"], 4000, "{}", show(&out));
    for step in ["hot_fill", "hot_drain", "cold_fill", "cold_drain"] {
        assert_eq!(r[step]["messages"], 2000, "{step}: {}", show(&out));
        assert_eq!(r[step]["bytes"], 2000 * 1024, "{step}: {}", show(&out));
        assert!(r[step]["mb_per_s"].as_f64().unwrap_or(0.0) > 0.0, "{step}");
    }
    assert_eq!(r["drained"], true, "{}", show(&out));
    assert!(
        r["stopped"]
            .as_str()
            .unwrap_or_default()
            .starts_with("stopped by SIGTERM (exit status: 0)"),
        "a graceful stop: {}",
        show(&out)
    );
    let raw = &r["raw_read"];
    if raw["error"].is_null() {
        // The backlog's bodies are in the segments read: at least 2000 KiB of them.
        assert!(raw["files"].as_u64().unwrap_or(0) >= 1, "{raw}");
        assert!(raw["bytes"].as_u64().unwrap_or(0) >= 2000 * 1024, "{raw}");
    } else {
        // Only a file system that refuses O_DIRECT excuses it; the report says so.
        assert!(
            stdout.contains("raw O_DIRECT read  not done:"),
            "{}",
            show(&out)
        );
    }
    let setup = r["broker_setup"].as_str().unwrap_or_default();
    let data = setup
        .split("data in ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .expect("the data directory is named in broker_setup");
    assert!(!Path::new(data).exists(), "{data} was left behind");
}

#[test]
fn drain_after_restart_is_refused_without_spawn_broker() {
    let mut cmd = loadgen();
    cmd.args(["--scenario", "drain-after-restart", "--addr", "127.0.0.1:1"]);
    let (out, stderr) = refused(&mut cmd);
    assert!(
        stderr.contains("drain-after-restart") && stderr.contains("only with --spawn-broker"),
        "{}",
        show(&out)
    );
}

#[test]
fn the_per_message_idiom_runs_closed_loop_without_loss_and_refuses_a_batch_flag() {
    let dir = temp_dir("lg-per-message-");
    let scenario = write_scenario(
        dir.path(),
        "pm.toml",
        r#"
description = "one publish call per message, one ack per delivery, for the test suite"
kind = "max"
idiom = "per-message"
size = 1024
in_flight = 100
prefetch = 100

[[phases]]
name = "max"
duration_s = 1
"#,
    );
    let out_dir = dir.path().join("out");
    let out = run_spawned(&scenario, &out_dir);
    assert!(out.status.success(), "{}", show(&out));
    let r = results(&out_dir);
    assert_eq!(r["settings"]["idiom"], "per-message");
    let check = &r["check"];
    assert!(
        check["confirmed"].as_u64().unwrap_or(0) > 0,
        "{}",
        show(&out)
    );
    assert_eq!(check["lost"], 0, "{}", show(&out));
    assert_eq!(check["duplicated"], 0, "{}", show(&out));
    assert_eq!(
        check["confirmed"],
        check["delivered_unique"],
        "{}",
        show(&out)
    );
    assert_eq!(
        r["backlog"]["drained"],
        true,
        "every ack landed: {}",
        show(&out)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("idiom per-message"), "{}", show(&out));

    let mut cmd = loadgen();
    cmd.arg("--scenario").arg(&scenario).args(["--batch", "8"]);
    let (out, stderr) = refused(&mut cmd);
    assert!(
        stderr.contains("idiom: \"per-message\"") && stderr.contains("batch must be 1 (got 8)"),
        "{}",
        show(&out)
    );
}

#[test]
fn exactly_once_idempotent_producers_through_sigkills_lose_and_duplicate_nothing() {
    let dir = temp_dir("lg-exactly-once");
    let scenario = write_scenario(
        dir.path(),
        "eo.toml",
        "description = \"exactly-once, small\"\nkind = \"exactly-once\"\nidiom = \"per-message\"\n\
         producers = 2\nconsumers = 2\nqueues = 2\nsize = 64\nbatch = 1\nin_flight = 256\nbacklog = 3000\n\
         kills = 2\n",
    );
    let out_dir = dir.path().join("out");
    let out = run_spawned(&scenario, &out_dir);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let r = results(&out_dir);
    assert_eq!(r["kills"], 2, "{r}");
    assert_eq!(r["confirmed"], 3000, "{r}");
    assert_eq!(
        (r["lost"].as_u64(), r["duplicated"].as_u64()),
        (Some(0), Some(0)),
        "{r}"
    );
    assert_eq!(r["delivered_unique"], 3000, "{r}");
    assert!(r["reconnects"].as_u64() >= Some(2), "{r}");
}
