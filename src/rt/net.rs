//! TCP on glommio: listeners bound before the shards start, connections read into `BytesMut`.
//!
//! Contract: `bind_reuseport_first` and `bind_reuseport` run on the main thread before any
//! executor exists, so that a bad address or a port in use (by anyone else, another broker
//! included) is reported once, clearly, and so that port 0 is resolved once and shared: every
//! shard's listener on the main address is bound to the same port with SO_REUSEPORT and the
//! kernel spreads connections across them. The bound sockets (`Send`) are handed to the shards,
//! which turn them into glommio listeners on their own executor (`Listener::from_bound`).
//! Everything else here runs on an executor thread.
//!
//! glommio's TCP is readiness-based: a read or write first tries the syscall and arms an io_uring
//! poll only on EAGAIN. Reads here do the same by hand (a `recv` into uninitialized room, then
//! glommio's `peek` as the readiness wait), because glommio's reads want an initialized buffer.
//! It has no vectored write, so a connection coalesces its frames into one buffer and writes it
//! whole.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, RawFd};

use bytes::BytesMut;
use futures_lite::AsyncWriteExt;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// A listening socket bound on the main thread, waiting to be adopted by a shard.
#[derive(Debug)]
pub struct BoundListener {
    socket: Socket,
    addr: SocketAddr,
}

impl BoundListener {
    /// The address it is bound to (with the port resolved if 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

/// Binds the first listening socket on `addr` (SO_REUSEPORT, as `bind_reuseport`), refusing
/// with `AddrInUse` an address some other socket already listens on.
///
/// SO_REUSEPORT lets any socket of the same user join a port, another broker's included: two
/// brokers would share it and the kernel would spread each one's clients across both. So a fixed
/// port is first bound by a probe without SO_REUSEPORT, which the kernel refuses while anyone
/// listens there, and closed before the real bind. The probe keeps SO_REUSEADDR so that the
/// connections of a broker just restarted, still in TIME_WAIT, do not block it. Port 0 needs no
/// probe: the kernel picks a port nobody holds. Not caught: another process binding the port
/// between the probe and the bind (two brokers started at the same instant).
pub fn bind_reuseport_first(addr: SocketAddr) -> io::Result<BoundListener> {
    if addr.port() != 0 {
        let probe = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        probe.set_reuse_address(true)?;
        probe.bind(&SockAddr::from(addr))?;
    }
    bind_reuseport(addr)
}

/// Binds a listening socket with SO_REUSEPORT, so that one listener per shard can share `addr`.
/// Only for an address whose first socket `bind_reuseport_first` bound.
pub fn bind_reuseport(addr: SocketAddr) -> io::Result<BoundListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_port(true)?;
    socket.set_reuse_address(true)?;
    socket.bind(&SockAddr::from(addr))?;
    socket.listen(1024)?;
    let addr = socket
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::other("bound socket has no IP address"))?;
    Ok(BoundListener { socket, addr })
}

/// A listener owned by one shard.
pub struct Listener {
    inner: glommio::net::TcpListener,
}

impl Listener {
    /// Adopts a socket bound by `bind_reuseport`. Must run on the executor that will accept.
    pub fn from_bound(bound: BoundListener) -> Listener {
        let fd = bound.socket.into_raw_fd();
        // SAFETY: `fd` is a bound, listening TCP socket whose ownership we just released.
        let inner = unsafe { glommio::net::TcpListener::from_raw_fd(fd) };
        Listener { inner }
    }

    pub async fn accept(&self) -> io::Result<Connection> {
        let stream = self.inner.accept().await.map_err(io::Error::from)?;
        stream.set_nodelay(true).map_err(io::Error::from)?;
        Ok(Connection { stream })
    }
}

/// One non-blocking `recv` of at most `max` bytes into `buf`'s spare capacity; the bytes
/// received become part of it.
fn recv_into_spare(fd: RawFd, buf: &mut BytesMut, max: usize) -> io::Result<usize> {
    let spare = buf.spare_capacity_mut();
    let len = max.min(spare.len());
    let spare = &mut spare[..len];
    // SAFETY: the kernel writes at most `spare.len()` bytes into memory we own exclusively; what
    // it wrote (`n` bytes, counted by the kernel) is initialized and ends up in `buf`.
    let n = unsafe {
        libc::recv(
            fd,
            spare.as_mut_ptr().cast::<libc::c_void>(),
            spare.len(),
            libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    // SAFETY: the first `n` bytes of the spare capacity were just written by `recv`.
    unsafe { buf.set_len(buf.len() + n) };
    Ok(n)
}

/// One accepted TCP connection.
pub struct Connection {
    stream: glommio::net::TcpStream,
}

impl Connection {
    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.stream.peer_addr().map_err(io::Error::from)
    }

    /// Reads what is available (at least one byte, at most `chunk`) onto the end of `buf`.
    /// Returns 0 at end of stream. This is the one copy on the way in: kernel to `buf`; frames
    /// are then sliced out of `buf` without copying.
    ///
    /// The kernel writes straight into `buf`'s spare capacity (`recv`, non-blocking): no
    /// zero-fill, so a read touches only the pages it fills. While no byte is pending and `buf`
    /// holds nothing, `buf` lets go of its allocation and the connection waits for readiness
    /// (glommio's `peek` of one byte), so an idle connection holds no receive room; room for
    /// `chunk` bytes is reserved only when bytes are there to read.
    ///
    /// Cancel-safe: if the future is dropped before the read completes (a connection racing its
    /// read against other events), `buf` holds exactly the bytes it held.
    pub async fn read_buf(&mut self, buf: &mut BytesMut, chunk: usize) -> io::Result<usize> {
        loop {
            if buf.capacity() - buf.len() < chunk {
                buf.reserve(chunk);
            }
            match recv_into_spare(self.stream.as_raw_fd(), buf, chunk) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            if buf.is_empty() {
                *buf = BytesMut::new();
            }
            let mut probe = [0u8; 1];
            if self.stream.peek(&mut probe).await? == 0 {
                return Ok(0); // end of stream
            }
        }
    }

    /// Writes all of `bytes`.
    pub async fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes).await
    }

    /// Closes both directions, after everything written has been sent.
    pub async fn close(&mut self) -> io::Result<()> {
        self.stream.flush().await?;
        self.stream.close().await
    }
}
