//! Kernels: the small interface the rest of the server uses to run code.
//!
//! A kernel is reached through a [`KernelHandle`]: a cheap, cloneable sender
//! to the one task that owns the kernel's process and sockets (see
//! [`actor`]). Starting kernels is behind the [`KernelFactory`] trait so a
//! warm pool or a remote gateway can be added without touching the callers.
//! Jupyter wire types never leave this module: callers see [`KernelEvent`].

mod actor;
pub mod local;
mod template;

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::{mpsc, oneshot};

pub use local::LocalKernelFactory;

/// What a running cell produced, in the order the kernel sent it.
#[derive(Debug, Clone, PartialEq)]
pub enum KernelEvent {
    /// Text written to stdout (`stderr == false`) or stderr.
    Stream { stderr: bool, text: String },
    /// A rich display (`display()`, an inline figure, a plotly PNG).
    Display(Vec<MimeData>),
    /// The value of the cell's last expression.
    Result(Vec<MimeData>),
    /// The cell raised.
    Error {
        ename: String,
        evalue: String,
        traceback: Vec<String>,
    },
    /// `clear_output()`: drop what was shown so far (now, or at the next output).
    ClearOutput { wait: bool },
}

/// One representation of a displayed object.
#[derive(Debug, Clone, PartialEq)]
pub struct MimeData {
    pub mime: String,
    /// Text for textual types, base64 for binary images, JSON text for JSON.
    pub data: String,
}

/// How an execution ended.
#[derive(Debug, Clone, PartialEq)]
pub enum ExecEnd {
    /// The kernel went back to idle after our request.
    Completed,
    /// The kernel process exited while the cell ran.
    Died { detail: String },
}

/// Messages sent to an [`ExecutionStream`].
#[derive(Debug)]
pub enum ExecMessage {
    Event(KernelEvent),
    End(ExecEnd),
}

/// The receiving side of one execution: events, then exactly one end.
pub type ExecutionStream = mpsc::Receiver<ExecMessage>;

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("could not start the Python kernel: {0}")]
    Start(String),
    #[error("the kernel process has exited: {0}")]
    Dead(String),
    #[error("the kernel is busy with another execution")]
    Busy,
}

/// Commands understood by a kernel's owning task.
pub(crate) enum Command {
    Execute {
        code: String,
        events: mpsc::Sender<ExecMessage>,
        accepted: oneshot::Sender<Result<(), KernelError>>,
    },
    Interrupt,
    Shutdown {
        done: oneshot::Sender<()>,
    },
}

/// Cheap handle to a kernel; all clones talk to the same owning task.
#[derive(Clone, Debug)]
pub struct KernelHandle {
    tx: mpsc::Sender<Command>,
    /// Process id, for logs and tests.
    pid: Option<u32>,
    /// Set by the owning task when the process has exited.
    exited: Arc<AtomicBool>,
}

/// Capacity of one execution's event channel. The owning task waits when it
/// is full, so a flood of output is paced by the consumer, not buffered.
const EXEC_CHANNEL: usize = 256;

impl KernelHandle {
    pub(crate) fn new(
        tx: mpsc::Sender<Command>,
        pid: Option<u32>,
        exited: Arc<AtomicBool>,
    ) -> Self {
        Self { tx, pid, exited }
    }

    pub fn pid(&self) -> Option<u32> {
        self.pid
    }

    /// False once the kernel process has exited or its task has stopped.
    pub fn is_alive(&self) -> bool {
        !self.tx.is_closed() && !self.exited.load(Ordering::SeqCst)
    }

    /// Starts running `code`; events arrive on the returned stream.
    pub async fn execute(&self, code: String) -> Result<ExecutionStream, KernelError> {
        let (events, rx) = mpsc::channel(EXEC_CHANNEL);
        let (accepted, accepted_rx) = oneshot::channel();
        self.tx
            .send(Command::Execute {
                code,
                events,
                accepted,
            })
            .await
            .map_err(|_| KernelError::Dead("kernel task has stopped".into()))?;
        accepted_rx
            .await
            .map_err(|_| KernelError::Dead("kernel task has stopped".into()))??;
        Ok(rx)
    }

    /// Sends SIGINT to the kernel (a `KeyboardInterrupt` in the running cell).
    pub async fn interrupt(&self) {
        let _ = self.tx.send(Command::Interrupt).await;
    }

    /// Shuts the kernel down and waits until its process is gone.
    pub async fn shutdown(&self) {
        let (done, rx) = oneshot::channel();
        if self.tx.send(Command::Shutdown { done }).await.is_ok() {
            let _ = rx.await;
        }
    }
}

/// A boxed future, so [`KernelFactory`] stays object safe.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Starts kernels whose working directory is a session folder.
pub trait KernelFactory: Send + Sync + 'static {
    fn start<'a>(&'a self, workdir: &'a Path) -> BoxFuture<'a, Result<KernelHandle, KernelError>>;
}
