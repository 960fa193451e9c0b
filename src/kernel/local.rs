//! Local ipykernel processes: launch, connection files, process lifetime.
//!
//! Kernels talk to us over ZeroMQ IPC sockets in a private runtime folder
//! (mode 0700), so no TCP port is ever picked and released (no race between
//! concurrent launches) and no other local user can connect. Each kernel runs
//! in its own process group with stdin closed, and is told our pid through
//! `JPY_PARENT_PID` so that ipykernel's parent poller ends it within a second
//! if the server dies, even by SIGKILL.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use jupyter_protocol::ConnectionInfo;
use jupyter_protocol::connection_info::Transport;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::actor::{Actor, StartupFiles};
use super::{BoxFuture, KernelError, KernelFactory, KernelHandle};

/// Python run in every kernel before the user's first line (silently).
const STARTUP_CODE: &str = include_str!("startup.py");

/// Everything needed to launch local kernels.
#[derive(Debug, Clone)]
pub struct LocalKernelConfig {
    /// Interpreter that has ipykernel installed.
    pub python: PathBuf,
    /// Private folder for connection files and IPC sockets.
    pub runtime_dir: PathBuf,
    /// Extra environment for kernels (PATH with the venv first, ...).
    pub env: HashMap<String, String>,
    /// How long a kernel may take to answer its first request.
    pub start_timeout: Duration,
}

/// Starts ipykernel processes; owns every kernel task it spawned.
pub struct LocalKernelFactory {
    config: LocalKernelConfig,
    /// Numbers kernels for their file names in the runtime folder.
    next: AtomicU64,
    /// Cancelled on server shutdown: every kernel task then shuts its kernel down.
    shutdown: CancellationToken,
    /// Every kernel task, so shutdown can wait until the last one is gone.
    tracker: TaskTracker,
}

impl LocalKernelFactory {
    pub fn new(
        config: LocalKernelConfig,
        shutdown: CancellationToken,
        tracker: TaskTracker,
    ) -> Self {
        Self {
            config,
            next: AtomicU64::new(1),
            shutdown,
            tracker,
        }
    }

    async fn launch(&self, workdir: &Path) -> Result<KernelHandle, KernelError> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let prefix = self.config.runtime_dir.join(format!("k{n}"));
        let info = ConnectionInfo {
            transport: Transport::IPC,
            ip: prefix.to_string_lossy().into_owned(),
            stdin_port: 1,
            control_port: 2,
            hb_port: 3,
            shell_port: 4,
            iopub_port: 5,
            signature_scheme: "hmac-sha256".into(),
            key: crate::random_token(32),
            kernel_name: Some("python3".into()),
        };
        let conn_file = self.config.runtime_dir.join(format!("k{n}.json"));
        let json = serde_json::to_vec(&info).map_err(|e| KernelError::Start(e.to_string()))?;
        write_private(&conn_file, &json)
            .await
            .map_err(|e| KernelError::Start(format!("writing {}: {e}", conn_file.display())))?;

        let mut cmd = tokio::process::Command::new(&self.config.python);
        cmd.arg("-m")
            .arg("ipykernel_launcher")
            .arg("-f")
            .arg(&conn_file)
            .arg("--HistoryManager.enabled=False")
            .arg("--Application.log_level=WARN")
            .current_dir(workdir)
            .envs(&self.config.env)
            .env("JPY_PARENT_PID", std::process::id().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        let mut child = cmd.spawn().map_err(|e| {
            KernelError::Start(format!("cannot run {}: {e}", self.config.python.display()))
        })?;
        let pid = child.id();
        let stderr_tail = StderrTail::default();
        if let Some(stderr) = child.stderr.take() {
            let tail = stderr_tail.clone();
            self.tracker.spawn(async move {
                let mut lines = BufReader::new(stderr).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    tracing::debug!(target: "kernel_stderr", pid, "{line}");
                    tail.push(line);
                }
            });
        }

        let mut socket_files: Vec<PathBuf> = (1..=5)
            .map(|p| PathBuf::from(format!("{}-{p}", info.ip)))
            .collect();
        socket_files.push(conn_file);
        let files = StartupFiles {
            info,
            startup_code: STARTUP_CODE.to_string(),
            remove_on_exit: socket_files,
            start_timeout: self.config.start_timeout,
            stderr_tail,
        };
        let (tx, rx) = mpsc::channel(16);
        let (ready_tx, ready_rx) = oneshot::channel();
        let actor = Actor::new(child, rx, self.shutdown.child_token());
        self.tracker.spawn(actor.run(files, ready_tx));
        match ready_rx.await {
            Ok(Ok(())) => Ok(KernelHandle::new(tx, pid)),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(KernelError::Start(
                "kernel task ended during start-up".into(),
            )),
        }
    }
}

impl KernelFactory for LocalKernelFactory {
    fn start<'a>(&'a self, workdir: &'a Path) -> BoxFuture<'a, Result<KernelHandle, KernelError>> {
        Box::pin(self.launch(workdir))
    }
}

/// The last lines a kernel wrote to stderr, to explain a failed start.
#[derive(Clone, Default, Debug)]
pub(crate) struct StderrTail(std::sync::Arc<std::sync::Mutex<std::collections::VecDeque<String>>>);

impl StderrTail {
    const LINES: usize = 20;

    fn push(&self, line: String) {
        let mut q = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if q.len() == Self::LINES {
            q.pop_front();
        }
        q.push_back(line);
    }

    pub(crate) fn text(&self) -> String {
        let q = self.0.lock().unwrap_or_else(|p| p.into_inner());
        q.iter().cloned().collect::<Vec<_>>().join("\n")
    }
}

async fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = path.to_owned();
    let data = data.to_owned();
    tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)?;
        f.write_all(&data)
    })
    .await
    .map_err(std::io::Error::other)?
}
