//! Per-kernel cgroups for memory, process and CPU limits.
//!
//! cgroup v2 is used where its memory controller is available and the
//! hierarchy is writable; otherwise the v1 `memory`, `pids` and `cpu`
//! hierarchies. CPU: each kernel gets a quota of `--kernel-cpus` cores
//! (`cpu.max`, or `cpu.cfs_quota_us` in v1) and the same weight as every
//! other kernel, so one busy session cannot take the whole machine.
//! The server creates one group per kernel under a group of its own and
//! removes it when the kernel is gone. Without a writable hierarchy the
//! caller falls back to `RLIMIT_DATA`.

use std::path::{Path, PathBuf};

/// Where kernels' cgroups go, and which layout it has.
#[derive(Debug, Clone)]
pub enum CgroupRoot {
    /// A v2 group of ours (memory.max, pids.max, cpu.max when `cpu`).
    V2 { dir: PathBuf, cpu: bool },
    /// Groups of ours in the v1 memory and (optionally) pids and cpu hierarchies.
    V1 {
        memory: PathBuf,
        pids: Option<PathBuf>,
        cpu: Option<PathBuf>,
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
            if std::fs::create_dir_all(&ours).is_ok() {
                let control = ours.join("cgroup.subtree_control");
                if std::fs::write(&control, "+memory +pids +cpu").is_ok() {
                    return Some(Self::V2 {
                        dir: ours,
                        cpu: true,
                    });
                }
                if std::fs::write(&control, "+memory +pids").is_ok() {
                    return Some(Self::V2 {
                        dir: ours,
                        cpu: false,
                    });
                }
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
                let cpu = Path::new("/sys/fs/cgroup/cpu").join(name).to_path_buf();
                let cpu = (std::fs::create_dir_all(&cpu).is_ok()
                    && cpu.join("cpu.cfs_quota_us").exists())
                .then_some(cpu);
                return Some(Self::V1 { memory, pids, cpu });
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
            "/sys/fs/cgroup/cpu",
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

    /// Whether kernels get a CPU quota here.
    pub fn has_cpu(&self) -> bool {
        match self {
            Self::V2 { cpu, .. } => *cpu,
            Self::V1 { cpu, .. } => cpu.is_some(),
        }
    }

    /// Makes the groups of one kernel with its limits (`cpus`: cores of
    /// CPU time per period).
    pub fn kernel(
        &self,
        name: &str,
        memory_bytes: u64,
        max_pids: u64,
        cpus: f64,
    ) -> std::io::Result<KernelCgroup> {
        let quota = (cpus * CPU_PERIOD_US as f64).round().max(1000.0) as u64;
        let mut cg = KernelCgroup {
            dirs: Vec::new(),
            procs: Vec::new(),
        };
        match self {
            Self::V2 { dir: root, cpu } => {
                let d = root.join(name);
                std::fs::create_dir_all(&d)?;
                cg.dirs.push(d.clone());
                std::fs::write(d.join("memory.max"), memory_bytes.to_string())?;
                let _ = std::fs::write(d.join("memory.swap.max"), "0");
                std::fs::write(d.join("pids.max"), max_pids.to_string())?;
                if *cpu {
                    std::fs::write(d.join("cpu.max"), format!("{quota} {CPU_PERIOD_US}"))?;
                }
                cg.procs.push(d.join("cgroup.procs"));
            }
            Self::V1 { memory, pids, cpu } => {
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
                if let Some(c) = cpu {
                    let d = c.join(name);
                    std::fs::create_dir_all(&d)?;
                    cg.dirs.push(d.clone());
                    std::fs::write(d.join("cpu.cfs_period_us"), CPU_PERIOD_US.to_string())?;
                    std::fs::write(d.join("cpu.cfs_quota_us"), quota.to_string())?;
                    cg.procs.push(d.join("cgroup.procs"));
                }
            }
        }
        Ok(cg)
    }

    /// Removes the server's own group (once its kernels' groups are gone).
    pub fn remove(&self) {
        match self {
            Self::V2 { dir, .. } => {
                let _ = std::fs::remove_dir(dir);
            }
            Self::V1 { memory, pids, cpu } => {
                let _ = std::fs::remove_dir(memory);
                for d in pids.iter().chain(cpu) {
                    let _ = std::fs::remove_dir(d);
                }
            }
        }
    }
}

/// CFS period for CPU quotas (the kernel's default).
const CPU_PERIOD_US: u64 = 100_000;

impl KernelCgroup {
    /// Kills every process still in the kernel's groups (what a cell left
    /// behind when the kernel had no PID namespace of its own), so its uid
    /// can be given to another session.
    pub fn kill_all(&self) {
        for procs in &self.procs {
            for _ in 0..10 {
                let Ok(text) = std::fs::read_to_string(procs) else {
                    break;
                };
                let pids: Vec<i32> = text.lines().filter_map(|l| l.trim().parse().ok()).collect();
                if pids.is_empty() {
                    break;
                }
                for p in pids {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(p),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        }
    }

    /// Removes the kernel's groups; call after its processes have exited.
    pub fn remove(&self) {
        for d in &self.dirs {
            let _ = std::fs::remove_dir(d);
        }
    }
}
