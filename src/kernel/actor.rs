//! The one task that owns a kernel: its process, its sockets, its state.
//!
//! Callers reach it only through [`super::KernelHandle`] commands. Socket
//! reads happen in two small reader tasks that forward whole messages over
//! bounded channels, so the `select!` below never drops a half-read message.
//! An execution ends at the iopub `idle` status whose parent is our request.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use jupyter_protocol::{
    ConnectionInfo, ExecuteRequest, ExecutionState, JupyterMessage, JupyterMessageContent,
    KernelInfoRequest, Media, ShutdownRequest,
};
use jupyter_zmq_client::{ClientControlConnection, DealerSendConnection};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::process::Child;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::local::StderrTail;
use super::{Command, ExecEnd, ExecMessage, KernelError, KernelEvent, MimeData};
use crate::sandbox::cgroup::KernelCgroup;

/// How long a kernel gets to exit after a shutdown request before SIGKILL.
/// Its state is being discarded anyway, and files are written through, so
/// waiting long only delays clear_session and expiry.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(500);
/// Capacity of the reader tasks' channels.
const READ_CHANNEL: usize = 64;

/// What the actor needs to bring a freshly spawned kernel up.
pub(crate) struct StartupFiles {
    pub info: ConnectionInfo,
    pub startup_code: String,
    /// The kernel's private folder (connection file, sockets, TMPDIR),
    /// removed when the kernel is gone.
    pub private_dir: PathBuf,
    /// The kernel's cgroups, removed when the kernel is gone.
    pub cgroup: Option<KernelCgroup>,
    pub start_timeout: Duration,
    pub stderr_tail: StderrTail,
    /// The write end of a namespace init's stdin: closing it (or our death)
    /// ends the kernel's whole PID namespace.
    pub lifeline: Option<tokio::process::ChildStdin>,
    /// The kernel's uid; given back only once its processes are all gone.
    pub lease: Option<crate::sandbox::users::UidLease>,
    /// Our binary, when processes of the kernel's uid may outlive it (no PID
    /// namespace, no cgroup): run with `--kill-uid` before the uid is given back.
    pub uid_reaper: Option<PathBuf>,
}

/// The execution in flight, if any.
struct Running {
    msg_id: String,
    events: mpsc::Sender<ExecMessage>,
}

struct Sockets {
    shell: DealerSendConnection,
    control: ClientControlConnection,
    iopub: mpsc::Receiver<JupyterMessage>,
    shell_replies: mpsc::Receiver<JupyterMessage>,
    /// The reader tasks; aborted when the actor ends.
    _readers: JoinSet<()>,
}

pub(crate) struct Actor {
    child: Child,
    commands: mpsc::Receiver<Command>,
    cancel: CancellationToken,
    /// Shared with the handles: set once the process has exited.
    exited: Arc<AtomicBool>,
}

impl Actor {
    pub(crate) fn new(
        child: Child,
        commands: mpsc::Receiver<Command>,
        cancel: CancellationToken,
        exited: Arc<AtomicBool>,
    ) -> Self {
        Self {
            child,
            commands,
            cancel,
            exited,
        }
    }

    pub(crate) async fn run(
        mut self,
        files: StartupFiles,
        ready: oneshot::Sender<Result<(), KernelError>>,
    ) {
        let start = tokio::time::timeout(files.start_timeout, async {
            tokio::select! {
                sockets = connect(&files.info, &files.startup_code) => sockets,
                status = self.child.wait() => Err(KernelError::Start(format!(
                    "the kernel exited during start-up ({}): {}",
                    status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string()),
                    files.stderr_tail.text()
                ))),
            }
        })
        .await
        .unwrap_or_else(|_| {
            Err(KernelError::Start(format!(
                "the kernel did not answer within {:?}: {}",
                files.start_timeout,
                files.stderr_tail.text()
            )))
        });
        match start {
            Ok(sockets) => {
                let _ = ready.send(Ok(()));
                self.serve(sockets).await;
            }
            Err(e) => {
                tracing::warn!("kernel start failed: {e}");
                let _ = ready.send(Err(e));
                self.kill().await;
            }
        }
        drop(files.lifeline);
        if let Some(cg) = files.cgroup {
            // Anything a cell started outside a PID namespace of its own.
            let _ = tokio::task::spawn_blocking(move || {
                cg.kill_all();
                cg.remove();
            })
            .await;
        }
        let _ = tokio::fs::remove_dir_all(&files.private_dir).await;
        if let (Some(exe), Some(lease)) = (&files.uid_reaper, &files.lease) {
            let _ = tokio::process::Command::new(exe)
                .args([
                    crate::sandbox::WRAPPER_ARG,
                    crate::sandbox::users::KILL_UID_ARG,
                ])
                .arg(lease.user().uid.to_string())
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .await;
        }
        drop(files.lease);
    }

    async fn serve(&mut self, mut s: Sockets) {
        let mut running: Option<Running> = None;
        let mut dead: Option<String> = None;
        loop {
            tokio::select! {
                cmd = self.commands.recv() => match cmd {
                    None => break,
                    Some(Command::Shutdown { done } | Command::Detach { done }) => {
                        self.shutdown(&mut s, dead.is_none()).await;
                        let _ = done.send(());
                        return;
                    }
                    Some(Command::Query { reply, .. }) => {
                        let _ = reply.send(Err(KernelError::Dead("a local kernel takes no queries".into())));
                    }
                    Some(Command::Interrupt) => {
                        if dead.is_none() {
                            self.signal(Signal::SIGINT);
                        }
                    }
                    Some(Command::Execute { code, events, accepted }) => {
                        if let Some(detail) = &dead {
                            let _ = accepted.send(Err(KernelError::Dead(detail.clone())));
                        } else if running.is_some() {
                            let _ = accepted.send(Err(KernelError::Busy));
                        } else {
                            let request = ExecuteRequest {
                                code,
                                silent: false,
                                store_history: true,
                                user_expressions: None,
                                allow_stdin: false,
                                stop_on_error: true,
                            };
                            let msg: JupyterMessage = request.into();
                            let msg_id = msg.header.msg_id.clone();
                            match s.shell.send(msg).await {
                                Ok(()) => {
                                    running = Some(Running { msg_id, events });
                                    let _ = accepted.send(Ok(()));
                                }
                                Err(e) => {
                                    let _ = accepted.send(Err(KernelError::Dead(e.to_string())));
                                }
                            }
                        }
                    }
                },
                Some(msg) = s.iopub.recv() => {
                    let Some(run) = &running else { continue };
                    if parent_id(&msg) != Some(run.msg_id.as_str()) {
                        continue;
                    }
                    if let JupyterMessageContent::Status(st) = &msg.content {
                        if st.execution_state == ExecutionState::Idle {
                            let _ = run.events.send(ExecMessage::End(ExecEnd::Completed)).await;
                            running = None;
                        }
                        continue;
                    }
                    if let Some(ev) = to_event(msg.content) {
                        // A dropped receiver means the caller stopped listening; keep
                        // draining until idle so the next execution starts clean.
                        let _ = run.events.send(ExecMessage::Event(ev)).await;
                    }
                },
                Some(_reply) = s.shell_replies.recv() => {},
                status = self.child.wait(), if dead.is_none() => {
                    let detail = match status {
                        Ok(s) => describe_exit(s),
                        Err(e) => e.to_string(),
                    };
                    tracing::info!("kernel process ended: {detail}");
                    self.exited.store(true, Ordering::SeqCst);
                    if let Some(run) = running.take() {
                        let _ = run.events.send(ExecMessage::End(ExecEnd::Died { detail: detail.clone() })).await;
                    }
                    dead = Some(detail);
                },
                _ = self.cancel.cancelled() => {
                    self.shutdown(&mut s, dead.is_none()).await;
                    return;
                }
            }
        }
        self.shutdown(&mut s, dead.is_none()).await;
    }

    fn signal(&self, sig: Signal) {
        if let Some(pid) = self.child.id() {
            // The kernel leads its own process group: this reaches `!cmd` children too.
            let _ = killpg(Pid::from_raw(pid as i32), sig);
        }
    }

    /// Asks the kernel to exit, then kills its process group after a grace period.
    async fn shutdown(&mut self, s: &mut Sockets, alive: bool) {
        if alive {
            let msg: JupyterMessage = ShutdownRequest { restart: false }.into();
            let _ = tokio::time::timeout(Duration::from_millis(200), s.control.send(msg)).await;
            if tokio::time::timeout(SHUTDOWN_GRACE, self.child.wait())
                .await
                .is_err()
            {
                tracing::debug!("kernel ignored shutdown request; killing it");
            }
        }
        self.kill().await;
    }

    async fn kill(&mut self) {
        self.signal(Signal::SIGKILL);
        let _ = self.child.kill().await;
    }
}

/// Waits until the kernel has bound the IPC sockets we connect to (their
/// files exist). zeromq retries a connect that finds no socket with an
/// exponential back-off (50, 100, 200 ms, ...), so connecting before the
/// kernel is up adds up to 200 ms to a start (measured: connections made at
/// about 375 ms instead of 165 ms). Looking every 5 ms costs nothing next to
/// a kernel start, and this is start-up, not the path of a call. The caller
/// bounds the wait (start-up timeout, kernel exit).
async fn sockets_bound(info: &ConnectionInfo) {
    if info.transport != jupyter_protocol::connection_info::Transport::IPC {
        return;
    }
    let files: Vec<PathBuf> = [info.shell_port, info.control_port, info.iopub_port]
        .iter()
        .map(|port| PathBuf::from(format!("{}-{port}", info.ip)))
        .collect();
    while !files.iter().all(|f| f.exists()) {
        tokio::time::sleep(SOCKET_POLL).await;
    }
}

pub(super) fn parent_id(msg: &JupyterMessage) -> Option<&str> {
    msg.parent_header.as_ref().map(|h| h.msg_id.as_str())
}

fn describe_exit(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        // A namespace init reports its kernel's death by signal as 128 + N.
        (Some(code), _) if code > 128 && Signal::try_from(code - 128).is_ok() => {
            format!(
                "killed by signal {}",
                Signal::try_from(code - 128).expect("checked")
            )
        }
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(sig)) => match Signal::try_from(sig) {
            Ok(s) => format!("killed by signal {s}"),
            Err(_) => format!("killed by signal {sig}"),
        },
        _ => status.to_string(),
    }
}

pub(super) fn to_event(content: JupyterMessageContent) -> Option<KernelEvent> {
    use jupyter_protocol::Stdio;
    Some(match content {
        JupyterMessageContent::StreamContent(s) => KernelEvent::Stream {
            stderr: matches!(s.name, Stdio::Stderr),
            text: s.text,
        },
        JupyterMessageContent::DisplayData(d) => KernelEvent::Display(mime_data(&d.data)),
        JupyterMessageContent::ExecuteResult(r) => KernelEvent::Result(mime_data(&r.data)),
        JupyterMessageContent::ErrorOutput(e) => KernelEvent::Error {
            ename: e.ename,
            evalue: e.evalue,
            traceback: e.traceback,
        },
        JupyterMessageContent::ClearOutput(c) => KernelEvent::ClearOutput { wait: c.wait },
        _ => return None,
    })
}

fn mime_data(media: &Media) -> Vec<MimeData> {
    let Ok(serde_json::Value::Object(map)) = serde_json::to_value(media) else {
        return Vec::new();
    };
    map.into_iter()
        .map(|(mime, v)| MimeData {
            mime,
            data: match v {
                serde_json::Value::String(s) => s,
                other => other.to_string(),
            },
        })
        .collect()
}

/// How often start-up looks for the kernel's sockets (see [`sockets_bound`]).
const SOCKET_POLL: Duration = Duration::from_millis(5);

/// Connects to a starting kernel, waits until iopub is subscribed, and runs
/// the start-up code.
async fn connect(info: &ConnectionInfo, startup_code: &str) -> Result<Sockets, KernelError> {
    sockets_bound(info).await;
    let err = |e: jupyter_zmq_client::RuntimeError| KernelError::Start(e.to_string());
    let session = crate::random_token(16);
    let identity = jupyter_zmq_client::peer_identity_for_session(&session).map_err(err)?;
    let mut iopub_conn = jupyter_zmq_client::create_client_iopub_connection(info, "", &session)
        .await
        .map_err(err)?;
    let shell =
        jupyter_zmq_client::create_client_shell_connection_with_identity(info, &session, identity)
            .await
            .map_err(err)?;
    let control = jupyter_zmq_client::create_client_control_connection(info, &session)
        .await
        .map_err(err)?;
    let (mut shell_tx, mut shell_rx) = shell.split();

    let mut readers = JoinSet::new();
    let (iopub_tx, mut iopub) = mpsc::channel(READ_CHANNEL);
    readers.spawn(async move {
        while let Ok(msg) = iopub_conn.read().await {
            if iopub_tx.send(msg).await.is_err() {
                break;
            }
        }
    });
    let (replies_tx, mut shell_replies) = mpsc::channel(READ_CHANNEL);
    readers.spawn(async move {
        while let Ok(msg) = shell_rx.read().await {
            if replies_tx.send(msg).await.is_err() {
                break;
            }
        }
    });

    // A SUB socket misses whatever is published before its subscription
    // reaches the kernel. Ask for kernel_info until its busy/idle status shows
    // up on iopub: from then on no output can be lost.
    loop {
        let msg: JupyterMessage = KernelInfoRequest {}.into();
        let id = msg.header.msg_id.clone();
        shell_tx.send(msg).await.map_err(err)?;
        let seen = tokio::time::timeout(Duration::from_millis(500), async {
            while let Some(m) = iopub.recv().await {
                if parent_id(&m) == Some(id.as_str()) {
                    return true;
                }
            }
            false
        })
        .await;
        match seen {
            Ok(true) => break,
            Ok(false) => return Err(KernelError::Start("iopub socket closed".into())),
            Err(_) => continue,
        }
    }

    let request = ExecuteRequest {
        code: startup_code.to_string(),
        silent: true,
        store_history: false,
        user_expressions: None,
        allow_stdin: false,
        stop_on_error: false,
    };
    let msg: JupyterMessage = request.into();
    let id = msg.header.msg_id.clone();
    shell_tx.send(msg).await.map_err(err)?;
    // Silent requests publish no output, but the reply tells whether the
    // start-up code raised.
    while let Some(reply) = shell_replies.recv().await {
        if parent_id(&reply) != Some(id.as_str()) {
            continue;
        }
        if let JupyterMessageContent::ExecuteReply(r) = &reply.content
            && let Some(e) = &r.error
        {
            return Err(KernelError::Start(format!(
                "start-up code failed: {}: {}",
                e.ename, e.evalue
            )));
        }
        break;
    }
    // Drain the start-up statuses so they never reach the first execution.
    while iopub.try_recv().is_ok() {}

    Ok(Sockets {
        shell: shell_tx,
        control,
        iopub,
        shell_replies,
        _readers: readers,
    })
}
