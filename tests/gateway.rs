//! Kernels on a real Jupyter server (Jupyter Kernel Gateway, Jupyter
//! Server), started on loopback with a token by the harness
//! ([`common::gateway`]). The interpreter suite runs against them too
//! (`MCP_TEST_GATEWAY`, see `scripts/test`); these are what only remote
//! kernels have: they outlive our restarts, they are deleted on the
//! gateway, files go through the kernel, and both WebSocket framings.

mod common;

use std::time::Duration;

use common::Transport;
use common::gateway::{Gateway, Kind};
use nix::sys::signal::Signal;
use rmcp::model::ResourceContents;
use serde_json::json;

/// The gateway kind these tests use: `MCP_TEST_GATEWAY`'s, else the Kernel Gateway.
fn kind() -> Kind {
    Kind::from_env().unwrap_or(Kind::KernelGateway)
}

fn text(c: &ResourceContents) -> String {
    match c {
        ResourceContents::TextResourceContents { text, .. } => text.clone(),
        other => panic!("expected text, got {other:?}"),
    }
}

async fn wait_for<F, Fut>(what: &str, within: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting: {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_server_reconnects_to_the_same_kernel() {
    let g = Gateway::start(kind()).await;
    let s = common::start_on_gateway(Transport::Http, &["--pool-size", "0"], g).await;
    let (id, _) = s
        .new_session("import os\nx = 41\nopen('kept.txt', 'w').write('kept')")
        .await;
    let before = s.gateway.as_ref().unwrap().kernels().await;
    assert_eq!(before.len(), 1, "{before:?}");

    // SIGTERM: the kernel is let go, not deleted.
    let s = s
        .restart(Signal::SIGTERM, &["--pool-size", "0"], None)
        .await;
    let g = s.gateway.as_ref().unwrap();
    assert_eq!(g.kernels().await, before, "the kernel kept running");
    // Its files are readable before any call (through the same kernel).
    assert_eq!(
        text(&s.read(&format!("kernel://{id}/kept.txt")).await.unwrap()),
        "kept"
    );
    let v = s.exec(&id, "x += 1\nx").await;
    assert_eq!(v["result"], "42", "{v:#}");
    let note = v["output"][0].as_str().unwrap();
    assert!(note.contains("reconnected to its kernel"), "{note}");
    assert_eq!(g.kernels().await, before, "the same kernel, no new one");

    // SIGKILL: nothing was let go; the record still names the kernel.
    let s = s
        .restart(Signal::SIGKILL, &["--pool-size", "0"], None)
        .await;
    let v = s.exec(&id, "x").await;
    assert_eq!(v["result"], "42", "{v:#}");
    assert_eq!(
        text(&s.read(&format!("kernel://{id}/kept.txt")).await.unwrap()),
        "kept"
    );

    // Cleared: kernel and folder gone from the gateway.
    let r = s.call("clear_session", json!({"session_id": id})).await;
    assert_ne!(r.is_error, Some(true), "{r:?}");
    let g = s.gateway.as_ref().unwrap();
    assert!(g.kernels().await.is_empty(), "the kernel was deleted");
    assert!(!s.session_folder(&id).exists(), "the folder was deleted");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn ephemeral_expired_and_pooled_kernels_are_deleted() {
    let g = Gateway::start(kind()).await;
    let s = common::start_on_gateway(
        Transport::Http,
        &[
            "--pool-size",
            "2",
            "--session-timeout",
            "2",
            "--cleanup-interval",
            "1",
        ],
        g,
    )
    .await;
    // The pool creates its kernels ahead of demand.
    wait_for("two pooled kernels", Duration::from_secs(60), || async {
        s.gateway.as_ref().unwrap().kernels().await.len() >= 2
    })
    .await;
    let (id, _) = s.new_session("open('f.txt', 'w').write('1')").await;
    assert!(s.session_folder(&id).join("f.txt").exists());
    // Expiry deletes the kernel and the folder on the gateway.
    wait_for(
        "the session folder to go",
        Duration::from_secs(30),
        || async { !s.session_folder(&id).exists() },
    )
    .await;
    let r = s
        .call("execute_code", json!({"session_id": id, "code": "1"}))
        .await;
    assert_eq!(r.is_error, Some(true));
    // Shutdown deletes the pooled kernels (nobody took them).
    let s = s
        .restart(Signal::SIGTERM, &["--pool-size", "0", "--ephemeral"], None)
        .await;
    let g = s.gateway.as_ref().unwrap();
    wait_for("no kernel left", Duration::from_secs(30), || async {
        g.kernels().await.is_empty()
    })
    .await;
    // --ephemeral: shutdown deletes live sessions' kernels too.
    let (_id, _) = s.new_session("y = 1").await;
    assert_eq!(s.gateway.as_ref().unwrap().kernels().await.len(), 1);
    let s = s
        .restart(Signal::SIGTERM, &["--pool-size", "0"], None)
        .await;
    assert!(s.gateway.as_ref().unwrap().kernels().await.is_empty());
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn files_go_through_the_kernel_and_links_are_refused() {
    let g = Gateway::start(kind()).await;
    let s = common::start_on_gateway(Transport::Stdio, &["--pool-size", "0"], g).await;
    let (id, _) = s
        .new_session(
            "import os\nos.symlink('/etc/passwd', 'link')\nos.makedirs('d', exist_ok=True)",
        )
        .await;
    let r = s
        .call(
            "upload_file",
            json!({"session_id": id, "path": "d/data.csv", "content": "a,b\n1,2\n"}),
        )
        .await;
    assert_ne!(r.is_error, Some(true), "{r:?}");
    let v = s
        .exec(
            &id,
            "import pandas as pd\ndf = pd.read_csv('d/data.csv')\nint(df.b.sum())",
        )
        .await;
    assert_eq!(v["result"], "2", "{v:#}");
    assert_eq!(
        text(&s.read(&format!("kernel://{id}/d/data.csv")).await.unwrap()),
        "a,b\n1,2\n"
    );
    assert!(s.read(&format!("kernel://{id}/link")).await.is_err());
    assert!(s.read(&format!("kernel://{id}/../x")).await.is_err());
    let r = s.call("export_notebook", json!({"session_id": id})).await;
    assert_ne!(r.is_error, Some(true), "{r:?}");
    let nb = text(
        &s.read(&format!("kernel://{id}/notebook_1.ipynb"))
            .await
            .unwrap(),
    );
    assert!(nb.contains("read_csv"), "{nb}");
    // The next call does not report the notebook as its own.
    let v = s.exec(&id, "1").await;
    assert_eq!(v["files"], json!([]), "{v:#}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn legacy_json_frames_work_when_the_server_refuses_v1() {
    let g = Gateway::start(Kind::JupyterServerJson).await;
    let s = common::start_on_gateway(Transport::Stdio, &["--pool-size", "0"], g).await;
    let (id, _) = s.new_session("x = 2").await;
    let v = s
        .exec(
            &id,
            "import matplotlib.pyplot as plt\nplt.plot([1, 2]); plt.show()\nprint('hi'); x * 21",
        )
        .await;
    assert_eq!(v["result"], "42", "{v:#}");
    assert_eq!(v["output"][0], "hi\n", "{v:#}");
    assert_eq!(v["files"][0]["name"], "figure_1.png", "{v:#}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_gateway_is_a_clear_error_not_a_hang() {
    let g = Gateway::start(kind()).await;
    let s = common::start_on_gateway(Transport::Stdio, &["--pool-size", "0"], g).await;
    let (id, _) = s.new_session("x = 1").await;
    let mut s = s;
    s.gateway.take().unwrap().stop().await;
    let started = tokio::time::Instant::now();
    let r = s
        .call("execute_code", json!({"session_id": id, "code": "x"}))
        .await;
    assert_eq!(r.is_error, Some(true), "{r:?}");
    assert!(started.elapsed() < Duration::from_secs(60));
    let v = s.exec("", "1").await;
    assert_eq!(v["success"], false, "{v:#}");
    s.stop().await;
}
