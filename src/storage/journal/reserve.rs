//! The disk reserve: room kept back for the records that free disk.
//!
//! Contract: runs on the shard thread. The reserve is one preallocated file, `reserve`, of
//! `reserve_bytes` in the journal's directory, never read or written, only created and removed.
//! A full disk refuses message records (`NoSpace`), but a commit holding no message record, with
//! none staged behind it, whose segment cannot be created for want of space removes the reserve
//! and creates the segment again in the room it leaves ([`Journal::spend_reserve`], from the
//! committer): so acks, nacks, purges, deletes and reclaim's restatement of the catalog become
//! durable on a full disk, and reclaim can delete the segments they free. Message records stay
//! refused until the reserve is whole again: [`Journal::restore_reserve`], which the reclaim
//! timer calls while it is missing (after a round that deleted segments, and every 10 s), makes
//! it again once there is room, and only then are messages taken. So a segment made from the reserve never holds a message record, and a
//! full disk empties itself as consumers drain it.
//!
//! Decisions, at open and after (also in `src/storage/README.md`):
//!
//! | row | finding | decision |
//! |---|---|---|
//! | V1 | `reserve_bytes` 0 | no reserve: a full disk refuses every append until space returns |
//! | V2 | open: the file is there, at least `reserve_bytes` long | use it |
//! | V3 | open: missing or short (a crash while making or spending it) | make it again; out of room: start with message records refused, said in the log, and try again later (V6) |
//! | V4 | a segment creation runs out of space; no message record in its commit or staged | remove the reserve, sync the directory, create the segment again; message records refused from then on |
//! | V5 | the same with message records | fail the commit `NoSpace`, as without a reserve |
//! | V6 | reserve missing, a reclaim round deleted segments (or 10 s passed) | make it again; out of room: remove what was made, message records still refused |
//!
//! Faults handled: a failed removal of the reserve fails the commit with the `NoSpace` that
//! asked for it (the file's fate is left to V3/V6); a reserve that cannot be made for any reason
//! leaves message records refused and is tried again; nothing here poisons the journal.

use super::{Journal, Reserve};
use crate::storage::error::is_no_space;
use crate::storage::io::{SegmentDir, SegmentFile};
use crate::storage::segment::RESERVE_FILE_NAME;

impl<D: SegmentDir + 'static> Journal<D> {
    /// At open (V1-V3): uses a whole reserve, or makes one, or says why it cannot.
    pub(super) async fn open_reserve(&self) {
        let want = self.inner.config.limits.reserve_bytes;
        if want == 0 {
            return;
        }
        let dir = &self.inner.dir;
        if let Ok(file) = dir.open(RESERVE_FILE_NAME).await {
            let size = file.size().await.unwrap_or(0);
            let _ = file.close().await;
            if size >= want {
                self.inner.state.borrow_mut().reserve = Reserve::Present;
                return;
            }
        }
        if let Err(why) = self.restore_reserve().await {
            tracing::warn!(
                shard = self.inner.config.shard_id,
                "journal: {why}; publishes are refused until reclaim frees room for it"
            );
        }
    }

    /// Whether the reserve is missing (spent, or never made): message records are refused.
    pub fn reserve_missing(&self) -> bool {
        self.inner.state.borrow().reserve == Reserve::Missing
    }

    /// Makes the reserve again, if it is missing (V3, V6); once it is whole, message records are
    /// taken again. Returns why it could not be made.
    pub async fn restore_reserve(&self) -> Result<(), String> {
        {
            let mut st = self.inner.state.borrow_mut();
            if st.reserve != Reserve::Missing {
                return Ok(());
            }
            st.reserve = Reserve::Making;
        }
        let made = self.make_reserve().await;
        let mut st = self.inner.state.borrow_mut();
        match made {
            Ok(()) => {
                st.reserve = Reserve::Present;
                st.no_space = None;
                // At a first start this is the reserve's making; after a full disk, its remaking.
                tracing::info!(
                    shard = self.inner.config.shard_id,
                    bytes = self.inner.config.limits.reserve_bytes,
                    "journal: disk reserve made; message records are taken"
                );
                Ok(())
            }
            Err(why) => {
                st.reserve = Reserve::Missing;
                Err(why)
            }
        }
    }

    async fn make_reserve(&self) -> Result<(), String> {
        let dir = &self.inner.dir;
        let want = self.inner.config.limits.reserve_bytes;
        let path = dir.describe(RESERVE_FILE_NAME);
        // A short one left by a crash or a failed try goes first: `create` makes a new name.
        let _ = dir.remove(RESERVE_FILE_NAME).await;
        let made = async {
            let file = dir.create(RESERVE_FILE_NAME).await?;
            // Its size made durable too, so a reopened journal finds it whole (V2).
            let allocated = match file.preallocate(want).await {
                Ok(()) => file.fdatasync().await,
                Err(e) => Err(e),
            };
            let _ = file.close().await;
            allocated?;
            dir.sync().await
        }
        .await;
        match made {
            Ok(()) => Ok(()),
            Err(e) => {
                let _ = dir.remove(RESERVE_FILE_NAME).await;
                let _ = dir.sync().await;
                let room = if is_no_space(&e) {
                    "no room for"
                } else {
                    "cannot make"
                };
                Err(format!(
                    "{room} the disk reserve of {want} bytes ({path}): {e}"
                ))
            }
        }
    }

    /// V4: called by the committer when creating a segment ran out of space. Spends the reserve
    /// if there is one and no message record is in this commit (`commit_has_messages`) or staged
    /// behind it; returns whether it did, so the caller creates the segment again.
    pub(super) async fn spend_reserve(&self, commit_has_messages: bool, why: &str) -> bool {
        {
            let mut st = self.inner.state.borrow_mut();
            if st.reserve != Reserve::Present
                || commit_has_messages
                || st.staged.iter().any(|c| c.messages > 0)
            {
                return false;
            }
            st.reserve = Reserve::Missing;
            // From now on message records are refused (`append_with` sees the reserve missing).
            st.no_space = Some(why.to_string());
        }
        tracing::warn!(
            shard = self.inner.config.shard_id,
            "journal: disk full ({why}); spending the disk reserve on settle and control records, \
             refusing message records until reclaim frees room to make it again"
        );
        let dir = &self.inner.dir;
        match dir.remove(RESERVE_FILE_NAME).await {
            Ok(()) => dir.sync().await.is_ok(),
            Err(e) => {
                tracing::warn!(
                    shard = self.inner.config.shard_id,
                    "journal: removing the disk reserve {}: {e}",
                    dir.describe(RESERVE_FILE_NAME)
                );
                false
            }
        }
    }
}
