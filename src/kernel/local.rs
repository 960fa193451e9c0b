//! Local ipykernel processes: launch, connection files, process lifetime.
//!
//! Kernels talk to us over ZeroMQ IPC sockets in a private runtime folder
//! (mode 0700, owned by the kernel's user), so no TCP port is ever picked and
//! released (no race between concurrent launches) and no other local user
//! can connect. Each kernel runs in its own process group.
//!
//! Where privilege allows, the kernel's wrapper is started as PID 1 of a new
//! PID namespace (see [`crate::sandbox`]): it holds a pipe from us as stdin
//! and takes the whole namespace down when that pipe closes, so no kernel
//! outlives the server, even one killed by SIGKILL. Otherwise the kernel is
//! told our pid through `JPY_PARENT_PID`, so that ipykernel's parent poller
//! ends it within a second if the server dies.
//!
//! Where the server can (root, with PID and mount namespaces), kernels are
//! not launched but forked from a template that has imported ipykernel and
//! the scientific stack ([`super::template`]): the wrapper is started the
//! same way and prepares the same namespaces, and the forked kernel becomes
//! its child. Otherwise, or when the template cannot serve, kernels are
//! launched.
//!
//! A root server runs each kernel as an unprivileged uid from a
//! [`UidPool`]; the session folder belongs to that uid. A session keeps its
//! uid across kernel restarts (its folder's owner says which), unless
//! another live kernel holds it by then, in which case the folder is handed
//! to the new uid.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use jupyter_protocol::ConnectionInfo;
use jupyter_protocol::connection_info::Transport;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::actor::{Actor, StartupFiles};
use super::template::{FORKED_STARTUP_CODE, ForkRequest, Forked, Template, TemplateConfig};
use super::{BoxFuture, KernelError, KernelFactory, KernelHandle};
use crate::sandbox::users::{UidLease, UidPool};
use crate::sandbox::{AWAIT_FORK_ARG, SPEC_ENV, SYSTEM_WRITE, SandboxSpec, WRAPPER_ARG};

/// ipykernel's options, the same for every kernel (after `-f CONNECTION_FILE`).
/// The template applies them once, before the first fork (see
/// `template.py`), so a forked kernel is started with exactly these.
const KERNEL_OPTIONS: [&str; 2] = [
    // The history database would start a thread per kernel, and keep a
    // sqlite file in its profile; a session's history is ours.
    "--HistoryManager.enabled=False",
    "--Application.log_level=WARN",
];

/// Python run in every kernel before the user's first line (silently).
pub(super) const STARTUP_CODE: &str = include_str!("startup.py");

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
    /// matplotlib's prebuilt font cache, copied into each kernel's own
    /// (writable) MPLCONFIGDIR so no kernel rebuilds it or warns about it.
    pub mpl_cache: Option<PathBuf>,
    /// Isolation for kernels; `None` runs them unconfined.
    pub sandbox: Option<SandboxSettings>,
    /// Fork kernels from a template that imported these modules (besides
    /// ipykernel), where the sandbox allows; `None` launches every kernel.
    pub fork_modules: Option<Vec<String>>,
}

pub use crate::sandbox::plan::SandboxSettings;

/// Starts ipykernel processes; owns every kernel task it spawned.
pub struct LocalKernelFactory {
    config: LocalKernelConfig,
    /// Numbers kernels for their file names in the runtime folder.
    next: AtomicU64,
    /// Cancelled on server shutdown: every kernel task then shuts its kernel down.
    shutdown: CancellationToken,
    /// Every kernel task, so shutdown can wait until the last one is gone.
    tracker: TaskTracker,
    /// The template kernels are forked from, where forking is possible.
    template: Option<Template>,
}

impl LocalKernelFactory {
    pub fn new(
        config: LocalKernelConfig,
        shutdown: CancellationToken,
        tracker: TaskTracker,
    ) -> Self {
        let template = start_template(&config, &shutdown, &tracker);
        Self {
            config,
            next: AtomicU64::new(1),
            shutdown,
            tracker,
            template,
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
        let mpl = own.join("mpl");
        for d in [&own, &tmp, &site, &mpl] {
            create_private_dir(d)
                .await
                .map_err(|e| KernelError::Start(format!("creating {}: {e}", d.display())))?;
        }
        if let Some(cache) = &self.config.mpl_cache {
            seed_mpl_config(cache, &mpl).await;
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
        // Forked kernels need the wrapper as their namespace's init.
        let template = self
            .template
            .as_ref()
            .filter(|_| sandbox.is_some_and(|s| s.pid_ns));
        let lease = match sandbox.and_then(|s| s.users.as_ref()) {
            Some(pool) => {
                let lease = take_uid(pool, workdir, [&own]).await;
                if lease.is_err() {
                    let _ = tokio::fs::remove_dir_all(&own).await;
                }
                Some(lease?)
            }
            None => None,
        };
        let cgroup = match sandbox.and_then(|s| s.cgroups.as_ref().map(|c| (s, c))) {
            Some((s, root)) => {
                match root.kernel(&format!("k{n}"), s.memory_bytes, s.max_pids, s.cpus) {
                    Ok(cg) => Some(cg),
                    Err(e) => {
                        tracing::warn!(
                            "cannot create the kernel's cgroup ({e}); using RLIMIT_DATA for memory"
                        );
                        None
                    }
                }
            }
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
                    network: s.network.clone(),
                    file_size_bytes: s.file_size_bytes,
                    data_bytes: cgroup.is_none().then_some(s.memory_bytes),
                    cgroup_procs: cgroup.as_ref().map(|c| c.procs.clone()).unwrap_or_default(),
                    private_tmp: s.mount_ns.then(|| tmp.clone()),
                    shm_bytes: s.memory_bytes,
                    masks: s.masks.clone(),
                    user: lease.as_ref().map(UidLease::user),
                    host_mounts: s.host_mounts.clone(),
                };
                let spec =
                    serde_json::to_string(&spec).map_err(|e| KernelError::Start(e.to_string()))?;
                let mut cmd = tokio::process::Command::new(&s.exe);
                // Nothing of the server's environment (its token may be
                // there) reaches a kernel but what `config.env` names.
                cmd.env_clear();
                cmd.arg(WRAPPER_ARG);
                if template.is_some() {
                    cmd.arg(AWAIT_FORK_ARG).stdout(Stdio::piped());
                }
                cmd.arg(&self.config.python)
                    .env(SPEC_ENV, spec)
                    // Packages from `!pip install` go to the kernel's own folder:
                    // the shared environment is read-only for sandboxed kernels.
                    .env("PIP_TARGET", &site)
                    .env("PYTHONPATH", &site);
                cmd
            }
            None => {
                let mut cmd = tokio::process::Command::new(&self.config.python);
                cmd.env_clear();
                cmd
            }
        };
        let kernel_args: Vec<String> = ["-f".into(), conn_file.to_string_lossy().into_owned()]
            .into_iter()
            .chain(KERNEL_OPTIONS.iter().map(|o| o.to_string()))
            .collect();
        let kernel_env: Vec<(&str, PathBuf)> = vec![
            ("TMPDIR", tmp.clone()),
            ("HOME", tmp.clone()),
            ("IPYTHONDIR", tmp.join("ipython")),
            ("MPLCONFIGDIR", mpl.clone()),
        ];
        if template.is_none() {
            cmd.stdout(Stdio::null());
        }
        cmd.arg("-m")
            .arg("ipykernel_launcher")
            .args(&kernel_args)
            .current_dir(workdir)
            .envs(&self.config.env)
            .env("JPY_PARENT_PID", std::process::id().to_string())
            .envs(kernel_env.iter().map(|(k, v)| (*k, v)))
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        let pid_ns = sandbox.is_some_and(|s| s.pid_ns);
        if pid_ns {
            // The wrapper's stdin is its lifeline to us (see the module doc).
            cmd.stdin(Stdio::piped());
        }
        let started = std::time::Instant::now();
        let mut child = match spawn(cmd, pid_ns).await {
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
        let mut lifeline = child.stdin.take();
        let mut startup_code = STARTUP_CODE;
        if let (Some(template), Some(pipe)) = (template, lifeline.as_mut()) {
            let request = |plan| ForkRequest {
                wrapper_pid: pid.unwrap_or(0),
                plan,
                cwd: workdir.to_path_buf(),
                env: self
                    .config
                    .env
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .chain(
                        kernel_env
                            .iter()
                            .map(|(k, v)| (k.to_string(), v.to_string_lossy().into_owned())),
                    )
                    .chain([
                        ("JPY_PARENT_PID".to_string(), "1".to_string()),
                        ("PIP_TARGET".into(), site.to_string_lossy().into_owned()),
                        ("PYTHONPATH".into(), site.to_string_lossy().into_owned()),
                    ])
                    .collect(),
                argv: kernel_args.clone(),
            };
            let word = match self.fork_into(&mut child, template, request).await {
                Ok(forked) => {
                    tracing::debug!(
                        "kernel forked {:?} after its wrapper started",
                        started.elapsed()
                    );
                    if forked.startup_loaded {
                        startup_code = FORKED_STARTUP_CODE;
                    }
                    format!("pid {}\n", forked.ns_pid)
                }
                Err(e) => {
                    tracing::warn!("launching a kernel instead of forking it: {e}");
                    "launch\n".to_string()
                }
            };
            // A wrapper that is gone is noticed by the kernel task.
            let _ = pipe.write_all(word.as_bytes()).await;
        }
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
            startup_code: startup_code.to_string(),
            private_dir: own,
            cgroup,
            start_timeout: self.config.start_timeout,
            stderr_tail,
            lifeline,
            uid_reaper: sandbox
                .filter(|s| {
                    lease.as_ref().is_some_and(UidLease::is_exclusive)
                        && !pid_ns
                        && s.cgroups.is_none()
                })
                .map(|s| s.exe.clone()),
            lease,
        };
        let (tx, rx) = mpsc::channel(16);
        let (ready_tx, ready_rx) = oneshot::channel();
        let exited = Arc::new(AtomicBool::new(false));
        let actor = Actor::new(child, rx, self.shutdown.child_token(), exited.clone());
        self.tracker.spawn(actor.run(files, ready_tx));
        match ready_rx.await {
            Ok(Ok(())) => {
                tracing::debug!(
                    "kernel ready {:?} after its wrapper started",
                    started.elapsed()
                );
                Ok(KernelHandle::new(tx, pid, exited))
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(KernelError::Start(
                "kernel task ended during start-up".into(),
            )),
        }
    }
}

impl LocalKernelFactory {
    /// Reads the wrapper's fork plan (its namespaces are ready then) and has
    /// the template fork the kernel into them; `Ok` is the kernel's pid in
    /// the wrapper's PID namespace.
    async fn fork_into(
        &self,
        child: &mut tokio::process::Child,
        template: &Template,
        request: impl FnOnce(serde_json::Value) -> ForkRequest,
    ) -> Result<Forked, String> {
        let Some(stdout) = child.stdout.take() else {
            return Err("no pipe from the wrapper".into());
        };
        let mut line = String::new();
        let mut stdout = BufReader::new(stdout);
        let read = stdout.read_line(&mut line);
        match tokio::time::timeout(self.config.start_timeout, read).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => return Err("the kernel's wrapper ended before its namespaces were ready".into()),
        }
        let plan: serde_json::Value =
            serde_json::from_str(&line).map_err(|e| format!("bad plan from the wrapper: {e}"))?;
        template
            .fork(&request(plan))
            .await
            .map_err(|e| e.to_string())
    }
}

/// Starts the template when forking was asked for and the sandbox can give
/// a forked kernel every layer a launched one gets (root: a uid per kernel;
/// PID and mount namespaces: the wrapper as init, `setns` into its view).
/// One log line says which.
fn start_template(
    config: &LocalKernelConfig,
    shutdown: &CancellationToken,
    tracker: &TaskTracker,
) -> Option<Template> {
    let modules = config.fork_modules.clone()?;
    let why_not = match &config.sandbox {
        None => Some("kernels are not sandboxed (--no-sandbox)"),
        Some(s) if s.users.is_none() => Some("the server is not root"),
        Some(s) if !(s.pid_ns && s.mount_ns) => {
            Some("this host gives the server no PID and mount namespaces (CAP_SYS_ADMIN)")
        }
        Some(_) => None,
    };
    if let Some(why) = why_not {
        tracing::info!("kernel start: launched, not forked from a template: {why}");
        return None;
    }
    let dir = config.runtime_dir.join("template");
    {
        use std::os::unix::fs::DirBuilderExt;
        if let Err(e) = std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            tracing::warn!("kernel start: launched: cannot create the template's folder: {e}");
            return None;
        }
    }
    if let Some(cache) = &config.mpl_cache
        && let Ok(entries) = std::fs::read_dir(cache)
    {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with("fontlist") {
                let _ = std::fs::copy(e.path(), dir.join(e.file_name()));
            }
        }
    }
    tracing::info!(
        "kernel start: forked from a template (importing ipykernel{}{})",
        if modules.is_empty() { "" } else { ", " },
        modules.join(", ")
    );
    Some(Template::start(
        TemplateConfig {
            python: config.python.clone(),
            env: config.env.clone(),
            dir,
            modules,
            options: KERNEL_OPTIONS.iter().map(|o| o.to_string()).collect(),
        },
        shutdown.child_token(),
        tracker,
    ))
}

impl KernelFactory for LocalKernelFactory {
    fn start<'a>(&'a self, workdir: &'a Path) -> BoxFuture<'a, Result<KernelHandle, KernelError>> {
        Box::pin(self.launch(workdir))
    }
}

/// Spawns the kernel's process; with `pid_ns`, as PID 1 of a new PID
/// namespace. `unshare(CLONE_NEWPID)` changes where the calling thread's
/// next child goes, so it runs on a thread of its own that ends right
/// after the spawn: no other spawn of the server is affected.
async fn spawn(
    mut cmd: tokio::process::Command,
    pid_ns: bool,
) -> std::io::Result<tokio::process::Child> {
    if !pid_ns {
        return cmd.spawn();
    }
    let (tx, rx) = oneshot::channel();
    let runtime = tokio::runtime::Handle::current();
    std::thread::Builder::new()
        .name("kernel-spawn".into())
        .spawn(move || {
            let _entered = runtime.enter();
            let result = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWPID)
                .map_err(|e| std::io::Error::from_raw_os_error(e as i32))
                .and_then(|()| cmd.spawn());
            let _ = tx.send(result);
        })?;
    rx.await
        .unwrap_or_else(|_| Err(std::io::Error::other("kernel spawn thread failed")))
}

/// Takes a uid for a kernel in `workdir`: the folder owner's if it is free,
/// else the next one, to which the folder (and everything in it) is then
/// handed. `private` (the kernel's runtime folder and files) are given to
/// it too.
async fn take_uid<const N: usize>(
    pool: &UidPool,
    workdir: &Path,
    private: [&PathBuf; N],
) -> Result<UidLease, KernelError> {
    use std::os::unix::fs::MetadataExt;
    let owner = tokio::fs::symlink_metadata(workdir)
        .await
        .map(|m| m.uid())
        .ok();
    let lease = pool.acquire(owner).ok_or_else(|| {
        KernelError::Start(
            "no free kernel uid: every uid of --kernel-uids is in use by a live kernel".into(),
        )
    })?;
    let user = lease.user();
    let workdir = workdir.to_path_buf();
    let private: Vec<PathBuf> = private.into_iter().cloned().collect();
    let rehome = owner != Some(user.uid);
    tokio::task::spawn_blocking(move || {
        for p in &private {
            chown_tree(p, user.uid, user.gid)?;
        }
        if rehome {
            chown_tree(&workdir, user.uid, user.gid)?;
        }
        Ok::<_, std::io::Error>(())
    })
    .await
    .map_err(std::io::Error::other)
    .and_then(|r| r)
    .map_err(|e| {
        KernelError::Start(format!("giving the session folder to its kernel user: {e}"))
    })?;
    Ok(lease)
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

/// Gives `dir` and everything beneath it to `uid`/`gid`. The walk goes by
/// descriptors (`openat` with `O_NOFOLLOW`, `chownat` without following), so
/// a symlink planted in a session folder changes only the link itself and
/// never leads the walk (which runs as root) out of the folder.
fn chown_tree(dir: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
    use rustix::fs::{AtFlags, Mode, OFlags, openat};
    const DIR_FLAGS: OFlags = OFlags::RDONLY
        .union(OFlags::DIRECTORY)
        .union(OFlags::NOFOLLOW)
        .union(OFlags::CLOEXEC);
    let fd = openat(rustix::fs::CWD, dir, DIR_FLAGS, Mode::empty())?;
    fn walk(fd: rustix::fd::OwnedFd, uid: u32, gid: u32, depth: usize) -> std::io::Result<()> {
        let (u, g) = (
            Some(rustix::fs::Uid::from_raw(uid)),
            Some(rustix::fs::Gid::from_raw(gid)),
        );
        rustix::fs::fchown(&fd, u, g)?;
        if depth > 256 {
            return Err(std::io::Error::other("folders nested too deep"));
        }
        for entry in rustix::fs::Dir::read_from(&fd)? {
            let entry = entry?;
            let name = entry.file_name();
            if name.to_bytes() == b"." || name.to_bytes() == b".." {
                continue;
            }
            if entry.file_type() == rustix::fs::FileType::Directory {
                match openat(&fd, name, DIR_FLAGS, Mode::empty()) {
                    Ok(sub) => walk(sub, uid, gid, depth + 1)?,
                    // Replaced by something else meanwhile: change just that.
                    Err(_) => rustix::fs::chownat(&fd, name, u, g, AtFlags::SYMLINK_NOFOLLOW)?,
                }
            } else {
                rustix::fs::chownat(&fd, name, u, g, AtFlags::SYMLINK_NOFOLLOW)?;
            }
        }
        Ok(())
    }
    walk(fd, uid, gid, 0)
}

/// Copies matplotlib's font cache (`fontlist-*.json`) into a kernel's own
/// config folder; a kernel without it just builds its own, slower.
async fn seed_mpl_config(cache: &Path, dir: &Path) {
    let Ok(mut entries) = tokio::fs::read_dir(cache).await else {
        return;
    };
    while let Ok(Some(e)) = entries.next_entry().await {
        let name = e.file_name();
        if name.to_string_lossy().starts_with("fontlist") {
            let _ = tokio::fs::copy(e.path(), dir.join(&name)).await;
        }
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
