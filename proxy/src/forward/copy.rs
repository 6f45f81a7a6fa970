//! Moving a tunnel's bytes from one socket to the other. On Linux the default is splice(2): socket to pipe to
//! socket, so the bytes never enter user space; the alternative is a user-space buffer. A pipe or buffer is
//! lent from a small per-thread pool for one chunk and given back once drained, so that an idle tunnel holds
//! neither: tens of thousands of idle tunnels would otherwise cost 4 pipe descriptors or 32 KiB each. The
//! syscalls go through nix's safe wrappers: this crate has no `unsafe`.

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
    /// splice(2) through a pipe: no copy into user space.
    #[default]
    Splice,
    /// read(2) into a 16 KiB buffer, write(2) from it.
    Buffer,
}

/// The user-space buffer size, and the most one splice moves (a pipe's default capacity is 64 KiB).
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
        Mover { mode }
    }

    /// Waits for bytes on `from` and moves them all to `to`; `Ok(0)` at EOF.
    pub async fn move_chunk(&mut self, from: &TcpStream, to: &TcpStream) -> Result<usize, MoveError> {
        loop {
            from.readable().await.map_err(|_| MoveError::Read)?;
            let moved = match self.mode {
                CopyMode::Splice => match take_pipe() {
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
                CopyMode::Buffer => {
                    let mut buffer = take_buffer();
                    let moved = copy_through(&mut buffer, from, to).await;
                    give_back_buffer(buffer);
                    moved
                }
            };
            match moved {
                Err(Some(error)) => return Err(error),
                Err(None) => continue,
                Ok(n) => return Ok(n),
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
    let n = match from.try_read(buffer) {
        Ok(n) => n,
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
        for mode in [CopyMode::Splice, CopyMode::Buffer] {
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
