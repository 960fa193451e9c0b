//! Per-kernel cgroups for memory and process limits.
//!
//! cgroup v2 is used where its memory controller is available and the
//! hierarchy is writable; otherwise the v1 `memory` and `pids` hierarchies.
//! The server creates one group per kernel under a group of its own and
//! removes it when the kernel is gone. Without a writable hierarchy the
//! caller falls back to `RLIMIT_AS`.

use std::path::{Path, PathBuf};

/// Where kernels' cgroups go, and which layout it has.
#[derive(Debug, Clone)]
pub enum CgroupRoot {
    /// A v2 group of ours (memory.max, pids.max).
    V2(PathBuf),
    /// Groups of ours in the v1 memory and (optionally) pids hierarchies.
    V1 {
        memory: PathBuf,
        pids: Option<PathBuf>,
    },
}

/// One kernel's groups; removed on drop... by [`KernelCgroup::remove`].
#[derive(Debug, Clone)]
pub struct KernelCgroup {
    dirs: Vec<PathBuf>,
    /// `cgroup.procs` files the kernel's wrapper joins.
    pub procs: Vec<PathBuf>,
}

impl CgroupRoot {
    /// Finds a writable hierarchy and makes the server's group `name` in it.
    pub fn detect(name: &str) -> Option<Self> {
        let v2 = Path::new("/sys/fs/cgroup");
        if std::fs::read_to_string(v2.join("cgroup.controllers"))
            .map(|c| c.split_whitespace().any(|x| x == "memory"))
            .unwrap_or(false)
        {
            let ours = v2.join(name);
            if std::fs::create_dir_all(&ours).is_ok()
                && std::fs::write(ours.join("cgroup.subtree_control"), "+memory +pids").is_ok()
            {
                return Some(Self::V2(ours));
            }
            let _ = std::fs::remove_dir(&ours);
        }
        let mem = Path::new("/sys/fs/cgroup/memory");
        if mem.join("memory.limit_in_bytes").exists() {
            let memory = mem.join(name);
            if std::fs::create_dir_all(&memory).is_ok() {
                // The v1 pids root has no pids.max of its own; a group made
                // in it does.
                let pids_root = Path::new("/sys/fs/cgroup/pids");
                let pids = pids_root
                    .join("cgroup.procs")
                    .exists()
                    .then(|| pids_root.join(name))
                    .filter(|p| std::fs::create_dir_all(p).is_ok() && p.join("pids.max").exists());
                return Some(Self::V1 { memory, pids });
            }
        }
        None
    }

    /// Removes groups left by servers of ours that are gone (killed with
    /// SIGKILL, so they could not clean up): `prefix{pid}` groups whose pid
    /// is not running. A group that still holds a process cannot be removed
    /// (the kernel refuses), so nothing live is touched.
    pub fn sweep_stale(prefix: &str) -> usize {
        let mut removed = 0;
        for root in [
            "/sys/fs/cgroup",
            "/sys/fs/cgroup/memory",
            "/sys/fs/cgroup/pids",
        ] {
            let Ok(entries) = std::fs::read_dir(root) else {
                continue;
            };
            for e in entries.flatten() {
                let name = e.file_name();
                let Some(pid) = name
                    .to_str()
                    .and_then(|n| n.strip_prefix(prefix))
                    .and_then(|p| p.parse::<u32>().ok())
                else {
                    continue;
                };
                if Path::new(&format!("/proc/{pid}")).exists() {
                    continue;
                }
                let group = e.path();
                if let Ok(kids) = std::fs::read_dir(&group) {
                    for k in kids.flatten() {
                        if k.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                            let _ = std::fs::remove_dir(k.path());
                        }
                    }
                }
                if std::fs::remove_dir(&group).is_ok() {
                    removed += 1;
                }
            }
        }
        removed
    }

    /// Makes the groups of one kernel with its limits.
    pub fn kernel(
        &self,
        name: &str,
        memory_bytes: u64,
        max_pids: u64,
    ) -> std::io::Result<KernelCgroup> {
        let mut cg = KernelCgroup {
            dirs: Vec::new(),
            procs: Vec::new(),
        };
        match self {
            Self::V2(root) => {
                let d = root.join(name);
                std::fs::create_dir_all(&d)?;
                cg.dirs.push(d.clone());
                std::fs::write(d.join("memory.max"), memory_bytes.to_string())?;
                let _ = std::fs::write(d.join("memory.swap.max"), "0");
                std::fs::write(d.join("pids.max"), max_pids.to_string())?;
                cg.procs.push(d.join("cgroup.procs"));
            }
            Self::V1 { memory, pids } => {
                let d = memory.join(name);
                std::fs::create_dir_all(&d)?;
                cg.dirs.push(d.clone());
                std::fs::write(d.join("memory.limit_in_bytes"), memory_bytes.to_string())?;
                let _ = std::fs::write(
                    d.join("memory.memsw.limit_in_bytes"),
                    memory_bytes.to_string(),
                );
                cg.procs.push(d.join("cgroup.procs"));
                if let Some(p) = pids {
                    let d = p.join(name);
                    std::fs::create_dir_all(&d)?;
                    cg.dirs.push(d.clone());
                    std::fs::write(d.join("pids.max"), max_pids.to_string())?;
                    cg.procs.push(d.join("cgroup.procs"));
                }
            }
        }
        Ok(cg)
    }

    /// Removes the server's own group (once its kernels' groups are gone).
    pub fn remove(&self) {
        match self {
            Self::V2(d) => {
                let _ = std::fs::remove_dir(d);
            }
            Self::V1 { memory, pids } => {
                let _ = std::fs::remove_dir(memory);
                if let Some(p) = pids {
                    let _ = std::fs::remove_dir(p);
                }
            }
        }
    }
}

impl KernelCgroup {
    /// Removes the kernel's groups; call after its processes have exited.
    pub fn remove(&self) {
        for d in &self.dirs {
            let _ = std::fs::remove_dir(d);
        }
    }
}
