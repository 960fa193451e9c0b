//! Integration tests: the real server binary, real ipykernel kernels, and
//! rmcp's client over stdio and streamable HTTP.

mod common;

use std::time::Duration;

use base64::Engine;
use common::{Server, Transport, start};
use rmcp::model::ResourceContents;
use serde_json::json;

fn blob_bytes(c: &ResourceContents) -> (Vec<u8>, Option<String>) {
    match c {
        ResourceContents::BlobResourceContents {
            blob, mime_type, ..
        } => (
            base64::engine::general_purpose::STANDARD
                .decode(blob)
                .unwrap(),
            mime_type.clone(),
        ),
        other => panic!("expected a blob, got {other:?}"),
    }
}

fn text_of(c: &ResourceContents) -> (String, Option<String>) {
    match c {
        ResourceContents::TextResourceContents {
            text, mime_type, ..
        } => (text.clone(), mime_type.clone()),
        other => panic!("expected text, got {other:?}"),
    }
}

const PNG: &[u8] = b"\x89PNG\r\n\x1a\n";

/// Sessions, persistence, errors, figures, files, resources, clearing.
async fn core_scenario(t: Transport) {
    let s = start(t, &[]).await;

    // New session, persistence, result of the last expression.
    let (id, first) = s.new_session("x = 21\nprint('hello')").await;
    assert!(
        id.len() >= 16
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    );
    assert_eq!(first["output"], json!(["hello\n"]));
    assert_eq!(first["session_info"]["session_id"], id.as_str());
    assert!(
        first["session_info"]["instructions"]
            .as_str()
            .unwrap()
            .contains(&id)
    );
    let v = s.exec(&id, "x * 2").await;
    assert_eq!(v["result"], "42");
    assert!(v["session_info"].is_null());

    // A Python exception is a tool result, with a clean traceback.
    let r = s
        .call("execute_code", json!({"code": "1/0", "session_id": id}))
        .await;
    assert_eq!(r.is_error, Some(true));
    let v = r.structured_content.clone().unwrap();
    assert_eq!(v["success"], false);
    assert_eq!(v["error"], "ZeroDivisionError: division by zero");
    let tb: Vec<String> = serde_json::from_value(v["traceback"].clone()).unwrap();
    assert!(tb.iter().any(|l| l.contains("ZeroDivisionError")));
    assert!(tb.iter().all(|l| !l.contains('\u{1b}')));
    // The same JSON is in a text block.
    let text = r.content[0].as_text().unwrap().text.clone();
    assert_eq!(serde_json::from_str::<serde_json::Value>(&text).unwrap(), v);

    // A figure saved and shown; a CSV in a subfolder.
    let v = s
        .exec(
            &id,
            "import matplotlib.pyplot as plt\nplt.plot([1,2,3],[1,4,9])\nplt.savefig('plot.png')\nplt.show()\n\
             import os, pandas as pd\nos.makedirs('out', exist_ok=True)\n\
             pd.DataFrame({'a':[1,2],'b':[3,4]}).to_csv('out/data.csv', index=False)",
        )
        .await;
    assert_eq!(v["success"], true, "{v:#}");
    let files = v["files"].as_array().unwrap();
    let names: Vec<&str> = files.iter().map(|f| f["name"].as_str().unwrap()).collect();
    assert!(names.contains(&"plot.png"), "{names:?}");
    assert!(names.contains(&"figure_1.png"), "{names:?}");
    assert!(names.contains(&"out/data.csv"), "{names:?}");
    let output: Vec<String> = serde_json::from_value(v["output"].clone()).unwrap();
    assert!(
        output.contains(&"File created: out/data.csv (text/csv, 12 bytes)".to_string()),
        "{output:?}"
    );
    for f in files {
        let uri = f["uri"].as_str().unwrap();
        assert_eq!(
            uri,
            format!("kernel://{id}/{}", f["name"].as_str().unwrap())
        );
        let c = s.read(uri).await.unwrap();
        if f["mime_type"] == "image/png" {
            let (bytes, mime) = blob_bytes(&c);
            assert!(bytes.starts_with(PNG));
            assert_eq!(bytes.len() as u64, f["size"].as_u64().unwrap());
            assert_eq!(mime.as_deref(), Some("image/png"));
        } else {
            let (text, mime) = text_of(&c);
            assert_eq!(text, "a,b\n1,3\n2,4\n");
            assert_eq!(mime.as_deref(), Some("text/csv"));
        }
    }
    // An unchanged file is not reported again; a changed one is.
    let v = s
        .exec(&id, "open('out/data.csv','a').write('5,6\\n')")
        .await;
    let names: Vec<&str> = v["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["out/data.csv"]);

    // Listing.
    let l = s
        .call("list_session_files", json!({"session_id": id}))
        .await;
    let l = l.structured_content.unwrap();
    assert_eq!(l["session_id"], id.as_str());
    let listed: Vec<&str> = l["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert_eq!(listed, vec!["figure_1.png", "out/data.csv", "plot.png"]);

    // Clearing removes kernel and folder; the id is then unknown.
    let folder = s.session_folder(&id);
    assert!(folder.is_dir());
    let c = s.call("clear_session", json!({"session_id": id})).await;
    assert_eq!(c.structured_content.unwrap()["success"], true);
    assert!(!folder.exists());
    let v = s.exec(&id, "x").await;
    assert_eq!(v["success"], false);
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .starts_with("SessionExpiredError:"),
        "{v}"
    );
    let l = s
        .call("list_session_files", json!({"session_id": id}))
        .await;
    assert!(
        l.structured_content.unwrap()["error"]
            .as_str()
            .unwrap()
            .starts_with("SessionExpiredError:")
    );
    let c = s.call("clear_session", json!({"session_id": id})).await;
    assert_eq!(c.structured_content.unwrap()["success"], false);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn core_over_stdio() {
    core_scenario(Transport::Stdio).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn core_over_http() {
    core_scenario(Transport::Http).await;
}

/// The kernel replies without ipykernel's 0.5 ms post-cell sleep, and skips
/// the end-of-cell flush round trip when a stream has nothing buffered:
/// back-to-back calls still get every line their cell printed (stdout and
/// stderr), because a call ends at the iopub `idle` that follows its output.
#[tokio::test(flavor = "multi_thread")]
async fn rapid_calls_lose_no_output() {
    let s = start(Transport::Stdio, &[]).await;
    let (id, v) = s
        .new_session(
            "import sys\n(get_ipython().kernel._execute_sleep, type(sys.stdout).flush.__qualname__)",
        )
        .await;
    assert_eq!(
        v["result"], "(0.0, '_coalesce_streams.<locals>.flush')",
        "{v}"
    );
    for i in 0..100 {
        let v = s
            .exec(
                &id,
                &format!(
                    "import sys\nprint({i})\nsys.stderr.write('e{i}\\n')\nprint('end', end='')"
                ),
            )
            .await;
        // stdout and stderr are separate streams: each arrives whole, in
        // its own order.
        let out: Vec<String> = serde_json::from_value(v["output"].clone()).unwrap();
        let err = format!("e{i}\n");
        assert_eq!(
            out.iter().filter(|o| **o == err).count(),
            1,
            "call {i}: {out:?}"
        );
        let stdout: String = out.iter().filter(|o| **o != err).cloned().collect();
        assert_eq!(stdout, format!("{i}\nend"), "call {i}: {out:?}");
    }
    s.stop().await;
}

/// Code that sets `sys.stdout`/`sys.stderr` to None does not silence the
/// session for good: the next cell has its streams, results and errors back.
#[tokio::test(flavor = "multi_thread")]
async fn a_cell_cannot_silence_its_session() {
    let s = start(Transport::Stdio, &[]).await;
    let (id, _) = s
        .new_session("import sys\nsys.stdout = None\nsys.stderr = None")
        .await;
    let v = s.exec(&id, "print('back')\n6 * 7").await;
    assert_eq!(v["output"], json!(["back\n"]), "{v}");
    assert_eq!(v["result"], "42", "{v}");
    let v = s.exec(&id, "input()").await;
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .starts_with("StdinNotImplementedError"),
        "{v}"
    );
    // A working redirection is the user's business and stays.
    let v = s
        .exec(&id, "sys.stdout = open('log.txt', 'w')\nprint('to file')")
        .await;
    assert_eq!(
        v["output"],
        json!(["File created: log.txt (text/plain, 8 bytes)"]),
        "{v}"
    );
    let v = s
        .exec(
            &id,
            "print('still to file')\nsys.stdout.flush()\nsys.stdout = sys.__stdout__",
        )
        .await;
    assert_eq!(v["success"], true, "{v}");
    s.stop().await;
}

/// Files reported per call: bounded when a cell writes hundreds, and exact
/// afterwards (written in subfolders, by subprocesses, moved with a folder),
/// through the sandbox's mounts.
#[tokio::test(flavor = "multi_thread")]
async fn many_files_are_bounded_and_changes_stay_exact() {
    let s = start(Transport::Stdio, &[]).await;
    let names = |v: &serde_json::Value| -> Vec<String> {
        let mut n: Vec<String> = v["files"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["name"].as_str().unwrap().to_string())
            .collect();
        n.sort();
        n
    };
    let (id, v) = s
        .new_session(
            "import os\nos.makedirs('many', exist_ok=True)\n\
             for i in range(150):\n    open(f'many/{i:03}.txt', 'w').write('x')",
        )
        .await;
    assert_eq!(v["success"], true, "{v}");
    assert_eq!(names(&v).len(), 100, "{v}");
    let output: Vec<String> = serde_json::from_value(v["output"].clone()).unwrap();
    assert_eq!(output.len(), 101, "{output:?}");
    assert!(output[100].contains("50 more files"), "{output:?}");

    let v = s.exec(&id, "x = 1").await;
    assert_eq!(names(&v), Vec::<String>::new(), "{v}");
    let v = s
        .exec(
            &id,
            "open('many/007.txt', 'a').write('y')\n!echo hi > sh.txt",
        )
        .await;
    assert_eq!(names(&v), vec!["many/007.txt", "sh.txt"], "{v}");
    let v = s
        .exec(
            &id,
            "os.makedirs('n/m')\nopen('n/m/z.txt', 'w').write('z')\nos.remove('sh.txt')",
        )
        .await;
    assert_eq!(names(&v), vec!["n/m/z.txt"], "{v}");
    let v = s.exec(&id, "os.rename('n', 'k')").await;
    assert_eq!(names(&v), vec!["k/m/z.txt"], "{v}");
    let v = s.exec(&id, "open('k/m/z.txt', 'a').write('z')").await;
    assert_eq!(names(&v), vec!["k/m/z.txt"], "{v}");
    let l = s
        .call("list_session_files", json!({"session_id": id}))
        .await
        .structured_content
        .unwrap();
    assert_eq!(l["files"].as_array().unwrap().len(), 151, "{l}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn resources_refuse_everything_outside_the_session() {
    // Boxed: hostile ids such as "/etc" are sent to clear_session below.
    let s = common::start_boxed(Transport::Stdio, &[], None).await;
    let (id, _) = s
        .new_session("import os\nopen('ok.txt','w').write('ok')\nos.symlink('/etc/passwd','link')")
        .await;
    std::fs::create_dir_all(s.sessions_parent()).unwrap();
    std::fs::write(s.sessions_parent().join("outside.txt"), "secret").unwrap();
    assert_eq!(
        text_of(&s.read(&format!("kernel://{id}/ok.txt")).await.unwrap()).0,
        "ok"
    );
    for bad in [
        format!("kernel://{id}/../outside.txt"),
        format!("kernel://{id}/%2e%2e/outside.txt"),
        format!("kernel://{id}/%2E%2E%2Foutside.txt"),
        format!("kernel://{id}//etc/passwd"),
        format!("kernel://{id}/%2Fetc%2Fpasswd"),
        format!("kernel://{id}/ok.txt%00"),
        format!("kernel://{id}/link"),
        format!("kernel://{id}/missing.txt"),
        "kernel://../etc/passwd".to_string(),
        "kernel://AAAAAAAAAAAAAAAAAAAAAA/ok.txt".to_string(),
        "file:///etc/passwd".to_string(),
    ] {
        assert!(s.read(&bad).await.is_err(), "{bad} was served");
    }
    // Hostile ids never touch the file system.
    for bad in ["/etc", "..", ".", "../../tmp", "0/../.."] {
        let c = s.call("clear_session", json!({"session_id": bad})).await;
        assert_eq!(c.structured_content.unwrap()["success"], false);
        let l = s
            .call("list_session_files", json!({"session_id": bad}))
            .await;
        assert!(
            l.structured_content.unwrap()["error"]
                .as_str()
                .unwrap()
                .starts_with("SessionExpiredError:")
        );
    }
    assert!(std::path::Path::new("/etc/passwd").exists());
    assert!(s.sessions_parent().join("outside.txt").exists());
    assert!(s.session_folder(&id).join("ok.txt").exists());
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_arguments_are_invalid_params() {
    let s = start(Transport::Stdio, &[]).await;
    for args in [
        json!({}),
        json!({"code": 5}),
        json!({"code": "1", "timeout": -1}),
        json!({"code": "1", "session_id": 7}),
    ] {
        let err = s
            .client
            .call_tool(
                rmcp::model::CallToolRequestParams::new("execute_code")
                    .with_arguments(args.as_object().cloned().unwrap()),
            )
            .await
            .expect_err("malformed arguments accepted");
        assert!(err.to_string().contains("-32602"), "{err}");
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn timeout_interrupts_and_keeps_state() {
    let s = start(Transport::Stdio, &["--execution-timeout", "2"]).await;
    let (id, _) = s.new_session("kept = 'yes'").await;
    let started = std::time::Instant::now();
    let v = s
        .exec(
            &id,
            "import time\nprint('before', flush=True)\ntime.sleep(60)",
        )
        .await;
    assert!(started.elapsed() < Duration::from_secs(15));
    assert_eq!(v["success"], false);
    assert!(
        v["error"].as_str().unwrap().starts_with("TimeoutError:"),
        "{v}"
    );
    assert_eq!(v["output"], json!(["before\n"]));
    assert_eq!(s.exec(&id, "kept").await["result"], "'yes'");
    // A per-call timeout longer than the default is honoured.
    let r = s
        .call(
            "execute_code",
            json!({"code": "import time; time.sleep(3); 'done'", "session_id": id, "timeout": 30}),
        )
        .await;
    assert_eq!(r.structured_content.unwrap()["result"], "'done'");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn input_fails_fast_and_kernel_death_is_reported() {
    let s = start(Transport::Stdio, &[]).await;
    let (id, _) = s
        .new_session("a = 1\nopen('kept.txt','w').write('k')")
        .await;
    let v = s.exec(&id, "input('name?')").await;
    assert_eq!(v["success"], false);
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .starts_with("StdinNotImplementedError"),
        "{v}"
    );

    let v = s.exec(&id, "import os; os._exit(1)").await;
    assert_eq!(v["success"], false);
    assert!(
        v["error"].as_str().unwrap().starts_with("KernelDiedError:"),
        "{v}"
    );
    let v = s
        .exec(&id, "print(open('kept.txt').read()); 'a' in globals()")
        .await;
    assert_eq!(v["success"], true, "{v}");
    assert_eq!(v["result"], "False");
    let out = v["output"].as_array().unwrap();
    assert!(out[0].as_str().unwrap().contains("lost"), "{out:?}");
    assert_eq!(out.last().unwrap(), "k\n");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn expired_sessions_are_removed() {
    let s = start(
        Transport::Stdio,
        &["--session-timeout", "2", "--cleanup-interval", "1"],
    )
    .await;
    let (id, _) = s.new_session("open('f.txt','w').write('x')").await;
    let folder = s.session_folder(&id);
    assert!(folder.is_dir());
    // The sweeper removes it without any call touching it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while folder.exists() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(!folder.exists(), "expired session folder still there");
    let v = s.exec(&id, "1").await;
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .starts_with("SessionExpiredError:")
    );
    assert!(v["error"].as_str().unwrap().contains("new session"));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn eight_sessions_in_parallel_and_fifo_within_one() {
    let s = std::sync::Arc::new(start(Transport::Http, &[]).await);
    let mut tasks = Vec::new();
    for i in 0..8 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let (id, _) = s.new_session(&format!("n = {i}")).await;
            for _ in 0..5 {
                let v = s.exec(&id, "n = n + 10; n").await;
                assert_eq!(v["success"], true);
            }
            assert_eq!(s.exec(&id, "n").await["result"], (i + 50).to_string());
            id
        }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.push(t.await.unwrap());
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 8);

    // Calls on one session run one at a time in arrival order, while a slow
    // call on another session does not hold them up.
    let (slow, _) = s.new_session("import time").await;
    let (id, _) = s.new_session("log = []").await;
    let slow_call = {
        let s = s.clone();
        tokio::spawn(async move { s.exec(&slow, "time.sleep(5)").await })
    };
    let mut calls = Vec::new();
    for i in 0..6 {
        let s = s.clone();
        let id = id.clone();
        calls.push(tokio::spawn(async move {
            s.exec(
                &id,
                &format!("import time; time.sleep(0.05); log.append({i})"),
            )
            .await
        }));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let started = std::time::Instant::now();
    for c in calls {
        c.await.unwrap();
    }
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "blocked by another session"
    );
    assert_eq!(s.exec(&id, "log").await["result"], "[0, 1, 2, 3, 4, 5]");
    slow_call.await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn plotly_show_and_pip_install_work() {
    // Processes of local kernels.
    local_kernels_only!();
    let s = start(Transport::Stdio, &[]).await;
    let (id, _) = s
        .new_session(
            "import plotly.graph_objects as go\ngo.Figure(go.Scatter(x=[1,2,3], y=[1,4,9])).show()",
        )
        .await;
    let v = s.exec(&id, "1").await;
    assert_eq!(v["success"], true);
    let l = s
        .call("list_session_files", json!({"session_id": id}))
        .await
        .structured_content
        .unwrap();
    let f = &l["files"][0];
    assert_eq!(f["mime_type"], "image/png", "{l}");
    let (bytes, _) = blob_bytes(&s.read(f["uri"].as_str().unwrap()).await.unwrap());
    assert!(bytes.starts_with(PNG));

    let v = s.exec(&id, "!pip install --quiet --disable-pip-version-check six==1.16.0\nimport six; six.__version__").await;
    assert_eq!(v["success"], true, "{v}");
    assert_eq!(v["result"], "'1.16.0'", "{v}");
    s.stop().await;
}

/// Every process whose parent is `pid` (kernels, pooled ones included).
/// The server's kernel wrappers (its children but the kernel template).
fn children_of(pid: u32) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&p| !common::is_forked(p))
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|s| {
                    s.rsplit(')')
                        .next()?
                        .split_whitespace()
                        .nth(1)?
                        .parse::<u32>()
                        .ok()
                })
                == Some(pid)
        })
        .collect()
}

/// No kernel outlives the server: SIGTERM shuts kernels down, and after a
/// SIGKILL the kernels notice their parent is gone. Pooled kernels too.
#[tokio::test(flavor = "multi_thread")]
async fn no_kernel_outlives_the_server() {
    // Processes of local kernels.
    local_kernels_only!();
    for signal in [
        nix::sys::signal::Signal::SIGTERM,
        nix::sys::signal::Signal::SIGKILL,
    ] {
        let s: Server = start(Transport::Http, &["--pool-size", "2"]).await;
        let mut pids = Vec::new();
        for _ in 0..2 {
            let (id, _) = s.new_session("1").await;
            pids.push(common::kernel_pid(&id).expect("kernel process"));
        }
        // Wait (bounded) until the pool has refilled: 2 sessions + 2 pooled.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while children_of(s.pid).len() < 4 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let kernels = children_of(s.pid);
        assert!(kernels.len() >= 4, "{kernels:?}");
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(s.pid as i32), signal);
        for pid in kernels.into_iter().chain(pids) {
            assert!(
                common::wait_gone(pid, Duration::from_secs(10)).await,
                "kernel {pid} outlived the server after {signal}"
            );
        }
    }
}

/// Pooled kernels: a new session takes a prepared one (its folder existed
/// before the call), and no state passes from one session to the next.
#[tokio::test(flavor = "multi_thread")]
async fn pooled_sessions_are_fresh_and_never_reused() {
    // Processes of local kernels.
    local_kernels_only!();
    let s = start(
        Transport::Stdio,
        &["--pool-size", "1", "--preload", "numpy,matplotlib"],
    )
    .await;
    let folders = |d: &std::path::Path| -> Vec<String> {
        std::fs::read_dir(d)
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| !n.starts_with('.'))
            .collect()
    };
    let mut seen_pids = Vec::new();
    for round in 0..3 {
        // Wait (bounded) until the pool holds its prepared session.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while folders(s.data_dir.path()).is_empty() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let prepared = folders(s.data_dir.path());
        assert_eq!(prepared.len(), 1, "round {round}: {prepared:?}");
        let (id, v) = s
            .new_session(
                "import os, sys
(0, 'leak' in globals(), 'numpy' in sys.modules, 'numpy' in globals())",
            )
            .await;
        assert_eq!(
            prepared[0], id,
            "the new session did not come from the pool"
        );
        let r = v["result"].as_str().unwrap().to_string();
        assert!(r.ends_with(", False, True, False)"), "{r}");
        let pid = common::kernel_pid(&id).expect("kernel process");
        assert!(!seen_pids.contains(&pid), "kernel {pid} reused");
        seen_pids.push(pid);
        s.exec(&id, "leak = 1").await;
        s.call("clear_session", json!({"session_id": id})).await;
    }

    // A pooled kernel that dies while waiting is discarded, not handed out.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while children_of(s.pid).is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pooled = children_of(s.pid);
    assert_eq!(pooled.len(), 1, "{pooled:?}");
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pooled[0]),
        nix::sys::signal::Signal::SIGKILL,
    );
    assert!(common::wait_gone(pooled[0], Duration::from_secs(10)).await);
    let (_, v) = s.new_session("40 + 2").await;
    assert_eq!(v["success"], true, "{v}");
    assert_eq!(v["result"], "42", "{v}");
    let text = v.to_string();
    assert!(
        !text.contains("KernelDied") && !text.contains("lost"),
        "{v}"
    );
    s.stop().await;
}

/// `--python PATH` runs kernels with an existing interpreter; one without
/// ipykernel is refused at start-up with a clear message.
#[tokio::test(flavor = "multi_thread")]
async fn python_flag_uses_an_existing_interpreter() {
    // Processes of local kernels.
    local_kernels_only!();
    let out = std::process::Command::new(common::BIN)
        .arg("--provision-only")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let python = stderr
        .lines()
        .find_map(|l| l.strip_prefix("kernel environment: "))
        .expect("provisioned python path")
        .to_string();
    let s = start(Transport::Stdio, &["--python", &python]).await;
    let (_, v) = s.new_session("import sys; sys.executable").await;
    assert_eq!(v["result"], format!("'{python}'"));
    s.stop().await;

    let bad = std::process::Command::new(common::BIN)
        .args(["--transport", "stdio", "--python", "/bin/false"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("cannot import ipykernel"));
    assert!(
        bad.stdout.is_empty(),
        "stdout must stay clean in stdio mode"
    );
}

/// A cell that prints far more than the limit returns head and tail, and the
/// full text is saved to a file listed in `files`.
#[tokio::test(flavor = "multi_thread")]
async fn huge_output_is_bounded_and_saved() {
    let s = start(Transport::Stdio, &["--max-output-chars", "2000"]).await;
    let (id, _) = s.new_session("n = 200_000").await;
    let v = s.exec(&id, "for i in range(n): print(f'line {i}')").await;
    assert_eq!(v["success"], true, "{v}");
    let out: Vec<String> = serde_json::from_value(v["output"].clone()).unwrap();
    let joined = out.concat();
    assert!(joined.len() < 4000, "{} bytes returned", joined.len());
    assert!(joined.starts_with("line 0\n"));
    assert!(joined.contains("line 199999\n"));
    assert!(joined.contains("omitted"));
    let (f, full) = spilled_output(&s, &id, &v);
    assert_eq!(full.lines().count(), 200_000);
    // Reported with its final size: the file was complete before the folder
    // was looked at (no "File updated" for it on the next call).
    assert_eq!(f["size"].as_u64().unwrap(), full.len() as u64);
    // tqdm-style progress collapses to its final state.
    let v = s
        .exec(&id, "import sys\nfor i in range(101): sys.stdout.write(f'\\r{i}%'); sys.stdout.flush()\nprint()")
        .await;
    assert_eq!(v["output"], json!(["100%\n"]));
    s.stop().await;
}

/// The `output_N.txt` a call listed in `files` (the full text of a long
/// output), and its content.
fn spilled_output(s: &Server, id: &str, v: &serde_json::Value) -> (serde_json::Value, String) {
    let f = v["files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"].as_str().unwrap().starts_with("output_"))
        .expect("full output file listed")
        .clone();
    let full =
        std::fs::read_to_string(s.session_folder(id).join(f["name"].as_str().unwrap())).unwrap();
    (f, full)
}

/// A cell that flushes every line (progress loops, training logs) gets its
/// output sent in batches: complete and in order in the output file, bounded
/// in the result with its last line intact; flushed stdout and stderr lines
/// keep their order, and `end='\r'` progress collapses across batches.
#[tokio::test(flavor = "multi_thread")]
async fn flushed_line_flood_arrives_whole_and_in_order() {
    let s = start(Transport::Stdio, &["--max-output-chars", "2000"]).await;
    let (id, _) = s.new_session("n = 100_000").await;
    let v = s
        .exec(&id, "for i in range(n): print(f'line {i}', flush=True)")
        .await;
    assert_eq!(v["success"], true, "{v}");
    let out: Vec<String> = serde_json::from_value(v["output"].clone()).unwrap();
    // The cell's text, then a line naming the output file.
    let joined: String = out
        .iter()
        .filter(|o| !o.starts_with("File created: "))
        .cloned()
        .collect();
    assert!(joined.len() < 4000, "{} bytes returned", joined.len());
    assert!(joined.starts_with("line 0\nline 1\n"), "{joined}");
    assert!(joined.ends_with("\nline 99998\nline 99999\n"), "{joined}");
    let (_, full) = spilled_output(&s, &id, &v);
    let expected: String = (0..100_000).map(|i| format!("line {i}\n")).collect();
    assert!(
        full == expected,
        "the output file is not every line in order"
    );

    let v = s
        .exec(
            &id,
            "import sys\nfor i in range(100):\n    print('o', i, flush=True)\n    \
             print('e', i, file=sys.stderr, flush=True)\nprint('end')",
        )
        .await;
    let out: Vec<String> = serde_json::from_value(v["output"].clone()).unwrap();
    let mut expected: Vec<String> = (0..100)
        .flat_map(|i| [format!("o {i}\n"), format!("e {i}\n")])
        .collect();
    expected.push("end\n".to_string());
    assert_eq!(out.concat(), expected.concat());
    assert_eq!(out, expected);

    let v = s
        .exec(
            &id,
            "for i in range(20_001): print(f'{i}%', end='\\r', flush=True)\nprint()",
        )
        .await;
    assert_eq!(v["output"], json!(["20000%\n"]), "{v}");

    // A forked child does not send again what the parent had printed.
    let v = s
        .exec(
            &id,
            "import multiprocessing as mp\nprint('parent', flush=True)\n\
             p = mp.get_context('fork').Process(target=print, args=('child',))\n\
             p.start(); p.join()",
        )
        .await;
    let out: Vec<String> = serde_json::from_value(v["output"].clone()).unwrap();
    assert_eq!(out.concat().matches("parent").count(), 1, "{v}");
    s.stop().await;
}

/// A call the client cancels interrupts the cell; the session keeps its state.
#[tokio::test(flavor = "multi_thread")]
async fn cancelled_call_interrupts_and_keeps_state() {
    use rmcp::model::{CallToolRequest, CallToolRequestParams, ClientRequest};
    use rmcp::service::PeerRequestOptions;
    for t in [Transport::Stdio, Transport::Http] {
        let s = start(t, &[]).await;
        let (id, _) = s.new_session("kept = 'yes'").await;
        let args = json!({"code": "open('started','w').close()\nimport time\ntime.sleep(120)", "session_id": id});
        let handle = s
            .client
            .send_cancellable_request(
                ClientRequest::CallToolRequest(CallToolRequest::new(
                    CallToolRequestParams::new("execute_code")
                        .with_arguments(args.as_object().cloned().unwrap()),
                )),
                PeerRequestOptions::no_options(),
            )
            .await
            .unwrap();
        let started = s.session_folder(&id).join("started");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while !started.exists() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(started.exists(), "cell never started");
        let t0 = std::time::Instant::now();
        handle
            .cancel(Some("user pressed stop".into()))
            .await
            .unwrap();
        let v = s.exec(&id, "kept").await;
        assert_eq!(v["result"], "'yes'", "{v}");
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "cancel did not interrupt ({:?})",
            t0.elapsed()
        );
        s.stop().await;
    }
}

#[derive(Clone)]
struct ProgressClient {
    tx: tokio::sync::mpsc::UnboundedSender<(
        std::time::Instant,
        rmcp::model::ProgressNotificationParam,
    )>,
}

impl rmcp::ClientHandler for ProgressClient {
    async fn on_progress(
        &self,
        p: rmcp::model::ProgressNotificationParam,
        _c: rmcp::service::NotificationContext<rmcp::RoleClient>,
    ) {
        let _ = self.tx.send((std::time::Instant::now(), p));
    }
}

/// A running cell sends progress (at most every 500 ms) with its newest output.
#[tokio::test(flavor = "multi_thread")]
async fn progress_notifications_carry_new_output() {
    use rmcp::ServiceExt;
    use rmcp::model::CallToolRequestParams;
    let data = tempfile::tempdir().unwrap();
    let mut cmd = tokio::process::Command::new(common::BIN);
    cmd.args(["--transport", "stdio", "--data-dir"])
        .arg(data.path());
    let proc = rmcp::transport::TokioChildProcess::new(cmd).unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let client = ProgressClient { tx }.serve(proc).await.unwrap();
    let args = json!({"code": "import time\nfor i in range(15):\n    print(f'step {i}', flush=True)\n    time.sleep(0.2)", "session_id": ""});
    let r = client
        .call_tool(
            CallToolRequestParams::new("execute_code")
                .with_arguments(args.as_object().cloned().unwrap()),
        )
        .await
        .unwrap();
    assert_eq!(r.structured_content.unwrap()["success"], true);
    let mut got = Vec::new();
    while let Ok(p) = rx.try_recv() {
        got.push(p);
    }
    assert!(got.len() >= 3, "only {} progress notifications", got.len());
    assert!(
        got.iter()
            .any(|(_, p)| p.message.as_deref().unwrap_or("").contains("step "))
    );
    for w in got.windows(2) {
        // `progress` is the server's elapsed time when it sent the update.
        assert!(
            w[1].1.progress - w[0].1.progress >= 0.45,
            "progress more often than every 500 ms"
        );
    }
    let _ = client.cancel().await;
}

/// Code that ignores the interrupt gets its kernel restarted after the grace
/// period; the result and the next call say so.
#[tokio::test(flavor = "multi_thread")]
async fn interrupt_that_does_not_take_restarts_the_kernel() {
    let s = start(Transport::Stdio, &["--interrupt-grace", "1"]).await;
    let (id, _) = s
        .new_session("v = 1\nopen('kept.txt','w').write('k')")
        .await;
    let t0 = std::time::Instant::now();
    let r = s
        .call(
            "execute_code",
            json!({"session_id": id, "timeout": 1,
                   "code": "import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nprint('stubborn', flush=True)\nwhile True: time.sleep(0.1)"}),
        )
        .await;
    assert!(t0.elapsed() < Duration::from_secs(10));
    let v = r.structured_content.unwrap();
    assert!(
        v["error"].as_str().unwrap().starts_with("TimeoutError:"),
        "{v}"
    );
    assert!(v["error"].as_str().unwrap().contains("restarted"), "{v}");
    assert_eq!(v["output"], json!(["stubborn\n"]));
    let v = s
        .exec(&id, "print(open('kept.txt').read()); 'v' in globals()")
        .await;
    assert_eq!(v["result"], "False", "{v}");
    assert!(
        v["output"][0].as_str().unwrap().contains("restarted"),
        "{v}"
    );
    s.stop().await;
}

/// A segfault and a kill from outside are reported as KernelDiedError, and
/// the session goes on in a fresh kernel with its files.
#[tokio::test(flavor = "multi_thread")]
async fn segfault_and_external_kill_are_kernel_deaths() {
    // Processes of local kernels.
    local_kernels_only!();
    let s = start(Transport::Stdio, &[]).await;
    let (id, _) = s.new_session("open('kept.txt','w').write('k')").await;
    let v = s.exec(&id, "import ctypes; ctypes.string_at(0)").await;
    assert!(
        v["error"].as_str().unwrap().starts_with("KernelDiedError:"),
        "{v}"
    );
    assert!(v["error"].as_str().unwrap().contains("SIGSEGV"), "{v}");

    let v = s.exec(&id, "1").await;
    assert!(v["output"][0].as_str().unwrap().contains("lost"), "{v}");
    let pid = common::kernel_pid(&id).expect("kernel process");
    let victim = {
        let s = &s;
        let id = id.clone();
        async move { s.exec(&id, "import time; time.sleep(30)").await }
    };
    let killer = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
    };
    let t0 = std::time::Instant::now();
    let (v, ()) = tokio::join!(victim, killer);
    assert!(t0.elapsed() < Duration::from_secs(10));
    assert!(
        v["error"].as_str().unwrap().starts_with("KernelDiedError:"),
        "{v}"
    );
    let v = s.exec(&id, "open('kept.txt').read()").await;
    assert_eq!(v["result"], "'k'", "{v}");
    s.stop().await;
}

/// Control characters, invalid UTF-8 and ANSI codes in output cannot break the JSON.
#[tokio::test(flavor = "multi_thread")]
async fn odd_bytes_in_output_stay_valid_json() {
    let s = start(Transport::Http, &[]).await;
    let (id, _) = s.new_session("import sys").await;
    let v = s
        .exec(
            &id,
            "print('nul\\x00 bell\\x07 esc\\x1b[31mred\\x1b[0m')\n!printf 'bad \\377\\376 bytes\\n'\n'\\x00\\udcff'",
        )
        .await;
    assert_eq!(v["success"], true, "{v}");
    let out = v["output"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o.as_str().unwrap())
        .collect::<String>();
    assert!(out.contains("nul\u{0} bell"), "{out:?}");
    assert!(out.contains("bad "), "{out:?}");
    assert!(v["result"].is_string());
    assert_eq!(s.exec(&id, "1+1").await["result"], "2");
    s.stop().await;
}

fn peak_rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// The server's memory stays bounded while a cell prints hundreds of MB,
/// in one write or in many; the full text still reaches the output file.
#[tokio::test(flavor = "multi_thread")]
async fn output_flood_keeps_server_memory_bounded() {
    let s = start(Transport::Stdio, &[]).await;
    let (id, _) = s.new_session("1").await;
    let v = s.exec(&id, "print('x' * 200_000_000)").await;
    assert_eq!(v["success"], true, "{}", v["error"]);
    // Every byte arrives, even while the server reads more slowly than the kernel writes.
    assert_eq!(v["files"][0]["size"], 200_000_001, "{}", v["files"]);
    let v = s
        .exec(&id, "for i in range(100_000): print('line', i, 'y' * 100)")
        .await;
    assert_eq!(v["success"], true);
    let peak = peak_rss_kb(s.pid);
    assert!(peak < 120_000, "server peak RSS {peak} kB while flooding");
    s.stop().await;
}

/// A cell longer than a typical client's patience, within its timeout, runs
/// to the end over HTTP (SSE keep-alives and progress keep the stream open).
#[tokio::test(flavor = "multi_thread")]
async fn long_cell_over_http_is_not_cut_short() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = start(Transport::Http, &[]).await;
    let (id, _) = s.new_session("import time").await;
    // A raw client that gives up when the server is silent for 12 s (like an
    // HTTP client's read timeout), running a 20 s cell: only the SSE
    // keep-alive pings keep it patient.
    let url = s.url.clone().unwrap();
    let rest = url.strip_prefix("http://").unwrap();
    let (authority, path) = rest.split_once('/').unwrap();
    let body = json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {
        "name": "execute_code",
        "arguments": {"session_id": id, "timeout": 120, "code": "time.sleep(20)\nprint('finished')"}
    }})
    .to_string();
    let req = format!(
        "POST /{path} HTTP/1.1\r\nHost: {authority}\r\nContent-Type: application/json\r\n\
         Accept: application/json, text/event-stream\r\nMCP-Protocol-Version: 2025-06-18\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut stream = tokio::net::TcpStream::connect(authority).await.unwrap();
    stream.write_all(req.as_bytes()).await.unwrap();
    let t0 = std::time::Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(12), stream.read(&mut buf))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "the server was silent for 12 s after {:?}: {}",
                    t0.elapsed(),
                    String::from_utf8_lossy(&got)
                )
            })
            .unwrap();
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
        if String::from_utf8_lossy(&got).contains(r#""id":7"#) {
            break;
        }
    }
    let text = String::from_utf8_lossy(&got);
    assert!(t0.elapsed() >= Duration::from_secs(19), "{text}");
    assert!(text.contains(r#"\"success\":true"#), "{text}");
    assert!(text.contains("finished"), "{text}");
    s.stop().await;
}

/// A kernel that stops answering altogether (SIGSTOP) is restarted after the
/// grace period; the caller gets a clear result and the session goes on.
#[tokio::test(flavor = "multi_thread")]
async fn frozen_kernel_is_restarted() {
    // Processes of local kernels.
    local_kernels_only!();
    let s = start(Transport::Stdio, &["--interrupt-grace", "1"]).await;
    let (id, _) = s.new_session("1").await;
    let pid = common::kernel_pid(&id).expect("kernel process");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGSTOP,
    )
    .unwrap();
    let t0 = std::time::Instant::now();
    let r = s
        .call(
            "execute_code",
            json!({"session_id": id, "timeout": 1, "code": "1"}),
        )
        .await;
    assert!(t0.elapsed() < Duration::from_secs(10));
    let v = r.structured_content.unwrap();
    assert!(
        v["error"].as_str().unwrap().starts_with("TimeoutError:"),
        "{v}"
    );
    assert!(v["error"].as_str().unwrap().contains("restarted"), "{v}");
    assert!(
        common::wait_gone(pid, Duration::from_secs(5)).await,
        "frozen kernel left running"
    );
    let v = s.exec(&id, "'alive'").await;
    assert_eq!(v["result"], "'alive'", "{v}");
    s.stop().await;
}

/// `clear_output` inside a cell drops what was shown before it.
#[tokio::test(flavor = "multi_thread")]
async fn clear_output_is_honoured() {
    let s = start(Transport::Stdio, &[]).await;
    let (id, _) = s
        .new_session("from IPython.display import clear_output")
        .await;
    let v = s
        .exec(
            &id,
            "for k in range(3):\n    clear_output(wait=True)\n    print('frame', k)\nprint('end')",
        )
        .await;
    assert_eq!(v["output"], json!(["frame 2\nend\n"]), "{v}");
    s.stop().await;
}

/// At the default log level, HTTP calls do not write a log line each (rmcp
/// logs every stateless request at info): the log stays readable.
#[tokio::test(flavor = "multi_thread")]
async fn http_calls_do_not_flood_the_log() {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let data = tempfile::tempdir().unwrap();
    let mut child = tokio::process::Command::new(common::BIN)
        .args(["--transport", "http", "--port", "0", "--pool-size", "0"])
        .arg("--data-dir")
        .arg(data.path())
        .env("LOG_LEVEL", "info")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let url = common::listening_url(&mut lines).await;
    let counted = tokio::spawn(async move {
        let mut n = Vec::new();
        while let Ok(Some(line)) = lines.next_line().await {
            n.push(line);
        }
        n
    });
    let client = common::connect_http(&url, None).await.unwrap();
    let r = common::call(
        &client,
        "execute_code",
        json!({"code": "1", "session_id": ""}),
    )
    .await;
    let id = r.structured_content.unwrap()["session_id"]
        .as_str()
        .unwrap()
        .to_string();
    for _ in 0..30 {
        common::call(
            &client,
            "execute_code",
            json!({"code": "x = 1", "session_id": id}),
        )
        .await;
    }
    drop(client);
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id().unwrap() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = tokio::time::timeout(Duration::from_secs(20), child.wait()).await;
    let logged = tokio::time::timeout(Duration::from_secs(5), counted)
        .await
        .unwrap()
        .unwrap();
    assert!(logged.len() < 15, "{} log lines: {logged:#?}", logged.len());
}

/// The image blocks of a result, decoded, with their sizes.
fn inline_images(r: &rmcp::model::CallToolResult) -> Vec<(String, Vec<u8>, (u32, u32))> {
    r.content
        .iter()
        .filter_map(|b| b.as_image())
        .map(|img| {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(&img.data)
                .unwrap();
            let size = image::ImageReader::new(std::io::Cursor::new(&bytes))
                .with_guessed_format()
                .unwrap()
                .into_dimensions()
                .unwrap();
            (img.mime_type.clone(), bytes, size)
        })
        .collect()
}

/// Each file in `files` has a resource_link with the same uri, name, type
/// and size, and no other block is a link.
fn assert_linked(r: &rmcp::model::CallToolResult) {
    let v = r.structured_content.as_ref().unwrap();
    let links: Vec<_> = r
        .content
        .iter()
        .filter_map(|b| b.as_resource_link())
        .collect();
    let files = v["files"].as_array().unwrap();
    assert_eq!(links.len(), files.len(), "{:?}", r.content);
    for (f, l) in files.iter().zip(links) {
        assert_eq!(l.uri, f["uri"].as_str().unwrap());
        assert_eq!(l.name, f["name"].as_str().unwrap());
        assert_eq!(l.mime_type.as_deref(), f["mime_type"].as_str());
        assert_eq!(l.size, f["size"].as_u64());
    }
}

/// Figures inline within the budget, resource links, Markdown and HTML
/// displays, and the notebook export.
#[tokio::test(flavor = "multi_thread")]
async fn rich_results_images_links_displays_and_notebook() {
    let s = start(Transport::Http, &["--inline-image-max-side", "800"]).await;
    let exec = |id: &str, code: &str| {
        s.call(
            "execute_code",
            json!({"code": code, "session_id": id.to_string()}),
        )
    };
    let r = exec(
        "",
        "import matplotlib.pyplot as plt\nplt.figure(figsize=(20, 10), dpi=100)\n\
         plt.plot([1, 2, 3])\nplt.savefig('wide.png')\nplt.show()",
    )
    .await;
    let v = r.structured_content.clone().unwrap();
    assert_eq!(v["success"], true, "{v:#}");
    let id = v["session_id"].as_str().unwrap().to_string();
    let images = inline_images(&r);
    assert_eq!(images.len(), 2, "{v:#}");
    for (mime, bytes, (w, h)) in &images {
        assert_eq!(mime, "image/png");
        assert!(bytes.starts_with(PNG));
        assert!(*w <= 800 && *h <= 800 && w * h <= 1_150_000, "{w}x{h}");
        assert!(*w >= 700, "{w}x{h}");
    }
    let on_disk = std::fs::read(s.session_folder(&id).join("wide.png")).unwrap();
    let (w, _) = image::ImageReader::new(std::io::Cursor::new(&on_disk))
        .with_guessed_format()
        .unwrap()
        .into_dimensions()
        .unwrap();
    assert_eq!(w, 2000);
    assert_linked(&r);

    let r = exec(
        &id,
        "from IPython.display import display, Markdown, HTML\ndisplay(Markdown('**bold**'))\n\
         HTML('<p>hello <b>world</b></p>')",
    )
    .await;
    let v = r.structured_content.clone().unwrap();
    assert_eq!(
        v["output"],
        json!([
            "**bold**",
            "[HTML output saved as display_1.html]",
            "File created: display_1.html (text/html, 25 bytes)"
        ]),
        "{v:#}"
    );
    assert_eq!(v["result"], "hello world");
    assert_eq!(v["files"][0]["name"], "display_1.html");
    assert_linked(&r);
    let (html, mime) = text_of(
        &s.read(v["files"][0]["uri"].as_str().unwrap())
            .await
            .unwrap(),
    );
    assert_eq!(html, "<p>hello <b>world</b></p>");
    assert_eq!(mime.as_deref(), Some("text/html"));

    // A styled pandas table (jinja2 is in the kernel environment) is HTML
    // only: saved as a file, its text in the result, not `<Styler object>`.
    let r = exec(
        &id,
        "import pandas as pd\npd.DataFrame({'city': ['Oslo'], 'sales': [3]}).style.highlight_max()",
    )
    .await;
    let v = r.structured_content.clone().unwrap();
    assert_eq!(v["success"], true, "{v:#}");
    assert_eq!(v["files"][0]["name"], "display_2.html", "{v:#}");
    let result = v["result"].as_str().unwrap();
    assert!(
        result.contains("Oslo") && !result.contains("object"),
        "{v:#}"
    );

    let r = exec(&id, "print('before'); 1/0").await;
    assert_eq!(r.is_error, Some(true));

    let r = s
        .call("export_notebook", json!({"session_id": id, "name": "run"}))
        .await;
    let v = r.structured_content.clone().unwrap();
    assert_eq!(v["success"], true, "{v:#}");
    assert_eq!(v["cells"], 4);
    assert_eq!(v["file"]["name"], "run.ipynb");
    assert_eq!(v["file"]["mime_type"], "application/x-ipynb+json");
    let link = r.content.iter().find_map(|b| b.as_resource_link()).unwrap();
    assert_eq!(link.uri, v["file"]["uri"].as_str().unwrap());
    let (text, _) = text_of(&s.read(&link.uri).await.unwrap());
    let nb: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        (nb["nbformat"].as_u64(), nb["nbformat_minor"].as_u64()),
        (Some(4), Some(5))
    );
    let cells = nb["cells"].as_array().unwrap();
    assert_eq!(cells.len(), 4);
    let kinds = |i: usize| -> Vec<String> {
        cells[i]["outputs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o["output_type"].as_str().unwrap().to_string())
            .collect()
    };
    assert!(
        cells[0]["outputs"][0]["data"]["image/png"].is_string(),
        "{}",
        cells[0]
    );
    assert_eq!(kinds(1), ["display_data", "execute_result"]);
    assert_eq!(kinds(2), ["execute_result"]);
    assert_eq!(kinds(3), ["stream", "error"]);
    assert_eq!(cells[3]["outputs"][1]["ename"], "ZeroDivisionError");

    // The name is taken now; a bad name is a protocol error.
    let r = s
        .call(
            "export_notebook",
            json!({"session_id": id, "name": "run.ipynb"}),
        )
        .await;
    assert_eq!(r.is_error, Some(true));
    let msg = r.structured_content.unwrap()["message"].clone();
    assert!(
        msg.as_str().unwrap().starts_with("FileExistsError:"),
        "{msg}"
    );
    let err = s
        .client
        .call_tool(
            rmcp::model::CallToolRequestParams::new("export_notebook").with_arguments(
                json!({"session_id": id, "name": "../x"})
                    .as_object()
                    .cloned()
                    .unwrap(),
            ),
        )
        .await
        .expect_err("a path accepted as a notebook name");
    assert!(err.to_string().contains("-32602"), "{err}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn inline_images_can_be_turned_off() {
    let s = start(Transport::Stdio, &["--inline-images", "0"]).await;
    let r = s
        .call(
            "execute_code",
            json!({"code": "import matplotlib.pyplot as plt\nplt.plot([1, 2])\nplt.show()", "session_id": ""}),
        )
        .await;
    assert!(inline_images(&r).is_empty());
    assert_eq!(
        r.structured_content.as_ref().unwrap()["files"][0]["name"],
        "figure_1.png"
    );
    assert_linked(&r);
    s.stop().await;
}
