//! Test harness: start the real server binary and connect rmcp's client to it,
//! over stdio or streamable HTTP (port 0, read back from stderr).
#![allow(dead_code)]

pub mod gateway;

use std::process::Stdio;
use std::time::Duration;

use rmcp::model::{
    CallToolRequestParams, CallToolResult, ReadResourceRequestParams, ResourceContents,
};
use rmcp::service::RunningService;
use rmcp::transport::{StreamableHttpClientTransport, TokioChildProcess};
use rmcp::{RoleClient, ServiceExt};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

pub const BIN: &str = env!("CARGO_BIN_EXE_mcp-python-interpreter");

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Stdio,
    Http,
}

pub type Client = RunningService<RoleClient, ()>;

/// A running server and a connected client. The data dir is a fresh temp dir.
pub struct Server {
    pub client: Client,
    pub data_dir: tempfile::TempDir,
    /// The HTTP server process (stdio servers are owned by the client transport).
    pub http: Option<Child>,
    pub pid: u32,
    /// The HTTP endpoint, for HTTP servers.
    pub url: Option<String>,
    /// The Jupyter server our server runs its kernels on
    /// (`MCP_TEST_GATEWAY`), started for this server.
    pub gateway: Option<gateway::Gateway>,
}

/// True when the tests run against a Jupyter gateway (`MCP_TEST_GATEWAY`):
/// tests of what only local kernels have (processes, sandbox) skip then.
pub fn on_gateway() -> bool {
    gateway::Kind::from_env().is_some()
}

/// Skips the rest of a test that needs local kernels when the suite runs
/// against a gateway.
#[macro_export]
macro_rules! local_kernels_only {
    () => {
        if common::on_gateway() {
            eprintln!("skipped: needs local kernels (MCP_TEST_GATEWAY is set)");
            return;
        }
    };
}

pub async fn start(transport: Transport, extra: &[&str]) -> Server {
    start_with_token(transport, extra, None).await
}

/// Like [`start`], but the server runs under bubblewrap with a read-only
/// root, a private /tmp and only its data folder writable, so a defence
/// that fails under attack cannot harm anything outside that folder.
/// Without bwrap the server runs unboxed, unless `MCP_TEST_REQUIRE_BWRAP`
/// is set (as `scripts/test` does), which makes that a failure.
pub async fn start_boxed(transport: Transport, extra: &[&str], token: Option<&str>) -> Server {
    start_inner(transport, extra, token, Boxing::Boxed, &[]).await
}

/// Like [`start_boxed`] (or [`start_boxed_without_namespaces`] when
/// `namespaces` is false), with the folders `writable` writable in the box
/// too, so a test sees what a defence, not the box, refuses there.
pub async fn start_boxed_with_writable(
    transport: Transport,
    extra: &[&str],
    namespaces: bool,
    writable: &[&std::path::Path],
) -> Server {
    let boxing = if namespaces {
        Boxing::Boxed
    } else {
        Boxing::NoNamespaces
    };
    start_inner(transport, extra, None, boxing, writable).await
}

/// Like [`start_boxed`], but the server (root) lacks CAP_SYS_ADMIN, as in a
/// default container: no mount or PID namespaces for its kernels. /tmp is
/// world-writable as on a real host, and folders on the way to the kernel
/// environment that others may not search (such as /root) are replaced by
/// searchable ones holding just that environment, as a container image
/// would have it.
pub async fn start_boxed_without_namespaces(
    transport: Transport,
    extra: &[&str],
    token: Option<&str>,
) -> Server {
    start_inner(transport, extra, token, Boxing::NoNamespaces, &[]).await
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Boxing {
    None,
    Boxed,
    NoNamespaces,
    /// Boxed, and the server runs as `nobody` (65534), as a desktop user's
    /// server does: no root, so no kernel uids or masks.
    Rootless,
}

/// The uid a rootless boxed server runs as.
pub const ROOTLESS_UID: u32 = 65534;

/// Like [`start_boxed`], but the server runs as an ordinary user (`nobody`),
/// with the kernel environment and the checkout made reachable for it.
pub async fn start_boxed_rootless(transport: Transport, extra: &[&str]) -> Server {
    start_inner(transport, extra, None, Boxing::Rootless, &[]).await
}

/// The provisioned kernel interpreter (as `--provision-only` reports it).
pub fn kernel_python() -> String {
    let out = std::process::Command::new(BIN)
        .arg("--provision-only")
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .find_map(|l| l.strip_prefix("kernel environment: "))
        .expect("provisioned python path")
        .to_string()
}

/// bwrap arguments that make `paths` reachable for any user: each folder on
/// the way that others may not search becomes a fresh tmpfs with searchable
/// folders down to `paths`, which are bound back read-only.
fn reachable(paths: &[std::path::PathBuf]) -> Vec<String> {
    use std::os::unix::fs::PermissionsExt;
    let mut args = Vec::new();
    let mut masked: Vec<std::path::PathBuf> = Vec::new();
    for p in paths {
        let mut ancestors: Vec<&std::path::Path> = p.ancestors().collect();
        ancestors.reverse();
        let Some(blocker) = ancestors
            .iter()
            .skip(1)
            .find(|a| std::fs::metadata(a).is_ok_and(|m| m.permissions().mode() & 0o001 == 0))
        else {
            continue;
        };
        if !masked.iter().any(|m| m == blocker) {
            masked.push(blocker.to_path_buf());
            args.extend(["--perms".into(), "0755".into(), "--tmpfs".into()]);
            args.push(blocker.display().to_string());
        }
        for a in ancestors
            .iter()
            .filter(|a| a.starts_with(blocker) && *a != blocker && *a != p)
        {
            args.extend(["--perms".into(), "0755".into(), "--dir".into()]);
            args.push(a.display().to_string());
        }
        args.extend([
            "--ro-bind".into(),
            p.display().to_string(),
            p.display().to_string(),
        ]);
    }
    args
}

fn bwrap_available() -> bool {
    let found = std::process::Command::new("bwrap")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !found && std::env::var_os("MCP_TEST_REQUIRE_BWRAP").is_some() {
        panic!("bubblewrap (bwrap) is required for the attack tests: apt-get install bubblewrap");
    }
    found
}

/// The command that runs the server, boxed or not; in a box, `writable`
/// are bound writable after the data folder.
fn server_command(
    data_dir: &std::path::Path,
    boxing: Boxing,
    writable: &[&std::path::Path],
) -> Command {
    if boxing != Boxing::None && bwrap_available() {
        let mut cmd = Command::new("bwrap");
        if boxing == Boxing::NoNamespaces {
            cmd.args(["--cap-drop", "CAP_SYS_ADMIN"]);
        }
        cmd.args(["--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]);
        if matches!(boxing, Boxing::NoNamespaces | Boxing::Rootless) {
            cmd.args(["--perms", "1777"]);
        }
        cmd.args(["--tmpfs", "/tmp"]);
        if matches!(boxing, Boxing::NoNamespaces | Boxing::Rootless) {
            let python = std::path::PathBuf::from(kernel_python());
            let out = std::process::Command::new(&python)
                .args(["-c", "import sys; print(sys.base_prefix)"])
                .output()
                .unwrap();
            let base = String::from_utf8_lossy(&out.stdout).trim().to_string();
            let env = python
                .parent()
                .and_then(|b| b.parent())
                .unwrap()
                .to_path_buf();
            let mut paths = vec![base.into(), env];
            if boxing == Boxing::Rootless {
                paths.push(env!("CARGO_MANIFEST_DIR").into());
            }
            cmd.args(reachable(&paths));
        }
        // The checkout (the binary, files tests write under target/) and the
        // provisioned kernel environment may themselves live under /tmp: bind
        // them back read-only. The data folder comes last, writable.
        let checkout = env!("CARGO_MANIFEST_DIR");
        cmd.args(["--ro-bind", checkout, checkout]);
        if let Some(xdg) = std::env::var_os("XDG_DATA_HOME") {
            cmd.arg("--ro-bind-try").arg(&xdg).arg(&xdg);
        }
        cmd.arg("--bind").arg(data_dir).arg(data_dir);
        for w in writable {
            cmd.arg("--bind").arg(w).arg(w);
        }
        cmd.args(["--die-with-parent", "--"]);
        if boxing == Boxing::Rootless {
            let id = ROOTLESS_UID.to_string();
            std::os::unix::fs::chown(data_dir, Some(ROOTLESS_UID), Some(ROOTLESS_UID)).unwrap();
            cmd.args([
                "setpriv",
                "--reuid",
                &id,
                "--regid",
                &id,
                "--clear-groups",
                "--",
            ]);
        }
        cmd.arg(BIN);
        cmd
    } else {
        Command::new(BIN)
    }
}

/// Connects a client to an HTTP server, with a bearer token if given.
pub async fn connect_http(url: &str, token: Option<&str>) -> Result<Client, String> {
    use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
    let mut config = StreamableHttpClientTransportConfig::with_uri(url.to_string());
    if let Some(t) = token {
        config = config.auth_header(t.to_string());
    }
    ().serve(StreamableHttpClientTransport::from_config(config))
        .await
        .map_err(|e| e.to_string())
}

/// Starts a server; over HTTP the client authenticates with `token`.
/// rmcp's client on a stdio server started by `cmd` (its own flags and
/// environment; stderr shown).
pub async fn connect_stdio(cmd: Command) -> Client {
    let (proc, _) = TokioChildProcess::builder(cmd)
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    ().serve(proc).await.expect("connect over stdio")
}

/// Like [`start`], with kernels on `gateway`.
pub async fn start_on_gateway(
    transport: Transport,
    extra: &[&str],
    gateway: gateway::Gateway,
) -> Server {
    start_on(
        transport,
        extra,
        None,
        Boxing::None,
        &[],
        tempfile::tempdir().unwrap(),
        Some(gateway),
        &[],
    )
    .await
}

pub async fn start_with_token(transport: Transport, extra: &[&str], token: Option<&str>) -> Server {
    start_inner(transport, extra, token, Boxing::None, &[]).await
}

/// A stdio server whose data folder is `data_dir` and whose temporary
/// folder (where its kernels' runtime folders go) is `tmp`.
pub async fn start_in(data_dir: tempfile::TempDir, tmp: &std::path::Path) -> Server {
    let tmp = tmp.display().to_string();
    let env = [("TMPDIR", tmp.as_str())];
    start_on(
        Transport::Stdio,
        &[],
        None,
        Boxing::None,
        &[],
        data_dir,
        None,
        &env,
    )
    .await
}

async fn start_inner(
    transport: Transport,
    extra: &[&str],
    token: Option<&str>,
    boxing: Boxing,
    writable: &[&std::path::Path],
) -> Server {
    start_on(
        transport,
        extra,
        token,
        boxing,
        writable,
        tempfile::tempdir().unwrap(),
        None,
        &[],
    )
    .await
}

// Every way a test starts a server goes through here.
#[allow(clippy::too_many_arguments)]
async fn start_on(
    transport: Transport,
    extra: &[&str],
    token: Option<&str>,
    boxing: Boxing,
    writable: &[&std::path::Path],
    data_dir: tempfile::TempDir,
    gateway: Option<gateway::Gateway>,
    env: &[(&str, &str)],
) -> Server {
    let gateway = match (gateway, gateway::Kind::from_env()) {
        (Some(g), _) => Some(g),
        (None, Some(kind)) => Some(gateway::Gateway::start(kind).await),
        (None, None) => None,
    };
    let mut args: Vec<String> = vec!["--data-dir".into(), data_dir.path().display().to_string()];
    if let Some(g) = &gateway {
        args.extend(g.args());
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    match transport {
        Transport::Stdio => {
            let mut cmd = server_command(data_dir.path(), boxing, writable);
            cmd.arg("--transport")
                .arg("stdio")
                .args(&args)
                .envs(env.iter().copied())
                .env("LOG_LEVEL", "error");
            let (proc, _stderr) = TokioChildProcess::builder(cmd)
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap();
            let pid = proc.id().unwrap();
            let client = ().serve(proc).await.expect("connect over stdio");
            Server {
                client,
                data_dir,
                http: None,
                pid,
                url: None,
                gateway,
            }
        }
        Transport::Http => {
            let mut child = server_command(data_dir.path(), boxing, writable)
                .args(["--transport", "http", "--host", "127.0.0.1", "--port", "0"])
                .args(&args)
                .envs(env.iter().copied())
                .env("LOG_LEVEL", "error")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .unwrap();
            let pid = child.id().unwrap();
            let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
            let url = listening_url(&mut lines).await;
            tokio::spawn(async move {
                while let Ok(Some(line)) = lines.next_line().await {
                    eprintln!("{line}");
                }
            });
            let client = connect_http(&url, token).await.expect("connect over http");
            Server {
                client,
                data_dir,
                http: Some(child),
                pid,
                url: Some(url),
                gateway,
            }
        }
    }
}

impl Server {
    /// The folder holding the session folders: the data folder, or on a
    /// gateway the folder beside its kernels.
    pub fn sessions_parent(&self) -> std::path::PathBuf {
        match &self.gateway {
            Some(g) => g.root.path().join("mcp-sessions"),
            None => self.data_dir.path().to_path_buf(),
        }
    }

    /// A session's folder, wherever its kernel runs.
    pub fn session_folder(&self, id: &str) -> std::path::PathBuf {
        self.sessions_parent().join(id)
    }

    pub async fn call(&self, tool: &str, args: Value) -> CallToolResult {
        call(&self.client, tool, args).await
    }

    /// `execute_code`, returning the structured result.
    pub async fn exec(&self, session_id: &str, code: &str) -> Value {
        self.call(
            "execute_code",
            json!({"code": code, "session_id": session_id}),
        )
        .await
        .structured_content
        .expect("structured content")
    }

    /// Starts a session with `code`; returns (session id, result).
    pub async fn new_session(&self, code: &str) -> (String, Value) {
        let v = self.exec("", code).await;
        assert_eq!(v["success"], true, "{v:#}");
        (v["session_id"].as_str().unwrap().to_string(), v)
    }

    pub async fn read(&self, uri: &str) -> Result<ResourceContents, rmcp::ServiceError> {
        let r = self
            .client
            .read_resource(ReadResourceRequestParams::new(uri))
            .await?;
        Ok(r.contents.into_iter().next().expect("one content"))
    }

    /// Stops an HTTP server with `signal`, waits (bounded) until it has
    /// exited, and starts a new one on the same data folder with `extra`.
    pub async fn restart(
        mut self,
        signal: nix::sys::signal::Signal,
        extra: &[&str],
        token: Option<&str>,
    ) -> Server {
        let mut child = self.http.take().expect("restart needs an HTTP server");
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid as i32), signal);
        tokio::time::timeout(Duration::from_secs(20), child.wait())
            .await
            .expect("server did not exit")
            .unwrap();
        let _ = self.client.cancel().await;
        start_on(
            Transport::Http,
            extra,
            token,
            Boxing::None,
            &[],
            self.data_dir,
            self.gateway.take(),
            &[],
        )
        .await
    }

    /// Stops the server with SIGTERM and waits (bounded) for it to exit.
    pub async fn stop(mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        if let Some(mut child) = self.http.take() {
            // A boxed server's status is bwrap's (killed by the signal).
            tokio::time::timeout(Duration::from_secs(20), child.wait())
                .await
                .expect("server did not exit after SIGTERM")
                .unwrap();
        }
        let _ = self.client.cancel().await;
    }
}

pub async fn call(client: &Client, tool: &str, args: Value) -> CallToolResult {
    let args = args.as_object().cloned().unwrap();
    client
        .call_tool(CallToolRequestParams::new(tool.to_string()).with_arguments(args))
        .await
        .unwrap_or_else(|e| panic!("{tool} failed at protocol level: {e}"))
}

/// Waits (bounded) until process `pid` no longer exists.
pub async fn wait_gone(pid: i32, within: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline {
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() || is_zombie(pid) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(true)
}

/// Reads an HTTP server's stderr (echoing it) until the server says where it
/// listens; returns that URL. The lines after it stay in `lines`.
pub async fn listening_url(
    lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStderr>>,
) -> String {
    tokio::time::timeout(Duration::from_secs(120), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            eprintln!("{line}");
            if let Some(url) = line.strip_prefix("mcp-python-interpreter: listening on ") {
                return url.to_string();
            }
        }
        panic!("server exited before listening");
    })
    .await
    .expect("server did not start listening")
}

/// The host pid of the ipykernel serving `session_id` (found by its working
/// folder). A kernel in a PID namespace of its own sees another pid for
/// itself, so tests that signal a kernel look it up here.
pub fn kernel_pid(session_id: &str) -> Option<i32> {
    std::fs::read_dir("/proc")
        .ok()?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .find(|p| {
            let cmd = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd);
            // Not the sandbox wrapper (the namespace's init), the kernel
            // itself: launched, or forked from the template (whose command
            // line it keeps).
            let is_kernel = (cmd.contains("ipykernel_launcher") || cmd.contains(TEMPLATE_MARKER))
                && !cmd.contains("__kernel-sandbox");
            is_kernel
                && std::fs::read_link(format!("/proc/{p}/cwd"))
                    .is_ok_and(|cwd| cwd.ends_with(session_id))
        })
}

/// The kernel template's first argument (see `src/kernel/template.rs`).
pub const TEMPLATE_MARKER: &str = "mcp-python-interpreter-kernel-template";

/// Whether process `pid` was forked from (or is) the kernel template.
pub fn is_forked(pid: i32) -> bool {
    let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    String::from_utf8_lossy(&cmd).contains(TEMPLATE_MARKER)
}

/// The kernel template of the server `server` (its pid, or the pid of the
/// bwrap that boxes it): the marked process that descends from it and is
/// not a kernel (a kernel's parent is its sandbox wrapper).
pub fn template_pid(server: u32) -> Option<i32> {
    let parent = |p: i32| -> Option<i32> {
        std::fs::read_to_string(format!("/proc/{p}/stat"))
            .ok()?
            .rsplit(')')
            .next()?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    let descends = |mut p: i32| {
        for _ in 0..4 {
            match parent(p) {
                Some(q) if q == server as i32 => return true,
                Some(q) if q > 1 => p = q,
                _ => return false,
            }
        }
        false
    };
    std::fs::read_dir("/proc")
        .ok()?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .find(|&p| {
            is_forked(p)
                && descends(p)
                && parent(p).is_some_and(|q| {
                    let cmd = std::fs::read(format!("/proc/{q}/cmdline")).unwrap_or_default();
                    let cmd = String::from_utf8_lossy(&cmd);
                    !cmd.contains(TEMPLATE_MARKER) && !cmd.contains("__kernel-sandbox")
                })
        })
}
