//! Shared by the tests/journal_*.rs suites: a tiny driver that polls the committer next to a
//! workload (no executor needed for the in-memory fault layer), small limits that make segment
//! rolls and multi-chunk commits happen within a few dozen records, and the model that every
//! recovered journal is checked against.

#![allow(dead_code)]

use std::cell::RefCell;
use std::future::Future;
use std::pin::pin;
use std::rc::Rc;

use weir::storage::fault::FaultDir;
use weir::storage::io::SegmentDir;
use weir::storage::{Journal, JournalConfig, Position, RecordKind, StorageError, StorageLimits};

/// Small limits: 32 KiB segments, 8 KiB commit chunks, records up to 4 KiB.
pub fn small_config() -> JournalConfig {
    JournalConfig {
        shard_id: 7,
        limits: StorageLimits {
            segment_size_bytes_max: 32 << 10,
            record_bytes_max: 4 << 10,
            commit_bytes_max: 8 << 10,
            staged_bytes_max: 16 << 10,
            read_window_bytes: 16 << 10,
            reserve_bytes: 0,
        },
    }
}

/// Polls `workload` to completion, polling the journal's committer alongside until it stops.
pub fn drive<D: SegmentDir + 'static, T>(
    journal: &Journal<D>,
    workload: impl Future<Output = T>,
) -> T {
    futures_lite::future::block_on(with_committer(journal, workload))
}

/// Runs `workload` while polling the committer (which stops at close or failure).
pub async fn with_committer<D: SegmentDir + 'static, T>(
    journal: &Journal<D>,
    workload: impl Future<Output = T>,
) -> T {
    let mut committer = pin!(journal.clone().run_committer());
    let mut committer_done = false;
    let mut workload = pin!(workload);
    std::future::poll_fn(|cx| {
        if !committer_done && committer.as_mut().poll(cx).is_ready() {
            committer_done = true;
        }
        workload.as_mut().poll(cx)
    })
    .await
}

/// Opens (recovering) the journal in `dir`; returns it with the replayed records.
pub async fn open<D: SegmentDir + 'static>(
    dir: D,
    config: JournalConfig,
) -> Result<(Journal<D>, Vec<(Position, RecordKind, Vec<u8>)>), StorageError> {
    let mut replayed = Vec::new();
    let (j, _report) =
        Journal::open(dir, config, |p, k, b| replayed.push((p, k, b.to_vec()))).await?;
    Ok((j, replayed))
}

/// The deterministic body of scripted record `i`: sizes chosen to land records on, across and
/// inside block boundaries, contents from a per-record generator so a misplaced byte shows.
pub fn body(i: usize) -> Vec<u8> {
    const SIZES: [usize; 8] = [17, 900, 3000, 1, 4000, 250, 64, 2048];
    let len = SIZES[i % SIZES.len()] + i;
    let mut x = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// What the journal was asked to keep: every record appended, in append order, and which of
/// them a successful commit confirmed.
#[derive(Default, Debug)]
pub struct Model {
    pub log: Vec<Vec<u8>>,
    pub committed: Vec<bool>,
}

impl Model {
    pub fn appended(&mut self, body: Vec<u8>) -> usize {
        self.log.push(body);
        self.committed.push(false);
        self.log.len() - 1
    }

    /// Records `0..must` have to be recovered.
    pub fn must(&self) -> usize {
        self.committed.iter().rposition(|&c| c).map_or(0, |i| i + 1)
    }

    /// Every committed record recovered, in order, byte for byte; uncommitted ones only as a
    /// prefix; nothing else.
    pub fn check(&self, recovered: &[(Position, RecordKind, Vec<u8>)], context: &str) {
        self.check_prefix(recovered, context);
        assert!(
            recovered.len() >= self.must(),
            "{context}: recovered {} records but {} were committed",
            recovered.len(),
            self.must()
        );
    }

    /// Recovered records are a prefix of what was appended, byte for byte, in order (for tests
    /// that damage committed data on purpose and assert the count themselves).
    pub fn check_prefix(&self, recovered: &[(Position, RecordKind, Vec<u8>)], context: &str) {
        assert!(
            recovered.len() <= self.log.len(),
            "{context}: recovered {} records, only {} were ever appended",
            recovered.len(),
            self.log.len()
        );
        for (i, (pos, kind, b)) in recovered.iter().enumerate() {
            assert_eq!(
                *kind,
                RecordKind::Control,
                "{context}: record {i} at {pos} has kind {kind:?}"
            );
            assert!(
                *b == self.log[i],
                "{context}: record {i} at {pos} differs from what was appended ({} vs {} bytes)",
                b.len(),
                self.log[i].len()
            );
        }
        let positions: Vec<_> = recovered.iter().map(|r| r.0).collect();
        assert!(
            positions.windows(2).all(|w| w[0] < w[1]),
            "{context}: positions not in order"
        );
    }

    /// After a recovery, the log is what was recovered; all of it is now part of the journal.
    pub fn reset_to(&mut self, recovered: &[(Position, RecordKind, Vec<u8>)]) {
        self.log = recovered.iter().map(|r| r.2.clone()).collect();
        self.committed = vec![true; self.log.len()];
    }
}

/// `appenders` concurrent appenders append scripted records `range` (interleaved), each
/// awaiting the commit of every second record and of its last one.
pub async fn phase<D: SegmentDir + 'static>(
    journal: &Journal<D>,
    model: &Rc<RefCell<Model>>,
    range: std::ops::Range<usize>,
    appenders: usize,
) {
    let tasks: Vec<_> = (0..appenders)
        .map(|a| {
            let journal = journal.clone();
            let model = model.clone();
            let mine: Vec<usize> = range.clone().filter(|i| i % appenders == a).collect();
            async move {
                let n = mine.len();
                for (k, i) in mine.into_iter().enumerate() {
                    let b = body(i);
                    journal.wait_for_room(b.len() + 64).await;
                    let appended = match journal.append_control(&b) {
                        Ok(x) => x,
                        Err(_) => return,
                    };
                    let idx = model.borrow_mut().appended(b);
                    if k % 2 == 1 || k + 1 == n {
                        match journal.commit(&appended).await {
                            Ok(()) => model.borrow_mut().committed[idx] = true,
                            Err(_) => return,
                        }
                    }
                }
            }
        })
        .collect();
    weir::storage::io::join_all(tasks).await;
}

/// The scripted workload of the crash tests: two phases with a close and a reopen (recovery)
/// between them, so crash points also cover segment creation after a restart.
pub async fn scripted_workload(dir: FaultDir, model: Rc<RefCell<Model>>) {
    let Ok((j, replayed)) = open(dir.clone(), small_config()).await else {
        return;
    };
    model.borrow().check(&replayed, "initial open");
    with_committer(&j, async {
        phase(&j, &model, 0..20, 3).await;
        j.close().await;
    })
    .await;
    let Ok((j, replayed)) = open(dir.clone(), small_config()).await else {
        return;
    };
    model.borrow().check(&replayed, "reopen");
    model.borrow_mut().reset_to(&replayed);
    with_committer(&j, async {
        phase(&j, &model, 20..36, 2).await;
        j.close().await;
    })
    .await;
}
