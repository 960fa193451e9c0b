//! The kernel template: one Python process that has imported ipykernel and
//! the scientific stack, and forks every new kernel (`template.py`).
//!
//! Why: a launched kernel spends most of its start importing, and holds its
//! own copy of every imported module (87 MB unique after pandas, numpy and
//! matplotlib). Forked from a process that has done that once, a kernel
//! starts with the imports done and shares their memory copy-on-write.
//!
//! How it stays exactly as isolated as a launched kernel: the per-kernel
//! wrapper (our binary, `__kernel-sandbox --await-fork`) is still started
//! by the server as PID 1 of a new PID namespace and does the privileged
//! stage as for a launch (cgroups, namespaces, private `/proc`, `/tmp`,
//! `/dev/shm`, masks, shared folders). It then prints what the kernel must
//! apply to itself ([`crate::sandbox::ForkPlan`]: its uid, the Landlock
//! ruleset computed by `sandbox/rules.rs`, limits, cgroups) and waits. The
//! template forks the kernel into the wrapper's PID namespace; the kernel
//! joins those cgroups, sets those limits, enters the wrapper's other
//! namespaces (`setns`), drops to its uid, sets no_new_privs, applies the
//! ruleset, reseeds, and only then starts ipykernel. The kernel is the
//! template's child, which reaps it and writes `exit CODE` on the wrapper's
//! stdin; the wrapper, which the server owns as before, exits with that
//! code: death detection, interrupts (forwarded by the wrapper), shutdown
//! and the lifeline work unchanged. If the template dies first, its kernels
//! come to the server (a child subreaper), and [`adopt_orphans`] does the
//! template's part for them.
//!
//! On CPython 3.12+ the template makes every object it holds immortal after
//! its warm-up (`template.py`, `_immortalize`), so kernels reading them copy
//! no page for reference counts (an idle session after a plot: 12 MB of its
//! own instead of 24).
//!
//! What a kernel's start does the same way in every kernel is done once in
//! the template, before it says it is ready (`template.py`, `_prepare`):
//! ipykernel's application and kernel object, with its shell, from
//! [`TemplateConfig::options`]; the server's start-up code compiled as a
//! module, so a kernel runs [`FORKED_STARTUP_CODE`] instead (the fork's
//! answer, [`Forked`], says whether it can).
//!
//! The template never runs session code: it reads requests only from a pipe
//! only the server holds; it is root, in the host's namespaces, and no
//! kernel can see it (PID namespace), signal it (other uid, Landlock scope)
//! or reach its descriptors (closed in every kernel).
//!
//! This task owns the template: it starts it, answers fork requests one at a
//! time, and replaces it when it dies (with a back-off). A request that
//! finds no template within [`WAIT_FOR_TEMPLATE`] or that fails is answered
//! with an error, and the caller launches that kernel instead.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The template program, run with `python -c`.
const TEMPLATE_CODE: &str = include_str!("template.py");
/// The template's first argument: names it in `ps` (and so in what its
/// kernels' command lines show: they are forks of it).
const MARKER: &str = "mcp-python-interpreter-kernel-template";
/// Longest a template may take to import its modules.
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest one fork may take (the kernel confines itself meanwhile).
const FORK_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a kernel start waits for a template (being started or replaced)
/// before it launches instead.
pub(crate) const WAIT_FOR_TEMPLATE: Duration = Duration::from_secs(30);
/// Templates that die this many times in a row, each before it served
/// anything, are given up: kernels are launched from then on.
const MAX_FAILURES: u32 = 5;

/// How to start the template.
pub(crate) struct TemplateConfig {
    pub python: PathBuf,
    /// The kernels' environment (the template imports with it).
    pub env: HashMap<String, String>,
    /// A private folder of the template's (its HOME, TMPDIR, cwd, and
    /// matplotlib's config folder).
    pub dir: PathBuf,
    /// Modules imported before the first fork.
    pub modules: Vec<String>,
    /// ipykernel's options (each `--Name=value`), applied once in the
    /// template: every kernel it forks is started with exactly these.
    pub options: Vec<String>,
}

/// What one forked kernel needs; sent to the template as one JSON line.
#[derive(Serialize)]
pub(crate) struct ForkRequest {
    /// The wrapper (host pid) whose namespaces the kernel enters.
    pub wrapper_pid: u32,
    /// The wrapper's [`crate::sandbox::ForkPlan`], as it printed it.
    pub plan: serde_json::Value,
    pub cwd: PathBuf,
    /// Set in the kernel's environment (over the template's).
    pub env: HashMap<String, String>,
    /// ipykernel's arguments.
    pub argv: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum TemplateError {
    #[error("no kernel template is available")]
    Unavailable,
    #[error("the kernel template failed to fork: {0}")]
    Fork(String),
}

/// A kernel the template forked.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Forked {
    /// Its pid in the wrapper's PID namespace.
    pub ns_pid: u32,
    /// It has the server's start-up code loaded (the module `_mcp_startup`,
    /// see `template.py`), so its start-up cell is [`FORKED_STARTUP_CODE`].
    pub startup_loaded: bool,
}

/// The start-up cell of a kernel whose template loaded the start-up code.
pub(crate) const FORKED_STARTUP_CODE: &str =
    "__import__('sys').modules.pop('_mcp_startup').setup()";

type Reply = oneshot::Sender<Result<Forked, TemplateError>>;

/// A cheap handle to the task that owns the template.
#[derive(Clone)]
pub(crate) struct Template {
    requests: mpsc::Sender<(String, Reply)>,
}

impl Template {
    /// Starts the owning task (and the template) on `tracker`.
    pub(crate) fn start(
        config: TemplateConfig,
        cancel: CancellationToken,
        tracker: &TaskTracker,
    ) -> Self {
        let (tx, rx) = mpsc::channel(64);
        // Before the template starts: its kernels come to us if it dies.
        match nix::sys::prctl::set_child_subreaper(true) {
            Ok(()) => {
                tracker.spawn(adopt_orphans(cancel.clone()));
            }
            Err(e) => tracing::warn!(
                "cannot become a child subreaper ({e}): the death of a kernel whose template \
                 died first will not be noticed"
            ),
        }
        tracker.spawn(own(config, rx, cancel));
        Self { requests: tx }
    }

    /// Forks a kernel.
    pub(crate) async fn fork(&self, request: &ForkRequest) -> Result<Forked, TemplateError> {
        let line =
            serde_json::to_string(request).map_err(|e| TemplateError::Fork(e.to_string()))?;
        let (tx, rx) = oneshot::channel();
        self.requests
            .send((line, tx))
            .await
            .map_err(|_| TemplateError::Unavailable)?;
        match tokio::time::timeout(WAIT_FOR_TEMPLATE + FORK_TIMEOUT, rx).await {
            Ok(Ok(r)) => r,
            _ => Err(TemplateError::Unavailable),
        }
    }
}

/// A running, ready template.
struct Running {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

async fn own(
    config: TemplateConfig,
    mut requests: mpsc::Receiver<(String, Reply)>,
    cancel: CancellationToken,
) {
    let mut failures = 0u32;
    let mut started_once = false;
    loop {
        if failures >= MAX_FAILURES {
            tracing::warn!(
                "kernel template: failed {failures} times in a row; kernels are launched instead \
                 of forked from now on"
            );
            // Answer every request at once: the callers launch.
            requests.close();
            while let Some((_, reply)) = requests.recv().await {
                let _ = reply.send(Err(TemplateError::Unavailable));
            }
            return;
        }
        // After a failure, kernels asked for meanwhile are launched at once
        // rather than kept waiting for a template that may fail again. (A
        // first start, or a replacement after a healthy template died, is
        // waited for: it is ready sooner than a launched kernel would be.)
        let impatient = failures > 0;
        let pause = tokio::time::sleep(if impatient {
            Duration::from_millis(250 * 2u64.pow(failures))
        } else {
            Duration::ZERO
        });
        let started = tokio::time::Instant::now();
        let spawned = async {
            pause.await;
            spawn(&config).await
        };
        tokio::pin!(spawned);
        let spawned = loop {
            tokio::select! {
                r = &mut spawned => break r,
                req = requests.recv(), if impatient => match req {
                    Some((_, reply)) => {
                        let _ = reply.send(Err(TemplateError::Unavailable));
                    }
                    None => return,
                },
                _ = cancel.cancelled() => return,
            }
        };
        let mut running = match spawned {
            Ok(r) => r,
            Err(e) => {
                failures += 1;
                tracing::warn!("kernel template did not start: {e}");
                continue;
            }
        };
        tracing::info!(
            "kernel template {}: {} imported in {:.2} s; new kernels are forked from it",
            if started_once { "replaced" } else { "ready" },
            if config.modules.is_empty() {
                "ipykernel".to_string()
            } else {
                format!("ipykernel, {}", config.modules.join(", "))
            },
            started.elapsed().as_secs_f64()
        );
        started_once = true;
        let mut served = false;
        loop {
            tokio::select! {
                req = requests.recv() => {
                    let Some((line, reply)) = req else { return };
                    match fork_one(&mut running, &line).await {
                        Ok(r) => {
                            served = true;
                            let _ = reply.send(r);
                        }
                        Err(e) => {
                            tracing::warn!("kernel template failed ({e}); replacing it");
                            let _ = reply.send(Err(TemplateError::Fork(e)));
                            let _ = running.child.start_kill();
                            let _ = running.child.wait().await;
                            break;
                        }
                    }
                }
                status = running.child.wait() => {
                    tracing::warn!(
                        "kernel template exited ({}); starting a new one",
                        status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string())
                    );
                    break;
                }
                _ = cancel.cancelled() => {
                    let _ = running.child.start_kill();
                    let _ = running.child.wait().await;
                    return;
                }
            }
        }
        failures = if served { 0 } else { failures + 1 };
    }
}

/// One request, one reply line. `Err` means the template is broken.
async fn fork_one(
    running: &mut Running,
    line: &str,
) -> Result<Result<Forked, TemplateError>, String> {
    let exchange = async {
        running.stdin.write_all(line.as_bytes()).await?;
        running.stdin.write_all(b"\n").await?;
        running.stdin.flush().await?;
        let mut reply = String::new();
        if running.stdout.read_line(&mut reply).await? == 0 {
            return Err(std::io::Error::other("the template closed its pipe"));
        }
        Ok(reply)
    };
    let reply = match tokio::time::timeout(FORK_TIMEOUT, exchange).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return Err(e.to_string()),
        Err(_) => return Err(format!("no answer within {FORK_TIMEOUT:?}")),
    };
    #[derive(serde::Deserialize)]
    struct Answer {
        ok: bool,
        ns_pid: Option<u32>,
        #[serde(default)]
        startup: bool,
        error: Option<String>,
    }
    let a: Answer = serde_json::from_str(&reply).map_err(|e| format!("bad answer: {e}"))?;
    Ok(match (a.ok, a.ns_pid) {
        (true, Some(pid)) if pid > 1 => Ok(Forked {
            ns_pid: pid,
            startup_loaded: a.startup,
        }),
        _ => Err(TemplateError::Fork(
            a.error.unwrap_or_else(|| "no kernel pid".into()),
        )),
    })
}

/// Starts a template and waits until it has imported everything.
async fn spawn(config: &TemplateConfig) -> Result<Running, String> {
    // The start-up code every kernel runs, for the template to load once.
    tokio::fs::write(config.dir.join("startup.py"), super::local::STARTUP_CODE)
        .await
        .map_err(|e| format!("cannot write its start-up code: {e}"))?;
    let mut cmd = tokio::process::Command::new(&config.python);
    // Kernels forked from it inherit its environment: only what `config.env`
    // names (the local kernels' allowlist), never the server's secrets.
    cmd.env_clear();
    cmd.arg("-c")
        .arg(TEMPLATE_CODE)
        .arg(MARKER)
        .args(&config.options)
        .args(&config.modules)
        .current_dir(&config.dir)
        .envs(&config.env)
        .env("HOME", &config.dir)
        .env("TMPDIR", &config.dir)
        .env("MPLCONFIGDIR", &config.dir)
        .env("IPYTHONDIR", config.dir.join("ipython"))
        // One thread at fork time: OpenBLAS would otherwise start its
        // thread pool at import. Kernels keep this (their BLAS runs one
        // thread; the default CPU quota on small machines is one core).
        .env("OPENBLAS_NUM_THREADS", "1")
        .env("OMP_NUM_THREADS", "1")
        .env("MKL_NUM_THREADS", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", config.python.display()))?;
    let stdin = child.stdin.take().ok_or("no stdin")?;
    let mut stdout = BufReader::new(child.stdout.take().ok_or("no stdout")?);
    if let Some(stderr) = child.stderr.take() {
        // The template's own messages (and those of kernels that fail before
        // they have their own stderr): debug lines of the server's log.
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                // The template's own complaints (a module it cannot import,
                // a thread where none may be) are worth a warning.
                match line.strip_prefix("mcp-python-interpreter kernel template: ") {
                    Some(msg) => tracing::warn!("kernel template: {msg}"),
                    None => tracing::debug!(target: "kernel_template", "{line}"),
                }
            }
        });
    }
    let mut ready = String::new();
    match tokio::time::timeout(READY_TIMEOUT, stdout.read_line(&mut ready)).await {
        Ok(Ok(n)) if n > 0 && ready.contains("\"ready\"") => Ok(Running {
            child,
            stdin,
            stdout,
        }),
        Ok(_) => {
            let status = child.wait().await;
            Err(format!(
                "it exited while importing ({}); run with RUST_LOG=kernel_template=debug for its messages",
                status
                    .map(|s| s.to_string())
                    .unwrap_or_else(|e| e.to_string())
            ))
        }
        Err(_) => Err(format!(
            "it did not finish its imports within {READY_TIMEOUT:?}"
        )),
    }
}

/// Stands in for a dead template as the parent of the kernels it forked.
///
/// A kernel is the template's child: the template reaps it and tells its
/// wrapper how it ended (`exit CODE` on the wrapper's stdin). If the
/// template dies first (killed, or stopped at shutdown while its kernels
/// are still ending), Linux gives its children to the nearest ancestor that
/// is a child subreaper, which the server makes itself in
/// [`Template::start`] (else they would go to the host's init, which may
/// never reap them, and a wrapper cannot finish exiting until its kernel is
/// reaped). Their ends come as SIGCHLD, and this task does the template's
/// part ([`reap_adopted`]). At shutdown it outlives the other tasks until
/// no wrapper, kernel or template of ours is left (or a bound passes):
/// when a wrapper dies, what is left in its namespace can come to us too.
/// It then looks every 100 ms besides SIGCHLD.
async fn adopt_orphans(cancel: CancellationToken) {
    let mut chld = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child()) {
        Ok(s) => s,
        Err(e) => return tracing::warn!("cannot watch for orphaned kernels: {e}"),
    };
    let mut stop_by = None;
    loop {
        tokio::select! {
            _ = chld.recv() => {}
            () = cancel.cancelled(), if stop_by.is_none() => {
                stop_by = Some(tokio::time::Instant::now() + ORPHANS_AT_SHUTDOWN);
            }
            () = tokio::time::sleep(Duration::from_millis(100)), if stop_by.is_some() => {}
        }
        let left = tokio::task::spawn_blocking(reap_adopted)
            .await
            .unwrap_or_default();
        if stop_by.is_some_and(|t| left == 0 || tokio::time::Instant::now() >= t) {
            return;
        }
    }
}

/// How long shutdown waits for a dead template's kernels (see [`adopt_orphans`]).
const ORPHANS_AT_SHUTDOWN: Duration = Duration::from_secs(10);

/// Reaps the kernels that came to us from a dead template and have ended,
/// and writes `exit CODE` to each one's wrapper. Returns how many of our
/// children may still bring us kernels: wrappers, kernels, templates.
///
/// Found from `/proc`, without a list of our own that a fork in flight when
/// the template died could miss: an adopted kernel is a child of ours that
/// lives in a PID namespace below ours without being its first process (a
/// wrapper is its namespace's pid 1; the template and everything else we
/// start live in ours). Its wrapper is the child of ours that is pid 1 of
/// the same namespace. Only this task reaps such processes (tokio reaps
/// only the children it started), so a pid read here is not reused before
/// this task's `waitpid`.
fn reap_adopted() -> usize {
    use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
    struct Child {
        pid: i32,
        zombie: bool,
        /// Its pid in its innermost PID namespace, if below ours.
        nested: Option<u32>,
        ns: Option<PathBuf>,
    }
    let me = std::process::id() as i32;
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let children: Vec<Child> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // After the command's name (in parentheses, which it may contain).
            let mut rest = stat.get(stat.rfind(')')? + 1..)?.split_whitespace();
            let state = rest.next()?;
            (rest.next()?.parse::<i32>().ok()? == me).then_some(())?;
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
            let levels: Vec<u32> = status
                .lines()
                .find_map(|l| l.strip_prefix("NSpid:"))?
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect();
            let nested = (levels.len() > 1).then(|| levels[levels.len() - 1]);
            Some(Child {
                pid,
                zombie: state == "Z",
                nested,
                ns: nested.and_then(|_| std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok()),
            })
        })
        .collect();
    let mut reaped = 0;
    for kernel in children.iter().filter(|c| c.nested.is_some_and(|p| p != 1)) {
        if !kernel.zombie {
            continue;
        }
        let code = match waitpid(
            nix::unistd::Pid::from_raw(kernel.pid),
            Some(WaitPidFlag::WNOHANG),
        ) {
            Ok(WaitStatus::Exited(_, code)) => code,
            Ok(WaitStatus::Signaled(_, sig, _)) => 128 + sig as i32,
            _ => continue,
        };
        reaped += 1;
        let wrapper = children
            .iter()
            .find(|w| w.nested == Some(1) && w.ns.is_some() && w.ns == kernel.ns);
        tracing::debug!(
            pid = kernel.pid,
            "reaped a kernel whose template had died (exit {code})"
        );
        if let Some(w) = wrapper {
            let told = std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
                .open(format!("/proc/{}/fd/0", w.pid))
                .and_then(|mut f| f.write_all(format!("exit {code}\n").as_bytes()));
            if let Err(e) = told {
                tracing::debug!(wrapper = w.pid, "could not tell the wrapper: {e}");
            }
        }
    }
    // What may still bring us kernels: a wrapper (when it dies, what is
    // left in its namespace may come to us), a kernel, a template.
    let nested = children.iter().filter(|c| c.nested.is_some()).count();
    nested - reaped
        + children
            .iter()
            .filter(|c| c.nested.is_none() && is_template(c.pid))
            .count()
}

/// Whether our child `pid` is a kernel template (its command line names it;
/// a template that has ended but is not reaped yet counts too: its kernels
/// may not have come to us yet).
fn is_template(pid: i32) -> bool {
    match std::fs::read(format!("/proc/{pid}/cmdline")) {
        // A zombie (tokio reaps it soon): a template if it ran Python.
        Ok(c) if c.is_empty() => std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .is_ok_and(|n| n.starts_with("python")),
        Ok(c) => c.windows(MARKER.len()).any(|w| w == MARKER.as_bytes()),
        Err(_) => false,
    }
}
