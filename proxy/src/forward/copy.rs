//! Moving a tunnel's bytes from one socket to the other. By default each direction adapts, as HAProxy's
//! `splice-auto` does: small chunks (handshakes, requests and responses) go through a user-space buffer, whose
//! short reads prove the socket drained and so spare the read that would only say EAGAIN; once a read fills the
//! buffer the direction is moving bulk and switches to splice(2), socket to pipe to socket, so the bytes never
//! enter user space, until a splice comes back short again. A pipe or buffer is lent from a small per-thread
//! pool for one chunk and given back once drained, so that an idle tunnel holds neither: tens of thousands of
//! idle tunnels would otherwise cost 4 pipe descriptors or 32 KiB each. The syscalls go through nix's safe
//! wrappers: this crate has no `unsafe`.

use std::cell::RefCell;
use std::io;
use std::os::fd::OwnedFd;

use nix::fcntl::{OFlag, SpliceFFlags, splice};
use nix::unistd::pipe2;
use tokio::io::Interest;
use tokio::net::TcpStream;

/// How a tunnel moves its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CopyMode {
    /// Small chunks through a buffer, bulk through splice(2).
    #[default]
    Auto,
    /// Always splice(2) through a pipe: no copy into user space.
    Splice,
    /// Always read(2) into a 16 KiB buffer and write(2) from it.
    Buffer,
}

/// The user-space buffer size, and the most one splice moves (a pipe's default capacity is 64 KiB). A chunk of
/// `BUFFER` bytes or more is bulk, for `CopyMode::Auto`.
const BUFFER: usize = 16 * 1024;
const SPLICE_CHUNK: usize = 64 * 1024;

/// Which side failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MoveError {
    Read,
    Write,
}

/// Pipes and buffers kept per thread for the next chunk; more are closed or freed.
const POOL: usize = 64;

thread_local! {
    static PIPES: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
    static BUFFERS: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
}

/// One direction's mover: how it moves bytes. It holds no pipe or buffer between chunks.
#[derive(Debug, Clone, Copy)]
pub struct Mover {
    mode: CopyMode,
    /// Under `Auto`: the last chunk was bulk, so the next one is spliced.
    bulk: bool,
}

/// An empty pipe.
#[derive(Debug)]
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

fn take_pipe() -> io::Result<Pipe> {
    match PIPES.with_borrow_mut(Vec::pop) {
        Some(pipe) => Ok(pipe),
        None => {
            let (read, write) = pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
            Ok(Pipe { read, write })
        }
    }
}

/// Only an empty pipe may go back: one that still holds bytes is closed with them.
fn give_back_pipe(pipe: Pipe) {
    PIPES.with_borrow_mut(|pool| (pool.len() < POOL).then(|| pool.push(pipe)));
}

fn take_buffer() -> Box<[u8]> {
    BUFFERS.with_borrow_mut(Vec::pop).unwrap_or_else(|| vec![0; BUFFER].into_boxed_slice())
}

fn give_back_buffer(buffer: Box<[u8]>) {
    BUFFERS.with_borrow_mut(|pool| (pool.len() < POOL).then(|| pool.push(buffer)));
}

impl Mover {
    pub fn new(mode: CopyMode) -> Self {
        Mover { mode, bulk: false }
    }

    /// Waits for bytes on `from` and moves them all to `to`; `Ok(0)` at EOF.
    pub async fn move_chunk(&mut self, from: &TcpStream, to: &TcpStream) -> Result<usize, MoveError> {
        loop {
            from.readable().await.map_err(|_| MoveError::Read)?;
            let splices = match self.mode {
                CopyMode::Auto => self.bulk,
                CopyMode::Splice => true,
                CopyMode::Buffer => false,
            };
            let moved = match splices {
                true => match take_pipe() {
                    Ok(pipe) => {
                        let moved = splice_through(&pipe, from, to).await;
                        // Drained (or never filled): the pipe is empty again.
                        if !matches!(moved, Err(Some(_))) {
                            give_back_pipe(pipe);
                        }
                        moved
                    }
                    Err(_) => {
                        // Out of file descriptors for a pipe: this direction copies through user space instead.
                        self.mode = CopyMode::Buffer;
                        continue;
                    }
                },
                false => {
                    let mut buffer = take_buffer();
                    let moved = copy_through(&mut buffer, from, to).await;
                    give_back_buffer(buffer);
                    moved
                }
            };
            match moved {
                Err(Some(error)) => return Err(error),
                Err(None) => continue,
                Ok(n) => {
                    self.bulk = n >= BUFFER;
                    return Ok(n);
                }
            }
        }
    }
}

const FLAGS: SpliceFFlags = SpliceFFlags::SPLICE_F_MOVE.union(SpliceFFlags::SPLICE_F_NONBLOCK);

/// `Err(None)`: nothing was ready after all (readiness was stale).
async fn splice_through(pipe: &Pipe, from: &TcpStream, to: &TcpStream) -> Result<usize, Option<MoveError>> {
    let filled = from.try_io(Interest::READABLE, || {
        splice(from, None, &pipe.write, None, SPLICE_CHUNK, FLAGS).map_err(io::Error::from)
    });
    let n = match filled {
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Err(None),
        Err(_) => return Err(Some(MoveError::Read)),
    };
    let mut left = n;
    while left > 0 {
        to.writable().await.map_err(|_| Some(MoveError::Write))?;
        match to.try_io(Interest::WRITABLE, || splice(&pipe.read, None, to, None, left, FLAGS).map_err(io::Error::from))
        {
            Ok(m) => left -= m,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => return Err(Some(MoveError::Write)),
        }
    }
    Ok(n)
}

async fn copy_through(buffer: &mut [u8], from: &TcpStream, to: &TcpStream) -> Result<usize, Option<MoveError>> {
    let mut filled = 0;
    let read = from.try_io(Interest::READABLE, || {
        filled = nix::unistd::read(from, buffer)?;
        // A short read from TCP took all that was queued (as tokio's own poll_read reasons): saying WouldBlock
        // clears the readiness, so the next chunk waits for epoll instead of a read that would say EAGAIN. A
        // readiness event that came in meanwhile is kept.
        if 0 < filled && filled < buffer.len() { Err(io::ErrorKind::WouldBlock.into()) } else { Ok(filled) }
    });
    let n = match read {
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock && filled > 0 => filled,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Err(None),
        Err(_) => return Err(Some(MoveError::Read)),
    };
    let mut written = 0;
    while written < n {
        to.writable().await.map_err(|_| Some(MoveError::Write))?;
        match to.try_write(&buffer[written..n]) {
            Ok(m) => written += m,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => return Err(Some(MoveError::Write)),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        (client, listener.accept().await.unwrap().0)
    }

    #[tokio::test]
    async fn both_movers_carry_every_byte_and_report_eof() {
        for mode in [CopyMode::Auto, CopyMode::Splice, CopyMode::Buffer] {
            // source -> (a, b) -> mover -> (c, d) -> sink
            let ((mut source, b), (c, mut sink)) = (pair().await, pair().await);
            let payload: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
            let sent = payload.clone();
            let writer = tokio::spawn(async move {
                source.write_all(&sent).await.unwrap();
                source.shutdown().await.unwrap();
            });
            let reader = tokio::spawn(async move {
                let mut received = Vec::new();
                sink.read_to_end(&mut received).await.unwrap();
                received
            });
            let mut mover = Mover::new(mode);
            let mut total = 0;
            loop {
                match mover.move_chunk(&b, &c).await.unwrap() {
                    0 => break,
                    n => total += n,
                }
            }
            drop(c);
            writer.await.unwrap();
            assert_eq!(total, payload.len(), "{mode:?}");
            assert!(reader.await.unwrap() == payload, "{mode:?}: bytes changed");
        }
    }
}
