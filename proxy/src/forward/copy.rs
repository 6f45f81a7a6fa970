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

use nix::fcntl::{FcntlArg, OFlag, SpliceFFlags, fcntl, splice};
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

/// The user-space buffer size. A chunk of `BUFFER` bytes or more is bulk, for `CopyMode::Auto`.
const BUFFER: usize = 16 * 1024;
/// The most one splice moves, and the pipe capacity asked for (the default is 64 KiB): a quarter of the
/// syscalls per byte cut the CPU per GiB moved by a fifth (README, levers). Past
/// `fs.pipe-user-pages-soft` the kernel refuses the size and the pipe keeps its default.
const SPLICE_CHUNK: usize = 256 * 1024;

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
            let _ = fcntl(&write, FcntlArg::F_SETPIPE_SZ(SPLICE_CHUNK as i32));
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

/// Bytes read from one socket and not yet all written to the other. Dropped before that (the tunnel ended),
/// its pipe is closed with the bytes and its buffer freed.
#[derive(Debug)]
pub struct Chunk {
    len: usize,
    held: Held,
}

#[derive(Debug)]
enum Held {
    /// `left` bytes still in the pipe.
    Pipe { pipe: Pipe, left: usize },
    /// `buffer[start..end]` still to write.
    Buffer { buffer: Box<[u8]>, start: usize, end: usize },
}

const FLAGS: SpliceFFlags = SpliceFFlags::SPLICE_F_MOVE.union(SpliceFFlags::SPLICE_F_NONBLOCK);

impl Mover {
    pub fn new(mode: CopyMode) -> Self {
        Mover { mode, bulk: false }
    }

    /// Reads the next chunk from `from` without waiting: `Ok(None)` at EOF, `WouldBlock` when nothing is
    /// ready (the readiness is then cleared, so `poll_read_ready` waits for more).
    pub fn read(&mut self, from: &TcpStream) -> io::Result<Option<Chunk>> {
        let splices = match self.mode {
            CopyMode::Auto => self.bulk,
            CopyMode::Splice => true,
            CopyMode::Buffer => false,
        };
        let chunk = match splices.then(take_pipe) {
            Some(Ok(pipe)) => {
                let filled = from.try_io(Interest::READABLE, || {
                    splice(from, None, &pipe.write, None, SPLICE_CHUNK, FLAGS).map_err(io::Error::from)
                });
                match filled {
                    Ok(n) if n > 0 => Some(Chunk { len: n, held: Held::Pipe { pipe, left: n } }),
                    // Nothing went into the pipe: it is empty.
                    other => {
                        give_back_pipe(pipe);
                        other?;
                        None
                    }
                }
            }
            Some(Err(_)) => {
                // Out of file descriptors for a pipe: this direction copies through user space instead.
                self.mode = CopyMode::Buffer;
                return self.read(from);
            }
            None => read_into_buffer(from)?,
        };
        if let Some(chunk) = &chunk {
            self.bulk = chunk.len >= BUFFER;
        }
        Ok(chunk)
    }
}

fn read_into_buffer(from: &TcpStream) -> io::Result<Option<Chunk>> {
    let mut buffer = take_buffer();
    let mut filled = 0;
    let read = from.try_io(Interest::READABLE, || {
        filled = nix::unistd::read(from, &mut buffer)?;
        // A short read from TCP took all that was queued (as tokio's own poll_read reasons): saying WouldBlock
        // clears the readiness, so the next chunk waits for epoll instead of a read that would say EAGAIN. A
        // readiness event that came in meanwhile is kept.
        if 0 < filled && filled < buffer.len() { Err(io::ErrorKind::WouldBlock.into()) } else { Ok(filled) }
    });
    match read {
        Err(e) if e.kind() != io::ErrorKind::WouldBlock || filled == 0 => {
            give_back_buffer(buffer);
            Err(e)
        }
        _ if filled == 0 => {
            give_back_buffer(buffer);
            Ok(None)
        }
        _ => Ok(Some(Chunk { len: filled, held: Held::Buffer { buffer, start: 0, end: filled } })),
    }
}

impl Chunk {
    /// The bytes read.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Writes what `to` takes without waiting: `Ok(true)` once all is written (the pipe or buffer is then
    /// back in the pool), `WouldBlock` when `to` is full (readiness cleared, as for `read`).
    pub fn write(&mut self, to: &TcpStream) -> io::Result<bool> {
        let done = match &mut self.held {
            Held::Pipe { pipe, left } => {
                *left -= to.try_io(Interest::WRITABLE, || {
                    splice(&pipe.read, None, to, None, *left, FLAGS).map_err(io::Error::from)
                })?;
                *left == 0
            }
            Held::Buffer { buffer, start, end } => {
                *start += to.try_write(&buffer[*start..*end])?;
                start == end
            }
        };
        Ok(done)
    }

    /// Gives a written chunk's pipe or buffer back to the pool.
    pub fn release(self) {
        match self.held {
            Held::Pipe { pipe, left: 0 } => give_back_pipe(pipe),
            Held::Pipe { .. } => {}
            Held::Buffer { buffer, .. } => give_back_buffer(buffer),
        }
    }
}
