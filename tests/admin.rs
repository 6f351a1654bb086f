//! Black-box tests of the admin listener (`src/admin`): the real binary on two shards, its admin
//! port ephemeral (the testkit passes `--admin-listen 127.0.0.1:0` and reads the address from the
//! ready line), spoken to over real HTTP.
//!
//! - `/metrics` parsed by a strict OpenMetrics text parser, its numbers checked against a known
//!   workload;
//! - the JSON API's declare, purge, delete, exchange and binding round trips, with the broker's
//!   own errors;
//! - `/health` and `/ready` while the shards have not yet recovered a journal, held
//!   deterministically by the debug build's `WEIR_TEST_HOLD_RECOVERY`;
//! - the dashboard in a real headless Chromium over WebDriver (Debian's `chromium` and
//!   `chromium-driver`; `.ci/run` installs them). Without them that test fails, saying so.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{temp_dir, Broker, TIMEOUT};
use serde_json::{json, Value};
use weir_client::{Client, ClientOptions, QueueArguments, QueueOptions};

const TWO_SHARDS: &[&str] = &["--cpus", "0,1"];

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// One HTTP request: status and body. Refusals are answers here, not failures.
fn http(method: &str, url: &str, body: Option<&Value>) -> (u16, String) {
    let request = ureq::request(method, url).timeout(TIMEOUT);
    let result = match body {
        Some(b) => request
            .set("content-type", "application/json")
            .send_string(&b.to_string()),
        None => request.call(),
    };
    match result {
        Ok(r) => (r.status(), r.into_string().unwrap()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap()),
        Err(e) => panic!("{method} {url}: {e}"),
    }
}

fn json_of(method: &str, url: &str, body: Option<&Value>) -> (u16, Value) {
    let (status, text) = http(method, url, body);
    let v = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{method} {url}: {status} {text:?} is not JSON: {e}"));
    (status, v)
}

fn admin_url(broker: &Broker) -> String {
    let admin = broker
        .admin
        .expect("the testkit starts brokers with an admin listener");
    format!("http://{admin}")
}

fn publish(addr: SocketAddr, queue: &str, n: usize) {
    runtime().block_on(async {
        let c = Client::connect(addr, ClientOptions::default())
            .await
            .unwrap();
        let mut confirms = Vec::new();
        for i in 0..n {
            let f = c
                .publish(queue, weir_client::Message::new(format!("m{i}")))
                .await
                .unwrap();
            confirms.push(f);
        }
        for f in confirms {
            f.await.unwrap();
        }
        c.close().await.unwrap();
    });
}

/// Polls `f` until it gives `Some`, failing after `TIMEOUT` with `what`.
fn poll<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A sample's identity: its name and its labels, sorted.
type Series = (String, Vec<(String, String)>);

/// A strict reader of the OpenMetrics text format: every family is declared (`# TYPE`) before
/// its samples, every sample's name is its family's (with the suffixes its type allows), label
/// values are quoted with only `\\`, `\"` and `\n` escaped, values are numbers, no series
/// repeats, and the text ends with `# EOF`. Returns every sample, and each family's type.
fn parse_openmetrics(text: &str) -> (BTreeMap<Series, f64>, BTreeMap<String, String>) {
    let mut samples = BTreeMap::new();
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut current: Option<(String, String)> = None;
    let lines = text.lines();
    let mut saw_eof = false;
    for line in lines {
        assert!(!saw_eof, "text after # EOF: {line:?}");
        if line == "# EOF" {
            saw_eof = true;
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut words = rest.splitn(3, ' ');
            let (kind, name) = (words.next().unwrap(), words.next().unwrap());
            match kind {
                "TYPE" => {
                    let t = words.next().unwrap().to_string();
                    assert!(
                        ["gauge", "counter", "histogram"].contains(&t.as_str()),
                        "{line}"
                    );
                    assert!(
                        types.insert(name.to_string(), t.clone()).is_none(),
                        "family {name} declared twice"
                    );
                    current = Some((name.to_string(), t));
                }
                "HELP" | "UNIT" => {}
                _ => panic!("unknown comment line {line:?}"),
            }
            continue;
        }
        let (family, kind) = current
            .clone()
            .unwrap_or_else(|| panic!("sample before any # TYPE: {line}"));
        let name_end = line
            .find(['{', ' '])
            .unwrap_or_else(|| panic!("no value: {line}"));
        let name = &line[..name_end];
        assert!(
            name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "bad metric name {name:?}"
        );
        let suffix = name
            .strip_prefix(family.as_str())
            .unwrap_or_else(|| panic!("sample {name} outside its family {family}"));
        let allowed: &[&str] = match kind.as_str() {
            "gauge" => &[""],
            "counter" => &["_total", "_created"],
            _ => &["_bucket", "_sum", "_count", "_created"],
        };
        assert!(
            allowed.contains(&suffix),
            "{name} in {kind} family {family}"
        );
        let mut rest = &line[name_end..];
        let mut labels = Vec::new();
        if let Some(r) = rest.strip_prefix('{') {
            let mut chars = r.char_indices();
            let mut key = String::new();
            loop {
                let (i, c) = chars
                    .next()
                    .unwrap_or_else(|| panic!("unclosed labels: {line}"));
                match c {
                    '}' => {
                        rest = &r[i + 1..];
                        break;
                    }
                    ',' => {}
                    '=' => {
                        assert_eq!(chars.next().map(|x| x.1), Some('"'), "{line}");
                        let mut value = String::new();
                        loop {
                            match chars.next().unwrap().1 {
                                '"' => break,
                                '\\' => match chars.next().unwrap().1 {
                                    '\\' => value.push('\\'),
                                    '"' => value.push('"'),
                                    'n' => value.push('\n'),
                                    other => panic!("bad escape \\{other} in {line}"),
                                },
                                c => value.push(c),
                            }
                        }
                        labels.push((std::mem::take(&mut key), value));
                    }
                    c if c.is_ascii_alphanumeric() || c == '_' => key.push(c),
                    c => panic!("bad character {c:?} in the labels of {line}"),
                }
            }
        }
        let value = rest
            .strip_prefix(' ')
            .unwrap_or_else(|| panic!("no value: {line}"));
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("bad value in {line}")),
        };
        labels.sort();
        assert!(
            samples.insert((name.to_string(), labels), value).is_none(),
            "series repeated: {line}"
        );
    }
    assert!(saw_eof, "no # EOF at the end");
    (samples, types)
}

fn scrape(admin: &str) -> (BTreeMap<Series, f64>, BTreeMap<String, String>) {
    let response = ureq::get(&format!("{admin}/metrics"))
        .timeout(TIMEOUT)
        .call()
        .unwrap();
    let content_type = response.header("content-type").unwrap_or("").to_string();
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    parse_openmetrics(&response.into_string().unwrap())
}

fn value(samples: &BTreeMap<Series, f64>, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut l: Vec<(String, String)> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    l.sort();
    samples.get(&(name.to_string(), l)).copied()
}

fn sum_of(samples: &BTreeMap<Series, f64>, name: &str) -> f64 {
    samples
        .iter()
        .filter(|((n, _), _)| n == name)
        .map(|(_, v)| v)
        .sum()
}

#[test]
fn metrics_after_publishing_100_say_100_ready_and_100_published() {
    let broker = Broker::start(&temp_dir("admin-metrics"), TWO_SHARDS);
    let admin = admin_url(&broker);
    let (status, _) = json_of(
        "PUT",
        &format!("{admin}/api/queues/metered"),
        Some(&json!({})),
    );
    assert_eq!(status, 200);
    publish(broker.listen, "metered", 100);
    let shard = weir_protocol::placement("metered", 2).to_string();
    let queue = [("queue", "metered"), ("shard", shard.as_str())];

    let (samples, types) = scrape(&admin);
    assert_eq!(value(&samples, "weir_up", &[]), Some(1.0));
    assert_eq!(value(&samples, "weir_shards_ready", &[]), Some(2.0));
    assert_eq!(value(&samples, "weir_shards", &[]), Some(2.0));
    assert_eq!(
        value(&samples, "weir_queue_messages_ready", &queue),
        Some(100.0)
    );
    assert_eq!(
        value(&samples, "weir_queue_messages_unacked", &queue),
        Some(0.0)
    );
    assert_eq!(value(&samples, "weir_queue_consumers", &queue), Some(0.0));
    assert_eq!(
        value(&samples, "weir_queue_published_total", &queue),
        Some(100.0),
        "the publish counter"
    );
    assert!(value(&samples, "weir_queue_bytes_ready", &queue).unwrap() >= 100.0 * 2.0);
    assert!(value(&samples, "weir_queue_oldest_ready_age_seconds", &queue).is_some());
    assert_eq!(
        value(&samples, "weir_metrics_queues_omitted", &[]),
        Some(0.0)
    );
    assert_eq!(types["weir_queue_published"], "counter");
    assert_eq!(types["weir_queue_messages_ready"], "gauge");
    // The shards' own counters, per shard: the ready messages are all on the queue's owner.
    assert_eq!(sum_of(&samples, "weir_shard_messages_ready"), 100.0);
    assert_eq!(
        value(
            &samples,
            "weir_shard_messages_ready",
            &[("shard", shard.as_str())]
        ),
        Some(100.0)
    );
    assert_eq!(types["weir_shard_messages_ready"], "gauge");
    assert!(sum_of(&samples, "weir_shard_journal_commits_total") >= 1.0);
    // The admin's own connection is one of them.
    assert!(sum_of(&samples, "weir_shard_connections") >= 1.0);
    assert_eq!(
        sum_of(&samples, "weir_shard_messages_published_total"),
        100.0
    );
    // The journal's commit latency, a histogram in seconds, per shard.
    assert_eq!(types["weir_journal_commit_latency_seconds"], "histogram");
    let commits = value(
        &samples,
        "weir_journal_commit_latency_seconds_count",
        &[("shard", shard.as_str())],
    )
    .expect("the owner's commit latency");
    assert!(commits >= 1.0, "{commits}");
    assert_eq!(
        value(
            &samples,
            "weir_journal_commit_latency_seconds_bucket",
            &[("shard", shard.as_str()), ("le", "+Inf")]
        ),
        Some(commits)
    );
    assert_eq!(types["weir_journal_fdatasync_latency_seconds"], "histogram");
    grafana_uses_only_these_families(&types);

    // Acks move the counters: consume 40 and ack them.
    runtime().block_on(async {
        let c = Client::connect(broker.listen, ClientOptions::default())
            .await
            .unwrap();
        for _ in 0..40 {
            let d = c.get("metered", false).await.unwrap().unwrap();
            d.ack().await.unwrap();
        }
        c.close().await.unwrap();
    });
    let samples = poll("the acks in /metrics", || {
        let (s, _) = scrape(&admin);
        (value(&s, "weir_queue_messages_ready", &queue) == Some(60.0)).then_some(s)
    });
    assert_eq!(
        value(&samples, "weir_queue_acked_total", &queue),
        Some(40.0)
    );
    assert_eq!(
        value(&samples, "weir_queue_delivered_total", &queue),
        Some(40.0)
    );
    assert_eq!(
        value(&samples, "weir_queue_published_total", &queue),
        Some(100.0)
    );
}

/// Every metric the Grafana dashboard (`ops/grafana-dashboard.json`) queries is one `/metrics`
/// serves (a family of `types`, or one only there once a limit is hit).
fn grafana_uses_only_these_families(types: &BTreeMap<String, String>) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("ops/grafana-dashboard.json");
    let text = std::fs::read_to_string(&path).unwrap();
    let dashboard: Value = serde_json::from_str(&text).unwrap();
    let mut names = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            let mut rest = expr;
            while let Some(i) = rest.find("weir_") {
                let tail = &rest[i..];
                let end = tail
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(tail.len());
                names.push(tail[..end].to_string());
                rest = &tail[end..];
            }
        }
    }
    assert!(names.len() > 20, "{names:?}");
    for name in names {
        let family = ["_total", "_bucket"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(&name);
        assert!(
            types.contains_key(family) || family == "weir_limit_hits",
            "the Grafana dashboard queries {name}, which /metrics does not serve"
        );
    }
}

#[test]
fn metrics_leave_out_queues_past_admin_metrics_queues_max_and_count_them() {
    let dir = temp_dir("admin-metrics-max");
    let config = dir.join("weir.toml");
    std::fs::write(&config, "[limits]\nadmin_metrics_queues_max = 2\n").unwrap();
    let broker = Broker::start(
        &dir,
        &["--cpus", "0,1", "--config", config.to_str().unwrap()],
    );
    let admin = admin_url(&broker);
    for q in ["q-a", "q-b", "q-c"] {
        let (status, body) = http("PUT", &format!("{admin}/api/queues/{q}"), None);
        assert_eq!(status, 200, "{body}");
    }
    let (samples, _) = scrape(&admin);
    let listed: Vec<String> = samples
        .keys()
        .filter(|(n, _)| n == "weir_queue_messages_ready")
        .flat_map(|(_, l)| {
            l.iter()
                .filter(|(k, _)| k == "queue")
                .map(|(_, v)| v.clone())
        })
        .collect();
    assert_eq!(listed, ["q-a", "q-b"], "the first two by name");
    assert_eq!(
        value(&samples, "weir_metrics_queues_omitted", &[]),
        Some(1.0)
    );
    // The JSON API still lists every queue.
    let (_, queues) = json_of("GET", &format!("{admin}/api/queues"), None);
    assert_eq!(queues.as_array().unwrap().len(), 3);
}

#[test]
fn the_admin_api_declares_purges_and_deletes_with_the_brokers_errors() {
    let broker = Broker::start(&temp_dir("admin-api"), TWO_SHARDS);
    let admin = admin_url(&broker);
    let q = format!("{admin}/api/queues/orders");

    let (status, info) = json_of(
        "PUT",
        &q,
        Some(
            &json!({ "durable": true, "arguments": { "max_length": 10, "overflow": "reject_publish" } }),
        ),
    );
    assert_eq!(status, 200, "{info}");
    assert_eq!(info["name"], "orders");
    assert_eq!(info["arguments"]["max_length"], 10);
    assert_eq!(info["arguments"]["overflow"], "reject_publish");
    let (status, list) = json_of("GET", &format!("{admin}/api/queues"), None);
    assert_eq!(status, 200);
    assert!(
        list.as_array()
            .unwrap()
            .iter()
            .any(|q| q["name"] == "orders"),
        "{list}"
    );

    // A redeclare that differs: 409 with the broker's own sentence, word for word.
    let (status, err) = json_of(
        "PUT",
        &q,
        Some(&json!({ "arguments": { "max_length": 20, "overflow": "reject_publish" } })),
    );
    assert_eq!(status, 409, "{err}");
    assert_eq!(err["error"], "PreconditionFailed");
    let wire_message = runtime().block_on(async {
        let c = Client::connect(broker.listen, ClientOptions::default())
            .await
            .unwrap();
        let options = QueueOptions {
            arguments: QueueArguments {
                max_length: Some(20),
                overflow: weir_client::Overflow::RejectPublish,
                ..QueueArguments::default()
            },
            ..QueueOptions::default()
        };
        match c.declare("orders", options).await {
            Err(weir_client::ClientError::Refused { message, .. }) => message,
            other => panic!("{other:?}"),
        }
    });
    assert_eq!(err["message"], wire_message.as_str());

    // Bad bodies name the field.
    let (status, err) = json_of("PUT", &q, Some(&json!({ "durable": "yes" })));
    assert_eq!((status, &err["error"]), (400, &json!("InvalidArgument")));
    assert!(
        err["message"].as_str().unwrap().contains("durable"),
        "{err}"
    );
    let (status, err) = json_of(
        "PUT",
        &q,
        Some(&json!({ "arguments": { "max_lenght": 1 } })),
    );
    assert_eq!(status, 400);
    assert!(
        err["message"].as_str().unwrap().contains("max_lenght"),
        "{err}"
    );
    let (status, err) = http("PUT", &q, Some(&json!("not an object")));
    assert_eq!(status, 400, "{err}");
    // Reserved names are the broker's refusal too.
    let (status, err) = json_of("PUT", &format!("{admin}/api/queues/weir.mine"), None);
    assert_eq!(
        (status, &err["error"]),
        (403, &json!("AccessRefused")),
        "{err}"
    );

    publish(broker.listen, "orders", 5);
    let (status, one) = json_of("GET", &q, None);
    assert_eq!((status, &one["messages_ready"]), (200, &json!(5)), "{one}");
    let (status, err) = json_of("DELETE", &format!("{q}?if_empty=true"), None);
    assert_eq!(
        (status, &err["error"]),
        (409, &json!("PreconditionFailed")),
        "{err}"
    );
    let (status, purged) = json_of("POST", &format!("{q}/purge"), None);
    assert_eq!((status, &purged["messages"]), (200, &json!(5)), "{purged}");
    let (status, deleted) = json_of("DELETE", &format!("{q}?if_empty=true"), None);
    assert_eq!(status, 200, "{deleted}");
    let (status, err) = json_of("GET", &q, None);
    assert_eq!((status, &err["error"]), (404, &json!("NotFound")), "{err}");
    let (status, err) = json_of("POST", &format!("{q}/purge"), None);
    assert_eq!(status, 404, "{err}");

    // Exchanges and bindings.
    let x = format!("{admin}/api/exchanges/events");
    let (status, body) = json_of("PUT", &x, Some(&json!({ "kind": "fanout" })));
    assert_eq!(status, 200, "{body}");
    let (status, body) = json_of("PUT", &x, Some(&json!({ "kind": "direct" })));
    assert_eq!(
        (status, &body["error"]),
        (409, &json!("PreconditionFailed")),
        "{body}"
    );
    let (status, body) = json_of("PUT", &x, Some(&json!({ "kind": "sideways" })));
    assert_eq!(status, 400, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("sideways"),
        "{body}"
    );
    let (status, _) = json_of("PUT", &format!("{admin}/api/queues/audit"), None);
    assert_eq!(status, 200);
    let binding = json!({ "exchange": "events", "queue": "audit", "binding_key": "" });
    let (status, body) = json_of("POST", &format!("{admin}/api/bindings"), Some(&binding));
    assert_eq!(status, 200, "{body}");
    let (_, list) = json_of(
        "GET",
        &format!("{admin}/api/bindings?exchange=events"),
        None,
    );
    assert_eq!(list, json!([binding]));
    let (_, list) = json_of("GET", &format!("{admin}/api/exchanges?prefix=ev"), None);
    assert_eq!(list[0]["name"], "events");
    assert_eq!(list[0]["kind"], "fanout");
    let (status, body) = json_of("DELETE", &format!("{admin}/api/bindings"), Some(&binding));
    assert_eq!(status, 200, "{body}");
    let (_, list) = json_of(
        "GET",
        &format!("{admin}/api/bindings?exchange=events"),
        None,
    );
    assert_eq!(list, json!([]));
    let (status, body) = json_of("DELETE", &x, None);
    assert_eq!(status, 200, "{body}");
    let (status, body) = json_of("DELETE", &x, None);
    assert_eq!(
        (status, &body["error"]),
        (404, &json!("NotFound")),
        "{body}"
    );

    let (status, overview) = json_of("GET", &format!("{admin}/api/overview"), None);
    assert_eq!(status, 200);
    assert_eq!(overview["shard_count"], 2);
    assert_eq!(overview["shards_ready"], 2);
    let (status, conns) = json_of("GET", &format!("{admin}/api/connections"), None);
    assert_eq!(status, 200, "{conns}");
    assert!(
        conns
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["client_name"] == "weir-admin"),
        "the admin's own connection is listed: {conns}"
    );
    let (status, consumers) = json_of("GET", &format!("{admin}/api/consumers"), None);
    assert_eq!((status, consumers), (200, json!([])));
    let (status, body) = json_of("GET", &format!("{admin}/api/nothing-here"), None);
    assert_eq!((status, &body["error"]), (404, &json!("NotFound")));
}

#[test]
fn an_admin_port_in_use_is_refused_naming_admin_listen_and_no_admin_turns_it_off() {
    let a = Broker::start(&temp_dir("admin-port-a"), &[]);
    let taken = a.admin.unwrap();
    let dir_b = temp_dir("admin-port-b");
    let out = weir_testkit::Serve::new(env!("CARGO_BIN_EXE_weir"))
        .data_dir(&dir_b)
        .args(["--admin-listen", &taken.to_string()])
        .command()
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("admin_listen: address {taken} is in use")),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir_b);
    let off = Broker::start(&temp_dir("admin-port-off"), &["--no-admin"]);
    assert_eq!(off.admin, None);
    assert!(off.ready_line.ends_with(" admin off"), "{}", off.ready_line);
}

/// A broker child this test spawned itself (not through the testkit's start, which waits for
/// the ready line), killed when dropped.
struct Spawned(Child);

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn health_answers_and_ready_is_503_until_every_shard_has_recovered_its_journal() {
    const BACKLOG: usize = 3000;
    let dir = temp_dir("admin-ready");
    let data = dir.join("data");
    let first = Broker::start(&data, TWO_SHARDS);
    let (status, _) = http(
        "PUT",
        &format!("{}/api/queues/backlog", admin_url(&first)),
        None,
    );
    assert_eq!(status, 200);
    publish(first.listen, "backlog", BACKLOG);
    let data = first.crash();

    // The same data directory again, its shards held before recovery until `hold` exists.
    let hold = dir.join("release-recovery");
    let mut cmd = weir_testkit::Serve::new(env!("CARGO_BIN_EXE_weir"))
        .data_dir(&data)
        .args(TWO_SHARDS)
        .rust_log("info")
        .env("WEIR_TEST_HOLD_RECOVERY", &hold)
        .command();
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = Spawned(cmd.spawn().unwrap());
    let stderr = child.0.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some((_, addr)) = line.split_once("admin listening on ") {
                let _ = tx.send(addr.trim().to_string());
            }
        }
    });
    let admin = format!(
        "http://{}",
        rx.recv_timeout(TIMEOUT).expect("the admin address logged")
    );

    let (status, health) = json_of("GET", &format!("{admin}/health"), None);
    assert_eq!((status, &health["status"]), (200, &json!("up")));
    let (status, ready) = json_of("GET", &format!("{admin}/ready"), None);
    assert_eq!(status, 503, "{ready}");
    assert_eq!(ready["shards_ready"], 0);
    assert_eq!(ready["shard_count"], 2);
    let (status, err) = json_of("GET", &format!("{admin}/api/queues"), None);
    assert_eq!((status, &err["error"]), (503, &json!("NotReady")), "{err}");
    let (samples, _) = scrape(&admin);
    assert_eq!(value(&samples, "weir_shards_ready", &[]), Some(0.0));
    assert_eq!(value(&samples, "weir_up", &[]), Some(0.0));

    std::fs::write(&hold, b"").unwrap();
    poll("/ready to say 200", || {
        let (status, body) = json_of("GET", &format!("{admin}/ready"), None);
        match status {
            200 => Some(body),
            503 => None,
            other => panic!("/ready answered {other}: {body}"),
        }
    });
    let (status, q) = json_of("GET", &format!("{admin}/api/queues/backlog"), None);
    assert_eq!(status, 200, "{q}");
    assert_eq!(q["messages_ready"], BACKLOG, "recovered before ready");
    drop(child);
    let _ = std::fs::remove_dir_all(&dir);
}

// --- The dashboard in a real browser ---------------------------------------------------------

fn find_program(names: &[&str]) -> Option<String> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for name in names {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return Some(candidate.display().to_string());
            }
        }
    }
    None
}

/// chromedriver on a port of its choosing, read from what it prints.
fn start_chromedriver(driver: &str) -> (Spawned, String) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(driver)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {driver}: {e}"));
    let url = format!("http://127.0.0.1:{port}");
    let child = Spawned(child);
    poll("chromedriver to answer /status", || {
        match ureq::get(&format!("{url}/status"))
            .timeout(Duration::from_secs(2))
            .call()
        {
            Ok(r) => {
                let v: Value = serde_json::from_str(&r.into_string().ok()?).ok()?;
                (v["value"]["ready"] == true).then_some(())
            }
            Err(_) => None,
        }
    });
    (child, url)
}

/// A WebDriver session: the few commands the test needs, as plain HTTP.
struct Session {
    driver: String,
    id: String,
}

impl Session {
    fn new(driver: &str, chromium: &str, profile: &Path) -> Session {
        let capabilities = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu",
                    "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                    format!("--user-data-dir={}", profile.display()),
                ],
            },
        }}});
        let (status, body) = json_of("POST", &format!("{driver}/session"), Some(&capabilities));
        assert_eq!(status, 200, "a WebDriver session: {body}");
        Session {
            driver: driver.to_string(),
            id: body["value"]["sessionId"].as_str().unwrap().to_string(),
        }
    }

    fn command(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let url = format!("{}/session/{}{path}", self.driver, self.id);
        let body = (method == "POST").then(|| body.unwrap_or_else(|| json!({})));
        json_of(method, &url, body.as_ref())
    }

    fn go(&self, url: &str) {
        let (status, body) = self.command("POST", "/url", Some(json!({ "url": url })));
        assert_eq!(status, 200, "{body}");
    }

    /// The text of the first element `css` selects, if there is one.
    fn text(&self, css: &str) -> Option<String> {
        let (status, found) = self.command(
            "POST",
            "/element",
            Some(json!({ "using": "css selector", "value": css })),
        );
        if status != 200 {
            return None;
        }
        let element = found["value"]
            .as_object()?
            .values()
            .next()?
            .as_str()?
            .to_string();
        let (status, text) = self.command("GET", &format!("/element/{element}/text"), None);
        (status == 200).then(|| text["value"].as_str().unwrap_or_default().to_string())
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = ureq::delete(&format!("{}/session/{}", self.driver, self.id))
            .timeout(TIMEOUT)
            .call();
    }
}

#[test]
fn the_dashboard_shows_a_queue_and_its_depth_changing_in_headless_chromium() {
    let chromium =
        find_program(&["chromium", "chromium-browser", "google-chrome"]).unwrap_or_else(|| {
            panic!(
                "no chromium on PATH: install Debian's chromium and chromium-driver \
             (apt-get install -y chromium chromium-driver; .ci/run does) to run the dashboard test"
            )
        });
    let driver = find_program(&["chromedriver"]).unwrap_or_else(|| {
        panic!(
            "no chromedriver on PATH: install Debian's chromium-driver \
             (apt-get install -y chromium chromium-driver; .ci/run does) to run the dashboard test"
        )
    });
    let dir = temp_dir("admin-browser");
    let broker = Broker::start(&dir.join("data"), TWO_SHARDS);
    let admin = admin_url(&broker);
    let (status, _) = http("PUT", &format!("{admin}/api/queues/shown"), None);
    assert_eq!(status, 200);
    publish(broker.listen, "shown", 3);

    let (_driver, driver_url) = start_chromedriver(&driver);
    let session = Session::new(&driver_url, &chromium, &dir.join("profile"));
    session.go(&format!("{admin}/"));
    let title = session.command("GET", "/title", None).1;
    assert_eq!(title["value"], "weir");
    let ready = "tr[data-queue=\"shown\"] td.ready";
    poll("the dashboard to show 3 ready in queue shown", || {
        (session.text(ready).as_deref() == Some("3")).then_some(())
    });
    publish(broker.listen, "shown", 4);
    poll("the dashboard's depth to change to 7", || {
        (session.text(ready).as_deref() == Some("7")).then_some(())
    });
    let shards = session.text("#shards").unwrap_or_default();
    assert_eq!(shards, "2 / 2");
}
