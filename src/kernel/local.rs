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
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use jupyter_protocol::ConnectionInfo;
use jupyter_protocol::connection_info::Transport;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::actor::{Actor, StartupFiles};
use super::{BoxFuture, KernelError, KernelFactory, KernelHandle};
use crate::sandbox::cgroup::CgroupRoot;
use crate::sandbox::{SPEC_ENV, SYSTEM_WRITE, SandboxSpec, WRAPPER_ARG};

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
    /// Isolation for kernels; `None` runs them unconfined.
    pub sandbox: Option<SandboxSettings>,
}

/// How kernels are confined (see [`crate::sandbox`]).
#[derive(Debug, Clone)]
pub struct SandboxSettings {
    /// Our own binary, which wraps the kernel (`__kernel-sandbox`).
    pub exe: PathBuf,
    pub landlock: bool,
    pub no_network: bool,
    /// System folders and the Python installation.
    pub read_only: Vec<PathBuf>,
    pub memory_bytes: u64,
    pub max_pids: u64,
    pub file_size_bytes: Option<u64>,
    /// Where per-kernel cgroups go, if a hierarchy is writable.
    pub cgroups: Option<CgroupRoot>,
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
        // Everything private to this kernel: connection file, IPC sockets,
        // TMPDIR and HOME. Sandboxed kernels can write here and in their
        // session folder only, so no kernel can read another's key.
        let own = self.config.runtime_dir.join(format!("k{n}"));
        let tmp = own.join("tmp");
        let site = own.join("site");
        for d in [&own, &tmp, &site] {
            create_private_dir(d)
                .await
                .map_err(|e| KernelError::Start(format!("creating {}: {e}", d.display())))?;
        }
        let info = ConnectionInfo {
            transport: Transport::IPC,
            ip: own.join("s").to_string_lossy().into_owned(),
            stdin_port: 1,
            control_port: 2,
            hb_port: 3,
            shell_port: 4,
            iopub_port: 5,
            signature_scheme: "hmac-sha256".into(),
            key: crate::random_token(32),
            kernel_name: Some("python3".into()),
        };
        let conn_file = own.join("kernel.json");
        let json = serde_json::to_vec(&info).map_err(|e| KernelError::Start(e.to_string()))?;
        write_private(&conn_file, &json)
            .await
            .map_err(|e| KernelError::Start(format!("writing {}: {e}", conn_file.display())))?;

        let sandbox = self.config.sandbox.as_ref();
        let cgroup = match sandbox.and_then(|s| s.cgroups.as_ref().map(|c| (s, c))) {
            Some((s, root)) => match root.kernel(&format!("k{n}"), s.memory_bytes, s.max_pids) {
                Ok(cg) => Some(cg),
                Err(e) => {
                    tracing::warn!(
                        "cannot create the kernel's cgroup ({e}); using RLIMIT_AS for memory"
                    );
                    None
                }
            },
            None => None,
        };
        let mut cmd = match sandbox {
            Some(s) => {
                let spec = SandboxSpec {
                    read_only: s.read_only.clone(),
                    read_write: [workdir.to_path_buf(), own.clone()]
                        .into_iter()
                        .chain(SYSTEM_WRITE.iter().map(PathBuf::from))
                        .collect(),
                    landlock: s.landlock,
                    no_network: s.no_network,
                    file_size_bytes: s.file_size_bytes,
                    address_space_bytes: cgroup.is_none().then_some(s.memory_bytes),
                    cgroup_procs: cgroup.as_ref().map(|c| c.procs.clone()).unwrap_or_default(),
                    private_tmp: Some(tmp.clone()),
                };
                let spec =
                    serde_json::to_string(&spec).map_err(|e| KernelError::Start(e.to_string()))?;
                let mut cmd = tokio::process::Command::new(&s.exe);
                cmd.arg(WRAPPER_ARG)
                    .arg(&self.config.python)
                    .env(SPEC_ENV, spec)
                    // Packages from `!pip install` go to the kernel's own folder:
                    // the shared environment is read-only for sandboxed kernels.
                    .env("PIP_TARGET", &site)
                    .env("PYTHONPATH", &site);
                cmd
            }
            None => tokio::process::Command::new(&self.config.python),
        };
        cmd.arg("-m")
            .arg("ipykernel_launcher")
            .arg("-f")
            .arg(&conn_file)
            .arg("--HistoryManager.enabled=False")
            .arg("--Application.log_level=WARN")
            .current_dir(workdir)
            .envs(&self.config.env)
            .env("JPY_PARENT_PID", std::process::id().to_string())
            .env("TMPDIR", &tmp)
            .env("HOME", &tmp)
            .env("IPYTHONDIR", tmp.join("ipython"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                if let Some(cg) = &cgroup {
                    cg.remove();
                }
                let _ = tokio::fs::remove_dir_all(&own).await;
                return Err(KernelError::Start(format!(
                    "cannot run {}: {e}",
                    self.config.python.display()
                )));
            }
        };
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

        let files = StartupFiles {
            info,
            startup_code: STARTUP_CODE.to_string(),
            private_dir: own,
            cgroup,
            start_timeout: self.config.start_timeout,
            stderr_tail,
        };
        let (tx, rx) = mpsc::channel(16);
        let (ready_tx, ready_rx) = oneshot::channel();
        let exited = Arc::new(AtomicBool::new(false));
        let actor = Actor::new(child, rx, self.shutdown.child_token(), exited.clone());
        self.tracker.spawn(actor.run(files, ready_tx));
        match ready_rx.await {
            Ok(Ok(())) => Ok(KernelHandle::new(tx, pid, exited)),
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

async fn create_private_dir(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&path)
    })
    .await
    .map_err(std::io::Error::other)?
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
