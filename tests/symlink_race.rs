//! Symlink races against the real server (issue 9): a kernel keeps swapping
//! names in its folder between real files or folders and symlinks leading
//! out, while the client reads, lists, and makes the server write. Nothing
//! outside the session folder may be read, listed, written or deleted.
//!
//! The server runs boxed (bubblewrap, only its data folder writable); the
//! "outside" files live in the data folder next to the session folders,
//! where the server could reach them but the kernel (Landlock) cannot.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{Server, Transport, start_boxed};
use rmcp::model::ResourceContents;
use serde_json::json;

const SECRET: &str = "OUTSIDE-SECRET";
/// A file name that exists only outside the session folder.
const SECRET_NAME: &str = "secret-name-7f3a.txt";

fn text(c: &ResourceContents) -> String {
    match c {
        ResourceContents::TextResourceContents { text, .. } => text.clone(),
        other => panic!("expected text, got {other:?}"),
    }
}

fn names(files: &serde_json::Value) -> Vec<String> {
    files
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap().to_string())
        .collect()
}

async fn list(s: &Server, id: &str) -> Vec<String> {
    let l = s
        .call("list_session_files", json!({"session_id": id}))
        .await;
    names(&l.structured_content.unwrap()["files"])
}

/// A folder outside every session, holding `f.txt` (the secret) and a file
/// whose name must never be listed.
fn outside_dir(s: &Server) -> std::path::PathBuf {
    let out = s.data_dir.path().join("outside");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("f.txt"), SECRET).unwrap();
    std::fs::write(out.join(SECRET_NAME), SECRET).unwrap();
    out
}

/// Python that starts a thread swapping, with `renameat2(RENAME_EXCHANGE)`,
/// `f.txt` (a file) with a symlink to the outside `f.txt`, and the folder
/// `d` (holding `f.txt` and `inside.txt`) with a symlink to the outside
/// folder, as fast as it can until `stop` is set.
fn swapper(outside: &Path) -> String {
    let out = outside.display();
    format!(
        r#"import ctypes, os, threading
libc = ctypes.CDLL(None, use_errno=True)
def exchange(a, b):
    if libc.renameat2(-100, a, -100, b, 2) != 0:
        raise OSError(ctypes.get_errno(), 'renameat2')
open('f.txt', 'w').write('inside')
os.makedirs('d', exist_ok=True)
open('d/f.txt', 'w').write('inside')
open('d/inside.txt', 'w').write('inside')
os.symlink('{out}/f.txt', 'f.alt')
os.symlink('{out}', 'd.alt')
stop = threading.Event()
swaps = 0
def swap():
    global swaps
    while not stop.is_set():
        exchange(b'f.txt', b'f.alt')
        exchange(b'd', b'd.alt')
        swaps += 1
t = threading.Thread(target=swap, daemon=True)
t.start()
"#
    )
}

/// Reading `f.txt` and `d/f.txt` and listing the folder while both keep
/// turning into symlinks leading out: never a byte or a name from outside.
#[tokio::test(flavor = "multi_thread")]
async fn reads_and_listings_never_follow_a_swapped_symlink_out() {
    let s = start_boxed(Transport::Stdio, &[], None).await;
    let outside = outside_dir(&s);
    let (id, v) = s.new_session(&swapper(&outside)).await;
    assert_eq!(v["success"], true, "{v:#}");

    let (mut inside, mut refused, mut leaked) = (0u32, 0u32, Vec::new());
    for i in 0..3000 {
        let rel = if i % 2 == 0 { "f.txt" } else { "d/f.txt" };
        match s.read(&format!("kernel://{id}/{rel}")).await {
            Ok(c) if text(&c) == "inside" => inside += 1,
            Ok(c) => leaked.push(format!("read {rel}: {:?}", text(&c))),
            Err(_) => refused += 1,
        }
        if i % 3 == 0 {
            for name in list(&s, &id).await {
                if name.contains(SECRET_NAME) {
                    leaked.push(format!("listed {name}"));
                }
            }
        }
        if leaked.len() > 5 {
            break;
        }
    }
    let v = s.exec(&id, "stop.set(); t.join(); swaps").await;
    eprintln!(
        "{inside} reads inside, {refused} refused, {} leaks, {} swaps",
        leaked.len(),
        v["result"]
    );
    assert!(leaked.is_empty(), "outside data served: {leaked:?}");
    // The race was real: the kernel swapped throughout, and the real files
    // stayed readable.
    assert!(inside > 0, "no read succeeded");
    assert!(
        v["result"].as_str().unwrap().parse::<u64>().unwrap() > 1000,
        "{v}"
    );
    assert_eq!(
        std::fs::read_to_string(outside.join("f.txt")).unwrap(),
        SECRET
    );
    s.stop().await;
}

/// Python that starts a thread planting symlinks to `victim` at every name
/// the server might create (`figure_N.png`, `output_N.txt`) that is free.
fn planter(victim: &Path) -> String {
    let victim = victim.display();
    format!(
        r#"import os, threading
stop = threading.Event()
def plant():
    while not stop.is_set():
        for n in range(1, 200):
            for name in (f'figure_{{n}}.png', f'output_{{n}}.txt'):
                try:
                    os.symlink('{victim}', name)
                except FileExistsError:
                    pass
t = threading.Thread(target=plant, daemon=True)
t.start()
"#
    )
}

/// Saving figures and spilling long output while the kernel plants symlinks
/// to a file outside at every name the server may pick: the server picks
/// other names, and the outside file is never written.
#[tokio::test(flavor = "multi_thread")]
async fn figures_and_spilled_output_never_write_through_a_planted_symlink() {
    let s = start_boxed(Transport::Stdio, &["--max-output-chars", "2000"], None).await;
    let victim = s.data_dir.path().join("victim.txt");
    std::fs::write(&victim, SECRET).unwrap();
    let (id, v) = s
        .new_session("import matplotlib.pyplot as plt\nplt.plot([1, 2])\nplt.show()")
        .await;
    assert_eq!(names(&v["files"]), vec!["figure_1.png"], "{v:#}");
    let v = s.exec(&id, &planter(&victim)).await;
    assert_eq!(v["success"], true, "{v:#}");

    for round in 0..4 {
        let v = s
            .exec(
                &id,
                "for k in range(3):\n    plt.figure(); plt.plot([k, 1]); plt.show()\n\
                 for i in range(20000): print('line', i)",
            )
            .await;
        assert_eq!(v["success"], true, "round {round}: {v:#}");
        let created = names(&v["files"]);
        assert!(
            created.iter().filter(|n| n.starts_with("figure_")).count() == 3
                && created.iter().any(|n| n.starts_with("output_")),
            "round {round}: {created:?}"
        );
        for name in &created {
            let meta = std::fs::symlink_metadata(s.data_dir.path().join(&id).join(name)).unwrap();
            assert!(meta.is_file(), "{name} is not a regular file");
        }
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), SECRET);
    }
    let v = s.exec(&id, "stop.set(); t.join()").await;
    assert_eq!(v["success"], true, "{v:#}");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), SECRET);
    s.stop().await;
}

/// The session folder itself replaced by a symlink to another folder (by
/// someone who can write the data folder) does not redirect the server: it
/// keeps working in the folder it created, and clearing the session removes
/// the link, not the folder it points to. Symlinks inside a folder being
/// cleared are removed, not followed.
#[tokio::test(flavor = "multi_thread")]
async fn a_replaced_session_folder_and_planted_links_redirect_nothing() {
    let s = start_boxed(Transport::Stdio, &["--max-output-chars", "2000"], None).await;
    let outside = outside_dir(&s);
    let (id, _) = s
        .new_session("import matplotlib.pyplot as plt\nopen('f.txt', 'w').write('inside')")
        .await;
    let folder = s.data_dir.path().join(&id);
    let moved = s.data_dir.path().join("moved");
    std::fs::rename(&folder, &moved).unwrap();
    std::os::unix::fs::symlink(&outside, &folder).unwrap();

    let got = s
        .read(&format!("kernel://{id}/f.txt"))
        .await
        .map(|c| text(&c));
    assert!(
        matches!(&got, Ok(t) if t == "inside"),
        "read through the replaced folder: {got:?}"
    );
    let listed = list(&s, &id).await;
    assert!(
        !listed.iter().any(|n| n.contains(SECRET_NAME)),
        "{listed:?}"
    );
    let v = s
        .exec(
            &id,
            "plt.plot([1, 2]); plt.show()\nfor i in range(20000): print('line', i)",
        )
        .await;
    assert_eq!(v["success"], true, "{v:#}");
    let mut there: Vec<String> = std::fs::read_dir(&outside)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    there.sort();
    assert_eq!(
        there,
        vec!["f.txt", SECRET_NAME],
        "the server wrote outside"
    );
    assert!(moved.join("figure_1.png").is_file());
    assert!(moved.join("output_1.txt").is_file());

    let c = s.call("clear_session", json!({"session_id": id})).await;
    assert_eq!(c.structured_content.unwrap()["success"], true);
    assert!(std::fs::symlink_metadata(&folder).is_err(), "link left");
    assert_eq!(
        std::fs::read_to_string(outside.join("f.txt")).unwrap(),
        SECRET
    );

    // Links inside a folder being cleared are removed, not followed.
    let (id, v) = s
        .new_session(&format!(
            "import os\nos.symlink({:?}, 'dir_link')\nos.symlink({:?}, 'file_link')",
            outside.display().to_string(),
            outside.join("f.txt").display().to_string()
        ))
        .await;
    assert_eq!(v["success"], true, "{v:#}");
    let c = s.call("clear_session", json!({"session_id": id})).await;
    assert_eq!(c.structured_content.unwrap()["success"], true);
    assert!(!s.data_dir.path().join(&id).exists());
    assert_eq!(
        std::fs::read_to_string(outside.join("f.txt")).unwrap(),
        SECRET
    );
    assert!(outside.join(SECRET_NAME).is_file());
    tokio::time::timeout(Duration::from_secs(20), s.stop())
        .await
        .unwrap();
}
