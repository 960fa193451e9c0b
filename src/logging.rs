//! Our stderr, written so that it can never stop the server.
//!
//! The launcher owns the other end of stderr and may close it, or keep it
//! open and stop reading. A closed pipe makes writes fail (EPIPE): then
//! `eprintln!` panics, and so does tracing-subscriber's writer, which reports
//! a failed write with `eprintln!`; a panic in a task ends only that task, so
//! the server may carry on without, say, its signal handling. A pipe nobody
//! reads makes writes block once it is full, and a blocked write holds
//! stderr's lock, so every thread that logs stops behind it.
//!
//! So nothing in the server writes to stderr itself: log lines and notices
//! go to a bounded queue, and one thread of ours (for the life of the
//! process) writes them out. When stderr is closed the messages are
//! dropped; when it is full the queue fills and further messages are
//! dropped, and counted in a note once stderr takes lines again. Nobody
//! else waits.

use std::fmt::Display;
use std::io::{self, Write};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::time::Duration;

/// Messages waiting for stderr; beyond this they are dropped.
const QUEUE: usize = 1024;

enum Message {
    Text(Vec<u8>),
    /// Answered once everything queued before it has been written.
    Flushed(mpsc::Sender<()>),
}

/// The queue to the writer thread; `None` if that thread could not be
/// started (stderr is then written directly, errors ignored).
fn queue() -> Option<&'static SyncSender<Message>> {
    static QUEUE_TX: OnceLock<Option<SyncSender<Message>>> = OnceLock::new();
    QUEUE_TX
        .get_or_init(|| {
            let (tx, rx) = mpsc::sync_channel(QUEUE);
            std::thread::Builder::new()
                .name("stderr".into())
                .spawn(move || write_out(rx))
                .ok()
                .map(|_| tx)
        })
        .as_ref()
}

/// Lines dropped because the queue was full, not yet reported.
static DROPPED: AtomicUsize = AtomicUsize::new(0);

fn write_out(rx: Receiver<Message>) {
    for message in rx {
        match message {
            Message::Text(bytes) => {
                let _ = io::stderr().write_all(&bytes);
                let dropped = DROPPED.swap(0, Ordering::Relaxed);
                if dropped > 0 {
                    let _ = writeln!(
                        io::stderr(),
                        "mcp-python-interpreter: {dropped} log line(s) dropped: stderr was not keeping up"
                    );
                }
            }
            Message::Flushed(done) => {
                let _ = done.send(());
            }
        }
    }
}

/// Queues `bytes` for stderr; drops them if the queue is full.
pub fn write(bytes: &[u8]) {
    match queue() {
        Some(tx) => {
            if tx.try_send(Message::Text(bytes.to_vec())).is_err() {
                DROPPED.fetch_add(1, Ordering::Relaxed);
            }
        }
        None => {
            let _ = io::stderr().write_all(bytes);
        }
    }
}

/// A line on stderr: what `eprintln!` would print, without its panic.
pub fn line(text: impl Display) {
    write(format!("{text}\n").as_bytes());
}

/// Waits, at most `within`, until what was queued so far has been written
/// (or dropped). Before exiting, and before a child writes to our stderr
/// directly, so lines keep their order.
pub fn flush(within: Duration) {
    let Some(tx) = queue() else { return };
    let (done, written) = mpsc::channel();
    if tx.try_send(Message::Flushed(done)).is_ok() {
        let _ = written.recv_timeout(within);
    }
}

/// The writer tracing's formatter uses: one `write` per event, which is
/// queued whole. It never fails, so tracing-subscriber never falls back to
/// `eprintln!`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Stderr;

impl Write for Stderr {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        write(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Flushes stderr (bounded) when dropped: hold one in `main`, so the last
/// lines are written on every way out of it.
#[derive(Debug)]
pub struct FlushOnDrop;

impl Drop for FlushOnDrop {
    fn drop(&mut self) {
        flush(Duration::from_millis(500));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_never_fail_and_flush_returns() {
        let mut w = Stderr;
        assert_eq!(w.write(b"logging test line\n").unwrap(), 18);
        line("logging test: a line");
        flush(Duration::from_secs(5));
    }
}
