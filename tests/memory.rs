//! Bounded memory: a backlog far larger than the payload budget lives in the journal, and the
//! broker's memory for payloads stays within `cache_bytes_max`.

mod common;

use common::{temp_dir, Broker};
use weir_protocol::wire::{BodyT, ErrorCode};

#[test]
fn a_backlog_beyond_the_cache_budget_spills_to_the_journal_and_comes_back_in_order() {
    let dir = temp_dir("mem-spill");
    let config = dir.join("weir.toml");
    // 256 KiB of payloads in memory; the backlog below is 2 MiB.
    std::fs::write(
        &config,
        "cpus = [0]\n[limits]\nmessage_size_max = 65536\ncache_bytes_max = 262144\n",
    )
    .unwrap();
    let broker = Broker::start(&dir, &["--config", config.to_str().unwrap()]);
    let mut c = broker.connect();
    c.handshake();
    c.declare("backlog");
    let durable: Vec<Vec<u8>> = (0..2000)
        .map(|i| format!("{i:04}").repeat(256).into_bytes())
        .collect();
    for (chunk, first) in durable.chunks(200).zip((1..).step_by(200)) {
        let refs: Vec<&[u8]> = chunk.iter().map(|b| b.as_slice()).collect();
        c.publish("backlog", first, &refs, false);
        c.await_confirms(first, first + 199);
    }

    // Had the 2 MiB stayed in memory, the budget would be spent and these would be refused:
    // journaled payloads keep at most half of it.
    let transient: Vec<Vec<u8>> = (0..50)
        .map(|i| format!("t{i:03}").repeat(256).into_bytes())
        .collect();
    let refs: Vec<&[u8]> = transient.iter().map(|b| b.as_slice()).collect();
    c.publish_with("backlog", 10_001, &refs, false, false);
    c.await_confirms(10_001, 10_050);

    // Transient messages cannot be spilled: past the budget they are refused, by sequence.
    let more: Vec<Vec<u8>> = (0..400).map(|_| vec![7u8; 1024]).collect();
    let refs: Vec<&[u8]> = more.iter().map(|b| b.as_slice()).collect();
    c.publish_with("backlog", 20_001, &refs, false, false);
    let mut refused = 0;
    let mut confirmed = 0;
    while refused + confirmed < 400 {
        match c.recv().expect("open").body {
            BodyT::Confirm(cf) => {
                confirmed += cf.ranges.iter().map(|r| r.last - r.first + 1).sum::<u64>()
            }
            BodyT::Error(e) => {
                assert_eq!(e.code, ErrorCode::LimitExceeded, "{e:?}");
                assert!(e.message.unwrap().contains("cache_bytes_max"));
                refused += e
                    .sequences
                    .unwrap()
                    .iter()
                    .map(|r| r.last - r.first + 1)
                    .sum::<u64>();
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(
        refused > 0,
        "transient payloads beyond the budget were all taken"
    );

    // Every spilled message comes back from the journal, byte for byte, in publish order.
    c.consume("backlog", "drain", 500, true);
    let got = c.deliveries(2000 + 50 + confirmed as usize);
    let bodies: Vec<Vec<u8>> = got.into_iter().map(|g| g.body).collect();
    assert_eq!(&bodies[..2000], &durable[..]);
    assert_eq!(&bodies[2000..2050], &transient[..]);
}
