//! Kernel isolation without containers (Linux).
//!
//! The server never restricts itself. Each kernel is started through our own
//! binary (`mcp-python-interpreter __kernel-sandbox PYTHON ARGS...`), which
//! reads a [`SandboxSpec`] from the environment, applies it to itself and
//! then runs Python, so everything below holds for the kernel and every
//! process it starts. In the order the wrapper applies them:
//!
//! - **Limits**: memory, processes and CPU through cgroups the server made
//!   for this kernel ([`cgroup`]); `RLIMIT_DATA` for memory when no cgroup is
//!   writable; `RLIMIT_FSIZE` caps one file; no core dumps.
//! - **No network** ([`NetworkPolicy::None`]): a private network namespace.
//! - **Namespaces** ([`mounts`]): where privilege allows, the server starts
//!   the wrapper as PID 1 of a new PID namespace (other processes do not
//!   exist for the kernel; see [`init`]), and the wrapper makes a private
//!   mount namespace: a fresh `/proc`, a private `/tmp` and `/dev/shm`, and
//!   private folders (such as `/root`) replaced by empty ones into which
//!   only what the kernel needs is bound back; host folders shared with
//!   `--mount` bound at `/mnt/NAME` ([`host_folders`]), read-only unless
//!   asked otherwise. Without root, the wrapper first enters an unprivileged
//!   user namespace of its own (same uid), where the host allows, for the
//!   private `/tmp` (and network namespace).
//! - **No privilege** ([`users`]): a root server's kernels run as an
//!   unprivileged uid of their own (one per live session), with no
//!   supplementary groups.
//! - **Landlock** ([`rules`]): writes only in the session folder and the
//!   kernel's private runtime folder (and `:rw` shared folders), reads only
//!   in system folders, the Python installation and shared folders; TCP
//!   connections only to web ports
//!   ([`NetworkPolicy::Web`]); no signals and no abstract Unix sockets to
//!   anything outside the kernel's own processes.
//!
//! What this host offers is found once at start-up by [`probe`] and logged.

pub mod cgroup;
pub mod host_folders;
mod init;
mod mounts;
pub mod plan;
pub mod probe;
mod rules;
pub mod users;

use std::ffi::OsString;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use host_folders::{HostMount, MountRequest};
pub use probe::{Capabilities, LandlockSupport};

/// Environment variable carrying the JSON [`SandboxSpec`] to the wrapper.
pub const SPEC_ENV: &str = "MCP_PYTHON_INTERPRETER_SANDBOX";
/// First argument that turns our binary into the kernel wrapper.
pub const WRAPPER_ARG: &str = "__kernel-sandbox";

/// What kernels may reach over the network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum NetworkPolicy {
    /// Whatever the host allows.
    Full,
    /// Outgoing TCP only to these ports (web and proxies; Landlock, Linux
    /// 6.7+). UDP (DNS) is not restricted.
    Web { ports: Vec<u16> },
    /// A private network namespace with no interfaces.
    None,
}

/// The Unix identity a kernel runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelUser {
    pub uid: u32,
    pub gid: u32,
}

/// What the wrapper applies before it becomes the kernel.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SandboxSpec {
    /// Folders the kernel may read and execute from.
    pub read_only: Vec<PathBuf>,
    /// Folders the kernel may read and write.
    pub read_write: Vec<PathBuf>,
    /// Apply Landlock (when the running Linux supports it).
    pub landlock: bool,
    pub network: NetworkPolicy,
    /// `RLIMIT_FSIZE`: largest file the kernel may write.
    pub file_size_bytes: Option<u64>,
    /// `RLIMIT_DATA`: used for memory when no cgroup could be made. Not
    /// `RLIMIT_AS`: V8 (kaleido's Chromium), Go and Java reserve far more
    /// address space than they use and die under it; the data limit counts
    /// writable private memory, which is what a cell can actually fill.
    pub data_bytes: Option<u64>,
    /// `cgroup.procs` files the wrapper moves itself into.
    pub cgroup_procs: Vec<PathBuf>,
    /// Bound over `/tmp` in a private mount namespace (programs such as
    /// kaleido's Chromium write to `/tmp` whatever TMPDIR says).
    pub private_tmp: Option<PathBuf>,
    /// Size of the private `/dev/shm` (a tmpfs; its pages count against
    /// the kernel's memory limit).
    pub shm_bytes: u64,
    /// Folders the kernel must not see (not traversable by its user, such as
    /// `/root`): replaced by empty ones, with the kept folders beneath them
    /// bound back.
    pub masks: Vec<PathBuf>,
    /// Drop to this user (the server is root).
    pub user: Option<KernelUser>,
    /// Host folders shared with the kernel: bound at their targets in a
    /// private mount namespace (read-only ones remounted so), and granted
    /// by Landlock at their targets.
    pub host_mounts: Vec<HostMount>,
}

impl Default for SandboxSpec {
    fn default() -> Self {
        Self {
            read_only: Vec::new(),
            read_write: Vec::new(),
            landlock: false,
            network: NetworkPolicy::Full,
            file_size_bytes: None,
            data_bytes: None,
            cgroup_procs: Vec::new(),
            private_tmp: None,
            shm_bytes: 64 << 20,
            masks: Vec::new(),
            user: None,
            host_mounts: Vec::new(),
        }
    }
}

/// System folders every kernel may read.
pub const SYSTEM_READ: &[&str] = &[
    "/usr",
    "/lib",
    "/lib64",
    "/lib32",
    "/bin",
    "/sbin",
    "/etc",
    "/opt",
    "/proc",
    "/sys",
    "/run",
    "/var/lib",
    "/var/cache/fontconfig",
];
/// Device nodes kernels need to write (/dev/null, /dev/shm for Chromium).
pub const SYSTEM_WRITE: &[&str] = &["/dev"];

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("bad sandbox spec: {0}")]
    Spec(String),
    #[error("cannot join cgroup {0}: {1}")]
    Cgroup(PathBuf, std::io::Error),
    #[error("cannot set {0}: {1}")]
    Rlimit(&'static str, nix::Error),
    #[error("cannot create a private network namespace: {0}")]
    Network(nix::Error),
    #[error("cannot hide {0} from the kernel: {1}")]
    Mask(PathBuf, std::io::Error),
    #[error("cannot share the host folder {0} with the kernel: {1}")]
    HostFolder(PathBuf, std::io::Error),
    #[error("cannot drop privileges to uid {0}: {1}")]
    User(u32, nix::Error),
    #[error("landlock: {0}")]
    Landlock(String),
    #[error("cannot run {0:?}: {1}")]
    Exec(OsString, std::io::Error),
}

/// Second argument that marks the wrapper's second stage (see [`exec_wrapped`]).
const STAGE2_ARG: &str = "--stage2";
/// Second argument of a wrapper whose kernel the template forks into it
/// (see [`exec_wrapped`] and `kernel::template`).
pub const AWAIT_FORK_ARG: &str = "--await-fork";

/// What a kernel forked by the template must apply to itself, as root and
/// then as its user, before any of its code runs: the unprivileged part of
/// the wrapper's work ([`confine`]) as data, plus the per-process limits and
/// the cgroups that a launched kernel inherits from the wrapper. The wrapper
/// prints it (one JSON line) once its namespaces are ready.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ForkPlan {
    pub user: Option<KernelUser>,
    pub landlock: Option<rules::LandlockPlan>,
    pub cgroup_procs: Vec<PathBuf>,
    pub file_size_bytes: Option<u64>,
    pub data_bytes: Option<u64>,
}

/// The wrapper: applies the spec from the environment, then runs `args`.
/// Returns only on failure.
///
/// Outside a PID namespace it applies everything and `exec`s the kernel.
/// As PID 1 of one it applies what needs privilege (cgroups, limits,
/// namespaces, mounts), then stays as the namespace's [`init`] and starts
/// itself again as `--stage2`, which drops to the kernel's user, applies
/// Landlock and `exec`s the kernel. init itself keeps its uid and stays
/// outside the Landlock domain, so the kernel cannot signal even PID 1.
pub fn exec_wrapped(args: Vec<OsString>) -> SandboxError {
    let spec: SandboxSpec = match std::env::var(SPEC_ENV)
        .map_err(|e| e.to_string())
        .and_then(|s| serde_json::from_str(&s).map_err(|e| e.to_string()))
    {
        Ok(s) => s,
        Err(e) => return SandboxError::Spec(e),
    };
    let (stage2, await_fork, args) = match args.split_first() {
        Some((first, rest)) if first == STAGE2_ARG => (true, false, rest),
        Some((first, rest)) if first == AWAIT_FORK_ARG => (false, true, rest),
        _ => (false, false, &args[..]),
    };
    let Some((program, rest)) = args.split_first() else {
        return SandboxError::Spec("no program to run".into());
    };
    // The unprivileged part, then the kernel itself.
    let confine_and_exec = |spec: &SandboxSpec| {
        use std::os::unix::process::CommandExt;
        if let Err(e) = confine(spec) {
            return e;
        }
        let err = std::process::Command::new(program)
            .args(rest)
            .env_remove(SPEC_ENV)
            .exec();
        SandboxError::Exec(program.clone(), err)
    };
    if stage2 {
        return confine_and_exec(&spec);
    }
    let pid1 = std::process::id() == 1;
    if await_fork && !pid1 {
        return SandboxError::Spec(
            "a forked kernel needs the wrapper as a namespace's init".into(),
        );
    }
    let cgroup_procs = spec.cgroup_procs.clone();
    let spec = match isolate(spec, pid1) {
        Ok(s) => s,
        Err(e) => return e,
    };
    let stage2 = || {
        let json = serde_json::to_string(&spec).map_err(|e| SandboxError::Spec(e.to_string()))?;
        // /proc/self/exe: our own binary, even where its path is masked.
        let mut cmd = std::process::Command::new("/proc/self/exe");
        cmd.arg(WRAPPER_ARG)
            .arg(STAGE2_ARG)
            .args(args)
            .env(SPEC_ENV, json);
        Ok::<_, SandboxError>(cmd)
    };
    if await_fork {
        let plan = ForkPlan {
            user: spec.user,
            landlock: spec.landlock.then(|| rules::plan(&spec)),
            cgroup_procs,
            file_size_bytes: spec.file_size_bytes,
            data_bytes: spec.data_bytes,
        };
        return match (serde_json::to_string(&plan), stage2()) {
            (Ok(json), Ok(cmd)) => init::await_fork(&json, cmd),
            (Err(e), _) => SandboxError::Spec(e.to_string()),
            (_, Err(e)) => e,
        };
    }
    if pid1 {
        return match stage2() {
            Ok(cmd) => init::run(cmd),
            Err(e) => e,
        };
    }
    confine_and_exec(&spec)
}

/// The privileged part: cgroups, limits, namespaces and mounts. Returns the
/// spec for [`confine`] (with `/tmp` writable once it is private).
fn isolate(mut spec: SandboxSpec, pid1: bool) -> Result<SandboxSpec, SandboxError> {
    use nix::sys::resource::{Resource, setrlimit};
    for procs in &spec.cgroup_procs {
        // "0" is the writer itself, whatever PID namespace it is in.
        std::fs::write(procs, "0").map_err(|e| SandboxError::Cgroup(procs.clone(), e))?;
    }
    setrlimit(Resource::RLIMIT_CORE, 0, 0).map_err(|e| SandboxError::Rlimit("RLIMIT_CORE", e))?;
    if let Some(b) = spec.file_size_bytes {
        setrlimit(Resource::RLIMIT_FSIZE, b, b)
            .map_err(|e| SandboxError::Rlimit("RLIMIT_FSIZE", e))?;
    }
    if let Some(b) = spec.data_bytes {
        setrlimit(Resource::RLIMIT_DATA, b, b)
            .map_err(|e| SandboxError::Rlimit("RLIMIT_DATA", e))?;
    }
    // Without root, a user namespace of our own (same uid inside) gives the
    // privilege to make the namespaces below, and nothing outside them.
    let wants_ns = spec.network == NetworkPolicy::None || spec.private_tmp.is_some();
    if wants_ns
        && !nix::unistd::Uid::effective().is_root()
        && let Err(e) = mounts::own_user_namespace()
    {
        eprintln_quiet(&format!(
            "mcp-python-interpreter kernel sandbox: no user namespace ({e})"
        ));
    }
    if spec.network == NetworkPolicy::None {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).map_err(SandboxError::Network)?;
    }
    if spec.private_tmp.is_some() || !spec.masks.is_empty() || pid1 {
        match mounts::private_view(&spec, pid1) {
            Ok(view) => {
                if view.tmp {
                    spec.read_write.push(PathBuf::from("/tmp"));
                }
            }
            // Masks and shared folders are only asked for where the probe
            // found mount namespaces to work: failing here is an error, not
            // a downgrade.
            Err(e) if !spec.masks.is_empty() || !spec.host_mounts.is_empty() => return Err(e),
            Err(e) => eprintln_quiet(&format!(
                "mcp-python-interpreter kernel sandbox: no private /tmp ({e}); /tmp stays unwritable"
            )),
        }
    }
    spec.private_tmp = None;
    spec.masks.clear();
    spec.cgroup_procs.clear();
    Ok(spec)
}

/// The unprivileged part: the kernel's user, then Landlock.
fn confine(spec: &SandboxSpec) -> Result<(), SandboxError> {
    if let Some(user) = spec.user {
        users::become_user(user)?;
        // What the kernel creates is its own alone, wherever it lands.
        nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    }
    if spec.landlock {
        rules::restrict(spec)?;
    }
    Ok(())
}

/// A line on stderr that is dropped if stderr is gone (never panics).
fn eprintln_quiet(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}
