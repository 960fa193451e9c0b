//! Sessions outlive the server: after SIGKILL or SIGTERM a new server on the
//! same data folder adopts them (same id, files intact, variables replayed
//! without touching a file), removes what a crash left behind, and never
//! trusts a record it cannot validate.

mod common;

use std::time::Duration;

use common::{Server, Transport, kernel_pid, start, start_with_token};
use nix::sys::signal::Signal;
use serde_json::json;

/// Session folders in the data folder (not `.records`).
fn folders(data: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(data)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| !n.starts_with('.'))
        .collect()
}

fn is_expired(v: &serde_json::Value) -> bool {
    v["error"]
        .as_str()
        .is_some_and(|e| e.starts_with("SessionExpiredError"))
}

fn output(v: &serde_json::Value) -> String {
    v["output"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str())
                .collect::<Vec<_>>()
                .join("")
        })
        .unwrap_or_default()
}

/// Builds some state: variables over three cells, a file written by cell 1
/// and rewritten by cell 3, a failing cell (not replayed).
async fn work(s: &Server) -> String {
    let (id, _) = s
        .new_session("x = 41\nopen('data.csv', 'w').write('v1')")
        .await;
    assert_eq!(s.exec(&id, "y = x + 1").await["success"], true);
    let v = s
        .exec(&id, "open('data.csv', 'w').write('v3'); import os; os.makedirs('out', exist_ok=True); open('out/r.txt','w').write('r')")
        .await;
    assert_eq!(v["success"], true, "{v}");
    assert_eq!(s.exec(&id, "z = 1/0").await["success"], false);
    id
}

async fn check_restored(s: &Server, id: &str) {
    // Dormant: listing and reading need no kernel.
    let v = s
        .call("list_session_files", json!({"session_id": id}))
        .await;
    let files = v.structured_content.unwrap()["files"].to_string();
    assert!(
        files.contains("data.csv") && files.contains("out/r.txt"),
        "{files}"
    );
    assert!(
        kernel_pid(id).is_none(),
        "a dormant session started a kernel"
    );
    let v = s
        .exec(id, "(x, y, 'z' in dir(), open('data.csv').read())")
        .await;
    assert_eq!(v["success"], true, "{v}");
    assert_eq!(v["result"], "(41, 42, False, 'v3')", "{v}");
    let out = output(&v);
    assert!(out.contains("server restarted"), "{out}");
    assert!(out.contains("replaying 3 of its 3"), "{out}");
    // Replay wrote to a scratch copy: the folder is as it was.
    let root = s.data_dir.path().join(id);
    assert_eq!(
        std::fs::read_to_string(root.join("data.csv")).unwrap(),
        "v3"
    );
    assert_eq!(
        std::fs::read_to_string(root.join("out/r.txt")).unwrap(),
        "r"
    );
    // A second call is an ordinary one.
    let v = s.exec(id, "x").await;
    assert!(!output(&v).contains("restarted"), "{v}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sessions_survive_sigkill_and_sigterm() {
    let s = start(Transport::Http, &[]).await;
    let id = work(&s).await;
    let old_pid = s.pid;
    let s = s.restart(Signal::SIGKILL, &[], None).await;
    check_restored(&s, &id).await;
    // Nothing of the killed server is left: no runtime folder, no kernel.
    let leftovers: Vec<String> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(&format!("mcp-python-interpreter-{old_pid}-")))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    let id2 = work(&s).await;
    let s = s.restart(Signal::SIGTERM, &[], None).await;
    check_restored(&s, &id2).await;
    // The first session, used after the first restart, survives again.
    let v = s.exec(&id, "x").await;
    assert_eq!(v["result"], "41", "{v}");
    s.stop().await;
}

/// Files-only restore, pooled sessions and expiry across a restart.
#[tokio::test(flavor = "multi_thread")]
async fn restarts_remove_pooled_and_expired_sessions() {
    let s = start(Transport::Http, &["--pool-size", "2"]).await;
    let (kept, _) = s.new_session("a = 1; open('f.txt','w').write('f')").await;
    let (expired, _) = s.new_session("b = 2").await;
    // Wait (bounded) for the pool to be full again: 2 sessions + 2 pooled folders.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while folders(s.data_dir.path()).len() < 4 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        folders(s.data_dir.path()).len(),
        4,
        "{:?}",
        folders(s.data_dir.path())
    );
    // The server is killed; meanwhile `expired` passes its idle timeout
    // (its record says it was last used long ago).
    let record = s
        .data_dir
        .path()
        .join(".records")
        .join(format!("{expired}.json"));
    let mut s = s;
    let mut child = s.http.take().unwrap();
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(s.pid as i32), Signal::SIGKILL);
    child.wait().await.unwrap();
    let mut r: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&record).unwrap()).unwrap();
    r["last_used"] = json!(1);
    std::fs::write(&record, serde_json::to_vec(&r).unwrap()).unwrap();
    // Calls mark a session used by touching its record: back-date that too.
    std::fs::File::options()
        .write(true)
        .open(&record)
        .unwrap()
        .set_modified(std::time::UNIX_EPOCH + Duration::from_secs(1))
        .unwrap();
    s.http = Some(child);
    let s = s
        .restart(
            Signal::SIGKILL,
            &["--pool-size", "0", "--restore", "files"],
            None,
        )
        .await;
    assert_eq!(
        folders(s.data_dir.path()),
        vec![kept.clone()],
        "pooled or expired folders left"
    );
    let v = s.exec(&expired, "b").await;
    assert!(is_expired(&v), "{v}");
    let v = s.exec(&kept, "open('f.txt').read()").await;
    assert_eq!(v["result"], "'f'", "{v}");
    assert!(output(&v).contains("files only"), "{v}");
    let v = s.exec(&kept, "a").await;
    assert!(v["error"].as_str().unwrap().starts_with("NameError"), "{v}");
    // clear_session of an adopted session removes folder and record.
    s.call("clear_session", json!({"session_id": kept})).await;
    assert!(!s.data_dir.path().join(&kept).exists());
    assert!(
        !s.data_dir
            .path()
            .join(".records")
            .join(format!("{kept}.json"))
            .exists()
    );
    s.stop().await;
}

/// Records that do not validate are ignored and delete nothing; a session
/// keeps its owner across a restart.
#[tokio::test(flavor = "multi_thread")]
async fn tampered_records_are_ignored_and_owners_kept() {
    const ALICE: &str = "alice-token-0123456789abcdef";
    const BOB: &str = "bob-token-0123456789abcdef0";
    let tokens_dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let tokens = tokens_dir.path().join("tokens");
    std::fs::write(&tokens, format!("alice {ALICE}\nbob {BOB}\n")).unwrap();
    let tokens = tokens.display().to_string();
    let flags = ["--tokens-file", tokens.as_str()];
    let s = start_with_token(Transport::Http, &flags, Some(ALICE)).await;
    let (id, _) = s.new_session("secret = 7").await;

    let data = s.data_dir.path().to_path_buf();
    let records = data.join(".records");
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("keep.txt"), "keep").unwrap();
    std::fs::create_dir(data.join("decoy")).unwrap();
    let base: serde_json::Value =
        serde_json::from_slice(&std::fs::read(records.join(format!("{id}.json"))).unwrap())
            .unwrap();
    let evil_id = format!("../../{}", outside.path().display());
    for (file, id_field, pooled) in [
        ("garbage.json", None, false),
        ("AAAAAAAAAAAAAAAAAAAAAA.json", Some(evil_id.as_str()), true),
        ("decoy.json", Some("decoy"), true),
        (
            "BBBBBBBBBBBBBBBBBBBBBB.json",
            Some("CCCCCCCCCCCCCCCCCCCCCC"),
            true,
        ),
    ] {
        let body = match id_field {
            None => b"{ not json".to_vec(),
            Some(i) => {
                let mut r = base.clone();
                r["id"] = json!(i);
                r["pooled"] = json!(pooled);
                serde_json::to_vec(&r).unwrap()
            }
        };
        std::fs::write(records.join(file), body).unwrap();
    }
    let s = s.restart(Signal::SIGTERM, &flags, Some(ALICE)).await;
    assert!(outside.path().join("keep.txt").exists());
    assert!(data.join("decoy").is_dir());
    assert!(records.join("garbage.json").exists());
    let v = s.exec(&id, "secret").await;
    assert_eq!(v["result"], "7", "{v}");

    // Bob cannot see Alice's session after the restart either.
    let bob = common::connect_http(s.url.as_deref().unwrap(), Some(BOB))
        .await
        .unwrap();
    let r = common::call(
        &bob,
        "execute_code",
        json!({"code": "secret", "session_id": id}),
    )
    .await;
    let v = r.structured_content.unwrap();
    assert!(is_expired(&v), "{v}");
    let _ = bob.cancel().await;
    s.stop().await;
}

/// `--ephemeral`: a shutdown throws sessions away (folder and record), as
/// before sessions were durable.
#[tokio::test(flavor = "multi_thread")]
async fn ephemeral_servers_delete_sessions_at_shutdown() {
    let s = start(Transport::Http, &["--ephemeral", "--pool-size", "1"]).await;
    let (id, _) = s.new_session("open('f.txt','w').write('f')").await;
    let data = s.data_dir.path().to_path_buf();
    assert!(data.join(&id).join("f.txt").exists());
    let s = s
        .restart(Signal::SIGTERM, &["--ephemeral", "--pool-size", "0"], None)
        .await;
    let left = folders(&data);
    assert!(left.is_empty(), "{left:?}");
    assert!(
        !data.join(".records").exists(),
        "records kept by an ephemeral server"
    );
    let v = s.exec(&id, "1").await;
    assert!(is_expired(&v), "{v}");
    s.stop().await;
}
