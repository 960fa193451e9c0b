//! Attacks from inside a kernel: other sessions' files, the server's data,
//! other kernels' connection keys, the network, memory and disk.
//!
//! Every write a payload attempts targets a path inside the test's own
//! temporary folder, so a failed defence cannot harm anything outside it.

mod common;

use std::time::Duration;

use common::{Transport, start};
use serde_json::json;

fn err(v: &serde_json::Value) -> String {
    v["error"].as_str().unwrap_or("").to_string()
}

/// The kernel either may not touch the path or does not even see it.
fn refused(v: &serde_json::Value) -> bool {
    let e = err(v);
    e.starts_with("PermissionError") || e.starts_with("FileNotFoundError")
}

#[tokio::test(flavor = "multi_thread")]
async fn kernels_cannot_reach_other_sessions_or_server_data() {
    let s = common::start_boxed(Transport::Stdio, &[], None).await;
    let root = s.data_dir.path().to_path_buf();
    let (victim, _) = s
        .new_session("open('secret.txt','w').write('victim data')")
        .await;
    let (attacker, _) = s.new_session("import os, glob").await;
    let secret = root.join(&victim).join("secret.txt");
    let outside = root.join("planted.txt");

    // Read another session's file.
    let v = s
        .exec(
            &attacker,
            &format!("open({:?}).read()", secret.display().to_string()),
        )
        .await;
    assert!(refused(&v), "{v}");
    // List the data folder (learns other session ids).
    let v = s
        .exec(
            &attacker,
            &format!(
                "[n for n in os.listdir({:?}) if n != os.path.basename(os.getcwd())]",
                root.display().to_string()
            ),
        )
        .await;
    assert!(refused(&v) || v["result"] == "[]", "{v}");
    // Write next to the sessions, or into the victim's folder: whatever the
    // kernel sees at those paths, the real folders stay untouched.
    for target in [outside.clone(), root.join(&victim).join("planted.txt")] {
        s.exec(
            &attacker,
            &format!("open({:?}, 'w').write('x')", target.display().to_string()),
        )
        .await;
        assert!(!target.exists(), "{} was written", target.display());
    }
    // Delete the victim's file.
    let v = s
        .exec(
            &attacker,
            &format!("os.remove({:?})", secret.display().to_string()),
        )
        .await;
    assert!(refused(&v), "{v}");
    // Other kernels' connection files (their HMAC keys) are out of reach.
    let v = s
        .exec(
            &attacker,
            "own = os.path.dirname(os.environ['TMPDIR'])\n\
             [p for p in glob.glob('/tmp/mcp-python-interpreter-*/k*/kernel.json') if not p.startswith(own + '/')]",
        )
        .await;
    assert_eq!(v["result"], "[]", "{v}");
    // The home folder and its data are not readable.
    let v = s
        .exec(&attacker, "os.listdir(os.path.expanduser('~root'))")
        .await;
    assert!(refused(&v), "{v}");
    // Its own folder works as usual.
    let v = s
        .exec(
            &attacker,
            "open('mine.txt','w').write('ok'); open('mine.txt').read()",
        )
        .await;
    assert_eq!(v["result"], "'ok'", "{v}");

    assert_eq!(std::fs::read_to_string(&secret).unwrap(), "victim data");
    assert!(!outside.exists());
    s.stop().await;
}

/// `--kernel-network full` reaches a loopback service; the default (`web`)
/// and `--no-network` do not (the web policy's own test, with `!pip
/// download`, is in tests/confinement.rs).
#[tokio::test(flavor = "multi_thread")]
async fn network_policies_block_connections() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let probe = format!(
        "import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=3)\ns.close()\n'connected'"
    );
    let open = start(Transport::Stdio, &["--kernel-network", "full"]).await;
    let (id, _) = open.new_session("1").await;
    assert_eq!(open.exec(&id, &probe).await["result"], "'connected'");
    open.stop().await;

    let web = start(Transport::Stdio, &[]).await;
    let (id, _) = web.new_session("1").await;
    let v = web.exec(&id, &probe).await;
    assert_eq!(v["success"], false, "{v}");
    assert!(err(&v).contains("PermissionError"), "{v}");
    web.stop().await;

    let closed = start(Transport::Stdio, &["--no-network"]).await;
    let (id, _) = closed.new_session("1").await;
    let v = closed.exec(&id, &probe).await;
    assert_eq!(v["success"], false, "{v}");
    assert!(err(&v).contains("Error"), "{v}");
    closed.stop().await;
    drop(listener);
}

#[tokio::test(flavor = "multi_thread")]
async fn memory_and_disk_limits_hold() {
    let s = start(
        Transport::Stdio,
        &["--kernel-memory-limit", "400", "--max-session-bytes", "2M"],
    )
    .await;
    let (id, _) = s.new_session("x = 1").await;
    let t0 = std::time::Instant::now();
    let v = s
        .exec(
            &id,
            "b = bytearray(1500 * 1024 * 1024)\nb[::4096] = b'x' * len(b[::4096])",
        )
        .await;
    assert!(t0.elapsed() < Duration::from_secs(60));
    let e = err(&v);
    assert!(
        e.starts_with("MemoryError") || e.starts_with("KernelDiedError"),
        "{v}"
    );
    // The server and the session go on.
    assert_eq!(s.exec(&id, "1 + 1").await["result"], "2");

    // One file over the quota cannot be written; the folder over it is reported.
    let v = s
        .exec(&id, "open('big.bin','wb').write(b'0' * (3 * 1024 * 1024))")
        .await;
    assert!(err(&v).contains("File too large"), "{v}");
    let v = s
        .exec(
            &id,
            "for k in range(3): open(f'part{k}.bin','wb').write(b'0' * (1024 * 1024))",
        )
        .await;
    assert!(err(&v).starts_with("DiskQuotaError"), "{v}");
    let l = s
        .call("list_session_files", json!({"session_id": id}))
        .await;
    assert!(
        l.structured_content.unwrap()["files"]
            .as_array()
            .unwrap()
            .len()
            >= 3
    );
    s.stop().await;
}

/// A kernel cannot start more processes and threads than `--kernel-max-pids`
/// (a fork bomb stops at the limit); the session goes on. Needs a cgroup
/// pids controller, which the CI machines have.
#[tokio::test(flavor = "multi_thread")]
async fn process_limit_holds() {
    let pids_controller = std::path::Path::new("/sys/fs/cgroup/pids/cgroup.procs").exists()
        || std::fs::read_to_string("/sys/fs/cgroup/cgroup.controllers")
            .is_ok_and(|c| c.split_whitespace().any(|x| x == "pids"));
    if !pids_controller {
        eprintln!("no cgroup pids controller on this host: process limit not testable");
        return;
    }
    let s = start(Transport::Stdio, &["--kernel-max-pids", "40"]).await;
    let (id, _) = s.new_session("x = 1").await;
    let v = s
        .exec(
            &id,
            "import threading, time\nstop = threading.Event()\nn = 0\ntry:\n    \
             for _ in range(500):\n        \
             threading.Thread(target=stop.wait, daemon=True).start()\n        n += 1\n\
             except RuntimeError as e:\n    print('refused', type(e).__name__)\n\
             stop.set()\nn",
        )
        .await;
    let started: u64 = v["result"].as_str().unwrap_or("0").parse().unwrap_or(999);
    assert!(started < 40, "{started} threads started: {v}");
    assert!(v["output"].to_string().contains("refused"), "{v}");
    assert_eq!(s.exec(&id, "x + 1").await["result"], "2");
    s.stop().await;
}

/// A server whose temporary folder is `/dev/shm` (TMPDIR=/dev/shm: its
/// kernels' runtime folders go there, and every kernel's view covers
/// `/dev/shm` with a private tmpfs) and whose data folder is there too:
/// kernels start, write to their session folder, and what they write in
/// `/dev/shm` stays in their own. (Before the fix, those folders vanished from the kernel's
/// view: ipykernel found no connection file and no call was ever answered.)
#[tokio::test(flavor = "multi_thread")]
async fn runtime_and_data_folders_under_dev_shm_still_work() {
    if !std::path::Path::new("/dev/shm").is_dir() {
        return;
    }
    let data = tempfile::tempdir_in("/dev/shm").unwrap();
    let s = common::start_in(data, std::path::Path::new("/dev/shm")).await;
    let probe = format!("/dev/shm/probe-{}", std::process::id());
    let (id, v) = s
        .new_session(&format!(
            "open('out.txt', 'w').write('kept')\nopen({probe:?}, 'w').write('private')"
        ))
        .await;
    assert_eq!(v["success"], json!(true), "{v}");
    assert!(
        !std::path::Path::new(&probe).exists(),
        "the kernel wrote the host's /dev/shm"
    );
    let written = s.session_folder(&id).join("out.txt");
    assert_eq!(std::fs::read_to_string(&written).unwrap(), "kept");
    s.stop().await;
}
