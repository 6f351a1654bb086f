//! The file seam: the few file operations the journal uses, as traits.
//!
//! Contract: implemented by `crate::rt::fs` (glommio DMA files, O_DIRECT, the broker's I/O) and by
//! [`crate::storage::fault`] (memory, crashes on command, for tests). Implementations run on the
//! shard thread; their futures are not `Send` and need not be. Every write and read the journal
//! issues is aligned to `BLOCK_BYTES` in position and length, as O_DIRECT requires; the fault
//! layer asserts it so a misaligned write fails in tests, not first in production.
//!
//! Durability model the journal relies on, and the fault layer simulates: a write is durable
//! only after `fdatasync` of its file returns; a created or removed name is durable only after
//! `sync` of the directory returns; an un-synced write may land whole, in part (any subset of its
//! 512-byte sectors) or not at all.

// The seam is single-threaded by design (thread-per-core): its futures are never sent across
// threads, so the auto-trait bounds this lint asks for would be wrong, not missing.
#![allow(async_fn_in_trait)]

use std::io;
use std::ops::Deref;

/// An aligned buffer that a write consumes (a DMA buffer for O_DIRECT).
pub trait IoBuf {
    /// Its bytes.
    fn bytes(&self) -> &[u8];
    /// Its bytes, writable.
    fn bytes_mut(&mut self) -> &mut [u8];
    /// Shortens it to `len` bytes (a multiple of the block size).
    fn truncate(&mut self, len: usize);
}

/// A directory of segment files.
pub trait SegmentDir {
    /// An open segment file.
    type File: SegmentFile<Buf = Self::Buf>;
    /// The write buffer type.
    type Buf: IoBuf;
    /// A buffer of `len` bytes (a multiple of the block size); its contents are unspecified.
    fn alloc_buf(&self, len: usize) -> Self::Buf;
    /// How to name `name` in messages (the full path for real files).
    fn describe(&self, name: &str) -> String;
    /// The names in the directory.
    async fn list(&self) -> io::Result<Vec<String>>;
    /// Creates a new file (fails if it exists).
    async fn create(&self, name: &str) -> io::Result<Self::File>;
    /// Opens an existing file for reading and writing.
    async fn open(&self, name: &str) -> io::Result<Self::File>;
    /// Removes a name.
    async fn remove(&self, name: &str) -> io::Result<()>;
    /// Makes created and removed names durable.
    async fn sync(&self) -> io::Result<()>;
}

/// An open segment file.
pub trait SegmentFile {
    /// The write buffer type.
    type Buf: IoBuf;
    /// What a read returns (zero-copy where the runtime allows).
    type ReadBuf: Deref<Target = [u8]>;
    /// Reserves `len` bytes of disk for the file and sets its size to at least `len`.
    async fn preallocate(&self, len: u64) -> io::Result<()>;
    /// Writes the whole buffer at `pos`; returns the bytes written.
    async fn write_at(&self, buf: Self::Buf, pos: u64) -> io::Result<usize>;
    /// Reads up to `len` bytes at `pos` (fewer at the end of the file).
    async fn read_at(&self, pos: u64, len: usize) -> io::Result<Self::ReadBuf>;
    /// Makes the file's written data durable.
    async fn fdatasync(&self) -> io::Result<()>;
    /// The file size.
    async fn size(&self) -> io::Result<u64>;
    /// Cuts or extends the file to `len` bytes.
    async fn truncate(&self, len: u64) -> io::Result<()>;
    /// Closes the file (glommio closes dropped files only while its executor still runs).
    async fn close(self) -> io::Result<()>;
}

/// Polls a set of futures to completion concurrently and returns their outputs in order. The
/// journal uses it to keep a commit's few large writes in flight together without a runtime.
pub async fn join_all<F: std::future::Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut futures: Vec<_> = futures.into_iter().map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, out) in futures.iter_mut().zip(outputs.iter_mut()) {
            if out.is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *out = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    outputs
        .into_iter()
        .map(|o| o.expect("every future completed"))
        .collect()
}
