//! The disk reserve's decisions (`storage::journal::reserve`, rows V1-V6), on the in-memory
//! fault-injecting directory with a capped disk: a full disk refuses message records but lets
//! settle and control records spend the reserve, a commit carrying messages never spends it,
//! message records come back only once the reserve is whole again, and a reserve missing at
//! open is made again when there is room. The same on a real full disk, end to end through the
//! broker: tests/disk_full_drain.rs.

mod journal_support;

use futures_lite::future::block_on;
use journal_support::*;
use weir::storage::fault::{FaultDir, Image};
use weir::storage::{
    JournalConfig, MessageEnvelope, RecordKind, SettleReason, SettleRecord, StorageError, Target,
};

const RESERVE: &str = "reserve";

/// The small limits with a reserve of two segments.
fn config() -> JournalConfig {
    let mut c = small_config();
    c.limits.reserve_bytes = 2 * c.limits.segment_size_bytes_max;
    c
}

fn message(
    j: &weir::storage::Journal<FaultDir>,
    seq: u64,
) -> Result<weir::storage::Appended, StorageError> {
    let env = MessageEnvelope {
        deaths: &[],
        exchange: b"",
        routing_key: b"q",
        targets: vec![Target {
            queue: b"q",
            queue_seq: seq,
        }],
    };
    j.append_message(&env, &[b'm'; 1000])
}

fn ack(
    j: &weir::storage::Journal<FaultDir>,
    seq: u64,
) -> Result<weir::storage::Appended, StorageError> {
    j.append_settle(&SettleRecord {
        queue: b"q",
        reason: SettleReason::Acked,
        ranges: vec![(seq, seq)],
    })
}

fn has_reserve(dir: &FaultDir) -> bool {
    dir.names().iter().any(|n| n == RESERVE)
}

#[test]
fn on_a_full_disk_messages_are_refused_settles_spend_the_reserve_and_reclaim_makes_it_again() {
    let dir = FaultDir::new();
    let config = config();
    let seg = config.limits.segment_size_bytes_max;
    // The reserve and three segments; the fourth cannot be preallocated.
    dir.set_space_bytes_max(Some(config.limits.reserve_bytes + 3 * seg + 4096));
    let mut messages = 0u64;
    let mut acks = 0u64;
    block_on(async {
        let (j, _) = open(dir.clone(), config.clone()).await.expect("opens");
        assert!(has_reserve(&dir), "V3: no reserve made at open");
        with_committer(&j, async {
            // Messages until the disk is full: the commits carrying them never spend the
            // reserve (V5).
            let err = loop {
                let a = match message(&j, messages + 1) {
                    Ok(a) => a,
                    Err(e) => break e,
                };
                match j.commit(&a).await {
                    Ok(()) => messages += 1,
                    Err(e) => break e,
                }
                assert!(messages < 1000, "never ran out of space");
            };
            assert!(matches!(err, StorageError::NoSpace(_)), "got {err}");
            assert!(has_reserve(&dir), "a commit of messages spent the reserve");
            assert!(matches!(
                message(&j, messages + 1),
                Err(StorageError::NoSpace(_))
            ));

            // Acks are taken and become durable: their commit spends the reserve (V4)...
            let mut last = None;
            for seq in 1..=messages {
                last = Some(ack(&j, seq).expect("an ack on a full disk is taken"));
                acks += 1;
            }
            let last = last.expect("acks");
            j.commit(&last)
                .await
                .expect("acks on a full disk are durable");
            let a = j.append_control(b"restated").expect("control taken");
            j.commit(&a).await.expect("control durable");
            assert!(!has_reserve(&dir), "the reserve was not spent");
            assert!(j.reserve_missing());
            // ...and message records stay refused while it is missing.
            let refused = message(&j, messages + 1).expect_err("a message took the spent reserve");
            assert!(matches!(refused, StorageError::NoSpace(_)), "got {refused}");
            assert!(refused.to_string().contains("reserve"), "{refused}");

            // No room for the reserve before reclaim freed some (V6).
            assert!(
                j.restore_reserve().await.is_err(),
                "room for a reserve on a full disk"
            );
            assert!(!has_reserve(&dir), "a short reserve was left behind");
            assert!(message(&j, messages + 1).is_err());
            // Reclaim frees the acked segments; the reserve is made again only when there is
            // room for all of it (V6), and only then are messages taken again.
            for s in j.segments() {
                if s.active {
                    continue;
                }
                j.reclaim(s.number).await.expect("reclaim");
                if j.restore_reserve().await.is_err() {
                    assert!(!has_reserve(&dir), "a short reserve was left behind");
                    assert!(message(&j, messages + 1).is_err());
                }
            }
            assert!(!j.reserve_missing(), "reclaim freed three segments");
            assert!(has_reserve(&dir));
            let a = message(&j, messages + 1).expect("messages are taken again");
            j.commit(&a).await.expect("and committed");
            messages += 1;
            j.close().await;
        })
        .await;
    });
    assert!(messages >= 3, "the disk filled after {messages} messages");
    // Every commit survives a crash: the last message, and every ack.
    let (_, replayed) =
        block_on(open(dir.crash_image(Image::LoseUnsynced), small_config())).expect("recovers");
    let settles = replayed
        .iter()
        .filter(|r| r.1 == RecordKind::Settle)
        .count() as u64;
    assert_eq!(settles, acks);
    assert_eq!(replayed.last().expect("records").1, RecordKind::Message);
}

#[test]
fn a_reserve_missing_at_open_is_made_when_there_is_room_and_messages_wait_for_it() {
    let dir = FaultDir::new();
    let config = config();
    let seg = config.limits.segment_size_bytes_max;
    // A short reserve left behind (a crash while making it), and no room for a whole one.
    dir.put_file(RESERVE, vec![0; 4096]);
    dir.set_space_bytes_max(Some(config.limits.reserve_bytes - 4096));
    block_on(async {
        let (j, _) = open(dir.clone(), config.clone())
            .await
            .expect("opens anyway");
        assert!(j.reserve_missing());
        assert!(!has_reserve(&dir), "the short reserve was kept");
        with_committer(&j, async {
            let refused = message(&j, 1).expect_err("a message without a reserve");
            assert!(matches!(refused, StorageError::NoSpace(_)), "got {refused}");
            // Records that free disk still go, while they fit.
            let a = j.append_control(b"declare").expect("control taken");
            j.commit(&a).await.expect("control durable");
            // Room returns: the reserve is made, and messages are taken.
            dir.set_space_bytes_max(Some(config.limits.reserve_bytes + 2 * seg + 4096));
            j.restore_reserve().await.expect("room for the reserve");
            assert!(has_reserve(&dir));
            let a = message(&j, 1).expect("a message once the reserve is whole");
            j.commit(&a).await.expect("committed");
            j.close().await;
        })
        .await;
    });
    // A whole reserve found at open is used as it is (V2).
    let image = dir.crash_image(Image::LoseUnsynced);
    assert!(has_reserve(&image), "the reserve's name was not synced");
    let (j, replayed) = block_on(open(image, config)).expect("recovers");
    assert!(!j.reserve_missing());
    assert_eq!(replayed.len(), 2);
}

#[test]
fn without_a_reserve_a_full_disk_refuses_settles_too() {
    // V1: reserve_bytes 0 keeps the journal's behaviour without one.
    let dir = FaultDir::new();
    let config = small_config();
    dir.set_space_bytes_max(Some(2 * config.limits.segment_size_bytes_max + 4096));
    block_on(async {
        let (j, _) = open(dir.clone(), config.clone()).await.expect("opens");
        assert!(!has_reserve(&dir));
        with_committer(&j, async {
            let mut seq = 1;
            loop {
                let a = message(&j, seq).expect("append");
                seq += 1;
                if j.commit(&a).await.is_err() {
                    break;
                }
            }
            let refused = ack(&j, 1).expect_err("an ack without a reserve");
            assert!(matches!(refused, StorageError::NoSpace(_)), "got {refused}");
            j.close().await;
        })
        .await;
    });
}
