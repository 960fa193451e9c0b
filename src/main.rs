//! Command line: parse flags (with environment fallbacks), set up logging,
//! provision the kernel environment, run the server.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use mcp_python_interpreter::auth::Tokens;
use mcp_python_interpreter::config::{Config, TransportKind};
use mcp_python_interpreter::kernel::gateway::GatewaySettings;
use mcp_python_interpreter::sandbox::users::UidRange;
use mcp_python_interpreter::sandbox::{MountRequest, NetworkPolicy};
use mcp_python_interpreter::session::InlineBudget;
use mcp_python_interpreter::{environment, logging, sandbox, serve};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum RestoreMode {
    Replay,
    Files,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum KernelNetwork {
    Full,
    Web,
    None,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Transport {
    /// MCP over stdin/stdout (desktop clients). Logs go to stderr.
    Stdio,
    /// Streamable HTTP at http://HOST:PORT/mcp.
    Http,
}

/// A stateful Python interpreter (Jupyter kernels) for AI assistants, served over MCP.
#[derive(Debug, Parser)]
#[command(
    version,
    about,
    after_help = "Every option can also be set by the environment variable shown with it, except --no-sandbox and --provision-only.
The first start provisions the kernels' Python environment (about a minute, once). Over HTTP, binding anything but loopback needs a token.
Desktop clients: `mcp-python-interpreter --transport stdio`. Docs: README.md, SECURITY.md."
)]
struct Args {
    /// Transport to serve.
    #[arg(long, value_enum, default_value = "http", env = "MCP_TRANSPORT")]
    transport: Transport,
    /// Address to listen on (HTTP).
    #[arg(long, default_value = "127.0.0.1", env = "MCP_HOST")]
    host: String,
    /// Port to listen on (HTTP); 0 picks a free one (printed on stderr).
    #[arg(long, default_value_t = 8000, env = "MCP_PORT")]
    port: u16,
    /// Folder that holds one sub-folder per session
    /// [default: $XDG_DATA_HOME/mcp-python-interpreter/sessions, else ~/.local/share/mcp-python-interpreter/sessions].
    #[arg(long, env = "MCP_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Use this Python (it must have ipykernel) instead of the provisioned environment
    /// [default: none: the provisioned environment].
    #[arg(long, env = "MCP_PYTHON")]
    python: Option<PathBuf>,
    /// Where the provisioned kernel environment lives
    /// [default: $XDG_DATA_HOME/mcp-python-interpreter, else ~/.local/share/mcp-python-interpreter].
    #[arg(long, env = "MCP_ENVS_DIR")]
    envs_dir: Option<PathBuf>,
    /// Python used to create the provisioned environment [default: a CPython 3.12 or
    /// 3.13 of the machine (PATH, pyenv, uv), whose kernels share more memory, else python3].
    #[arg(long, env = "MCP_BASE_PYTHON")]
    base_python: Option<PathBuf>,
    /// Only provision the kernel environment, then exit [default: off; no environment variable].
    #[arg(long)]
    provision_only: bool,
    /// Seconds without use after which a session expires.
    #[arg(long, default_value_t = 1800, env = "MCP_SESSION_TIMEOUT")]
    session_timeout: u64,
    /// Seconds between sweeps for expired sessions.
    #[arg(long, default_value_t = 300, env = "MCP_CLEANUP_INTERVAL")]
    cleanup_interval: u64,
    /// Default time limit of one execute_code call, in seconds.
    #[arg(long, default_value_t = 300.0, env = "MCP_EXECUTION_TIMEOUT")]
    execution_timeout: f64,
    /// Seconds a cell gets to stop after an interrupt (timeout or cancel)
    /// before its kernel is restarted.
    #[arg(long, default_value_t = 5.0, env = "MCP_INTERRUPT_GRACE")]
    interrupt_grace: f64,
    /// Most characters of output returned per call; longer output keeps its head
    /// and tail, and the full text is saved to a file in the session folder.
    #[arg(long, default_value_t = 20_000, env = "MCP_MAX_OUTPUT_CHARS")]
    max_output_chars: usize,
    /// Most live sessions; beyond it execute_code answers SessionLimitError.
    #[arg(long, default_value_t = 64, env = "MCP_MAX_SESSIONS")]
    max_sessions: usize,
    /// Require `Authorization: Bearer TOKEN` on HTTP (at least 16 characters)
    /// [default: none: no token, allowed only on loopback]. Prefer the
    /// environment variable: a command line is visible to other processes.
    #[arg(long, env = "MCP_AUTH_TOKEN", hide_env_values = true)]
    auth_token: Option<String>,
    /// File of `NAME TOKEN` lines: several principals, each owning its sessions [default: none].
    #[arg(long, env = "MCP_TOKENS_FILE")]
    tokens_file: Option<PathBuf>,
    /// A browser origin allowed to call the HTTP endpoint, besides loopback ones
    /// (repeatable; the environment variable takes a comma-separated list)
    /// [default: none: loopback origins only].
    #[arg(
        long = "allowed-origin",
        env = "MCP_ALLOWED_ORIGINS",
        value_delimiter = ','
    )]
    allowed_origins: Vec<String>,
    /// Another name clients may reach this server by, as sent in the HTTP
    /// `Host` header (repeatable): a container's or proxy's name, say;
    /// `*` accepts any (only with tokens, where DNS rebinding gains a page
    /// nothing) [default: none: localhost, 127.0.0.1, ::1 and --host].
    #[arg(
        long = "allowed-host",
        env = "MCP_ALLOWED_HOSTS",
        value_delimiter = ','
    )]
    allowed_hosts: Vec<String>,
    /// HTTP requests handled at once; more are answered 503.
    #[arg(long, default_value_t = 256, env = "MCP_MAX_CONCURRENT_REQUESTS")]
    max_concurrent_requests: usize,
    /// What kernels may reach: `web` (outgoing TCP to ports 80 and 443 and
    /// to the proxies in HTTP_PROXY/HTTPS_PROXY/ALL_PROXY, so `!pip install`
    /// works, but not databases or admin ports on loopback or the LAN),
    /// `full`, or `none` (a private network namespace).
    #[arg(long, value_enum, default_value = "web", env = "MCP_KERNEL_NETWORK")]
    kernel_network: KernelNetwork,
    /// Another TCP port kernels may connect to under `--kernel-network web`
    /// (repeatable; the environment variable takes a comma-separated list) [default: none].
    #[arg(
        long = "kernel-allow-port",
        env = "MCP_KERNEL_ALLOW_PORTS",
        value_delimiter = ','
    )]
    kernel_allow_ports: Vec<u16>,
    /// The same as `--kernel-network none` [default: off].
    #[arg(long, env = "MCP_NO_NETWORK", conflicts_with = "kernel_network")]
    no_network: bool,
    /// Cores of CPU time each kernel may use (cgroup quota; fractions allowed)
    /// [default: half of this machine's cores, at least 1].
    #[arg(long, env = "MCP_KERNEL_CPUS")]
    kernel_cpus: Option<f64>,
    /// uids kernels run as when the server is root, one per live session:
    /// `FIRST-LAST`, or one uid for all.
    #[arg(long, default_value = "60000-60999", env = "MCP_KERNEL_UIDS", value_parser = UidRange::parse)]
    kernel_uids: UidRange,
    /// Run kernels on this Jupyter server instead of as local processes:
    /// Jupyter Server, Jupyter Kernel Gateway or Enterprise Gateway
    /// (Kubernetes), as http://HOST:PORT[/PREFIX]. Their confinement is then
    /// the deployment's (see SECURITY.md) [default: none: local kernels].
    #[arg(long, env = "MCP_KERNEL_GATEWAY")]
    kernel_gateway: Option<String>,
    /// The gateway's token, sent as `Authorization: token T` [default: none].
    #[arg(long, env = "MCP_GATEWAY_TOKEN", hide_env_values = true)]
    gateway_token: Option<String>,
    /// Kernel spec the gateway starts for each session.
    #[arg(long, default_value = "python3", env = "MCP_GATEWAY_KERNEL")]
    gateway_kernel: String,
    /// Folder holding the session folders on the kernels' side, relative to
    /// the folder kernels start in, or absolute (a persistent volume, say).
    #[arg(long, default_value = "mcp-sessions", env = "MCP_GATEWAY_FOLDER")]
    gateway_folder: PathBuf,
    /// NAME=VALUE sent in each kernel creation's `env` (repeatable):
    /// Enterprise Gateway reads KERNEL_USERNAME, KERNEL_NAMESPACE, ...
    /// [default: none].
    #[arg(
        long = "gateway-env",
        env = "MCP_GATEWAY_ENV",
        value_delimiter = ',',
        value_parser = parse_env_pair
    )]
    gateway_env: Vec<(String, String)>,
    /// Longest a remote kernel may take from creation to its first answer,
    /// in seconds (a pod to schedule, an image to pull).
    #[arg(long, default_value_t = 120.0, env = "MCP_GATEWAY_START_TIMEOUT")]
    gateway_start_timeout: f64,
    /// Do not confine kernels (no Landlock, cgroups or rlimits). For debugging only
    /// [default: off; no environment variable, so it is never on by accident].
    #[arg(long)]
    no_sandbox: bool,
    /// Memory limit of each kernel (cgroup, or RLIMIT_DATA without cgroups): MiB,
    /// or a size with a unit (512M, 2G); a plain number above 1048576 is bytes.
    #[arg(long, default_value = "2048", env = "MCP_KERNEL_MEMORY_LIMIT", value_parser = parse_memory_limit)]
    kernel_memory_limit: u64,
    /// Processes and threads each kernel may have (cgroup pids controller).
    #[arg(long, default_value_t = 512, env = "MCP_KERNEL_MAX_PIDS")]
    kernel_max_pids: u64,
    /// Disk quota of each session folder (also the largest single file): bytes,
    /// or a size with a unit (500M, 1G) [default: 1G, or --max-session-mb].
    #[arg(long, env = "MCP_MAX_SESSION_BYTES", value_parser = parse_bytes)]
    max_session_bytes: Option<u64>,
    /// The same quota in MiB (used when --max-session-bytes is not given).
    #[arg(
        long,
        default_value_t = 1024,
        env = "MCP_MAX_SESSION_MB",
        conflicts_with = "max_session_bytes"
    )]
    max_session_mb: u64,
    /// Kernels kept started and ready, so a new session does not wait for one.
    /// Each is used by exactly one session and never returned.
    #[arg(long, default_value_t = 2, env = "MCP_POOL_SIZE")]
    pool_size: usize,
    /// Delete every session (folder and record) at shutdown, as an ephemeral
    /// deployment wants; by default sessions survive restarts [default: off].
    #[arg(long, env = "MCP_EPHEMERAL")]
    ephemeral: bool,
    /// How a session gets its state back after a restart: `replay` (its files,
    /// and its variables by re-running the cells that completed) or `files`.
    #[arg(long, value_enum, default_value = "replay", env = "MCP_RESTORE")]
    restore: RestoreMode,
    /// Longest a replay after a restart may take, in seconds.
    #[arg(long, default_value_t = 120.0, env = "MCP_REPLAY_TIMEOUT")]
    replay_timeout: f64,
    /// Modules every new kernel starts with already imported: the kernel
    /// template imports them once and forks kernels from it (where the server
    /// can: root with namespaces), else pooled kernels import them ahead.
    #[arg(
        long,
        value_delimiter = ',',
        env = "MCP_PRELOAD",
        default_value = "numpy,pandas,matplotlib,seaborn"
    )]
    preload: Vec<String>,
    /// Import nothing ahead (the same as `--preload ''`) [default: off].
    #[arg(long, env = "MCP_NO_PRELOAD", conflicts_with = "preload")]
    no_preload: bool,
    /// Launch every kernel as a new Python process instead of forking it from
    /// the kernel template [default: off: fork where the server can].
    #[arg(long, env = "MCP_NO_FORK")]
    no_fork: bool,
    /// Most images returned inline (MCP image content) per execute_code call:
    /// displayed figures first, then PNG/JPEG/GIF files the call wrote. 0 turns
    /// inline images off (files are still listed).
    #[arg(long, default_value_t = 4, env = "MCP_INLINE_IMAGES")]
    inline_images: usize,
    /// Longest side of an inline image in pixels; larger images are sent
    /// scaled down (the file keeps its size).
    #[arg(long, default_value_t = 1568, env = "MCP_INLINE_IMAGE_MAX_SIDE")]
    inline_image_max_side: u32,
    /// Most pixels (width x height) of an inline image; larger images are
    /// sent scaled down.
    #[arg(long, default_value_t = 1_150_000, env = "MCP_INLINE_IMAGE_MAX_PIXELS")]
    inline_image_max_pixels: u64,
    /// Most bytes of one inline image (before base64): bytes, or a size with a
    /// unit (500K, 1M); larger ones are scaled down or sent as JPEG.
    #[arg(long, default_value = "1000000", env = "MCP_INLINE_IMAGE_MAX_BYTES", value_parser = parse_bytes)]
    inline_image_max_bytes: u64,
    /// A host folder every kernel may read: HOST_DIR[:NAME][:rw]. Kernels find it
    /// at /mnt/NAME (NAME defaults to the folder's name), or at its own path where
    /// the server cannot make mount namespaces (e.g. when not run as root);
    /// read-only unless `:rw`. Repeatable; MCP_MOUNTS takes a comma-separated list
    /// [default: none].
    #[arg(long = "mount", env = "MCP_MOUNTS", value_delimiter = ',', value_parser = MountRequest::parse)]
    mounts: Vec<MountRequest>,
    /// Log level (error, warn, info, debug, trace), or a tracing filter.
    #[arg(long, env = "LOG_LEVEL", default_value = "info")]
    log_level: String,
}

/// Variables of ours a kernel gets: what programs in a cell need to behave
/// as on this machine (locale, time zone, proxies, certificates, the package
/// index, pip's settings). Nothing else: our own settings hold tokens
/// (`MCP_AUTH_TOKEN`).
fn kernel_may_inherit(name: &str) -> bool {
    const NAMES: &[&str] = &[
        "LANG",
        "LANGUAGE",
        "TZ",
        "TERM",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "NO_PROXY",
        "SSL_CERT_FILE",
        "SSL_CERT_DIR",
        "REQUESTS_CA_BUNDLE",
        "CURL_CA_BUNDLE",
    ];
    // PIP_*: pip's configuration (index, certificates, find-links), which
    // `!pip install` in a cell needs to work as it does on this machine.
    name.starts_with("LC_")
        || name.starts_with("PIP_")
        || NAMES.iter().any(|n| n.eq_ignore_ascii_case(name))
}

/// `NAME=VALUE` for `--gateway-env`.
fn parse_env_pair(raw: &str) -> Result<(String, String), String> {
    match raw.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected NAME=VALUE, got {raw:?}")),
    }
}

fn main() -> anyhow::Result<()> {
    // Our binary doubles as the kernels' sandbox wrapper (see src/sandbox).
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if argv.get(1).is_some_and(|a| a == sandbox::WRAPPER_ARG) {
        if argv
            .get(2)
            .is_some_and(|a| a == sandbox::users::KILL_UID_ARG)
        {
            let uid = argv
                .get(3)
                .and_then(|u| u.to_str())
                .and_then(|u| u.parse().ok());
            std::process::exit(match uid.map(sandbox::users::kill_all_of) {
                Some(Ok(())) => 0,
                _ => 1,
            });
        }
        if argv.get(2).is_some_and(|a| a == "--probe") {
            let uid = argv
                .get(3)
                .and_then(|u| u.to_str())
                .and_then(|u| u.parse().ok());
            sandbox::probe::probe_main(uid);
            return Ok(());
        }
        let err = sandbox::exec_wrapped(argv[2..].to_vec());
        // Not eprintln!, which panics if stderr is gone.
        let _ = writeln!(
            std::io::stderr(),
            "mcp-python-interpreter kernel sandbox: {err}"
        );
        std::process::exit(126);
    }
    // Logs and notices go through logging (never a panic or a blocked
    // thread when stderr is closed or full); the last ones out on return.
    let _flush_stderr = logging::FlushOnDrop;
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(|| logging::Stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(log_filter(&args.log_level))
                .context("invalid --log-level")?,
        )
        .init();

    let home_data = user_data_dir().join("mcp-python-interpreter");
    let envs_dir = args.envs_dir.clone().unwrap_or_else(|| home_data.clone());
    // Remote kernels bring their own environment.
    let python = match (&args.python, &args.kernel_gateway) {
        (Some(p), _) => Some(environment::existing(p)?),
        (None, Some(_)) if !args.provision_only => None,
        (None, _) => Some(environment::provision(
            &envs_dir,
            args.base_python.as_deref(),
        )?),
    };
    if args.provision_only {
        if let Some(python) = &python {
            logging::line(format_args!(
                "kernel environment: {}",
                python.python.display()
            ));
        }
        return Ok(());
    }
    anyhow::ensure!(
        args.gateway_start_timeout.is_finite() && args.gateway_start_timeout > 0.0,
        "--gateway-start-timeout must be a positive number of seconds"
    );
    anyhow::ensure!(
        args.execution_timeout.is_finite() && args.execution_timeout > 0.0,
        "--execution-timeout must be a positive number of seconds"
    );
    anyhow::ensure!(
        args.replay_timeout.is_finite() && args.replay_timeout > 0.0,
        "--replay-timeout must be a positive number of seconds"
    );
    anyhow::ensure!(
        args.session_timeout > 0 && args.cleanup_interval > 0,
        "timeouts must be positive"
    );

    let mut tokens = match &args.tokens_file {
        Some(f) => {
            let text =
                std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
            Tokens::parse(&text).with_context(|| format!("in {}", f.display()))?
        }
        None => Tokens::default(),
    };
    if let Some(t) = &args.auth_token {
        anyhow::ensure!(
            tokens.is_empty(),
            "give --auth-token or --tokens-file, not both"
        );
        tokens = Tokens::single(t).context("--auth-token")?;
    }
    anyhow::ensure!(args.max_sessions > 0, "--max-sessions must be at least 1");
    anyhow::ensure!(
        args.inline_image_max_side >= 16
            && args.inline_image_max_pixels >= 256
            && args.inline_image_max_bytes >= 1024,
        "inline image limits must allow at least 16 px a side, 256 pixels and 1024 bytes"
    );
    anyhow::ensure!(
        args.max_concurrent_requests > 0,
        "--max-concurrent-requests must be at least 1"
    );

    let kernel_cpus = args.kernel_cpus.unwrap_or_else(|| {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        (cores / 2).max(1) as f64
    });
    anyhow::ensure!(
        kernel_cpus.is_finite() && kernel_cpus >= 0.01,
        "--kernel-cpus must be a positive number of cores"
    );

    let config = Config {
        transport: match args.transport {
            Transport::Stdio => TransportKind::Stdio,
            Transport::Http => TransportKind::Http,
        },
        host: args.host,
        port: args.port,
        data_dir: args.data_dir.unwrap_or_else(|| home_data.join("sessions")),
        python: args.python,
        envs_dir,
        session_timeout: Duration::from_secs(args.session_timeout),
        cleanup_interval: Duration::from_secs(args.cleanup_interval),
        execution_timeout: Duration::from_secs_f64(args.execution_timeout),
        interrupt_grace: Duration::from_secs_f64(args.interrupt_grace),
        max_output_chars: args.max_output_chars,
        max_sessions: args.max_sessions,
        pool_size: args.pool_size,
        ephemeral: args.ephemeral,
        restore: match args.restore {
            RestoreMode::Replay => mcp_python_interpreter::session::Restore::Replay,
            RestoreMode::Files => mcp_python_interpreter::session::Restore::Files,
        },
        replay_timeout: Duration::from_secs_f64(args.replay_timeout),
        preload: if args.no_preload {
            Vec::new()
        } else {
            args.preload
                .into_iter()
                .filter(|m| !m.trim().is_empty())
                .collect()
        },
        fork_kernels: !args.no_fork,
        sandbox: !args.no_sandbox,
        kernel_network: match (args.no_network, args.kernel_network) {
            (true, _) | (_, KernelNetwork::None) => NetworkPolicy::None,
            (_, KernelNetwork::Full) => NetworkPolicy::Full,
            (_, KernelNetwork::Web) => NetworkPolicy::Web {
                ports: web_ports(&args.kernel_allow_ports),
            },
        },
        kernel_cpus,
        kernel_uids: args.kernel_uids,
        kernel_memory_bytes: args.kernel_memory_limit,
        kernel_max_pids: args.kernel_max_pids,
        max_session_bytes: args
            .max_session_bytes
            .unwrap_or(args.max_session_mb.saturating_mul(MIB)),
        tokens,
        allowed_origins: args.allowed_origins,
        allowed_hosts: args.allowed_hosts,
        max_concurrent_requests: args.max_concurrent_requests,
        inherited_path: std::env::var("PATH").unwrap_or_default(),
        kernel_inherited_env: std::env::vars()
            .filter(|(k, _)| kernel_may_inherit(k))
            .collect(),
        kernel_start_timeout: Duration::from_secs(60),
        inline_images: InlineBudget {
            max_images: args.inline_images,
            max_side: args.inline_image_max_side,
            max_pixels: args.inline_image_max_pixels,
            max_bytes: usize::try_from(args.inline_image_max_bytes).unwrap_or(usize::MAX),
        },
        mounts: args.mounts.into_iter().map(expand_home).collect(),
        gateway: args.kernel_gateway.map(|url| GatewaySettings {
            url,
            token: args.gateway_token,
            kernel_name: args.gateway_kernel,
            env: args.gateway_env,
            folder: args.gateway_folder,
            start_timeout: Duration::from_secs_f64(args.gateway_start_timeout),
            file_timeout: Duration::from_secs(30),
        }),
    };

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let result = runtime.block_on(serve::run(config, python));
    // A blocked stdin read cannot be cancelled; don't wait for it.
    runtime.shutdown_timeout(Duration::from_millis(500));
    result.map_err(Into::into)
}

/// `$XDG_DATA_HOME`, else `~/.local/share`, else the temp folder.
fn user_data_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    match std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        Some(h) => PathBuf::from(h).join(".local/share"),
        None => std::env::temp_dir(),
    }
}

/// `~/x` in a `--mount` is `$HOME/x`: desktop clients start servers from a
/// JSON list of arguments, which no shell expands.
fn expand_home(mut m: MountRequest) -> MountRequest {
    if let Ok(rest) = m.host.strip_prefix("~")
        && let Some(home) = std::env::var_os("HOME").filter(|h| !h.is_empty())
    {
        m.host = PathBuf::from(home).join(rest);
    }
    m
}

/// The tracing filter for `--log-level`. zeromq logs every kernel disconnect
/// at info, and rmcp logs three info lines per stateless HTTP request (one
/// with the client's whole `initialize`): below debug, both are kept to real
/// problems. A filter with directives of its own is used as given.
fn log_filter(level: &str) -> String {
    let level = level.to_lowercase();
    match level.as_str() {
        "error" | "warn" | "info" => format!("{level},zeromq=error,rmcp=warn"),
        "debug" | "trace" => format!("{level},zeromq=error"),
        _ => level,
    }
}

/// Ports kernels may connect to under `--kernel-network web`: the web's,
/// the configured proxies' (else a proxy would break `!pip install`), and
/// the ones given.
fn web_ports(extra: &[u16]) -> Vec<u16> {
    let mut ports = vec![80, 443];
    for var in [
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
    ] {
        if let Some(port) = std::env::var(var).ok().as_deref().and_then(proxy_port) {
            ports.push(port);
        }
    }
    ports.extend(extra);
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// The port of a proxy URL such as `http://user:pw@proxy:3128/`.
fn proxy_port(url: &str) -> Option<u16> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next()?;
    let host_port = authority.rsplit('@').next()?;
    let (host, port) = host_port.rsplit_once(':')?;
    if host.ends_with(']') || !host.contains(':') {
        port.parse().ok()
    } else {
        None
    }
}

const MIB: u64 = 1024 * 1024;

/// A size: a number with an optional binary unit (K, M, G, T; `KB`, `KiB`
/// and lower case work too). A plain number is `plain_unit` bytes each.
fn parse_size(text: &str, plain_unit: u64) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("'{text}' is not a size (e.g. 1073741824, 512M, 2G)"))?;
    let unit = unit.trim().to_ascii_lowercase();
    let factor = match unit.trim_end_matches("ib").trim_end_matches('b') {
        "" if unit.is_empty() => plain_unit,
        "" => 1,
        "k" => 1024,
        "m" => MIB,
        "g" => 1024 * MIB,
        "t" => 1024 * 1024 * MIB,
        _ => return Err(format!("'{text}': unknown unit (use K, M, G or T)")),
    };
    n.checked_mul(factor)
        .filter(|&b| b > 0)
        .ok_or_else(|| format!("'{text}' is out of range"))
}

fn parse_bytes(text: &str) -> Result<u64, String> {
    parse_size(text, 1)
}

/// MiB when plain, unless the number is too large to be MiB of memory.
fn parse_memory_limit(text: &str) -> Result<u64, String> {
    match text.trim().parse::<u64>() {
        Ok(n) if n > MIB => Ok(n),
        _ => parse_size(text, MIB),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_ports() {
        assert_eq!(proxy_port("http://proxy.corp:3128/"), Some(3128));
        assert_eq!(proxy_port("http://u:p@10.0.0.1:8080"), Some(8080));
        assert_eq!(proxy_port("socks5://[::1]:1080"), Some(1080));
        assert_eq!(proxy_port("http://proxy.corp/"), None);
        assert_eq!(proxy_port("proxy:3129"), Some(3129));
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("1000"), Ok(1000));
        assert_eq!(parse_bytes("2K"), Ok(2048));
        assert_eq!(parse_bytes("500M"), Ok(500 * MIB));
        assert_eq!(parse_bytes("1GiB"), Ok(1024 * MIB));
        assert_eq!(parse_bytes("1gb"), Ok(1024 * MIB));
        assert_eq!(parse_bytes("7B"), Ok(7));
        assert!(parse_bytes("0").is_err());
        assert!(parse_bytes("-1").is_err());
        assert!(parse_bytes("1X").is_err());
        assert!(parse_bytes("").is_err());
        assert_eq!(parse_memory_limit("2048"), Ok(2048 * MIB));
        assert_eq!(parse_memory_limit("512M"), Ok(512 * MIB));
        assert_eq!(parse_memory_limit("536870912"), Ok(512 * MIB));
    }
}
