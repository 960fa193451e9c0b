//! Kernels: the small interface the rest of the server uses to run code.
//!
//! A kernel is reached through a [`KernelHandle`]: a cheap, cloneable sender
//! to the one task that owns the kernel's process and sockets (see
//! [`actor`]). Starting kernels is behind the [`KernelFactory`] trait so a
//! warm pool or a remote gateway can be added without touching the callers.
//! Jupyter wire types never leave this module: callers see [`KernelEvent`].

mod actor;
pub mod gateway;
pub mod local;
mod template;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::{mpsc, oneshot};

pub use gateway::GatewayKernelFactory;
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
    /// A silent query's expression raised or gave no text.
    #[error("the kernel could not answer: {0}")]
    Query(String),
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
    /// Lets go of a kernel that outlives us (remote: it keeps running, to be
    /// resumed after a restart); a local kernel is shut down.
    Detach {
        done: oneshot::Sender<()>,
    },
    /// A silent request whose one user expression is `expr`; answers the
    /// expression's `text/plain` value (remote kernels only).
    Query {
        expr: String,
        reply: oneshot::Sender<Result<String, KernelError>>,
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
    /// What reaches this kernel again after our restart (a remote kernel's id).
    resume_id: Option<Arc<str>>,
}

/// A [`KernelHandle`] that does not keep its kernel running.
#[derive(Clone, Debug)]
pub(crate) struct WeakKernel {
    tx: mpsc::WeakSender<Command>,
    pid: Option<u32>,
    exited: Arc<AtomicBool>,
    resume_id: Option<Arc<str>>,
}

impl WeakKernel {
    pub(crate) fn upgrade(&self) -> Option<KernelHandle> {
        Some(KernelHandle {
            tx: self.tx.upgrade()?,
            pid: self.pid,
            exited: self.exited.clone(),
            resume_id: self.resume_id.clone(),
        })
    }
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
        Self {
            tx,
            pid,
            exited,
            resume_id: None,
        }
    }

    pub(crate) fn with_resume_id(mut self, id: &str) -> Self {
        self.resume_id = Some(Arc::from(id));
        self
    }

    /// What [`KernelFactory::resume`] takes to reach this kernel after our
    /// restart; `None` for kernels that cannot outlive the server.
    pub fn resume_id(&self) -> Option<&str> {
        self.resume_id.as_deref()
    }

    /// A handle that does not keep the kernel's task alive.
    pub(crate) fn downgrade(&self) -> WeakKernel {
        WeakKernel {
            tx: self.tx.downgrade(),
            pid: self.pid,
            exited: self.exited.clone(),
            resume_id: self.resume_id.clone(),
        }
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

    /// Lets go of the kernel: a remote one keeps running for
    /// [`KernelFactory::resume`]; a local one is shut down.
    pub async fn detach(&self) {
        let (done, rx) = oneshot::channel();
        if self.tx.send(Command::Detach { done }).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// Evaluates `expr` silently in the kernel (after any running cell) and
    /// returns its plain-text value.
    pub(crate) async fn query(&self, expr: String) -> Result<String, KernelError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Query { expr, reply })
            .await
            .map_err(|_| KernelError::Dead("kernel task has stopped".into()))?;
        rx.await
            .map_err(|_| KernelError::Dead("kernel task has stopped".into()))?
    }
}

pub use crate::BoxFuture;

/// Starts kernels whose working directory is a session folder.
///
/// The defaults are those of local kernels; a remote backend overrides
/// them. These are the places where backends really differ.
pub trait KernelFactory: Send + Sync + 'static {
    fn start<'a>(&'a self, workdir: &'a Path) -> BoxFuture<'a, Result<KernelHandle, KernelError>>;

    /// Reaches again a kernel that outlived our previous run (its
    /// [`KernelHandle::resume_id`]), state intact; `Ok(None)` if it is gone
    /// or this backend's kernels never outlive us.
    fn resume<'a>(
        &'a self,
        _resume_id: &'a str,
        _workdir: &'a Path,
    ) -> BoxFuture<'a, Result<Option<KernelHandle>, KernelError>> {
        Box::pin(async { Ok(None) })
    }

    /// Deletes a kernel that outlived our previous run and is no longer
    /// wanted (its session expired or was pooled), and its folder.
    fn discard<'a>(&'a self, _resume_id: &'a str, _workdir: &'a Path) -> BoxFuture<'a, ()> {
        Box::pin(async {})
    }

    /// Session folders beside remote kernels are reached through this;
    /// `None`: folders are on our disk.
    fn remote_files(
        &self,
    ) -> Option<(
        std::path::PathBuf,
        Arc<dyn crate::workspace::remote::RemoteFiles>,
    )> {
        None
    }
}
