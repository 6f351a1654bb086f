//! An in-memory segment directory that crashes, tears writes and runs out of space on command.
//!
//! Contract: single-threaded test double behind the [`crate::storage::io`] seam. It keeps, for
//! every file, what the process sees (`current`) and what would survive a power cut (`durable`,
//! advanced by `fdatasync`), and for the directory which names are durable (advanced by `sync`).
//! Every mutating operation (create, preallocate, write, fdatasync, remove, directory sync,
//! truncate) is numbered, so a test can crash the "machine" before, during or after any one of
//! them, then build the disk image that a reboot would find and recover from it:
//! - [`Image::LoseUnsynced`]: every write and name not made durable is gone;
//! - [`Image::KeepUnsynced`]: every write issued landed, including a torn one (a write
//!   interrupted by the crash lands as its first N 512-byte sectors);
//! - [`Image::KeepLastUnsynced`]: the device reordered: only the last unsynced write of each
//!   file landed, the ones issued before it did not.
//!
//! It also checks what real O_DIRECT would: every write and read is block-aligned in position
//! and length. With `yield_each_op` every operation returns `Pending` once before completing, so
//! appenders run while a commit is "in flight" exactly as they do against a real disk.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use crate::storage::format::{BLOCK_BYTES, SECTOR_BYTES};
use crate::storage::io::{IoBuf, SegmentDir, SegmentFile};

/// When, relative to the numbered operation, the crash happens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrashWhen {
    /// The operation never happens.
    Before,
    /// A write lands as its first `torn_sectors` sectors; an fdatasync makes only the first half
    /// of the pending writes durable; other operations behave as `After`.
    During {
        /// Sectors of an interrupted write that land.
        torn_sectors: usize,
    },
    /// The operation completes, then the machine stops.
    After,
}

/// What survives the crash.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Image {
    /// Only what was fdatasynced (and names that were directory-synced).
    LoseUnsynced,
    /// Everything written, torn writes included.
    KeepUnsynced,
    /// Of the writes not yet synced, only the last one issued to each file landed (the device
    /// reordered them): what was synced, plus that write.
    KeepLastUnsynced,
}

#[derive(Clone, Default)]
struct MemFile {
    current: Vec<u8>,
    durable: Vec<u8>,
    /// Unsynced writes, in issue order (position, bytes), for a partial fdatasync.
    unsynced: Vec<(u64, Vec<u8>)>,
}

#[derive(Default)]
struct Disk {
    files: Vec<MemFile>,
    names: BTreeMap<String, usize>,
    durable_names: BTreeMap<String, usize>,
    ops: u64,
    crash: Option<(u64, CrashWhen)>,
    crashed: bool,
    fail: Option<(u64, io::ErrorKind)>,
    space_bytes_max: Option<u64>,
    yield_each_op: bool,
    reads: u64,
}

impl Disk {
    fn used_bytes(&self) -> u64 {
        self.names
            .values()
            .map(|&id| self.files[id].current.len() as u64)
            .sum()
    }

    /// Numbers a mutating operation and decides its fate.
    fn begin(&mut self, what: &str) -> io::Result<Option<CrashWhen>> {
        if self.crashed {
            return Err(io::Error::other(format!(
                "simulated crash: machine is down ({what})"
            )));
        }
        let op = self.ops;
        self.ops += 1;
        if let Some((n, kind)) = self.fail {
            if n == op {
                return Err(io::Error::new(
                    kind,
                    format!("injected error at operation {op} ({what})"),
                ));
            }
        }
        match self.crash {
            Some((n, when)) if n == op => {
                self.crashed = true;
                if when == CrashWhen::Before {
                    return Err(io::Error::other(format!(
                        "simulated crash before operation {op} ({what})"
                    )));
                }
                Ok(Some(when))
            }
            _ => Ok(None),
        }
    }

    fn grow(&mut self, id: usize, len: u64) -> io::Result<()> {
        let have = self.files[id].current.len() as u64;
        if len <= have {
            return Ok(());
        }
        if let Some(max) = self.space_bytes_max {
            if self.used_bytes() + (len - have) > max {
                return Err(io::Error::new(
                    io::ErrorKind::StorageFull,
                    "No space left on device (simulated)",
                ));
            }
        }
        self.files[id].current.resize(len as usize, 0);
        Ok(())
    }
}

fn crashed_after(what: &str) -> io::Error {
    io::Error::other(format!("simulated crash during or after {what}"))
}

/// The in-memory directory. Cloning shares the disk.
#[derive(Clone, Default)]
pub struct FaultDir {
    disk: Rc<RefCell<Disk>>,
}

/// A file of a [`FaultDir`].
pub struct FaultFile {
    disk: Rc<RefCell<Disk>>,
    id: usize,
}

/// A plain heap buffer (memory has no alignment rules; lengths are still checked).
pub struct MemBuf(Vec<u8>);

impl IoBuf for MemBuf {
    fn bytes(&self) -> &[u8] {
        &self.0
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.0
    }
    fn truncate(&mut self, len: usize) {
        self.0.truncate(len)
    }
}

struct YieldOnce(bool);

impl Future for YieldOnce {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0 {
            Poll::Ready(())
        } else {
            self.0 = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }
}

async fn maybe_yield(disk: &Rc<RefCell<Disk>>) {
    let y = disk.borrow().yield_each_op;
    if y {
        YieldOnce(false).await;
    }
}

impl FaultDir {
    /// An empty directory.
    pub fn new() -> FaultDir {
        FaultDir::default()
    }

    /// Makes every operation return `Pending` once before it completes.
    pub fn set_yield_each_op(&self, on: bool) {
        self.disk.borrow_mut().yield_each_op = on;
    }

    /// Crashes the machine at mutating operation number `op` (counted from 0 since creation).
    pub fn crash_at(&self, op: u64, when: CrashWhen) {
        self.disk.borrow_mut().crash = Some((op, when));
    }

    /// Makes mutating operation number `op` fail with `kind` (the machine stays up).
    pub fn fail_at(&self, op: u64, kind: io::ErrorKind) {
        self.disk.borrow_mut().fail = Some((op, kind));
    }

    /// Caps the bytes all files may occupy (`None`: unlimited).
    pub fn set_space_bytes_max(&self, max: Option<u64>) {
        self.disk.borrow_mut().space_bytes_max = max;
    }

    /// Mutating operations so far.
    pub fn ops(&self) -> u64 {
        self.disk.borrow().ops
    }

    /// Reads issued so far.
    pub fn reads(&self) -> u64 {
        self.disk.borrow().reads
    }

    /// Whether the simulated machine has crashed.
    pub fn crashed(&self) -> bool {
        self.disk.borrow().crashed
    }

    /// What a reboot finds: a fresh directory holding the chosen image, all of it durable.
    pub fn crash_image(&self, image: Image) -> FaultDir {
        let d = self.disk.borrow();
        let names = match image {
            Image::LoseUnsynced => &d.durable_names,
            Image::KeepUnsynced | Image::KeepLastUnsynced => &d.names,
        };
        let out = FaultDir::new();
        for (name, &id) in names {
            let f = &d.files[id];
            let bytes = match image {
                Image::LoseUnsynced => f.durable.clone(),
                Image::KeepUnsynced => f.current.clone(),
                Image::KeepLastUnsynced => {
                    let mut b = f.durable.clone();
                    if let Some((pos, w)) = f.unsynced.last() {
                        let end = *pos as usize + w.len();
                        if b.len() < end {
                            b.resize(end, 0);
                        }
                        b[*pos as usize..end].copy_from_slice(w);
                    }
                    b
                }
            };
            out.put_file(name, bytes);
        }
        out
    }

    /// The names present now.
    pub fn names(&self) -> Vec<String> {
        self.disk.borrow().names.keys().cloned().collect()
    }

    /// The current contents of `name`.
    pub fn file_bytes(&self, name: &str) -> Option<Vec<u8>> {
        let d = self.disk.borrow();
        d.names.get(name).map(|&id| d.files[id].current.clone())
    }

    /// Replaces (or creates) `name` with `bytes`, durable at once: for tests that damage images.
    pub fn put_file(&self, name: &str, bytes: Vec<u8>) {
        let mut d = self.disk.borrow_mut();
        let id = d.files.len();
        d.files.push(MemFile {
            current: bytes.clone(),
            durable: bytes,
            unsynced: Vec::new(),
        });
        d.names.insert(name.to_string(), id);
        d.durable_names.insert(name.to_string(), id);
    }

    /// Removes `name` at once, durably.
    pub fn delete_file(&self, name: &str) {
        let mut d = self.disk.borrow_mut();
        d.names.remove(name);
        d.durable_names.remove(name);
    }
}

impl SegmentDir for FaultDir {
    type File = FaultFile;
    type Buf = MemBuf;

    fn alloc_buf(&self, len: usize) -> MemBuf {
        assert_eq!(
            len % BLOCK_BYTES,
            0,
            "buffer of {len} bytes is not block-aligned"
        );
        MemBuf(vec![0; len])
    }

    fn describe(&self, name: &str) -> String {
        format!("mem:{name}")
    }

    async fn list(&self) -> io::Result<Vec<String>> {
        maybe_yield(&self.disk).await;
        let d = self.disk.borrow();
        if d.crashed {
            return Err(crashed_after("list"));
        }
        Ok(d.names.keys().cloned().collect())
    }

    async fn create(&self, name: &str) -> io::Result<FaultFile> {
        maybe_yield(&self.disk).await;
        let mut d = self.disk.borrow_mut();
        let when = d.begin("create")?;
        if d.names.contains_key(name) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                name.to_string(),
            ));
        }
        let id = d.files.len();
        d.files.push(MemFile::default());
        d.names.insert(name.to_string(), id);
        if when.is_some() {
            return Err(crashed_after("create"));
        }
        Ok(FaultFile {
            disk: self.disk.clone(),
            id,
        })
    }

    async fn open(&self, name: &str) -> io::Result<FaultFile> {
        maybe_yield(&self.disk).await;
        let d = self.disk.borrow();
        if d.crashed {
            return Err(crashed_after("open"));
        }
        let id = *d
            .names
            .get(name)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, name.to_string()))?;
        Ok(FaultFile {
            disk: self.disk.clone(),
            id,
        })
    }

    async fn remove(&self, name: &str) -> io::Result<()> {
        maybe_yield(&self.disk).await;
        let mut d = self.disk.borrow_mut();
        let when = d.begin("remove")?;
        if d.names.remove(name).is_none() {
            return Err(io::Error::new(io::ErrorKind::NotFound, name.to_string()));
        }
        if when.is_some() {
            return Err(crashed_after("remove"));
        }
        Ok(())
    }

    async fn sync(&self) -> io::Result<()> {
        maybe_yield(&self.disk).await;
        let mut d = self.disk.borrow_mut();
        let when = d.begin("directory sync")?;
        d.durable_names = d.names.clone();
        if when.is_some() {
            return Err(crashed_after("directory sync"));
        }
        Ok(())
    }
}

impl SegmentFile for FaultFile {
    type Buf = MemBuf;
    type ReadBuf = Vec<u8>;

    async fn preallocate(&self, len: u64) -> io::Result<()> {
        maybe_yield(&self.disk).await;
        let mut d = self.disk.borrow_mut();
        let when = d.begin("preallocate")?;
        d.grow(self.id, len)?;
        if when.is_some() {
            return Err(crashed_after("preallocate"));
        }
        Ok(())
    }

    async fn write_at(&self, buf: MemBuf, pos: u64) -> io::Result<usize> {
        maybe_yield(&self.disk).await;
        let bytes = buf.0;
        assert_eq!(
            pos % BLOCK_BYTES as u64,
            0,
            "write at unaligned position {pos}"
        );
        assert_eq!(
            bytes.len() % BLOCK_BYTES,
            0,
            "write of unaligned length {}",
            bytes.len()
        );
        let mut d = self.disk.borrow_mut();
        let when = d.begin("write")?;
        d.grow(self.id, pos + bytes.len() as u64)?;
        let landed = match when {
            Some(CrashWhen::During { torn_sectors }) => {
                (torn_sectors * SECTOR_BYTES).min(bytes.len())
            }
            _ => bytes.len(),
        };
        let f = &mut d.files[self.id];
        f.current[pos as usize..pos as usize + landed].copy_from_slice(&bytes[..landed]);
        f.unsynced.push((pos, bytes[..landed].to_vec()));
        if when.is_some() {
            return Err(crashed_after("write"));
        }
        Ok(bytes.len())
    }

    async fn read_at(&self, pos: u64, len: usize) -> io::Result<Vec<u8>> {
        maybe_yield(&self.disk).await;
        assert_eq!(
            pos % BLOCK_BYTES as u64,
            0,
            "read at unaligned position {pos}"
        );
        assert_eq!(len % BLOCK_BYTES, 0, "read of unaligned length {len}");
        let mut d = self.disk.borrow_mut();
        if d.crashed {
            return Err(crashed_after("read"));
        }
        d.reads += 1;
        let cur = &d.files[self.id].current;
        let start = (pos as usize).min(cur.len());
        let end = (pos as usize + len).min(cur.len());
        Ok(cur[start..end].to_vec())
    }

    async fn fdatasync(&self) -> io::Result<()> {
        maybe_yield(&self.disk).await;
        let mut d = self.disk.borrow_mut();
        let when = d.begin("fdatasync")?;
        let f = &mut d.files[self.id];
        if let Some(CrashWhen::During { .. }) = when {
            // The device persisted some of the queued writes, in issue order, then lost power.
            let half = f.unsynced.len() / 2;
            let len = f.current.len();
            if f.durable.len() < len {
                f.durable.resize(len, 0);
            }
            for (pos, bytes) in f.unsynced.drain(..half) {
                f.durable[pos as usize..pos as usize + bytes.len()].copy_from_slice(&bytes);
            }
            return Err(crashed_after("fdatasync"));
        }
        f.durable = f.current.clone();
        f.unsynced.clear();
        if when.is_some() {
            return Err(crashed_after("fdatasync"));
        }
        Ok(())
    }

    async fn size(&self) -> io::Result<u64> {
        maybe_yield(&self.disk).await;
        let d = self.disk.borrow();
        if d.crashed {
            return Err(crashed_after("size"));
        }
        Ok(d.files[self.id].current.len() as u64)
    }

    async fn truncate(&self, len: u64) -> io::Result<()> {
        maybe_yield(&self.disk).await;
        let mut d = self.disk.borrow_mut();
        let when = d.begin("truncate")?;
        if len > d.files[self.id].current.len() as u64 {
            d.grow(self.id, len)?;
        } else {
            d.files[self.id].current.truncate(len as usize);
        }
        if when.is_some() {
            return Err(crashed_after("truncate"));
        }
        Ok(())
    }

    async fn close(self) -> io::Result<()> {
        Ok(())
    }
}
