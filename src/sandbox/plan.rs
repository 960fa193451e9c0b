//! Deciding, once at start-up, how kernels are confined on this host.
//!
//! [`plan`] probes what the host offers ([`super::probe`]), chooses the
//! layers, logs one line per layer saying what is active (and what is not,
//! and what that leaves open), decides where shared host folders appear
//! ([`super::host_folders`], one line each), and returns the settings every
//! kernel launch uses. A root server whose kernels cannot be made unprivileged refuses to
//! start rather than run kernels as root.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::cgroup::CgroupRoot;
use super::host_folders::{self, HostMount, Kernels, MountError, MountRequest, Protected};
use super::users::{UidPool, UidRange};
use super::{Capabilities, LandlockSupport, NetworkPolicy};

/// How kernels are confined; fixed at start-up.
#[derive(Debug, Clone)]
pub struct SandboxSettings {
    /// Our own binary, which wraps the kernel (`__kernel-sandbox`).
    pub exe: PathBuf,
    pub landlock: bool,
    pub network: NetworkPolicy,
    /// System folders and the Python installation.
    pub read_only: Vec<PathBuf>,
    pub memory_bytes: u64,
    pub max_pids: u64,
    /// Cores of CPU time per kernel (cgroup quota).
    pub cpus: f64,
    pub file_size_bytes: Option<u64>,
    /// Where per-kernel cgroups go, if a hierarchy is writable.
    pub cgroups: Option<CgroupRoot>,
    /// Private mount namespaces work here (private /tmp, /proc, masks).
    pub mount_ns: bool,
    /// Each kernel gets a PID namespace of its own.
    pub pid_ns: bool,
    /// Folders hidden from kernels (see [`super::SandboxSpec::masks`]).
    pub masks: Vec<PathBuf>,
    /// uids for kernels, when the server is root.
    pub users: Option<UidPool>,
    /// Host folders every kernel sees (`--mount`).
    pub host_mounts: Vec<HostMount>,
}

/// What the plan is made from.
pub struct PlanInput<'a> {
    pub network: NetworkPolicy,
    pub memory_bytes: u64,
    pub max_pids: u64,
    pub cpus: f64,
    pub file_size_bytes: u64,
    pub uids: UidRange,
    /// The Python installation (venv and base prefixes).
    pub python_dirs: Vec<PathBuf>,
    /// Parent of the session folders.
    pub data_dir: &'a Path,
    /// The kernels' private folders (connection files, sockets).
    pub runtime_dir: &'a Path,
    pub cgroups: Option<CgroupRoot>,
    /// Host folders to share with every kernel.
    pub mounts: &'a [MountRequest],
}

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error(
        "the server runs as root but cannot run kernels as an unprivileged user (setuid to {0} \
         failed: is CAP_SETUID missing?). Run the server as an ordinary user instead, or give it \
         CAP_SETUID and CAP_SETGID"
    )]
    NoSetuid(u32),
    #[error(
        "kernels run as unprivileged users, who cannot reach {path}: {blocker} is not searchable \
         by others and this host does not allow mount namespaces to hide it. Move it (e.g. \
         --data-dir/--envs-dir under /var/lib or /srv) or make {blocker} searchable (chmod o+x)"
    )]
    Unreachable { path: PathBuf, blocker: PathBuf },
    #[error(transparent)]
    Mount(#[from] MountError),
}

/// Probes the host and decides; `None` when confinement cannot be applied
/// at all (no executable to wrap with).
pub fn plan(input: PlanInput<'_>) -> Result<Option<SandboxSettings>, PlanError> {
    let Ok(exe) = std::env::current_exe() else {
        tracing::warn!("cannot find our own executable; kernels run unconfined");
        return Ok(None);
    };
    let root = nix::unistd::Uid::effective().is_root();
    let caps = super::probe::run(&exe, root.then_some(input.uids.first));
    if root && !caps.setuid {
        return Err(PlanError::NoSetuid(input.uids.first));
    }
    let users = root.then(|| {
        UidPool::new(
            input.uids,
            &std::fs::read_to_string("/etc/passwd").unwrap_or_default(),
        )
    });

    let mut read_only: Vec<PathBuf> = super::SYSTEM_READ.iter().map(PathBuf::from).collect();
    read_only.extend(input.python_dirs.iter().cloned());
    // Kernels of another uid must reach the interpreter and their folders:
    // folders on the way that others may not search are hidden (masked) in
    // the kernel's mount namespace, with what it needs bound back.
    let mut masks = Vec::new();
    if root {
        for path in input
            .python_dirs
            .iter()
            .map(PathBuf::as_path)
            .chain([input.data_dir])
        {
            if path.starts_with("/tmp") && caps.mount_ns {
                continue; // under the kernel's private /tmp, rebuilt searchable
            }
            if let Some(blocker) = unsearchable_ancestor(path) {
                if !caps.mount_ns {
                    return Err(PlanError::Unreachable {
                        path: path.to_path_buf(),
                        blocker,
                    });
                }
                if !masks.iter().any(|m: &PathBuf| blocker.starts_with(m)) {
                    masks.retain(|m: &PathBuf| !m.starts_with(&blocker));
                    masks.push(blocker);
                }
            }
        }
    }
    let host_mounts = host_folders::resolve(
        input.mounts,
        Kernels::Confined {
            mount_ns: caps.mount_ns,
            uids: root.then_some(input.uids),
        },
        &Protected {
            data_dir: input.data_dir,
            runtime_dir: input.runtime_dir,
            python_dirs: &input.python_dirs,
        },
    )?;
    log_layers(&caps, &input, root, &masks);
    log_host_mounts(&host_mounts, &caps);

    Ok(Some(SandboxSettings {
        exe,
        landlock: caps.landlock_fs != LandlockSupport::None,
        network: match input.network {
            NetworkPolicy::Web { .. } if !caps.landlock_net => NetworkPolicy::Full,
            n => n,
        },
        read_only,
        memory_bytes: input.memory_bytes,
        max_pids: input.max_pids,
        cpus: input.cpus,
        file_size_bytes: Some(input.file_size_bytes),
        cgroups: input.cgroups,
        mount_ns: caps.mount_ns,
        pid_ns: caps.pid_ns && caps.mount_ns,
        masks,
        users,
        host_mounts,
    }))
}

/// The first folder on the way to `path` (excluding `/`, including `path`
/// itself) that others may not search.
pub(super) fn unsearchable_ancestor(path: &Path) -> Option<PathBuf> {
    let mut ancestors: Vec<&Path> = path.ancestors().collect();
    ancestors.reverse();
    ancestors
        .into_iter()
        .skip(1)
        .find(|a| {
            std::fs::metadata(a)
                .map(|m| m.is_dir() && m.permissions().mode() & 0o001 == 0)
                .unwrap_or(false)
        })
        .map(Path::to_path_buf)
}

/// One line per shared host folder, and what is not enforced here.
fn log_host_mounts(mounts: &[HostMount], caps: &Capabilities) {
    for m in mounts {
        tracing::info!(
            "host folder: {} is {} for every kernel at {}",
            m.host.display(),
            if m.writable {
                "read-write"
            } else {
                "read-only"
            },
            m.target.display()
        );
        if !m.writable && !caps.mount_ns && caps.landlock_fs == LandlockSupport::None {
            tracing::warn!(
                "host folder {}: neither mount namespaces nor Landlock are available, so \
                 read-only is not enforced: kernels may write it wherever their user may",
                m.host.display()
            );
        }
    }
}

fn log_layers(caps: &Capabilities, input: &PlanInput<'_>, root: bool, masks: &[PathBuf]) {
    match caps.landlock_fs {
        LandlockSupport::Full => {
            tracing::info!("kernel isolation: Landlock enforced (files: own session folder only)")
        }
        LandlockSupport::Partial => tracing::warn!(
            "kernel isolation: Landlock only partly supported by this Linux; file access is \
             restricted where it can be"
        ),
        LandlockSupport::None => tracing::warn!(
            "kernel isolation: Landlock is not available on this Linux, so kernels can read and \
             write whatever their user can{}",
            if root {
                " (each kernel has a uid of its own, so Unix permissions still keep sessions apart)"
            } else {
                ", including other sessions' folders: run the server as a dedicated user"
            }
        ),
    }
    if root {
        tracing::info!(
            "kernel users: one uid per session from {}-{} (no root in kernels){}",
            input.uids.first,
            input.uids.last,
            if masks.is_empty() {
                String::new()
            } else {
                let m: Vec<String> = masks.iter().map(|m| m.display().to_string()).collect();
                format!("; hidden from kernels: {}", m.join(", "))
            }
        );
    } else {
        tracing::info!("kernel users: kernels run as the server's user (the server is not root)");
    }
    match (caps.pid_ns && caps.mount_ns, caps.landlock_scopes) {
        (true, true) => tracing::info!(
            "kernel signals: own PID namespace per kernel, and Landlock scopes (no signals or \
             abstract sockets out)"
        ),
        (true, false) => tracing::info!(
            "kernel signals: own PID namespace per kernel (this Linux lacks Landlock scopes)"
        ),
        (false, true) => tracing::info!(
            "kernel signals: Landlock scopes (no signals or abstract sockets out); no PID namespace \
             (needs privilege), so other processes are visible in /proc"
        ),
        (false, false) => tracing::warn!(
            "kernel signals: neither PID namespaces nor Landlock scopes are available: a kernel can \
             signal every process of its user{}",
            if root {
                " (its own uid only)"
            } else {
                ", including the server"
            }
        ),
    }
    if caps.mount_ns {
        tracing::info!("kernel /tmp: private /tmp and /dev/shm per kernel");
    } else {
        tracing::warn!(
            "kernel /tmp: no mount namespaces here (the server lacks CAP_SYS_ADMIN), so no \
             private /tmp: /tmp stays closed to kernels (TMPDIR points to a private folder), and \
             programs that insist on /tmp fail: plotly's image export says so at once"
        );
    }
    match &input.network {
        NetworkPolicy::Web { ports } if caps.landlock_net => {
            tracing::info!("kernel network: outgoing TCP to ports {ports:?} only (Landlock)")
        }
        NetworkPolicy::Web { .. } => tracing::warn!(
            "kernel network: --kernel-network web needs Landlock network rules (Linux 6.7+), \
             which this Linux lacks: kernels have the full network"
        ),
        NetworkPolicy::Full => tracing::info!("kernel network: full"),
        NetworkPolicy::None => tracing::info!("kernel network: none (private network namespace)"),
    }
    match &input.cgroups {
        Some(cg) => tracing::info!(
            "kernel limits: {} (memory, {}{})",
            match cg {
                CgroupRoot::V2 { dir, .. } => format!("cgroup v2 at {}", dir.display()),
                CgroupRoot::V1 { memory, .. } => format!("cgroup v1 at {}", memory.display()),
            },
            match cg {
                CgroupRoot::V1 { pids: None, .. } => "no pids controller".to_string(),
                _ => "pids".to_string(),
            },
            if cg.has_cpu() {
                format!(", cpu {} core(s) per kernel", input.cpus)
            } else {
                "; no cpu controller: a kernel may use every core".to_string()
            }
        ),
        None => tracing::warn!(
            "kernel limits: no writable cgroup hierarchy; memory is limited with RLIMIT_DATA per process, and \
             neither the number of processes nor CPU is limited"
        ),
    }
}
