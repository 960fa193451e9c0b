//! A snapshot of `tools/list`, so interface changes are deliberate.
//! After an intended change: `UPDATE_SNAPSHOTS=1 cargo test --test tools_list`.

mod common;

use common::{Transport, start};

#[tokio::test(flavor = "multi_thread")]
async fn tools_list_matches_snapshot() {
    let s = start(Transport::Stdio, &[]).await;
    let mut tools = s.client.list_all_tools().await.unwrap();
    tools.sort_by(|a, b| a.name.cmp(&b.name));
    let actual = serde_json::to_string_pretty(&tools).unwrap() + "\n";
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/snapshots/tools_list.json");
    if std::env::var_os("UPDATE_SNAPSHOTS").is_some() {
        std::fs::write(&path, &actual).unwrap();
    }
    let expected =
        std::fs::read_to_string(&path).expect("snapshot missing: run with UPDATE_SNAPSHOTS=1");
    assert_eq!(
        actual, expected,
        "tools/list changed; if intended, run with UPDATE_SNAPSHOTS=1"
    );
    let names: Vec<&str> = tools.iter().map(|t| t.name.as_ref()).collect();
    assert_eq!(
        names,
        [
            "clear_session",
            "execute_code",
            "export_notebook",
            "list_session_files",
            "upload_file"
        ]
    );
    assert!(tools.iter().all(|t| t.output_schema.is_some()));
    // Self-contained schemas: some clients cannot resolve `$ref`.
    assert!(!actual.contains("$ref") && !actual.contains("$defs"));
    // No Rust-specific formats (uint64, double) that validators warn about.
    assert!(!actual.contains("\"format\""));
    s.stop().await;
}
