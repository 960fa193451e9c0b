//! Running the server: builds the parts from a [`Config`], serves one
//! transport, and shuts everything down in order.
//!
//! Shutdown is a tree: one root [`CancellationToken`] (fired by SIGINT,
//! SIGTERM, or the end of the stdio stream) reaches the transport, the expiry
//! task and every kernel task; a [`TaskTracker`] is then waited for, with a
//! bound, so no kernel outlives the server.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rmcp::ServiceExt;
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, TransportKind};
use crate::environment::KernelPython;
use crate::kernel::LocalKernelFactory;
use crate::kernel::local::LocalKernelConfig;
use crate::mcp::Interpreter;
use crate::sandbox::plan::{PlanError, PlanInput, SandboxSettings};
use crate::sandbox::{self, cgroup::CgroupRoot};
use crate::session::pool::{self, PoolSettings};
use crate::session::{Registry, SessionSettings, expiry};

/// Largest HTTP request body accepted (code and arguments).
const MAX_REQUEST_BYTES: usize = 16 * 1024 * 1024;
/// How long shutdown waits for kernels before giving up on them.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(10);
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
}

/// Runs the server until a signal (or, over stdio, the end of input).
pub async fn run(config: Config, python: KernelPython) -> Result<(), ServeError> {
    // Refused before anything starts (no kernel, no folder).
    if matches!(config.transport, TransportKind::Http)
        && config.tokens.is_empty()
        && !is_loopback(&config.host)
    {
        return Err(ServeError::Unauthenticated(config.host.clone()));
    }
    create_private_dir(&config.data_dir)?;
    let runtime_dir = std::env::temp_dir().join(format!(
        "mcp-python-interpreter-{}",
        crate::random_token(10)
    ));
    create_private_dir(&runtime_dir)?;

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
    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    let (sandbox, host_folders) = match sandbox_settings(&config, &python, &cgroups, &runtime_dir) {
        Ok(s) => s,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&runtime_dir);
            if let Some(cg) = &cgroups {
                cg.remove();
            }
            return Err(e);
        }
    };
    let factory = LocalKernelFactory::new(
        LocalKernelConfig {
            python: python.python.clone(),
            runtime_dir: runtime_dir.clone(),
            env: kernel_env(&python, &config.inherited_path),
            start_timeout: config.kernel_start_timeout,
            mpl_cache: python.mpl_config.clone(),
            sandbox,
        },
        shutdown.child_token(),
        tracker.clone(),
    );
    let registry = Arc::new(Registry::new(
        Arc::new(factory),
        SessionSettings {
            data_dir: config.data_dir.clone(),
            idle_timeout: config.session_timeout,
            execution_timeout: config.execution_timeout,
            interrupt_grace: config.interrupt_grace,
            max_output_chars: config.max_output_chars,
            max_sessions: config.max_sessions,
            max_session_bytes: config.max_session_bytes,
            host_folders,
        },
    ));
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
    tracker.spawn(watch_signals(shutdown.clone()));

    let served = match config.transport {
        TransportKind::Stdio => serve_stdio(registry.clone(), shutdown.clone()).await,
        TransportKind::Http => serve_http(&config, registry.clone(), shutdown.clone()).await,
    };

    tracing::info!("shutting down: closing {} session(s)", registry.len());
    shutdown.cancel();
    registry.shutdown().await;
    tracker.close();
    if tokio::time::timeout(SHUTDOWN_WAIT, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("some kernel tasks did not finish within {SHUTDOWN_WAIT:?}");
    }
    let _ = std::fs::remove_dir_all(&runtime_dir);
    if let Some(cg) = &cgroups {
        cg.remove();
    }
    served
}

async fn serve_stdio(
    registry: Arc<Registry>,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let service = Interpreter::new(registry)
        .serve_with_ct(rmcp::transport::stdio_pipes(), shutdown.child_token())
        .await
        .map_err(|e| ServeError::Transport(e.to_string()))?;
    tracing::info!("serving MCP over stdio");
    let _ = service.waiting().await;
    Ok(())
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
    let http_config = StreamableHttpServerConfig::default()
        .with_allowed_hosts(hosts)
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
    eprintln!("mcp-python-interpreter: listening on http://{local}/mcp");
    tracing::info!("serving MCP over streamable HTTP at http://{local}/mcp");
    // Headers and body go out as separate writes: without TCP_NODELAY a
    // client that delays its ACKs would wait ~40 ms per call (Nagle).
    use axum::serve::ListenerExt;
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, router)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
        .map_err(|e| ServeError::Transport(e.to_string()))
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

async fn watch_signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        tracing::warn!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = int.recv() => tracing::info!("SIGINT received"),
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = shutdown.cancelled() => return,
    }
    shutdown.cancel();
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
fn kernel_env(python: &KernelPython, inherited_path: &str) -> HashMap<String, String> {
    let mut env = HashMap::new();
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
