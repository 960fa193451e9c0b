//! Shutdown whatever the launcher did with our standard streams: SIGTERM
//! after the launcher closed its end of stderr, a stdio client that closes
//! all three pipes (after or before initializing), a request that never
//! ends, a second SIGTERM, and a stderr that nobody reads. Each test starts
//! the real binary with its own data folder and its own TMPDIR (so the
//! runtime folder, and with it every kernel's command line, is inside), and
//! ends by checking that no process is left that runs in or names either.

mod common;

use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use mcp_python_interpreter::serve::DRAIN_WAIT;
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, Lines};
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

    /// The server exits 0 within the orderly bound (else `after` says what
    /// it outlived) and has shut down in order.
    async fn assert_exits_in_order(&mut self, after: &str) {
        let status = self
            .exit_within(ORDERLY)
            .await
            .unwrap_or_else(|| panic!("server still running after {after}"));
        assert_eq!(status.code(), Some(0), "{status}");
        self.assert_shut_down_in_order().await;
    }

    /// Everything the orderly shutdown promises: pooled sessions-to-be are
    /// gone, every session folder kept has its record (sessions survive
    /// restarts), and every process that belonged to the server is gone.
    async fn assert_shut_down_in_order(&self) {
        let records = self.data_dir.path().join(".records");
        let left: Vec<String> = std::fs::read_dir(self.data_dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n != ".records")
            .collect();
        for name in &left {
            let record = std::fs::read_to_string(records.join(format!("{name}.json")))
                .unwrap_or_else(|_| panic!("folder {name} left without a record"));
            assert!(
                record.contains("\"pooled\":false"),
                "pooled folder {name} left: {record}"
            );
        }
        let pooled: Vec<String> = std::fs::read_dir(&records)
            .map(|d| {
                d.filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
                    .filter(|r| r.contains("\"pooled\":true"))
                    .collect()
            })
            .unwrap_or_default();
        assert!(pooled.is_empty(), "pooled records left: {pooled:?}");
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

/// A POST to /mcp whose body never comes: once the server has answered
/// `100 Continue`, its handler is waiting for the body, so the connection
/// stays open for as long as we keep this stream.
async fn stuck_request(url: &str) -> tokio::net::TcpStream {
    let authority = url
        .strip_prefix("http://")
        .and_then(|u| u.strip_suffix("/mcp"))
        .unwrap();
    let mut tcp = tokio::net::TcpStream::connect(authority).await.unwrap();
    let head = format!(
        "POST /mcp HTTP/1.1\r\nHost: {authority}\r\nAccept: application/json, text/event-stream\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\nExpect: 100-continue\r\n\r\n"
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), async {
        while !String::from_utf8_lossy(&got).contains("\r\n\r\n") {
            let mut buf = [0u8; 256];
            let n = tcp.read(&mut buf).await.unwrap();
            assert!(n > 0, "server closed the connection");
            got.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .expect("no interim answer to the request");
    let answer = String::from_utf8_lossy(&got);
    assert!(answer.starts_with("HTTP/1.1 100 Continue"), "{answer}");
    tcp
}

/// Reads the server's stderr until a line containing `text`.
async fn wait_for_line(lines: &mut Lines<BufReader<ChildStderr>>, text: &str) {
    tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            eprintln!("{line}");
            if line.contains(text) {
                return;
            }
        }
        panic!("stderr ended before a line with {text:?}");
    })
    .await
    .unwrap_or_else(|_| panic!("no line with {text:?} on stderr"));
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
    server.assert_exits_in_order("SIGTERM").await;
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
    server.assert_exits_in_order("its client went away").await;
}

/// A stdio client that goes away before it has initialized: an ordinary
/// end too (it used to be "transport failed", exit 1).
#[tokio::test]
async fn stdio_client_gone_before_initializing() {
    let (mut cmd, data_dir, tmp_dir) = launch(&["--transport", "stdio"], "info");
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
    // Up to the point where it waits for the client's first message.
    wait_for_line(&mut stderr, "kernel limits").await;
    drop((child.stdin.take(), child.stdout.take(), stderr));
    let mut server = Launched {
        child,
        data_dir,
        tmp_dir,
    };
    server.assert_exits_in_order("its client went away").await;
}

/// A request that never ends (its body never comes) no longer holds the
/// shutdown up for ever: after the drain bound the server closes the
/// sessions anyway and exits 0.
#[tokio::test]
async fn sigterm_with_a_request_that_never_ends() {
    let (mut server, mut lines, url) = launch_http("info").await;
    start_a_session(&url).await;
    let _stuck = stuck_request(&url).await;
    server.signal(nix::sys::signal::Signal::SIGTERM);
    wait_for_line(&mut lines, "SIGTERM").await;
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let status = server
        .exit_within(DRAIN_WAIT + ORDERLY)
        .await
        .expect("server still running after SIGTERM");
    assert_eq!(status.code(), Some(0), "{status}");
    server.assert_shut_down_in_order().await;
}

/// A second SIGTERM while the shutdown waits (here for a request that never
/// ends) exits at once, with status 128 + SIGTERM.
#[tokio::test]
async fn second_sigterm_exits_at_once() {
    let (mut server, mut lines, url) = launch_http("info").await;
    start_a_session(&url).await;
    let _stuck = stuck_request(&url).await;
    server.signal(nix::sys::signal::Signal::SIGTERM);
    // The first one has been taken (two pending SIGTERMs would be one).
    wait_for_line(&mut lines, "SIGTERM").await;
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    server.signal(nix::sys::signal::Signal::SIGTERM);
    let status = server
        .exit_within(Duration::from_secs(2))
        .await
        .expect("server still running after a second SIGTERM");
    assert_eq!(status.code(), Some(128 + 15), "{status}");
    server.assert_no_process_left().await;
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
    server.assert_exits_in_order("SIGTERM").await;
    drop(lines);
}

/// An HTTP server started by a program that holds its stdin (as the MCP
/// Inspector does when it is told to run a stdio server but the server's
/// default transport is HTTP): it says so in the log when MCP arrives on
/// stdin, and when that program goes away (stdin closes) it shuts down in
/// order instead of serving on, orphaned.
#[tokio::test]
async fn http_server_whose_launcher_closes_stdin() {
    use tokio::io::AsyncWriteExt;
    let (mut cmd, data_dir, tmp_dir) = launch(
        &["--transport", "http", "--host", "127.0.0.1", "--port", "0"],
        "info",
    );
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let url = common::listening_url(&mut lines).await;
    start_a_session(&url).await;
    stdin
        .write_all(b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"initialize\"}\n")
        .await
        .unwrap();
    wait_for_line(&mut lines, "--transport stdio").await;
    drop(stdin);
    let mut server = Launched {
        child,
        data_dir,
        tmp_dir,
    };
    server
        .assert_exits_in_order("its launcher closed stdin")
        .await;
}
