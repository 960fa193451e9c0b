//! Running the server: builds the parts from a [`Config`], serves one
//! transport, and shuts everything down in order.
//!
//! Shutdown is a tree: one root [`CancellationToken`] (fired by SIGINT,
//! SIGTERM, or the stdio client going away) reaches the transport, the expiry
//! task and every kernel task; a [`TaskTracker`] is then waited for, with a
//! bound, so no kernel outlives the server. Every step is bounded (open
//! requests [`DRAIN_WAIT`], sessions and kernels [`SHUTDOWN_WAIT`]) and none
//! needs stderr or stdout to work; a second signal, or [`FORCE_EXIT_AFTER`]
//! without the shutdown done, ends the process at once.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::Signal;
use rmcp::ServiceExt;
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, TransportKind};
use crate::environment::KernelPython;
use crate::kernel::local::LocalKernelConfig;
use crate::kernel::{GatewayKernelFactory, KernelFactory, LocalKernelFactory};
use crate::mcp::Interpreter;
use crate::sandbox::plan::{PlanError, PlanInput, SandboxSettings};
use crate::sandbox::{self, cgroup::CgroupRoot};
use crate::session::pool::{self, PoolSettings};
use crate::session::{Registry, SessionSettings, expiry};

/// Largest HTTP request body accepted (code and arguments).
const MAX_REQUEST_BYTES: usize = 16 * 1024 * 1024;
/// After shutdown starts, how long open requests (or the stdio service) get
/// to finish; their kernels are being stopped meanwhile, so a call ends
/// quickly. A request that still has not ended (a client that never sends
/// its body) is abandoned.
pub const DRAIN_WAIT: Duration = Duration::from_secs(5);
/// How long closing the sessions (kernels asked to stop, then killed;
/// folders removed) and waiting for the kernel tasks may take.
pub const SHUTDOWN_WAIT: Duration = Duration::from_secs(10);
/// After a signal, the process exits by this time whatever the ordered
/// shutdown is doing (it needs at most DRAIN_WAIT + SHUTDOWN_WAIT).
pub const FORCE_EXIT_AFTER: Duration = Duration::from_secs(20);
/// A ping on every open reply stream this often, well inside common client
/// and proxy read timeouts (30 s and up).
const SSE_KEEP_ALIVE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot create {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("transport failed: {0}")]
    Transport(String),
    #[error(
        "refusing to listen on {0} without authentication: anyone who can reach that address \
         could run code on this machine. Pass --auth-token TOKEN (or --tokens-file FILE), or \
         bind a loopback address such as 127.0.0.1"
    )]
    Unauthenticated(String),
    #[error(transparent)]
    Sandbox(#[from] PlanError),
    #[error(transparent)]
    Mount(#[from] crate::sandbox::host_folders::MountError),
    #[error("kernel gateway: {0}")]
    Gateway(String),
    #[error(
        "refusing --allowed-host '*' without authentication: any web page could then reach \
         this server through DNS rebinding. Pass --auth-token TOKEN (or --tokens-file FILE), \
         or name the hosts"
    )]
    AnyHostUnauthenticated,
}

/// Runs the server until a signal (or, over stdio, the end of input).
pub async fn run(config: Config, python: Option<KernelPython>) -> Result<(), ServeError> {
    // Refused before anything starts (no kernel, no folder).
    if matches!(config.transport, TransportKind::Http)
        && config.tokens.is_empty()
        && !is_loopback(&config.host)
    {
        return Err(ServeError::Unauthenticated(config.host.clone()));
    }
    if config.allowed_hosts.iter().any(|h| h == "*") && config.tokens.is_empty() {
        return Err(ServeError::AnyHostUnauthenticated);
    }
    create_private_dir(&config.data_dir)?;
    let swept = sweep_runtime_dirs(&std::env::temp_dir());
    if swept > 0 {
        tracing::info!("removed {swept} runtime folder(s) left by servers that were killed");
    }
    let runtime_dir = std::env::temp_dir().join(format!(
        "{RUNTIME_PREFIX}{}-{}",
        std::process::id(),
        crate::random_token(10)
    ));
    create_private_dir(&runtime_dir)?;

    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    let (factory, cgroups, host_folders) =
        match kernel_factory(&config, python, &runtime_dir, &shutdown, &tracker).await {
            Ok(parts) => parts,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&runtime_dir);
                return Err(e);
            }
        };
    let registry = Arc::new(Registry::new(
        factory,
        SessionSettings {
            data_dir: config.data_dir.clone(),
            idle_timeout: config.session_timeout,
            execution_timeout: config.execution_timeout,
            interrupt_grace: config.interrupt_grace,
            max_output_chars: config.max_output_chars,
            max_sessions: config.max_sessions,
            max_session_bytes: config.max_session_bytes,
            durable: !config.ephemeral,
            restore: config.restore,
            replay_timeout: config.replay_timeout,
            inline_images: config.inline_images.clone(),
            host_folders,
        },
    ));
    let adopted = registry.adopt().await;
    if adopted > 0 {
        tracing::info!("{adopted} session(s) kept from before the restart (dormant until used)");
    }
    tracker.spawn(expiry::run(
        registry.clone(),
        config.cleanup_interval,
        shutdown.child_token(),
    ));
    tracker.spawn(pool::run(
        registry.clone(),
        PoolSettings {
            size: config.pool_size,
            preload: config.preload.clone(),
        },
        shutdown.child_token(),
    ));
    // Not on the tracker: it must outlive the wait for it, to force the exit
    // if that wait does not end. Aborted once the shutdown is done.
    let signals = tokio::spawn(watch_signals(shutdown.clone()));

    let served = match config.transport {
        TransportKind::Stdio => serve_stdio(registry.clone(), shutdown.clone()).await,
        TransportKind::Http => {
            watch_launcher(shutdown.clone());
            serve_http(&config, registry.clone(), shutdown.clone()).await
        }
    };

    shutdown.cancel();
    tracing::info!("shutting down: closing {} session(s)", registry.len());
    tracker.close();
    let closed = tokio::time::timeout(SHUTDOWN_WAIT, async {
        registry.shutdown().await;
        tracker.wait().await;
    })
    .await;
    if closed.is_err() {
        tracing::warn!("sessions and kernel tasks not all closed within {SHUTDOWN_WAIT:?}");
    }
    let _ = std::fs::remove_dir_all(&runtime_dir);
    if let Some(cg) = &cgroups {
        cg.remove();
    }
    signals.abort();
    served
}

/// The kernel factory, the kernels' cgroups (local only), and the host
/// folders they share (local only).
type KernelBackend = (
    Arc<dyn KernelFactory>,
    Option<CgroupRoot>,
    Vec<sandbox::HostMount>,
);

/// The kernel backend: a Jupyter gateway's, or local kernels with this
/// host's confinement (and their cgroups, and the host folders they share).
async fn kernel_factory(
    config: &Config,
    python: Option<KernelPython>,
    runtime_dir: &Path,
    shutdown: &CancellationToken,
    tracker: &TaskTracker,
) -> Result<KernelBackend, ServeError> {
    Ok(match (&config.gateway, python) {
        (Some(gateway), _) => {
            if !config.mounts.is_empty() {
                return Err(ServeError::Gateway(
                    "--mount shares this machine's folders with local kernels; remote kernels \
                     see the volumes their deployment mounts"
                        .into(),
                ));
            }
            tracing::info!(
                "sandbox: kernels run on the gateway, so this server's confinement (Landlock, \
                 uids, cgroups, namespaces) does not apply to them: isolation comes from the \
                 deployment (a pod per kernel, its user, NetworkPolicy, resource limits; see \
                 SECURITY.md). Still enforced here: client authentication, session ids and \
                 paths, output and time bounds."
            );
            let factory = GatewayKernelFactory::connect(
                gateway.clone(),
                shutdown.child_token(),
                tracker.clone(),
            )
            .await
            .map_err(ServeError::Gateway)?;
            (
                Arc::new(factory) as Arc<dyn KernelFactory>,
                None,
                Vec::new(),
            )
        }
        (None, None) => {
            return Err(ServeError::Gateway(
                "no kernel environment and no gateway".into(),
            ));
        }
        (None, Some(python)) => {
            let cgroups = if config.sandbox {
                let prefix = "mcp-python-interpreter-";
                let stale = CgroupRoot::sweep_stale(prefix);
                if stale > 0 {
                    tracing::info!("removed {stale} cgroup(s) left by servers that were killed");
                }
                CgroupRoot::detect(&format!("{prefix}{}", std::process::id()))
            } else {
                None
            };
            let (sandbox, host_folders) =
                match sandbox_settings(config, &python, &cgroups, runtime_dir) {
                    Ok(s) => s,
                    Err(e) => {
                        if let Some(cg) = &cgroups {
                            cg.remove();
                        }
                        return Err(e);
                    }
                };
            let factory = LocalKernelFactory::new(
                LocalKernelConfig {
                    python: python.python.clone(),
                    runtime_dir: runtime_dir.to_path_buf(),
                    env: kernel_env(&python, config),
                    start_timeout: config.kernel_start_timeout,
                    mpl_cache: python.mpl_config.clone(),
                    sandbox,
                    fork_modules: config.fork_kernels.then(|| config.preload.clone()),
                },
                shutdown.child_token(),
                tracker.clone(),
            );
            (
                Arc::new(factory) as Arc<dyn KernelFactory>,
                cgroups,
                host_folders,
            )
        }
    })
}

async fn serve_stdio(
    registry: Arc<Registry>,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    use rmcp::service::ServerInitializeError as Init;
    let service = match Interpreter::new(registry)
        .serve_with_ct(rmcp::transport::stdio_pipes(), shutdown.child_token())
        .await
    {
        Ok(service) => service,
        // The client went away (or a signal came) before the handshake
        // finished: nothing to serve, an ordinary end.
        Err(e @ (Init::ConnectionClosed(_) | Init::TransportError { .. } | Init::Cancelled)) => {
            tracing::info!("stdio client gone before initializing: {e}");
            return Ok(());
        }
        Err(e) => return Err(ServeError::Transport(e.to_string())),
    };
    tracing::info!("serving MCP over stdio");
    // Ends at stdin's end, at a failed write to stdout, or on shutdown.
    drained(service.waiting(), &shutdown).await;
    Ok(())
}

/// Runs a transport until it ends by itself, or until [`DRAIN_WAIT`] after
/// shutdown started if it is still waiting for clients then.
async fn drained<F: std::future::IntoFuture>(
    transport: F,
    shutdown: &CancellationToken,
) -> Option<F::Output> {
    let transport = transport.into_future();
    tokio::pin!(transport);
    tokio::select! {
        out = &mut transport => return Some(out),
        _ = shutdown.cancelled() => {}
    }
    match tokio::time::timeout(DRAIN_WAIT, transport).await {
        Ok(out) => Some(out),
        Err(_) => {
            tracing::warn!("open requests did not finish within {DRAIN_WAIT:?}; abandoning them");
            None
        }
    }
}

async fn serve_http(
    config: &Config,
    registry: Arc<Registry>,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let addr = if config.host.contains(':') && !config.host.starts_with('[') {
        format!("[{}]:{}", config.host, config.port)
    } else {
        format!("{}:{}", config.host, config.port)
    };
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .map_err(|source| ServeError::Bind {
            addr: addr.clone(),
            source,
        })?;
    let local: SocketAddr = listener.local_addr().map_err(|source| ServeError::Bind {
        addr: addr.clone(),
        source,
    })?;

    let mut hosts = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    let host = config
        .host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    if !hosts.contains(&host) {
        hosts.push(host);
    }
    hosts.extend(config.allowed_hosts.iter().cloned());
    let any_host = config.allowed_hosts.iter().any(|h| h == "*");
    let http_config = StreamableHttpServerConfig::default().with_allowed_hosts(hosts);
    // `*`: any Host (the bearer token is what protects the endpoint then).
    let http_config = if any_host {
        http_config.disable_allowed_hosts()
    } else {
        http_config
    };
    let http_config = http_config
        .with_max_request_body_bytes(MAX_REQUEST_BYTES)
        .with_allowed_origins(allowed_origins(&config.allowed_origins))
        // Stateless: a request needs no MCP session (ours are interpreter
        // sessions, named in the arguments), and skipping the session layer
        // costs clients noticeably less per call. A reply is plain JSON
        // unless the call sends something first: progress, or the notice of
        // a long call (mcp::with_long_call_notice), which turns it into an
        // SSE stream with keep-alive pings. A client that disconnects
        // cancels its call.
        .with_legacy_session_mode(false)
        .with_json_response(true)
        .with_sse_keep_alive(Some(SSE_KEEP_ALIVE))
        .with_cancellation_token(shutdown.child_token());
    let service: StreamableHttpService<Interpreter, LocalSessionManager> =
        StreamableHttpService::new(
            move || Ok(Interpreter::new(registry.clone())),
            Arc::new(LocalSessionManager::default()),
            http_config,
        );
    let limit = Arc::new(tokio::sync::Semaphore::new(config.max_concurrent_requests));
    let router = axum::Router::new()
        .nest_service("/mcp", service)
        .layer(axum::middleware::from_fn_with_state(
            Arc::new(config.tokens.clone()),
            crate::auth::require_bearer,
        ))
        .layer(axum::middleware::from_fn_with_state(
            limit,
            limit_concurrency,
        ));
    // Tests and scripts read this line to find the port when started with --port 0.
    crate::logging::line(format_args!(
        "mcp-python-interpreter: listening on http://{local}/mcp"
    ));
    tracing::info!("serving MCP over streamable HTTP at http://{local}/mcp");
    // Headers and body go out as separate writes: without TCP_NODELAY a
    // client that delays its ACKs would wait ~40 ms per call (Nagle).
    use axum::serve::ListenerExt;
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let server =
        axum::serve(listener, router).with_graceful_shutdown(shutdown.clone().cancelled_owned());
    match drained(server, &shutdown).await {
        Some(served) => served.map_err(|e| ServeError::Transport(e.to_string())),
        None => Ok(()),
    }
}

/// Refuses requests beyond the concurrency limit at once (503), instead of
/// queueing them without bound.
async fn limit_concurrency(
    axum::extract::State(limit): axum::extract::State<Arc<tokio::sync::Semaphore>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    match limit.try_acquire_owned() {
        Ok(_permit) => next.run(req).await,
        Err(_) => (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "too many concurrent requests; retry shortly\n",
        )
            .into_response(),
    }
}

/// Loopback origins are always allowed; browsers elsewhere only when listed.
fn allowed_origins(extra: &[String]) -> Vec<String> {
    let mut origins: Vec<String> = ["http://localhost:*", "http://127.0.0.1:*", "http://[::1]:*"]
        .into_iter()
        .map(String::from)
        .collect();
    origins.extend(extra.iter().cloned());
    origins
}

fn is_loopback(host: &str) -> bool {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    h == "localhost"
        || h.parse::<std::net::IpAddr>()
            .map(|ip| ip.is_loopback())
            .unwrap_or(false)
}

/// The first SIGINT or SIGTERM starts the shutdown; a second one, or
/// [`FORCE_EXIT_AFTER`] without the shutdown done, ends the process at once
/// with status 128 + that signal's number, as if killed by it. Kernels
/// notice within a second that their parent is gone and exit too.
/// An HTTP server whose stdin is a pipe or a socket was started by a
/// program (a client, an inspector, a supervisor) holding the other end.
/// When that program goes away, the end of stdin is the only sign of it:
/// shut down then, instead of serving on, orphaned, forever. stdin that is
/// a terminal, `/dev/null` or a file (a shell, systemd, `nohup`) is left
/// alone. A launcher that speaks MCP over stdin to an HTTP server (the
/// default transport) is told, in the log, what to change.
///
/// A blocking read on a thread of its own, as stdin cannot be read on the
/// reactor portably; it is not waited for at exit (it ends with the process).
fn watch_launcher(shutdown: CancellationToken) {
    use nix::sys::stat::{SFlag, fstat};
    let Ok(st) = fstat(std::io::stdin()) else {
        return;
    };
    let kind = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
    if kind != SFlag::S_IFIFO && kind != SFlag::S_IFSOCK {
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("launcher-watch".into())
        .spawn(move || {
            use std::io::Read;
            let mut stdin = std::io::stdin();
            let mut buf = [0u8; 4096];
            let mut told = false;
            loop {
                match stdin.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        if !told && buf[..n].iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{') {
                            told = true;
                            tracing::error!(
                                "received what looks like MCP on stdin, but this server speaks streamable \
                                 HTTP (the default transport); a client that talks over stdin must start \
                                 it with --transport stdio"
                            );
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
            if !shutdown.is_cancelled() {
                tracing::info!("stdin closed: the program that started this server is gone; shutting down");
                shutdown.cancel();
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("cannot watch stdin for the launcher going away: {e}");
    }
}

async fn watch_signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        tracing::warn!("cannot install signal handlers");
        return;
    };
    let first = tokio::select! {
        _ = int.recv() => Signal::SIGINT,
        _ = term.recv() => Signal::SIGTERM,
    };
    // Cancel before anything else: nothing may stand between a signal and
    // the shutdown.
    shutdown.cancel();
    tracing::info!("{first} received: shutting down (again to exit at once)");
    let (forced_by, why) = tokio::select! {
        _ = int.recv() => (Signal::SIGINT, "second signal"),
        _ = term.recv() => (Signal::SIGTERM, "second signal"),
        _ = tokio::time::sleep(FORCE_EXIT_AFTER) => (first, "shutdown took too long"),
    };
    tracing::warn!("{why}: exiting now, without waiting for kernels or removing folders");
    crate::logging::flush(Duration::from_millis(100));
    std::process::exit(128 + forced_by as i32);
}

/// How kernels are confined here (see [`sandbox::plan`]), and the host
/// folders they see.
fn sandbox_settings(
    config: &Config,
    python: &KernelPython,
    cgroups: &Option<CgroupRoot>,
    runtime_dir: &Path,
) -> Result<(Option<SandboxSettings>, Vec<sandbox::HostMount>), ServeError> {
    if !config.sandbox {
        tracing::warn!(
            "kernel sandbox disabled (--no-sandbox): kernels run with the server's full rights"
        );
        let folders = unconfined_host_folders(config, python, runtime_dir)?;
        return Ok((None, folders));
    }
    let python_dirs = python_dirs(python);
    let settings = sandbox::plan::plan(PlanInput {
        network: config.kernel_network.clone(),
        memory_bytes: config.kernel_memory_bytes,
        max_pids: config.kernel_max_pids,
        cpus: config.kernel_cpus,
        file_size_bytes: config.max_session_bytes,
        uids: config.kernel_uids,
        python_dirs,
        data_dir: &config.data_dir,
        runtime_dir,
        cgroups: cgroups.clone(),
        mounts: &config.mounts,
    })?;
    let folders = match &settings {
        Some(s) => s.host_mounts.clone(),
        None => unconfined_host_folders(config, python, runtime_dir)?,
    };
    Ok((settings, folders))
}

/// The Python installation: its prefixes and the environment's folder.
fn python_dirs(python: &KernelPython) -> Vec<PathBuf> {
    let mut dirs = python.prefixes.clone();
    if let Some(bin) = &python.bin_dir
        && let Some(env) = bin.parent()
    {
        dirs.push(env.to_path_buf());
    }
    dirs
}

/// Shared host folders for kernels that are not confined (`--no-sandbox`):
/// they are where they are on the host, and nothing is enforced.
fn unconfined_host_folders(
    config: &Config,
    python: &KernelPython,
    runtime_dir: &Path,
) -> Result<Vec<sandbox::HostMount>, ServeError> {
    let mounts = sandbox::host_folders::resolve(
        &config.mounts,
        sandbox::host_folders::Kernels::Unconfined,
        &sandbox::host_folders::Protected {
            data_dir: &config.data_dir,
            runtime_dir,
            python_dirs: &python_dirs(python),
        },
    )?;
    for m in &mounts {
        tracing::warn!(
            "host folder: {} is at its own path for unconfined kernels, which may also write it",
            m.host.display()
        );
    }
    Ok(mounts)
}

/// Environment of every kernel.
/// A kernel's whole environment: what `main` let through from ours (locale,
/// time zone, proxies, CA bundles, package index; never tokens or our own
/// settings), PATH with the environment's `bin` first, and our settings.
fn kernel_env(python: &KernelPython, config: &Config) -> HashMap<String, String> {
    let inherited_path = &config.inherited_path;
    let mut env: HashMap<String, String> = config.kernel_inherited_env.iter().cloned().collect();
    env.insert("PATH".into(), inherited_path.clone());
    // Kernels' uids have no account; some libraries ask who the user is.
    env.insert("USER".into(), "kernel".into());
    env.insert("LOGNAME".into(), "kernel".into());
    if let Some(bin) = &python.bin_dir {
        env.insert("PATH".into(), format!("{}:{inherited_path}", bin.display()));
        if let Some(venv) = bin.parent() {
            env.insert("VIRTUAL_ENV".into(), venv.display().to_string());
        }
    }
    // plotly's fig.show() emits a PNG (via kaleido), which is saved as a file.
    env.insert("PLOTLY_RENDERER".into(), "png".into());
    env.insert("JUPYTER_PLATFORM_DIRS".into(), "1".into());
    env.insert("PYTHONUNBUFFERED".into(), "1".into());
    env.insert("PYDEVD_DISABLE_FILE_VALIDATION".into(), "1".into());
    env
}

/// Runtime folders are `{RUNTIME_PREFIX}{pid}-{random}` in the temp folder.
const RUNTIME_PREFIX: &str = "mcp-python-interpreter-";

/// Removes runtime folders of servers that are gone (killed by SIGKILL, so
/// they could not): those whose pid runs no process. A live server's folder
/// is never touched; a reused pid only delays the sweep to a later start.
fn sweep_runtime_dirs(tmp: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(tmp) else {
        return 0;
    };
    let mut removed = 0;
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(RUNTIME_PREFIX))
            .and_then(|rest| rest.split_once('-'))
            .and_then(|(pid, _)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let is_dir = e.file_type().is_ok_and(|t| t.is_dir());
        if is_dir && std::fs::remove_dir_all(e.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// Creates one of the server's folders. Owner-only, except that a root
/// server's kernels (other uids) may pass through it (0711: no listing) to
/// their own sub-folder, which is theirs alone.
fn create_private_dir(path: &Path) -> Result<(), ServeError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let mode = if nix::unistd::Uid::effective().is_root() {
        0o711
    } else {
        0o700
    };
    let fail = |source| ServeError::Dir {
        path: path.to_path_buf(),
        source,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(path)
        .map_err(fail)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(fail)
}
