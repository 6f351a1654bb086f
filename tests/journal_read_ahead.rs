//! Read-ahead over the fault layer: a backlog read back in order takes one read per window, not
//! one per record; a window never holds bytes past its segment's durable end (so records
//! committed after it are read from disk, not from stale memory), never outlives its segment's
//! reclaim, and the windows kept stay within their byte bound, the oldest evicted first.

mod journal_support;

use futures_lite::future::block_on;
use journal_support::*;
use weir::storage::fault::FaultDir;
use weir::storage::{Appended, Journal, StorageError};

/// Appends control records `first..first + n` of `len` bytes (record `i` holds byte `i`), each
/// in its own commit (so each in its own block); returns them in order.
async fn append_committed(
    j: &Journal<FaultDir>,
    first: usize,
    n: usize,
    len: usize,
) -> Vec<Appended> {
    let mut out = Vec::new();
    for i in first..first + n {
        let a = j.append_control(&vec![i as u8; len]).expect("append");
        j.commit(&a).await.expect("commit");
        out.push(a);
    }
    out
}

async fn read_all(j: &Journal<FaultDir>, records: &[Appended], first: usize, len: usize) {
    for (i, a) in records.iter().enumerate() {
        let r = j.read(a.position, Some(a.len)).await.expect("read");
        assert_eq!(r.body(), &vec![(first + i) as u8; len][..], "record {i}");
    }
}

#[test]
fn a_backlog_is_read_back_in_windows_not_record_by_record() {
    let dir = FaultDir::new();
    block_on(async {
        let (j, _) = open(dir.clone(), small_config()).await.expect("opens");
        with_committer(&j, async {
            // 32 KiB segments; records of 300 bytes, one commit (and so one block) each, fill
            // several segments.
            let records = append_committed(&j, 0, 40, 300).await;
            let segments = j.segments().len() as u64;
            assert!(segments >= 3, "{segments} segments");

            // Off (the journal's default): one read per record.
            let reads = dir.reads();
            read_all(&j, &records, 0, 300).await;
            assert_eq!(dir.reads() - reads, 40);

            // On: one read per segment (a window ends at its segment's durable end).
            j.set_read_ahead_bytes_max(1 << 20);
            let reads = dir.reads();
            let before = j.read_back_stats();
            read_all(&j, &records, 0, 300).await;
            let took = dir.reads() - reads;
            assert!(took <= segments, "{took} reads for {segments} segments");
            let after = j.read_back_stats();
            assert_eq!(after.records - before.records, 40);
            assert_eq!(
                after.reads - before.reads,
                took,
                "the counter counts disk reads"
            );
            j.close().await;
        })
        .await;
    });
}

#[test]
fn a_window_never_holds_bytes_past_the_durable_end() {
    let dir = FaultDir::new();
    block_on(async {
        let (j, _) = open(dir.clone(), small_config()).await.expect("opens");
        j.set_read_ahead_bytes_max(1 << 20);
        with_committer(&j, async {
            let early = append_committed(&j, 0, 3, 100).await;
            read_all(&j, &early, 0, 100).await;
            // Committed after the window was read, in the same segment: behind the window's
            // end, so read from disk. A window reaching past the durable end would have held
            // the preallocated zeros here and failed the record's check.
            let later = append_committed(&j, 3, 3, 100).await;
            assert_eq!(later[0].position.segment(), early[0].position.segment());
            let reads = dir.reads();
            read_all(&j, &later, 3, 100).await;
            assert_eq!(dir.reads() - reads, 1, "one window for the three");
            // Staged, not durable: not readable, from a window or otherwise.
            let staged = j.append_control(&[9; 100]).expect("append");
            match j.read(staged.position, Some(staged.len)).await {
                Err(StorageError::NotFound { .. }) => {}
                other => panic!("read of a staged record: {:?}", other.map(|r| r.kind)),
            }
            j.commit(&staged).await.expect("commit");
            j.close().await;
        })
        .await;
    });
}

#[test]
fn a_reclaimed_segment_is_never_served_from_a_window() {
    let dir = FaultDir::new();
    block_on(async {
        let (j, _) = open(dir.clone(), small_config()).await.expect("opens");
        j.set_read_ahead_bytes_max(1 << 20);
        with_committer(&j, async {
            let records = append_committed(&j, 0, 40, 300).await;
            let first = records[0];
            j.read(first.position, Some(first.len)).await.expect("read");
            let kept = j.read_ahead_bytes();
            assert!(kept > 0);
            j.reclaim(first.position.segment()).await.expect("reclaim");
            assert!(j.read_ahead_bytes() < kept, "its window went with it");
            match j.read(first.position, Some(first.len)).await {
                Err(StorageError::NotFound { .. }) => {}
                other => panic!("read of a reclaimed record: {:?}", other.map(|r| r.kind)),
            }
            j.close().await;
        })
        .await;
    });
}

#[test]
fn windows_stay_within_their_bytes_and_the_oldest_goes_first() {
    let dir = FaultDir::new();
    block_on(async {
        let (j, _) = open(dir.clone(), small_config()).await.expect("opens");
        // 8 KiB windows, two of them.
        j.set_read_ahead_bytes_max(16 << 10);
        with_committer(&j, async {
            let records = append_committed(&j, 0, 40, 300).await;
            read_all(&j, &records, 0, 300).await;
            assert!(j.read_ahead_bytes() <= 16 << 10);
            // The newest window still serves; the first record's went long ago.
            let reads = dir.reads();
            let last = records[39];
            j.read(last.position, Some(last.len)).await.expect("read");
            assert_eq!(dir.reads(), reads, "served from the newest window");
            let first = records[0];
            j.read(first.position, Some(first.len)).await.expect("read");
            assert_eq!(dir.reads(), reads + 1, "evicted: read again");
            j.close().await;
        })
        .await;
    });
}
