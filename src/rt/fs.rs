//! O_DIRECT segment files on glommio: the production side of the storage seam.
//!
//! Contract: runs on an executor thread. Writes and reads are glommio `DmaFile` operations on
//! io_uring, with buffers from the executor's DMA pool, so a commit's bytes go from the staging
//! buffer to the device without another copy. Directory operations (listing, removing, syncing
//! the directory) are rare (open, segment roll, reclaim) and run on glommio's blocking thread
//! so they never stall the executor.
//!
//! glommio 0.9 decides once per thread and device whether to use its polled (IOPOLL) ring, by
//! reading the first 512 bytes of the first `DmaFile` opened there. If that file is empty, as a
//! newly created segment is, the probe read succeeds without touching the device, glommio marks
//! the device pollable, and every later read of written data on that thread fails with
//! EOPNOTSUPP on a disk without poll queues (virtio here). So before the first open on a thread
//! and device we open a small non-empty probe file, which makes the probe see the truth.

use std::io;
use std::path::{Path, PathBuf};

use glommio::io::{DmaBuffer, DmaFile, OpenOptions, ReadResult};

use crate::storage::io::{IoBuf, SegmentDir, SegmentFile};

/// A journal directory on a real filesystem.
#[derive(Clone, Debug)]
pub struct DmaDir {
    path: PathBuf,
}

impl DmaDir {
    /// The directory at `path`, which must exist.
    pub fn new(path: impl Into<PathBuf>) -> DmaDir {
        DmaDir { path: path.into() }
    }
    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// A DMA buffer from the executor's pool.
pub struct DmaBuf(DmaBuffer);

impl IoBuf for DmaBuf {
    fn bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        self.0.as_bytes_mut()
    }
    fn truncate(&mut self, len: usize) {
        self.0.trim_to_size(len)
    }
}

/// What a read returns: a view into glommio's read buffer, no copy.
pub struct DmaRead(ReadResult);

impl std::ops::Deref for DmaRead {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

/// An open O_DIRECT segment file.
pub struct DmaSegmentFile {
    file: DmaFile,
}

impl DmaSegmentFile {
    /// Opens (creating if needed) a file for the benchmark's raw-disk measurements.
    pub async fn open_raw(path: &Path) -> io::Result<DmaSegmentFile> {
        if let Some(dir) = path.parent() {
            DmaDir::new(dir).probe_iopoll().await?;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .dma_open(path)
            .await?;
        Ok(DmaSegmentFile { file })
    }

    /// A DMA buffer of `len` bytes for [`SegmentFile::write_at`].
    pub fn alloc(len: usize) -> DmaBuf {
        DmaBuf(glommio::allocate_dma_buffer(len))
    }
}

thread_local! {
    /// Devices whose IOPOLL probe this thread already ran on a non-empty file.
    static PROBED_DEVICES: std::cell::RefCell<std::collections::HashSet<u64>> =
        std::cell::RefCell::new(std::collections::HashSet::new());
}

/// Name of the probe file; recovery reports and ignores it if a crash leaves it behind.
const IOPOLL_PROBE_NAME: &str = ".weir-iopoll-probe";

impl DmaDir {
    async fn probe_iopoll(&self) -> io::Result<()> {
        use std::os::unix::fs::MetadataExt;
        let dev = std::fs::metadata(&self.path)?.dev();
        if PROBED_DEVICES.with(|p| p.borrow().contains(&dev)) {
            return Ok(());
        }
        let probe = self.path.join(IOPOLL_PROBE_NAME);
        let p = probe.clone();
        blocking(move || {
            std::fs::write(&p, [0xA5u8; 4096])?;
            std::fs::File::open(&p)?.sync_all()
        })
        .await?;
        let file = DmaFile::open(&probe).await?;
        file.close().await?;
        blocking(move || std::fs::remove_file(probe)).await?;
        PROBED_DEVICES.with(|p| p.borrow_mut().insert(dev));
        Ok(())
    }
}

async fn blocking<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> R {
    glommio::executor().spawn_blocking(f).await
}

impl SegmentDir for DmaDir {
    type File = DmaSegmentFile;
    type Buf = DmaBuf;

    fn alloc_buf(&self, len: usize) -> DmaBuf {
        DmaSegmentFile::alloc(len)
    }

    fn describe(&self, name: &str) -> String {
        self.path.join(name).display().to_string()
    }

    async fn list(&self) -> io::Result<Vec<String>> {
        let path = self.path.clone();
        blocking(move || {
            let mut names = Vec::new();
            for e in std::fs::read_dir(&path)? {
                names.push(e?.file_name().to_string_lossy().into_owned());
            }
            Ok(names)
        })
        .await
    }

    async fn create(&self, name: &str) -> io::Result<DmaSegmentFile> {
        self.probe_iopoll().await?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .dma_open(self.path.join(name))
            .await?;
        Ok(DmaSegmentFile { file })
    }

    async fn open(&self, name: &str) -> io::Result<DmaSegmentFile> {
        self.probe_iopoll().await?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .dma_open(self.path.join(name))
            .await?;
        Ok(DmaSegmentFile { file })
    }

    async fn remove(&self, name: &str) -> io::Result<()> {
        let path = self.path.join(name);
        blocking(move || std::fs::remove_file(path)).await
    }

    async fn sync(&self) -> io::Result<()> {
        let path = self.path.clone();
        blocking(move || std::fs::File::open(path)?.sync_all()).await
    }
}

impl SegmentFile for DmaSegmentFile {
    type Buf = DmaBuf;
    type ReadBuf = DmaRead;

    async fn preallocate(&self, len: u64) -> io::Result<()> {
        Ok(self.file.pre_allocate(len, false).await?)
    }

    async fn write_at(&self, buf: DmaBuf, pos: u64) -> io::Result<usize> {
        Ok(self.file.write_at(buf.0, pos).await?)
    }

    async fn read_at(&self, pos: u64, len: usize) -> io::Result<DmaRead> {
        Ok(DmaRead(self.file.read_at_aligned(pos, len).await?))
    }

    async fn fdatasync(&self) -> io::Result<()> {
        Ok(self.file.fdatasync().await?)
    }

    async fn size(&self) -> io::Result<u64> {
        Ok(self.file.file_size().await?)
    }

    async fn truncate(&self, len: u64) -> io::Result<()> {
        Ok(self.file.truncate(len).await?)
    }

    async fn close(self) -> io::Result<()> {
        Ok(self.file.close().await?)
    }
}
