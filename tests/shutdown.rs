//! Shutdown whatever the launcher did with our standard streams: SIGTERM
//! after the launcher closed its end of stderr, a stdio client that closes
//! all three pipes, and a stderr that nobody reads. Each test starts the
//! real binary with its own data folder and its own TMPDIR (so the runtime
//! folder, and with it every kernel's command line, is inside), and ends by
//! checking that no process is left that runs in or names either of them.

mod common;

use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStderr, Command};

/// How long an orderly shutdown may take here (kernels are asked to stop,
/// then killed; folders removed), with room for a loaded machine.
const ORDERLY: Duration = Duration::from_secs(10);

/// A server process started by a test, and the folders it was given.
struct Launched {
    child: Child,
    data_dir: TempDir,
    tmp_dir: TempDir,
}

/// The server with `args`, a fresh data folder and a fresh TMPDIR. It is
/// killed if the test fails before it exits.
fn launch(args: &[&str], log_level: &str) -> (Command, TempDir, TempDir) {
    let data_dir = tempfile::tempdir().unwrap();
    let tmp_dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(common::BIN);
    cmd.args(args)
        .arg("--data-dir")
        .arg(data_dir.path())
        .env("LOG_LEVEL", log_level)
        .env("TMPDIR", tmp_dir.path())
        .kill_on_drop(true);
    (cmd, data_dir, tmp_dir)
}

/// An HTTP server on a free port whose stderr is a pipe to us, read until
/// the listening line; returns the server, the rest of its stderr, and the URL.
async fn launch_http(log_level: &str) -> (Launched, Lines<BufReader<ChildStderr>>, String) {
    let (mut cmd, data_dir, tmp_dir) = launch(
        &["--transport", "http", "--host", "127.0.0.1", "--port", "0"],
        log_level,
    );
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let url = common::listening_url(&mut lines).await;
    let launched = Launched {
        child,
        data_dir,
        tmp_dir,
    };
    (launched, lines, url)
}

impl Launched {
    fn pid(&self) -> i32 {
        self.child.id().expect("server still running") as i32
    }

    fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig).unwrap();
    }

    /// The exit status, if the server exits within `within`.
    async fn exit_within(&mut self, within: Duration) -> Option<ExitStatus> {
        tokio::time::timeout(within, self.child.wait())
            .await
            .ok()
            .map(Result::unwrap)
    }

    /// Everything the orderly shutdown promises: the session folders are
    /// gone, and so is every process that belonged to the server.
    async fn assert_shut_down_in_order(&self) {
        let left: Vec<_> = std::fs::read_dir(self.data_dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(left.is_empty(), "session folders left behind: {left:?}");
        self.assert_no_process_left().await;
    }

    /// No process runs in, or names, the data folder or the TMPDIR (kernels
    /// name their connection file in the runtime folder and run in a session
    /// folder). Kernels of a server that exited abruptly notice within a
    /// second that their parent is gone, hence the bounded wait.
    async fn assert_no_process_left(&self) {
        let dirs = [self.data_dir.path(), self.tmp_dir.path()];
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let left = processes_using(&dirs);
            if left.is_empty() {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "processes left behind: {left:#?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Processes (other than zombies) whose working directory is inside one of
/// `dirs`, or whose command line names one of them.
fn processes_using(dirs: &[&Path]) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let pid = entry.file_name();
        if !pid.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let proc_dir = entry.path();
        let cmdline = std::fs::read(proc_dir.join("cmdline"))
            .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
            .unwrap_or_default();
        let cwd = std::fs::read_link(proc_dir.join("cwd")).ok();
        let uses = dirs.iter().any(|d| {
            cmdline.contains(&*d.to_string_lossy())
                || cwd.as_deref().is_some_and(|c| c.starts_with(d))
        });
        if uses {
            found.push(format!("{}: {cmdline}", pid.to_string_lossy()));
        }
    }
    found
}

/// Starts a session over HTTP (so a kernel runs and a folder exists), then
/// disconnects.
async fn start_a_session(url: &str) {
    let client = common::connect_http(url, None).await.unwrap();
    let r = common::call(
        &client,
        "execute_code",
        json!({"code": "x = 1", "session_id": ""}),
    )
    .await;
    assert_eq!(r.is_error, Some(false), "{r:?}");
    let _ = client.cancel().await;
}

/// The launcher: reads stderr until "listening", closes the pipe,
/// then sends SIGTERM. The signal used to be logged to the broken pipe, and
/// the failed write panicked the task that watches for signals, so the
/// server never shut down.
#[tokio::test]
async fn sigterm_after_the_launcher_closed_stderr() {
    let (mut server, lines, url) = launch_http("info").await;
    start_a_session(&url).await;
    drop(lines);
    server.signal(nix::sys::signal::Signal::SIGTERM);
    let status = server
        .exit_within(ORDERLY)
        .await
        .expect("server still running after SIGTERM");
    assert_eq!(status.code(), Some(0), "{status}");
    server.assert_shut_down_in_order().await;
}

/// A desktop client quitting: stdin, stdout and stderr closed at once. The
/// server used to exit 101 (a panic logging to the closed stderr) before
/// closing its sessions.
#[tokio::test]
async fn stdio_client_closing_all_three_pipes() {
    let (mut cmd, data_dir, tmp_dir) = launch(&["--transport", "stdio"], "info");
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let stderr = child.stderr.take().unwrap();
    let messages = [
        json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {},
            "clientInfo": {"name": "shutdown-test", "version": "0"}}}),
        json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
        json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {
            "name": "execute_code", "arguments": {"code": "x = 1", "session_id": ""}}}),
    ];
    for m in messages {
        stdin.write_all(format!("{m}\n").as_bytes()).await.unwrap();
    }
    // The session exists once the call is answered.
    tokio::time::timeout(Duration::from_secs(120), async {
        loop {
            let line = stdout.next_line().await.unwrap().expect("stdout ended");
            let reply: Value = serde_json::from_str(&line).unwrap();
            if reply["id"] == 2 {
                assert_eq!(reply["result"]["isError"], false, "{reply}");
                return;
            }
        }
    })
    .await
    .expect("no answer to tools/call");

    drop((stdin, stdout, stderr));
    let mut server = Launched {
        child,
        data_dir,
        tmp_dir,
    };
    let status = server
        .exit_within(ORDERLY)
        .await
        .expect("server still running after its client went away");
    assert_eq!(status.code(), Some(0), "{status}");
    server.assert_shut_down_in_order().await;
}

/// A launcher that keeps stderr open but stops reading it: once the pipe
/// is full, writing a log line would block. Here every line a kernel
/// writes to its stderr is logged (debug), so a cell that writes a lot
/// fills the pipe; the call must still finish, and SIGTERM still work.
#[tokio::test]
async fn stderr_nobody_reads() {
    let (mut server, lines, url) = launch_http("debug").await;
    let client = common::connect_http(&url, None).await.unwrap();
    let code =
        "import os\nfor i in range(20000):\n    os.write(2, b'%d %s\\n' % (i, b'x' * 100))\n'done'";
    let r = tokio::time::timeout(
        Duration::from_secs(60),
        common::call(
            &client,
            "execute_code",
            json!({"code": code, "session_id": ""}),
        ),
    )
    .await
    .expect("a call blocked behind the server's unread stderr");
    assert_eq!(
        r.structured_content.as_ref().unwrap()["result"],
        "'done'",
        "{r:?}"
    );
    let _ = client.cancel().await;
    server.signal(nix::sys::signal::Signal::SIGTERM);
    let status = server
        .exit_within(ORDERLY)
        .await
        .expect("server still running after SIGTERM");
    assert_eq!(status.code(), Some(0), "{status}");
    server.assert_shut_down_in_order().await;
    drop(lines);
}
