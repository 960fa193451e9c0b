//! Kernels hold no privilege: from a cell, nothing outside its own kernel
//! can be signalled, root-only files and other sessions' files cannot be
//! read, one session cannot take every core, and the default network policy
//! lets `pip` out but nothing else. Run against the real binary, boxed by
//! bubblewrap (as root in CI: kernels then get uids of their own), both
//! with namespaces and as in a default container without them.

mod common;

use std::time::Duration;

use common::{
    Server, Transport, kernel_pid, start, start_boxed, start_boxed_rootless,
    start_boxed_without_namespaces,
};
use serde_json::json;

const TOKEN: &str = "confinement-token-0123456789";

fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

/// The server process itself (not bwrap, not a kernel wrapper), found by
/// its data folder.
fn server_pid(s: &Server) -> i32 {
    let data = s.data_dir.path().display().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .find(|p| {
            let cmd = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
            let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
            let text = String::from_utf8_lossy(&cmd);
            args.first()
                .is_some_and(|a| a.ends_with(b"mcp-python-interpreter"))
                && text.contains(&data)
                && !text.contains("__kernel-sandbox")
        })
        .expect("server process")
}

fn text(v: &serde_json::Value) -> String {
    v["result"].as_str().unwrap_or("").to_string()
}

/// Every attack of the issue, against one server; `tokens` is a 0600 file
/// the server was given.
async fn attack(s: &Server, tokens: &str) {
    let (victim, v) = s
        .new_session("open('secret.txt','w').write('victim data'); import os; os.getuid()")
        .await;
    let victim_uid = text(&v);
    let (attacker, v) = s.new_session("import os, signal; os.getuid()").await;
    let attacker_uid = text(&v);
    if is_root() {
        assert_ne!(attacker_uid, "0", "a kernel runs as root");
        assert_ne!(attacker_uid, victim_uid, "two live sessions share a uid");
    }

    // Signals: the server, a sibling kernel, PID 1. Signal 0 checks the
    // right to signal without doing harm; SIGKILL is tried on the sibling.
    let server = server_pid(s);
    let sibling = kernel_pid(&victim).expect("victim kernel");
    let code = format!(
        "def attempt(pid, sig):
    try:
        os.kill(pid, sig)
        return 'sent'
    except ProcessLookupError:
        return 'no such process'
    except PermissionError:
        return 'refused'
[attempt({server}, 0), attempt({sibling}, 0), attempt(1, 0), attempt({sibling}, signal.SIGKILL)]"
    );
    let v = s.exec(&attacker, &code).await;
    assert_eq!(v["success"], true, "{v}");
    assert!(!text(&v).contains("sent"), "a signal got out: {v}");
    assert!(
        std::path::Path::new(&format!("/proc/{server}")).exists(),
        "server gone"
    );
    let v = s.exec(&victim, "open('secret.txt').read()").await;
    assert_eq!(v["result"], "'victim data'", "{v}");
    assert!(
        !v.to_string().contains("lost"),
        "the sibling kernel died: {v}"
    );

    // Root-only files, the server's tokens file, another session's file by
    // absolute path, root's home.
    let secret = s.data_dir.path().join(&victim).join("secret.txt");
    let mut targets = vec![tokens.to_string(), secret.display().to_string()];
    if is_root() {
        targets.push("/etc/shadow".into());
    }
    for path in targets {
        let v = s.exec(&attacker, &format!("open({path:?}).read()")).await;
        let e = v["error"].as_str().unwrap_or("");
        assert!(
            e.starts_with("PermissionError") || e.starts_with("FileNotFoundError"),
            "{path} was readable: {v}"
        );
    }
    if is_root() {
        let v = s.exec(&attacker, "os.listdir('/root')").await;
        let e = v["error"].as_str().unwrap_or("");
        assert!(
            e.starts_with("PermissionError") || v["result"] == "[]",
            "{v}"
        );
    }
}

/// `fig.show()` of a plotly figure (kaleido's PNG export); a hang fails the
/// test instead of reaching the call's limit unnoticed.
async fn plotly_export(s: &Server, id: &str) -> serde_json::Value {
    let r = tokio::time::timeout(
        Duration::from_secs(120),
        s.call(
            "execute_code",
            json!({"session_id": id, "timeout": 60,
                   "code": "import plotly.express as px\npx.bar(x=['a','b'], y=[1,3]).show()"}),
        ),
    )
    .await
    .expect("plotly hung");
    r.structured_content.unwrap()
}

fn tokens_file() -> (tempfile::TempDir, String) {
    use std::os::unix::fs::PermissionsExt;
    // Not under /tmp, which the boxed server does not see.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let path = dir.path().join("tokens");
    std::fs::write(&path, format!("admin {TOKEN}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let p = path.display().to_string();
    (dir, p)
}

#[tokio::test(flavor = "multi_thread")]
async fn cells_cannot_signal_or_read_outside_their_session() {
    let (_dir, tokens) = tokens_file();
    let s = start_boxed(Transport::Http, &["--tokens-file", &tokens], Some(TOKEN)).await;
    attack(&s, &tokens).await;
    // With a PID namespace, only the kernel and its init exist for it.
    let (id, _) = s.new_session("import os").await;
    let v = s
        .exec(
            &id,
            "sorted(int(p) for p in os.listdir('/proc') if p.isdigit()) == [1, os.getpid()]",
        )
        .await;
    assert_eq!(v["success"], true, "{v}");
    if is_root() {
        // init and the kernel (pid 2 if launched, 3 if forked from the
        // template: its helper took 2).
        assert_eq!(v["result"], "True", "{v}");
    }
    s.stop().await;
}

/// The same attacks where the server may not create namespaces (a default
/// container): uids, Landlock scopes and permissions must hold alone; a
/// cell's leftovers die with its session; and plotly's export, which needs
/// a /tmp the kernel cannot have here, fails at once with a clear error.
#[tokio::test(flavor = "multi_thread")]
async fn without_namespaces_the_other_layers_hold_and_plotly_fails_clearly() {
    let (_dir, tokens) = tokens_file();
    let s =
        start_boxed_without_namespaces(Transport::Http, &["--tokens-file", &tokens], Some(TOKEN))
            .await;
    attack(&s, &tokens).await;

    // Without a PID namespace or a cgroup, what a cell leaves running (in a
    // session of its own) is killed before its uid can go to another session.
    let (id, v) = s
        .new_session(
            "import os, subprocess\nsubprocess.Popen(['sleep', '300'], start_new_session=True)\nos.getuid()",
        )
        .await;
    let uid: u32 = text(&v).parse().unwrap();
    let sleepers = || -> Vec<i32> {
        std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
            .filter(|p| {
                let status =
                    std::fs::read_to_string(format!("/proc/{p}/status")).unwrap_or_default();
                let cmd = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
                status.lines().any(|l| {
                    l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some(&uid.to_string())
                }) && cmd.starts_with(b"sleep\x00300")
            })
            .collect()
    };
    let left = sleepers();
    if is_root() {
        assert_eq!(left.len(), 1, "{left:?}");
    }
    s.call("clear_session", json!({"session_id": id})).await;
    for p in left {
        assert!(
            common::wait_gone(p, Duration::from_secs(10)).await,
            "process {p} of uid {uid} outlived its session"
        );
    }

    // No private /tmp here: plotly's export (kaleido's Chromium insists on
    // /tmp) fails at once with an error that says why, never hangs.
    let (id, _) = s.new_session("1").await;
    let v = plotly_export(&s, &id).await;
    assert_eq!(v["success"], false, "{v}");
    let e = v["error"].as_str().unwrap_or("");
    assert!(
        e.contains("writable /tmp") && e.contains("write_html"),
        "{v}"
    );
    // /tmp stays closed to the kernel.
    let v = s.exec(&id, "open('/tmp/x', 'w')").await;
    assert!(
        v["error"]
            .as_str()
            .unwrap_or("")
            .starts_with("PermissionError"),
        "{v}"
    );
    s.stop().await;
}

/// One session running seven busy processes gets at most its CPU quota
/// (`--kernel-cpus 1`), measured as CPU seconds per wall second; another
/// session meanwhile still answers. (Latency figures are in the benchmark.)
#[tokio::test(flavor = "multi_thread")]
async fn a_busy_session_gets_its_cpu_quota_only() {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let s = start(Transport::Stdio, &["--kernel-cpus", "1"]).await;
    let (busy, _) = s.new_session("1").await;
    let (other, _) = s.new_session("1").await;
    let burn = "import multiprocessing as mp, os, time
def burn(t):
    end = time.time() + t
    while time.time() < end:
        pass
t0, c0 = time.time(), os.times()
ps = [mp.Process(target=burn, args=(3,)) for _ in range(7)]
for p in ps: p.start()
for p in ps: p.join()
c1 = os.times()
round((c1.children_user + c1.children_system - c0.children_user - c0.children_system) / (time.time() - t0), 2)";
    let (v, w) = tokio::join!(s.exec(&busy, burn), async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        s.exec(&other, "sum(range(1000))").await
    });
    assert_eq!(w["result"], "499500", "{w}");
    let ratio: f64 = text(&v).parse().unwrap_or_else(|_| panic!("{v}"));
    if cores >= 2 {
        assert!(ratio < 1.4, "7 busy processes used {ratio} cores");
    }
    s.stop().await;
}

/// `--kernel-network web` (the default): `pip` reaches PyPI over HTTPS,
/// but a service on another loopback port cannot be reached.
#[tokio::test(flavor = "multi_thread")]
async fn web_network_lets_pip_out_and_nothing_else() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let s = start_boxed(Transport::Stdio, &[], None).await;
    let (id, _) = s.new_session("import socket, os").await;
    let v = s
        .exec(
            &id,
            &format!("socket.create_connection(('127.0.0.1', {port}), timeout=3)"),
        )
        .await;
    assert!(
        v["error"]
            .as_str()
            .unwrap_or("")
            .starts_with("PermissionError"),
        "{v}"
    );
    let v = s
        .exec(
            &id,
            "!pip download --quiet --disable-pip-version-check --no-deps six==1.16.0 -d dl\nos.listdir('dl')",
        )
        .await;
    assert!(text(&v).contains("six-1.16.0"), "{v}");
    s.stop().await;
    drop(listener);
}

/// A server that is not root (a desktop user's): kernels run as its user,
/// so Landlock keeps them from it; a user namespace still gives each kernel
/// a private /tmp, so plotly's export works.
#[tokio::test(flavor = "multi_thread")]
async fn a_rootless_server_confines_its_kernels_and_plotly_works() {
    if !is_root() {
        return; // needs root to become another user for the test
    }
    let s = start_boxed_rootless(Transport::Stdio, &[]).await;
    let server = server_pid(&s);
    let (id, v) = s.new_session("import os; os.getuid()").await;
    assert_eq!(text(&v), common::ROOTLESS_UID.to_string(), "{v}");
    let v = s
        .exec(
            &id,
            &format!(
                "def attempt(pid):
    try:
        os.kill(pid, 0)
        return 'sent'
    except ProcessLookupError:
        return 'no such process'
    except PermissionError:
        return 'refused'
[attempt({server}), attempt(1)]"
            ),
        )
        .await;
    assert_eq!(v["result"], "['refused', 'refused']", "{v}");
    // The server's own data (its records) stays out of reach.
    let records = s.data_dir.path().join(".records");
    let v = s
        .exec(
            &id,
            &format!("os.listdir({:?})", records.display().to_string()),
        )
        .await;
    let e = v["error"].as_str().unwrap_or("");
    assert!(
        e.starts_with("PermissionError") || e.starts_with("FileNotFoundError"),
        "{v}"
    );
    let v = plotly_export(&s, &id).await;
    assert_eq!(v["success"], true, "{v}");
    assert!(
        v["files"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["mime_type"] == "image/png"),
        "{v}"
    );
    s.stop().await;
}
