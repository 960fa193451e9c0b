//! Server configuration, built once in `main` from the command line and
//! environment, then passed down. Library code never reads argv or env.

use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportKind {
    Stdio,
    Http,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub transport: TransportKind,
    pub host: String,
    pub port: u16,
    /// Parent of every session folder.
    pub data_dir: PathBuf,
    /// Interpreter for kernels; `None` means the provisioned environment.
    pub python: Option<PathBuf>,
    /// Where provisioned kernel environments live.
    pub envs_dir: PathBuf,
    pub session_timeout: Duration,
    pub cleanup_interval: Duration,
    pub execution_timeout: Duration,
    /// How long a cell gets to stop after an interrupt before its kernel is restarted.
    pub interrupt_grace: Duration,
    /// Most live sessions at once.
    pub max_sessions: usize,
    /// Bearer tokens accepted over HTTP; empty means no authentication.
    pub tokens: crate::auth::Tokens,
    /// Browser origins allowed besides loopback ones (DNS-rebinding protection).
    pub allowed_origins: Vec<String>,
    /// `Host` header values allowed besides loopback names and `host`; `*`: any.
    pub allowed_hosts: Vec<String>,
    /// HTTP requests handled at once; more get 503.
    pub max_concurrent_requests: usize,
    /// Confine kernels (Landlock, cgroups or rlimits); off only for debugging.
    pub sandbox: bool,
    /// What kernels may reach over the network.
    pub kernel_network: crate::sandbox::NetworkPolicy,
    /// Cores of CPU time each kernel may use.
    pub kernel_cpus: f64,
    /// uids for kernels when the server runs as root.
    pub kernel_uids: crate::sandbox::users::UidRange,
    /// Memory limit of one kernel (and its children).
    pub kernel_memory_bytes: u64,
    /// Processes and threads one kernel may have.
    pub kernel_max_pids: u64,
    /// Disk quota of one session folder (also the largest single file).
    pub max_session_bytes: u64,
    /// Kernels kept started ahead of demand.
    pub pool_size: usize,
    /// Delete sessions at shutdown instead of keeping them for the next start.
    pub ephemeral: bool,
    /// How a session adopted after a restart gets its state back.
    pub restore: crate::session::Restore,
    /// Longest a replay may take.
    pub replay_timeout: Duration,
    /// Modules imported in pooled kernels.
    pub preload: Vec<String>,
    /// Fork kernels from a template (where the sandbox allows) instead of
    /// launching each.
    pub fork_kernels: bool,
    /// Most characters of output returned per call (head and tail kept).
    pub max_output_chars: usize,
    /// The server's own PATH, which kernels get after their environment's `bin`.
    pub inherited_path: String,
    /// The variables of the server's environment kernels get (an allowlist:
    /// locale, time zone, proxies, CA bundles, package index settings).
    pub kernel_inherited_env: Vec<(String, String)>,
    /// How long a kernel may take to start.
    pub kernel_start_timeout: Duration,
    /// Images returned inline with execute_code results (count and size).
    pub inline_images: crate::session::InlineBudget,
    /// Host folders shared with every kernel (`--mount`).
    pub mounts: Vec<crate::sandbox::MountRequest>,
    /// Kernels on a Jupyter server instead of local processes.
    pub gateway: Option<crate::kernel::gateway::GatewaySettings>,
}
