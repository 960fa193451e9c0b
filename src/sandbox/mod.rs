//! Kernel isolation without containers (Linux).
//!
//! The server never restricts itself. Each kernel is started through our own
//! binary (`mcp-python-interpreter __kernel-sandbox PYTHON ARGS...`), which
//! reads a [`SandboxSpec`] from the environment, applies it to itself and
//! then `exec`s Python, so everything below holds for the kernel and every
//! process it starts:
//!
//! - **Landlock**: the kernel may write only in its session folder and its
//!   private runtime folder (IPC sockets, TMPDIR, HOME), and read only system
//!   folders and the Python installation; other sessions and the server's
//!   data are out of reach.
//! - **Limits**: memory and process count through a cgroup the server made
//!   for this kernel ([`cgroup`]); `RLIMIT_AS` for memory when no cgroup is
//!   writable; `RLIMIT_FSIZE` caps one file; no core dumps.
//! - **No network** (`--no-network`): a private network namespace.
//!
//! What is unavailable is logged once at start-up by [`probe`], with what
//! protection remains.

pub mod cgroup;

use std::ffi::OsString;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Environment variable carrying the JSON [`SandboxSpec`] to the wrapper.
pub const SPEC_ENV: &str = "MCP_PYTHON_INTERPRETER_SANDBOX";
/// First argument that turns our binary into the kernel wrapper.
pub const WRAPPER_ARG: &str = "__kernel-sandbox";

/// What the wrapper applies before it becomes the kernel.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SandboxSpec {
    /// Folders the kernel may read and execute from.
    pub read_only: Vec<PathBuf>,
    /// Folders the kernel may read and write.
    pub read_write: Vec<PathBuf>,
    /// Apply Landlock (when the running Linux supports it).
    pub landlock: bool,
    /// Enter a new, empty network namespace.
    pub no_network: bool,
    /// `RLIMIT_FSIZE`: largest file the kernel may write.
    pub file_size_bytes: Option<u64>,
    /// `RLIMIT_AS`: used for memory when no cgroup could be made.
    pub address_space_bytes: Option<u64>,
    /// `cgroup.procs` files the wrapper moves itself into.
    pub cgroup_procs: Vec<PathBuf>,
    /// Bound over `/tmp` in a private mount namespace (programs such as
    /// kaleido's Chromium write to `/tmp` whatever TMPDIR says).
    pub private_tmp: Option<PathBuf>,
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
    #[error("landlock: {0}")]
    Landlock(String),
    #[error("cannot run {0:?}: {1}")]
    Exec(OsString, std::io::Error),
}

/// The wrapper: applies the spec from the environment, then execs `args`.
/// Returns only on failure.
pub fn exec_wrapped(args: Vec<OsString>) -> SandboxError {
    let spec: SandboxSpec = match std::env::var(SPEC_ENV)
        .map_err(|e| e.to_string())
        .and_then(|s| serde_json::from_str(&s).map_err(|e| e.to_string()))
    {
        Ok(s) => s,
        Err(e) => return SandboxError::Spec(e),
    };
    if let Err(e) = apply(&spec) {
        return e;
    }
    let Some((program, rest)) = args.split_first() else {
        return SandboxError::Spec("no program to run".into());
    };
    use std::os::unix::process::CommandExt;
    let err = std::process::Command::new(program)
        .args(rest)
        .env_remove(SPEC_ENV)
        .exec();
    SandboxError::Exec(program.clone(), err)
}

fn apply(spec: &SandboxSpec) -> Result<(), SandboxError> {
    use nix::sys::resource::{Resource, setrlimit};
    for procs in &spec.cgroup_procs {
        std::fs::write(procs, std::process::id().to_string())
            .map_err(|e| SandboxError::Cgroup(procs.clone(), e))?;
    }
    setrlimit(Resource::RLIMIT_CORE, 0, 0).map_err(|e| SandboxError::Rlimit("RLIMIT_CORE", e))?;
    if let Some(b) = spec.file_size_bytes {
        setrlimit(Resource::RLIMIT_FSIZE, b, b)
            .map_err(|e| SandboxError::Rlimit("RLIMIT_FSIZE", e))?;
    }
    if let Some(b) = spec.address_space_bytes {
        setrlimit(Resource::RLIMIT_AS, b, b).map_err(|e| SandboxError::Rlimit("RLIMIT_AS", e))?;
    }
    if spec.no_network {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).map_err(SandboxError::Network)?;
    }
    let mut spec = spec.clone();
    if let Some(dir) = &spec.private_tmp {
        match private_tmp(dir, spec.read_only.iter().chain(&spec.read_write)) {
            Ok(()) => spec.read_write.push(PathBuf::from("/tmp")),
            Err(e) => eprintln!(
                "mcp-python-interpreter kernel sandbox: no private /tmp ({e}); /tmp stays unwritable"
            ),
        }
    }
    if spec.landlock {
        landlock_restrict(&spec)?;
    }
    Ok(())
}

/// A mount namespace of our own in which `dir` is `/tmp`, with every folder
/// of `keep` that lived under `/tmp` bound back at its old path. Needs
/// privilege (root, or a user namespace); without it `/tmp` stays unwritable.
fn private_tmp<'a>(
    dir: &std::path::Path,
    keep: impl Iterator<Item = &'a PathBuf>,
) -> std::io::Result<()> {
    use nix::mount::{MsFlags, mount};
    let io = |e: nix::Error| std::io::Error::from_raw_os_error(e as i32);
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).map_err(io)?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(io)?;
    // Hold the folders open (in the new namespace): once /tmp is covered,
    // their paths lead elsewhere.
    let kept: Vec<(PathBuf, std::fs::File)> = keep
        .filter(|p| p.starts_with("/tmp"))
        .filter_map(|p| std::fs::File::open(p).ok().map(|f| (p.clone(), f)))
        .collect();
    mount(
        Some(dir),
        "/tmp",
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(io)?;
    for (path, file) in &kept {
        use std::os::fd::AsRawFd;
        std::fs::create_dir_all(path)?;
        let source = format!("/proc/self/fd/{}", file.as_raw_fd());
        mount(
            Some(source.as_str()),
            path,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(io)?;
    }
    Ok(())
}

fn landlock_restrict(spec: &SandboxSpec) -> Result<landlock::RulesetStatus, SandboxError> {
    use landlock::{
        ABI, Access, AccessFs, Ruleset, RulesetAttr, RulesetCreatedAttr, path_beneath_rules,
    };
    let abi = ABI::V5;
    let err = |e: landlock::RulesetError| SandboxError::Landlock(e.to_string());
    let status = Ruleset::default()
        .handle_access(AccessFs::from_all(abi))
        .map_err(err)?
        .create()
        .map_err(err)?
        .add_rules(path_beneath_rules(
            &spec.read_only,
            AccessFs::from_read(abi),
        ))
        .map_err(err)?
        .add_rules(path_beneath_rules(
            &spec.read_write,
            AccessFs::from_all(abi),
        ))
        .map_err(err)?
        .restrict_self()
        .map_err(err)?;
    Ok(status.ruleset)
}

/// What isolation this machine offers, found once at start-up by running the
/// wrapper in probe mode (Landlock applies per process, so the server does
/// not try it on itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LandlockSupport {
    Full,
    Partial,
    None,
}

/// Runs `exe __kernel-sandbox --probe` and reports what Landlock enforces here.
pub fn probe(exe: &std::path::Path) -> LandlockSupport {
    let out = std::process::Command::new(exe)
        .args([WRAPPER_ARG, "--probe"])
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output();
    match out.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()) {
        Ok(s) if s == "full" => LandlockSupport::Full,
        Ok(s) if s == "partial" => LandlockSupport::Partial,
        _ => LandlockSupport::None,
    }
}

/// The probe side: restricts itself (nothing allowed) and prints the status.
pub fn probe_main() {
    let spec = SandboxSpec {
        landlock: true,
        ..Default::default()
    };
    let status = match landlock_restrict(&spec) {
        Ok(landlock::RulesetStatus::FullyEnforced) => "full",
        Ok(landlock::RulesetStatus::PartiallyEnforced) => "partial",
        _ => "none",
    };
    println!("{status}");
}
