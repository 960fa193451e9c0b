//! `upload_file` and `path` completions, through rmcp's client against the
//! real binary: files land byte for byte where the kernel reads them,
//! hostile paths and planted symlinks write nothing outside the session,
//! the quota holds, and an upload waits for a running cell.

mod common;

use std::time::Duration;

use base64::Engine;
use common::{Server, Transport, connect_http, start, start_boxed, start_with_token};
use rmcp::model::{CallToolRequestParams, CompletionContext, ResourceContents};
use serde_json::{Value, json};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;
const TEMPLATE: &str = "kernel://{session_id}/{path}";

/// Calls `upload_file`; returns (isError, structured result).
async fn upload(s: &Server, args: Value) -> (bool, Value) {
    let r = s.call("upload_file", args).await;
    (r.is_error == Some(true), r.structured_content.unwrap())
}

fn err(v: &Value) -> String {
    v["error"].as_str().unwrap_or("").to_string()
}

/// Text and binary uploads, a new session made by an upload, overwrite,
/// and what the kernel, resources and later calls see.
async fn upload_scenario(t: Transport) {
    let s = start(t, &[]).await;
    let text = "name,price\nbread,2.5\ncafé,3\n";
    let (failed, v) = upload(
        &s,
        json!({"session_id": "", "path": "data/prices.csv", "content": text}),
    )
    .await;
    assert!(!failed, "{v}");
    let id = v["session_id"].as_str().unwrap().to_string();
    assert_eq!(v["success"], true);
    assert_eq!(v["path"], "data/prices.csv");
    assert_eq!(v["replaced"], false);
    assert_eq!(
        v["file"],
        json!({"uri": format!("kernel://{id}/data/prices.csv"), "mime_type": "text/csv",
               "name": "data/prices.csv", "size": text.len()})
    );
    assert!(
        v["session_info"]["instructions"]
            .as_str()
            .unwrap()
            .contains(&id)
    );

    let binary: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    let (failed, v) = upload(
        &s,
        json!({"session_id": id, "path": "blob.bin", "content_base64": B64.encode(&binary)}),
    )
    .await;
    assert!(!failed, "{v}");
    assert_eq!(v["session_info"], Value::Null);
    assert_eq!(v["file"]["mime_type"], "application/octet-stream");
    assert_eq!(v["file"]["size"], binary.len());

    // The kernel reads both byte for byte, by the returned paths.
    let v = s
        .exec(
            &id,
            "import hashlib, json, pandas as pd\n\
             df = pd.read_csv('data/prices.csv')\n\
             print(json.dumps([list(df['name']), open('data/prices.csv', encoding='utf-8').read(), \
                               hashlib.sha256(open('blob.bin','rb').read()).hexdigest()]))",
        )
        .await;
    assert_eq!(v["success"], true, "{v}");
    let sha = {
        use sha2::Digest;
        format!("{:x}", sha2::Sha256::digest(&binary))
    };
    let seen: Value = serde_json::from_str(v["output"][0].as_str().unwrap()).unwrap();
    assert_eq!(seen, json!([["bread", "café"], text, sha]));
    // Uploads are not reported as files the code created.
    assert_eq!(v["files"], json!([]), "{v}");

    // Resources serve the same bytes.
    let ResourceContents::BlobResourceContents { blob, .. } =
        s.read(&format!("kernel://{id}/blob.bin")).await.unwrap()
    else {
        panic!("blob.bin is not a blob");
    };
    assert_eq!(B64.decode(blob).unwrap(), binary);

    // An existing file is replaced only when asked.
    let args = |overwrite: bool| json!({"session_id": id, "path": "data/prices.csv", "content": "new", "overwrite": overwrite});
    let (failed, v) = upload(&s, args(false)).await;
    assert!(failed && err(&v).starts_with("FileExistsError:"), "{v}");
    assert_eq!(v["success"], false);
    let (failed, v) = upload(&s, args(true)).await;
    assert!(!failed, "{v}");
    assert_eq!(v["replaced"], true);
    let v = s.exec(&id, "open('data/prices.csv').read()").await;
    assert_eq!(v["result"], "'new'");

    // Folders are not replaced; a file is not a folder.
    let (failed, v) = upload(
        &s,
        json!({"session_id": id, "path": "data", "content": "x", "overwrite": true}),
    )
    .await;
    assert!(failed && err(&v).starts_with("IsADirectoryError:"), "{v}");
    let (failed, v) = upload(
        &s,
        json!({"session_id": id, "path": "blob.bin/x", "content": "x"}),
    )
    .await;
    assert!(failed && err(&v).starts_with("NotADirectoryError:"), "{v}");

    // Unknown and malformed ids read like everywhere else; no folder appears.
    for bad in ["AAAAAAAAAAAAAAAAAAAAAA", "../x", "/etc"] {
        let (failed, v) = upload(
            &s,
            json!({"session_id": bad, "path": "a.txt", "content": "x"}),
        )
        .await;
        assert!(failed && err(&v).starts_with("SessionExpiredError:"), "{v}");
        assert_eq!(v["session_id"], "");
    }
    assert!(!s.data_dir.path().join("AAAAAAAAAAAAAAAAAAAAAA").exists());
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn upload_over_stdio() {
    upload_scenario(Transport::Stdio).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn upload_over_http() {
    upload_scenario(Transport::Http).await;
}

/// Hostile paths and symlinks the kernel plants: refused, with nothing
/// written outside the session (boxed: a failed defence harms nothing).
#[tokio::test(flavor = "multi_thread")]
async fn hostile_upload_paths_write_nothing_outside() {
    let s = start_boxed(Transport::Stdio, &[], None).await;
    let outside = s.data_dir.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("target.txt"), "untouched").unwrap();
    let (id, _) = s
        .new_session(&format!(
            "import os\n\
             os.symlink({t:?}, 'link.txt')\n\
             os.symlink({n:?}, 'dangling.txt')\n\
             os.symlink({o:?}, 'out')\n\
             os.makedirs('sub')\n\
             os.symlink('..', 'sub/up')",
            t = outside.join("target.txt").display().to_string(),
            n = outside.join("new.txt").display().to_string(),
            o = outside.display().to_string(),
        ))
        .await;
    for path in [
        "../x",
        "/etc/x",
        "a/../../x",
        "%2e%2e/x",
        "%2Fetc%2Fx",
        "x%00y",
        "",
        "link.txt",
        "dangling.txt",
        "out/target.txt",
        "out/new.txt",
        "out/deeper/new.txt",
        "sub/up/x",
    ] {
        for overwrite in [false, true] {
            let (failed, v) = upload(
                &s,
                json!({"session_id": id, "path": path, "content": "pwned", "overwrite": overwrite}),
            )
            .await;
            assert!(
                failed && err(&v).starts_with("InvalidPathError:"),
                "{path:?}: {v}"
            );
        }
    }
    assert_eq!(
        std::fs::read_to_string(outside.join("target.txt")).unwrap(),
        "untouched"
    );
    let mut left: Vec<String> = std::fs::read_dir(&outside)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["target.txt"]);
    assert!(!s.data_dir.path().join("x").exists());
    assert!(!std::path::Path::new("/etc/x").exists());
    // The symlinks are still symlinks, not replaced by files.
    let folder = s.data_dir.path().join(&id);
    for link in ["link.txt", "dangling.txt", "out", "sub/up"] {
        assert!(
            std::fs::symlink_metadata(folder.join(link))
                .unwrap()
                .is_symlink(),
            "{link}"
        );
    }
    s.stop().await;
}

/// The quota counts what is there; a refused upload leaves nothing, and
/// an over-large one is refused before any session is made.
#[tokio::test(flavor = "multi_thread")]
async fn uploads_stay_within_the_quota_and_size_limit() {
    let s = start(Transport::Stdio, &["--max-session-bytes", "1000"]).await;
    let (id, _) = s.new_session("open('mine.txt','w').write('m' * 300)").await;
    let up =
        |path: &str, n: usize| json!({"session_id": id, "path": path, "content": "u".repeat(n)});
    let (failed, v) = upload(&s, up("a.txt", 600)).await;
    assert!(!failed, "{v}");
    let (failed, v) = upload(&s, up("more/b.txt", 200)).await;
    assert!(failed, "{v}");
    assert!(
        err(&v).starts_with("DiskQuotaError: the session folder holds 900 bytes"),
        "{v}"
    );
    let folder = s.data_dir.path().join(&id);
    assert!(!folder.join("more").exists());
    assert!(!folder.join("b.txt").exists());
    let v = s.exec(&id, "import os; sorted(os.listdir('.'))").await;
    assert_eq!(v["result"], "['a.txt', 'mine.txt']");

    // 12 MiB and one byte: refused with the limit and the alternatives.
    let (failed, v) = upload(
        &s,
        json!({"session_id": "", "path": "big.txt", "content": "b".repeat((12 << 20) + 1)}),
    )
    .await;
    assert!(failed, "{v}");
    assert!(err(&v).starts_with("FileTooLargeError:"), "{v}");
    assert!(err(&v).contains("--mount"), "{v}");
    assert_eq!(v["session_id"], "");
    s.stop().await;
}

/// Both or neither content, bad base64, a missing path: invalid_params.
#[tokio::test(flavor = "multi_thread")]
async fn malformed_upload_arguments_are_invalid_params() {
    let s = start(Transport::Stdio, &[]).await;
    for args in [
        json!({"session_id": "", "path": "a.txt"}),
        json!({"session_id": "", "path": "a.txt", "content": "a", "content_base64": "YQ=="}),
        json!({"session_id": "", "path": "a.txt", "content_base64": "%%%"}),
        json!({"session_id": "", "content": "a"}),
        json!({"session_id": "", "path": 5, "content": "a"}),
        json!({"session_id": "", "path": "a.txt", "content": "a", "overwrite": "yes"}),
    ] {
        let err = s
            .client
            .call_tool(
                CallToolRequestParams::new("upload_file")
                    .with_arguments(args.as_object().cloned().unwrap()),
            )
            .await
            .expect_err("malformed arguments accepted");
        assert!(err.to_string().contains("-32602"), "{args}: {err}");
    }
    s.stop().await;
}

/// An upload to a session running a cell waits for the cell (the session's
/// FIFO), so the cell never sees the file change under it.
#[tokio::test(flavor = "multi_thread")]
async fn an_upload_waits_for_the_running_cell() {
    let s = std::sync::Arc::new(start(Transport::Http, &[]).await);
    let (id, _) = s.new_session("import time").await;
    let folder = s.data_dir.path().join(&id);
    let cell = {
        let (s, id) = (s.clone(), id.clone());
        tokio::spawn(async move {
            s.exec(
                &id,
                "open('started','w').close()\ntime.sleep(1.5)\nopen('f.txt','w').write('cell')",
            )
            .await
        })
    };
    tokio::time::timeout(Duration::from_secs(60), async {
        while !folder.join("started").exists() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the cell did not start");
    let (failed, v) = upload(
        &s,
        json!({"session_id": id, "path": "f.txt", "content": "upload", "overwrite": true}),
    )
    .await;
    assert!(!failed, "{v}");
    // Had it not waited, f.txt would not have existed yet.
    assert_eq!(v["replaced"], true, "{v}");
    assert!(cell.await.unwrap()["success"] == true);
    assert_eq!(
        std::fs::read_to_string(folder.join("f.txt")).unwrap(),
        "upload"
    );
    std::sync::Arc::into_inner(s).unwrap().stop().await;
}

fn context(session_id: &str) -> Option<CompletionContext> {
    Some(CompletionContext::with_arguments(
        [("session_id".to_string(), session_id.to_string())].into(),
    ))
}

/// `path` completes from the caller's session only; session ids are never
/// completed; another principal's session completes to nothing.
#[tokio::test(flavor = "multi_thread")]
async fn completions_list_only_the_callers_files() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let tokens = dir.path().join("tokens");
    let (alice, bob) = ("alice-token-0123456789", "bob-token-0123456789ab");
    std::fs::write(&tokens, format!("alice {alice}\nbob {bob}\n")).unwrap();
    let s = start_with_token(
        Transport::Http,
        &["--tokens-file", tokens.to_str().unwrap()],
        Some(alice),
    )
    .await;
    let a = &s.client;
    let b = connect_http(s.url.as_deref().unwrap(), Some(bob))
        .await
        .unwrap();
    let v = common::call(
        a,
        "execute_code",
        json!({"session_id": "", "code":
            "import os\nos.makedirs('sub')\n\
             for n in ['a.csv', 'ab.csv', 'sub/c.csv', 'my file.txt']: open(n,'w').write('x')\n\
             for i in range(150): open(f'many_{i:03}.txt','w').write('x')"}),
    )
    .await
    .structured_content
    .unwrap();
    assert_eq!(v["success"], true, "{v}");
    let id = v["session_id"].as_str().unwrap().to_string();

    let complete = |client: &common::Client, arg: &str, value: &str, ctx| {
        let peer = client.peer().clone();
        let (arg, value) = (arg.to_string(), value.to_string());
        async move {
            peer.complete_resource_argument(TEMPLATE, arg, value, ctx)
                .await
                .unwrap()
        }
    };
    let c = complete(a, "path", "a", context(&id)).await;
    assert_eq!(c.values, ["a.csv", "ab.csv"]);
    assert_eq!((c.total, c.has_more), (Some(2), Some(false)));
    assert_eq!(
        complete(a, "path", "sub/", context(&id)).await.values,
        ["sub/c.csv"]
    );
    assert_eq!(
        complete(a, "path", "my%20", context(&id)).await.values,
        ["my file.txt"]
    );
    let c = complete(a, "path", "", context(&id)).await;
    assert_eq!(c.values.len(), 100);
    assert_eq!((c.total, c.has_more), (Some(154), Some(true)));
    let c = complete(a, "path", "many_14", context(&id)).await;
    assert_eq!(c.values.len(), 10);
    // Nothing for bob, an unknown session, no session, or session ids.
    for c in [
        complete(&b, "path", "", context(&id)).await,
        complete(a, "path", "", context("AAAAAAAAAAAAAAAAAAAAAA")).await,
        complete(a, "path", "", None).await,
        complete(a, "session_id", "", None).await,
        complete(a, "session_id", &id[..3], None).await,
    ] {
        assert!(c.values.is_empty(), "{c:?}");
    }
    // Completions are declared; an unknown template is invalid_params.
    let info = a.peer().peer_info().unwrap();
    assert!(info.capabilities.completions.is_some());
    let e = a
        .peer()
        .complete_resource_argument("file:///{path}", "path", "", None)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("-32602"), "{e}");
    let _ = b.cancel().await;
    s.stop().await;
}
