//! Host folders shared with `--mount`: every kernel reads them at the path
//! its session's instructions name; a read-only share refuses every kind
//! of write even where the kernel's uid could write the folder, and nothing
//! beside the folder becomes readable. The server runs boxed by bubblewrap
//! with the shared folder writable in the box, so what refuses a write is
//! the server's defence, not the box; with and without namespaces.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use common::{BIN, Server, Transport, start, start_boxed_with_writable};
use serde_json::Value;

const CSV: &str = "city,sales\nLyon,7\n";

fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

/// A folder to share (`shared/`, with `data.csv` and `sub/inner.txt`) and a
/// file beside it (`sibling.txt`), all as writable as Unix permissions
/// allow, so that only the share's read-only-ness can refuse writes.
struct Fixture {
    _dir: tempfile::TempDir,
    shared: PathBuf,
    sibling: PathBuf,
}

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn fixture() -> Fixture {
    // Not under /tmp, which boxed servers and kernels do not share.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    chmod(dir.path(), 0o755);
    let shared = dir.path().join("shared");
    std::fs::create_dir_all(shared.join("sub")).unwrap();
    std::fs::write(shared.join("data.csv"), CSV).unwrap();
    std::fs::write(shared.join("sub/inner.txt"), "inner").unwrap();
    let sibling = dir.path().join("sibling.txt");
    std::fs::write(&sibling, "sibling secret").unwrap();
    for (p, mode) in [
        (shared.as_path(), 0o777),
        (&shared.join("sub"), 0o777),
        (&shared.join("data.csv"), 0o666),
        (&shared.join("sub/inner.txt"), 0o666),
        (&sibling, 0o666),
    ] {
        chmod(p, mode);
    }
    Fixture {
        _dir: dir,
        shared,
        sibling,
    }
}

/// The shared folder as it was made.
fn untouched(f: &Fixture) {
    let mut names: Vec<String> = std::fs::read_dir(&f.shared)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["data.csv", "sub"]);
    assert_eq!(
        std::fs::read_to_string(f.shared.join("data.csv")).unwrap(),
        CSV
    );
    assert_eq!(
        std::fs::read_to_string(f.shared.join("sub/inner.txt")).unwrap(),
        "inner"
    );
    let mode = std::fs::metadata(f.shared.join("data.csv"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o666);
    assert_eq!(
        std::fs::read_to_string(&f.sibling).unwrap(),
        "sibling secret"
    );
}

fn result(v: &Value) -> String {
    assert_eq!(v["success"], true, "{v}");
    v["result"].as_str().unwrap_or("").to_string()
}

/// Python defining `attempt(f)`: "ok", or the name of the exception.
const ATTEMPT: &str = "import os, shutil
def attempt(f):
    try:
        f()
        return 'ok'
    except Exception as e:
        return type(e).__name__
";

/// Every kind of write into `dir` (the share as the kernel sees it).
fn writes(dir: &str) -> String {
    format!(
        "{ATTEMPT}
d = {dir:?}
{{name: attempt(f) for name, f in {{
    'create': lambda: open(d + '/new.txt', 'w').write('x'),
    'append': lambda: open(d + '/data.csv', 'a').write('x'),
    'truncate': lambda: open(d + '/data.csv', 'r+').truncate(0),
    'nested': lambda: open(d + '/sub/inner.txt', 'w').write('x'),
    'remove': lambda: os.remove(d + '/data.csv'),
    'rename': lambda: os.rename(d + '/data.csv', d + '/moved.csv'),
    'rmtree': lambda: shutil.rmtree(d + '/sub'),
    'mkdir': lambda: os.mkdir(d + '/newdir'),
    'chmod': lambda: os.chmod(d + '/data.csv', 0o600),
    'utime': lambda: os.utime(d + '/data.csv', (0, 0)),
    'symlink': lambda: os.symlink('/etc/passwd', d + '/link'),
    'link': lambda: os.link(d + '/data.csv', d + '/hard.csv'),
    'copy_out_in': lambda: shutil.copy('/etc/hostname', d + '/h'),
}}.items()}}"
    )
}

/// Reads through the share, and refusals of everything beside it.
async fn reads_and_refusals(s: &Server, id: &str, target: &str, f: &Fixture) {
    let v = s
        .exec(
            id,
            &format!(
                "import pandas as pd\n(pd.read_csv('{target}/data.csv')['sales'].sum(), \
                 sorted(os.listdir('{target}')), open('{target}/sub/inner.txt').read())"
            ),
        )
        .await;
    assert_eq!(result(&v), "(np.int64(7), ['data.csv', 'sub'], 'inner')");
    let v = s
        .exec(
            id,
            &format!(
                "{ATTEMPT}[attempt(lambda: open({sib:?}).read()), \
                 attempt(lambda: open('{target}/../sibling.txt').read()), \
                 attempt(lambda: os.listdir({parent:?}))]",
                sib = f.sibling.display().to_string(),
                parent = f.sibling.parent().unwrap().display().to_string(),
            ),
        )
        .await;
    let r = result(&v);
    assert!(
        !r.contains("'ok'"),
        "something beside the share was readable: {r}"
    );
}

fn no_write_got_through(v: &Value) {
    let r = result(v);
    assert!(
        !r.contains("'ok'"),
        "a write into the read-only share got through: {r}"
    );
    assert_eq!(r.matches(':').count(), 13, "{r}");
}

/// With namespaces (kernels of their own uids, root server): the share is
/// at /mnt/NAME for every session; the kernel's own uid could write the
/// folder (0777), yet nothing is written; the host path, reachable in the
/// box, refuses writes too; nothing beside the share is readable.
#[tokio::test(flavor = "multi_thread")]
async fn a_read_only_share_refuses_every_write() {
    let f = fixture();
    let mount = format!("{}:sales", f.shared.display());
    let s = start_boxed_with_writable(
        Transport::Http,
        &["--mount", &mount],
        true,
        &[f._dir.path()],
    )
    .await;
    let (id, v) = s.new_session("import os").await;
    let instructions = v["session_info"]["instructions"].as_str().unwrap();
    let target = if is_root() {
        "/mnt/sales".to_string()
    } else {
        // A server that is not root has no namespaces: the host path.
        f.shared.display().to_string()
    };
    assert!(
        instructions.contains(&format!("{target} (read-only)")),
        "{instructions}"
    );
    reads_and_refusals(&s, &id, &target, &f).await;
    no_write_got_through(&s.exec(&id, &writes(&target)).await);
    no_write_got_through(&s.exec(&id, &writes(&f.shared.display().to_string())).await);
    if is_root() {
        // The host's /mnt is not what the kernel sees there (Landlock does
        // not let it list /mnt at all).
        let v = s
            .exec(
                &id,
                &format!("{ATTEMPT}attempt(lambda: os.listdir('/mnt'))"),
            )
            .await;
        assert_eq!(result(&v), "'PermissionError'");
        let v = s.exec(&id, "os.path.exists('/mnt/sandboxing')").await;
        assert_eq!(result(&v), "False");
        // The bind itself is read-only (and nosuid, nodev), whatever Landlock says.
        let v = s
            .exec(
                &id,
                "[l.split()[5] for l in open('/proc/self/mountinfo') if l.split()[4] == '/mnt/sales']",
            )
            .await;
        let opts = result(&v);
        assert!(
            opts.starts_with("['ro,") && opts.contains("nosuid") && opts.contains("nodev"),
            "{opts}"
        );
    }
    // Another session, with another uid, reads it too.
    let (other, _) = s.new_session("import os").await;
    reads_and_refusals(&s, &other, &target, &f).await;
    s.stop().await;
    untouched(&f);
}

/// Without namespaces (a default container): the share is at its own path,
/// and Landlock alone keeps it read-only and its siblings unreadable.
#[tokio::test(flavor = "multi_thread")]
async fn without_namespaces_the_share_is_at_its_own_path_and_read_only() {
    let f = fixture();
    let mount = f.shared.display().to_string();
    let s = start_boxed_with_writable(
        Transport::Stdio,
        &["--mount", &mount],
        false,
        &[f._dir.path()],
    )
    .await;
    let (id, v) = s.new_session("import os").await;
    let target = std::fs::canonicalize(&f.shared)
        .unwrap()
        .display()
        .to_string();
    let instructions = v["session_info"]["instructions"].as_str().unwrap();
    assert!(
        instructions.contains(&format!("{target} (read-only)")),
        "{instructions}"
    );
    reads_and_refusals(&s, &id, &target, &f).await;
    no_write_got_through(&s.exec(&id, &writes(&target)).await);
    s.stop().await;
    untouched(&f);
}

/// `:rw` lets every kernel write the share (and nothing beside it).
#[tokio::test(flavor = "multi_thread")]
async fn a_read_write_share_is_written_through() {
    let f = fixture();
    let mount = format!("{}:out:rw", f.shared.display());
    let s = start(Transport::Stdio, &["--mount", &mount]).await;
    let target = if is_root() {
        "/mnt/out".to_string()
    } else {
        f.shared.display().to_string()
    };
    let (id, v) = s.new_session("import os").await;
    let instructions = v["session_info"]["instructions"].as_str().unwrap();
    assert!(
        instructions.contains(&format!("{target} (read-write)")),
        "{instructions}"
    );
    let v = s
        .exec(
            &id,
            &format!(
                "{ATTEMPT}open('{target}/result.txt', 'w').write('from the kernel')\n\
                 attempt(lambda: open('{target}/../sibling.txt', 'w').write('x'))"
            ),
        )
        .await;
    assert_ne!(result(&v), "'ok'");
    assert_eq!(
        std::fs::read_to_string(f.shared.join("result.txt")).unwrap(),
        "from the kernel"
    );
    assert_eq!(
        std::fs::read_to_string(&f.sibling).unwrap(),
        "sibling secret"
    );
    // Files written there are not the session's.
    let v = s.exec(&id, "1").await;
    assert_eq!(v["files"], serde_json::json!([]));
    s.stop().await;
}

/// What kernels could not use, or what would expose the server's data, is
/// refused at start-up with a message that says what to do.
#[tokio::test(flavor = "multi_thread")]
async fn unusable_shares_are_refused_at_start_up() {
    let f = fixture();
    let data = tempfile::tempdir().unwrap();
    let refusal = |mount: String| {
        let out = std::process::Command::new(BIN)
            .args(["--transport", "stdio", "--pool-size", "0", "--data-dir"])
            .arg(data.path().join("sessions"))
            .args(["--mount", &mount])
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        assert!(!out.status.success(), "{mount} was accepted");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let shared = f.shared.display().to_string();
    assert!(refusal(format!("{shared}:bad/name")).contains("must be 1-64"));
    assert!(refusal(format!("{shared}:n:rx")).contains("neither rw nor ro"));
    assert!(refusal(format!("{shared}/missing")).contains("No such file"));
    assert!(refusal(format!("{}:d", data.path().display())).contains("holds the session folders"));
    assert!(refusal(format!("{shared}:a,{shared}:a")).contains("given twice"));
    if is_root() {
        chmod(&f.shared, 0o700);
        let e = refusal(shared.clone());
        assert!(e.contains("may not read it") && e.contains("o+rx"), "{e}");
        chmod(&f.shared, 0o755);
        let e = refusal(format!("{shared}:rw"));
        assert!(e.contains("may not write it") && e.contains("o+rwx"), "{e}");
    }
}
