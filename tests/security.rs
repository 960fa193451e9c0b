//! Attacks on the HTTP surface and on other principals' sessions, against
//! the real binary with a temporary data directory.

mod common;

use std::time::Duration;

use common::{Transport, connect_http, start_boxed};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ALICE: &str = "alice-token-0123456789abcdef";
const BOB: &str = "bob-token-0123456789abcdef0";

fn tokens_file(dir: &std::path::Path) -> String {
    let path = dir.join("tokens");
    std::fs::write(&path, format!("# principals\nalice {ALICE}\nbob:{BOB}\n")).unwrap();
    path.display().to_string()
}

/// Sends a raw HTTP request and returns the status code.
async fn raw_status(url: &str, headers: &[(&str, &str)]) -> u16 {
    let rest = url.strip_prefix("http://").unwrap();
    let (authority, path) = rest.split_once('/').unwrap();
    let mut stream = tokio::net::TcpStream::connect(authority).await.unwrap();
    let body = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}"#;
    let mut req = format!(
        "POST /{path} HTTP/1.1\r\nContent-Type: application/json\r\n\
         Accept: application/json, text/event-stream\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        req.push_str(&format!("Host: {authority}\r\n"));
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let head = String::from_utf8_lossy(&buf[..n]).to_string();
    head.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn bearer_tokens_and_ownership() {
    // Not under /tmp, which the boxed server does not see.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let file = tokens_file(dir.path());
    let s = start_boxed(Transport::Http, &["--tokens-file", &file], Some(ALICE)).await;
    let url = s.url.clone().unwrap();

    // No token, a wrong token: refused before any MCP processing.
    assert_eq!(raw_status(&url, &[]).await, 401);
    assert_eq!(
        raw_status(&url, &[("Authorization", "Bearer wrong-token-0123456789")]).await,
        401
    );
    assert!(connect_http(&url, None).await.is_err());
    assert!(
        connect_http(&url, Some("nope-nope-nope-nope-nope"))
            .await
            .is_err()
    );

    // Alice's session and file.
    let (id, _) = s
        .new_session("open('secret.txt','w').write('alice only')")
        .await;
    let uri = format!("kernel://{id}/secret.txt");
    assert!(s.read(&uri).await.is_ok());

    // Bob gets exactly what an unknown id gets, for every tool and the resource.
    let bob = connect_http(&url, Some(BOB)).await.unwrap();
    let theirs = common::call(&bob, "execute_code", json!({"code": "1", "session_id": id})).await;
    let unknown = common::call(
        &bob,
        "execute_code",
        json!({"code": "1", "session_id": "AAAAAAAAAAAAAAAAAAAAAA"}),
    )
    .await;
    let e1 = theirs.structured_content.unwrap()["error"]
        .as_str()
        .unwrap()
        .replace(&id, "X");
    let e2 = unknown.structured_content.unwrap()["error"]
        .as_str()
        .unwrap()
        .replace("AAAAAAAAAAAAAAAAAAAAAA", "X");
    assert!(e1.starts_with("SessionExpiredError:"));
    assert_eq!(e1, e2);
    let l = common::call(&bob, "list_session_files", json!({"session_id": id})).await;
    assert!(
        l.structured_content.unwrap()["error"]
            .as_str()
            .unwrap()
            .starts_with("SessionExpiredError:")
    );
    let c = common::call(&bob, "clear_session", json!({"session_id": id})).await;
    assert_eq!(c.structured_content.unwrap()["success"], false);
    assert!(
        bob.read_resource(rmcp::model::ReadResourceRequestParams::new(uri.clone()))
            .await
            .is_err()
    );
    // Alice's work is untouched.
    assert_eq!(
        s.exec(&id, "open('secret.txt').read()").await["result"],
        "'alice only'"
    );
    let _ = bob.cancel().await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn foreign_origins_are_refused() {
    let s = start_boxed(Transport::Http, &[], None).await;
    let url = s.url.clone().unwrap();
    assert_eq!(
        raw_status(&url, &[("Origin", "http://evil.example")]).await,
        403
    );
    assert_eq!(raw_status(&url, &[("Host", "evil.example")]).await, 403);
    assert_ne!(
        raw_status(&url, &[("Origin", "http://localhost:3000")]).await,
        403
    );
    s.stop().await;
}

/// A kernel gets none of the server's environment but what it needs
/// (locale, proxies, certificates): not the token, not our settings.
#[tokio::test(flavor = "multi_thread")]
async fn kernels_do_not_inherit_the_servers_secrets() {
    let data = tempfile::tempdir().unwrap();
    let mut cmd = tokio::process::Command::new(common::BIN);
    cmd.args(["--transport", "stdio", "--pool-size", "0", "--data-dir"])
        .arg(data.path())
        .env("MCP_AUTH_TOKEN", "leaky-token-0123456789abcdef")
        .env("MCP_SESSION_TIMEOUT", "600")
        .env("AWS_SECRET_ACCESS_KEY", "also-secret")
        .env("LC_ALL", "C.UTF-8")
        .env("HTTPS_PROXY", "http://proxy.example:3128")
        .env("LOG_LEVEL", "error");
    let client = common::connect_stdio(cmd).await;
    let r = common::call(
        &client,
        "execute_code",
        json!({"session_id": "", "code": "import os, getpass\n\
            sorted(k for k in os.environ if k.startswith('MCP') or 'SECRET' in k or 'TOKEN' in k), \
            os.environ.get('LC_ALL'), os.environ.get('HTTPS_PROXY'), getpass.getuser()"}),
    )
    .await;
    let v = r.structured_content.unwrap();
    assert_eq!(
        v["result"], "([], 'C.UTF-8', 'http://proxy.example:3128', 'kernel')",
        "{v:#}"
    );
    let _ = client.cancel().await;
}

/// A server started under `umask 077` (a hardened shell's, a service
/// manager's) still gives its kernels a reachable Python: the folders made
/// for their private view are made searchable whatever the umask.
#[tokio::test(flavor = "multi_thread")]
async fn a_strict_umask_does_not_stop_kernels() {
    let data = tempfile::tempdir().unwrap();
    let mut cmd = tokio::process::Command::new("sh");
    cmd.arg("-c")
        .arg("umask 077; exec \"$0\" \"$@\"")
        .arg(common::BIN)
        .args(["--transport", "stdio", "--pool-size", "0", "--data-dir"])
        .arg(data.path())
        .env("LOG_LEVEL", "error");
    let client = common::connect_stdio(cmd).await;
    let r = common::call(
        &client,
        "execute_code",
        json!({"session_id": "", "code": "import os\nopen('f', 'w').write('x')\noct(os.stat('f').st_mode & 0o777)"}),
    )
    .await;
    let v = r.structured_content.unwrap();
    assert_eq!(v["success"], true, "{v:#}");
    let _ = client.cancel().await;
}

/// A deployment reached by another name (a container's, a proxy's) names
/// it with --allowed-host; other names stay refused.
#[tokio::test(flavor = "multi_thread")]
async fn allowed_hosts_are_accepted_and_others_refused() {
    let s = start_boxed(
        Transport::Http,
        &["--allowed-host", "mcp.internal:8000"],
        None,
    )
    .await;
    let url = s.url.clone().unwrap();
    assert_ne!(
        raw_status(&url, &[("Host", "mcp.internal:8000")]).await,
        403
    );
    assert_eq!(raw_status(&url, &[("Host", "evil.example")]).await, 403);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn any_host_needs_tokens() {
    let data = tempfile::tempdir().unwrap();
    let out = tokio::process::Command::new(common::BIN)
        .args(["--transport", "http", "--port", "0", "--allowed-host", "*"])
        .arg("--data-dir")
        .arg(data.path())
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--allowed-host '*'"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn public_bind_without_auth_refuses_to_start() {
    let data = tempfile::tempdir().unwrap();
    let child = tokio::process::Command::new(common::BIN)
        .args(["--transport", "http", "--host", "0.0.0.0", "--port", "0"])
        .arg("--data-dir")
        .arg(data.path().join("d"))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let out = tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
        .await
        .expect("the server started listening on 0.0.0.0 without authentication")
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("without authentication"), "{err}");
    // Refused before anything started: no kernel, no session folder.
    assert!(!data.path().join("d").exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn session_limit_is_a_clear_error() {
    let s = common::start(Transport::Stdio, &["--max-sessions", "2"]).await;
    s.new_session("1").await;
    let (second, _) = s.new_session("1").await;
    let v = s.exec("", "1").await;
    assert_eq!(v["success"], false);
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .starts_with("SessionLimitError:"),
        "{v}"
    );
    s.call("clear_session", json!({"session_id": second})).await;
    s.new_session("1").await;
    s.stop().await;
}
