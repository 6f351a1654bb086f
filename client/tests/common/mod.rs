//! Test harness: the real `weir` broker on 127.0.0.1 with ephemeral ports and a temporary data
//! directory, killed when dropped, and a bound on every wait.
//!
//! The broker binary belongs to another package, so cargo does not hand its path to these tests:
//! weir-testkit builds it once per test binary (a no-op when it is fresh), so `cargo test -p
//! weir-client` on a clean clone works and never tests a stale broker. Nothing here synchronises
//! by sleeping: the broker prints a ready line when its listeners are bound, and every wait is
//! bounded by `within`.

#![allow(dead_code)]

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use weir_client::{Client, ClientOptions, Consumer, Delivery, Message};

/// Longest any single wait may take before the test fails.
pub const TIMEOUT: Duration = Duration::from_secs(20);

/// Awaits `f`, failing the test if it takes longer than `TIMEOUT`.
pub async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    match tokio::time::timeout(TIMEOUT, f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {TIMEOUT:?} waiting for {what}"),
    }
}

/// A fresh directory under cargo's per-test temporary directory.
pub fn temp_dir(name: &str) -> PathBuf {
    weir_testkit::fresh_dir(env!("CARGO_TARGET_TMPDIR"), &format!("client-{name}"))
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
    /// `weir serve` on ephemeral ports, data in a fresh directory named after `name`, with
    /// `extra` arguments; returns once its ready line is printed.
    pub fn start(name: &str, extra: &[&str]) -> Broker {
        let serve = weir_testkit::Serve::new(weir_testkit::weir_binary())
            .data_dir(temp_dir(name))
            .args(extra)
            .ready_timeout(TIMEOUT);
        Broker(serve.start().unwrap_or_else(|e| panic!("{e}")))
    }

    /// Kills the broker with SIGKILL and starts it again on the same data directory (new ports).
    pub fn restart(self) -> Broker {
        Broker(self.0.restart().unwrap_or_else(|e| panic!("{e}")))
    }

    /// Starts a broker with a configuration file holding `toml`.
    pub fn start_with_config(name: &str, toml: &str, extra: &[&str]) -> Broker {
        let path = temp_dir(&format!("{name}-config")).join("weir.toml");
        std::fs::write(&path, toml).expect("write the configuration file");
        let config = path.to_str().expect("a UTF-8 temporary path").to_string();
        let mut args = vec!["--config", config.as_str()];
        args.extend_from_slice(extra);
        Broker::start(name, &args)
    }

    /// Sends SIGTERM: the broker's orderly shutdown.
    pub fn terminate(&self) {
        self.0.signal_term().expect("kill -TERM failed");
    }

    pub fn shard_count(&self) -> u16 {
        self.shard_ports.len() as u16
    }

    pub async fn client(&self) -> Client {
        self.client_with(ClientOptions::default()).await
    }

    pub async fn client_with(&self, options: ClientOptions) -> Client {
        within("connect", Client::connect(self.listen, options))
            .await
            .expect("connect to the broker")
    }
}

pub fn messages(prefix: &str, n: usize) -> Vec<Message> {
    (0..n)
        .map(|i| Message::new(format!("{prefix} {i}")))
        .collect()
}

pub fn bodies(prefix: &str, n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| format!("{prefix} {i}").into_bytes())
        .collect()
}

/// A queue name whose hash places it on `shard` of `shards`, by the client's placement function.
pub fn queue_on(shard: u16, shards: u16, prefix: &str) -> String {
    (0..)
        .map(|i| format!("{prefix}-{i}"))
        .find(|n| weir_client::placement(n, shards) == shard)
        .expect("some name hashes to every shard")
}

/// The next `n` deliveries of `consumer` (bounded by `TIMEOUT`).
pub async fn take(consumer: &mut Consumer, n: usize) -> Vec<Delivery> {
    let mut got = Vec::new();
    within("deliveries", async {
        while got.len() < n {
            got.push(consumer.recv().await.expect("open").expect("a delivery"));
        }
    })
    .await;
    got
}

/// The deliveries' bodies, as text.
pub fn bodies_of(ds: &[Delivery]) -> Vec<String> {
    ds.iter()
        .map(|d| String::from_utf8_lossy(d.body()).into_owned())
        .collect()
}

/// Publishes "m{i}" for each `i` of `range` to `queue`, one at a time, each confirmed.
pub async fn publish_numbered(client: &Client, queue: &str, range: std::ops::Range<usize>) {
    for i in range {
        let m = Message::new(format!("m{i}"));
        client.publish(queue, m).await.unwrap().await.unwrap();
    }
}
