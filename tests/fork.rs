//! Kernels forked from the template (the default where the server is root
//! with namespaces): attacks on siblings and on the template from inside a
//! forked kernel, random state, and the template's death.
//!
//! Every write a payload attempts targets a path inside the test's own
//! temporary folder, and the server runs boxed, so a failed defence cannot
//! harm anything outside it.

mod common;

use std::time::Duration;

use common::{Transport, is_forked, kernel_pid, start_boxed, template_pid};

fn err(v: &serde_json::Value) -> String {
    v["error"].as_str().unwrap_or("").to_string()
}

/// What a call printed (its streams and displays), as one string.
fn output(v: &serde_json::Value) -> String {
    let out: Vec<String> = serde_json::from_value(v["output"].clone()).unwrap();
    out.concat()
}

fn result(v: &serde_json::Value) -> String {
    assert_eq!(v["success"], true, "{v:#}");
    v["result"].as_str().unwrap_or("").to_string()
}

/// Waits (bounded) for the server's template, and for it to have served:
/// the first kernels may be forked while it is still importing.
async fn wait_template(server: u32, not: Option<i32>) -> i32 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(p) = template_pid(server).filter(|&p| Some(p) != not) {
            return p;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no kernel template appeared"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Inode of what descriptor `fd` of `pid` names (`pipe:[N]`), if anything.
fn fd_target(pid: i32, fd: u32) -> Option<String> {
    std::fs::read_link(format!("/proc/{pid}/fd/{fd}"))
        .ok()
        .map(|p| p.display().to_string())
}

#[tokio::test(flavor = "multi_thread")]
async fn forked_kernels_cannot_reach_siblings_or_the_template() {
    let s = start_boxed(Transport::Stdio, &[], None).await;
    let template = wait_template(s.pid, None).await;
    // The template never starts a thread: kernels are forked from one.
    let threads = std::fs::read_dir(format!("/proc/{template}/task"))
        .unwrap()
        .count();
    assert_eq!(threads, 1, "the template runs {threads} threads");

    let (victim, v) = s
        .new_session(
            "import ipykernel, os\nopen('secret.txt','w').write('victim data')\n\
             print(ipykernel.get_connection_file(), os.environ['TMPDIR'], sep='\\n')",
        )
        .await;
    let victim_pid = kernel_pid(&victim).expect("victim kernel");
    assert!(is_forked(victim_pid), "the victim's kernel was not forked");
    let out = output(&v);
    let mut lines = out.lines().map(str::to_string);
    let (conn, tmpdir) = (lines.next().unwrap(), lines.next().unwrap());
    let runtime = std::path::Path::new(&tmpdir)
        .parent()
        .unwrap()
        .display()
        .to_string();
    let secret = s.data_dir.path().join(&victim).join("secret.txt");

    let (attacker, _) = s.new_session("import os, signal, glob").await;
    let attacker_pid = kernel_pid(&attacker).expect("attacker kernel");
    assert!(is_forked(attacker_pid));

    // The sibling's key, runtime folder and files.
    for code in [
        format!("open({conn:?}).read()"),
        format!("os.listdir({runtime:?})"),
        format!("open({:?}).read()", secret.display().to_string()),
    ] {
        let v = s.exec(&attacker, &code).await;
        let e = err(&v);
        assert!(
            e.starts_with("PermissionError") || e.starts_with("FileNotFoundError"),
            "{code}: {v}"
        );
    }
    let v = s
        .exec(
            &attacker,
            "own = os.path.dirname(os.environ['TMPDIR'])\n\
             [p for p in glob.glob('/tmp/mcp-python-interpreter-*/**/kernel.json', recursive=True) \
              if not p.startswith(own + '/')]",
        )
        .await;
    assert_eq!(result(&v), "[]", "{v}");

    // Signals: the sibling and the template by their host pids, every pid
    // the kernel can name, and the namespace's init.
    for (who, pid) in [("sibling", victim_pid), ("template", template)] {
        let v = s
            .exec(&attacker, &format!("os.kill({pid}, signal.SIGKILL)"))
            .await;
        let e = err(&v);
        assert!(
            e.starts_with("ProcessLookupError") || e.starts_with("PermissionError"),
            "signalling the {who}: {v}"
        );
    }
    let v = s
        .exec(
            &attacker,
            "sorted(int(p) for p in os.listdir('/proc') if p.isdigit())",
        )
        .await;
    let visible = result(&v);
    let v = s
        .exec(
            &attacker,
            "import subprocess\nfailed = []\n\
             for p in range(1, 400):\n\
             \x20   if str(p) in os.listdir('/proc/self/task'): continue\n\
             \x20   try: os.kill(p, 0); failed.append(p)\n\
             \x20   except (ProcessLookupError, PermissionError): pass\n\
             failed",
        )
        .await;
    // Nothing but the kernel itself (whose threads' ids are skipped).
    assert_eq!(result(&v), "[]", "signallable: {v}; visible {visible}");
    assert!(!common::wait_gone(victim_pid, Duration::from_millis(300)).await);
    assert!(std::path::Path::new(&format!("/proc/{template}")).exists());

    // Who the kernel is: its own uid, no groups, no privileges, no way back.
    let v = s
        .exec(
            &attacker,
            "st = dict(l.split(':', 1) for l in open('/proc/self/status').read().splitlines())\n\
             (os.getuid(), st['Groups'].strip(), st['NoNewPrivs'].strip(), st['CapEff'].strip(), os.getcwd() == os.path.realpath('.'))",
        )
        .await;
    let who = result(&v);
    assert!(
        who.contains(", '', '1', '0000000000000000', True)"),
        "{who}"
    );
    let v = s.exec(&victim, "os.getuid()").await;
    assert!(!who.starts_with(&format!("({},", result(&v))), "same uid");

    // Nothing of the template's control pipes reached a kernel.
    let control: Vec<String> = [0, 1]
        .iter()
        .filter_map(|&fd| fd_target(template, fd))
        .filter(|t| t.starts_with("pipe:"))
        .collect();
    let fds: Vec<String> = std::fs::read_dir(format!("/proc/{attacker_pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .map(|p| p.display().to_string())
        .collect();
    for c in &control {
        assert!(!fds.contains(c), "kernel holds the template's {c}");
    }

    assert_eq!(std::fs::read_to_string(&secret).unwrap(), "victim data");
    let v = s.exec(&victim, "open('secret.txt').read()").await;
    assert_eq!(result(&v), "'victim data'");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn forked_sessions_draw_different_random_numbers_and_keys() {
    let s = start_boxed(Transport::Stdio, &[], None).await;
    wait_template(s.pid, None).await;
    let draw = "import random, numpy, multiprocessing\n\
                print(random.random(), numpy.random.rand(), random.getrandbits(64), \
                multiprocessing.current_process().authkey.hex(), sep='|')";
    let mut seen = Vec::new();
    for _ in 0..3 {
        let (id, v) = s.new_session(draw).await;
        assert!(is_forked(kernel_pid(&id).unwrap()));
        let r = output(&v);
        let parts: Vec<String> = r.trim().split('|').map(str::to_string).collect();
        assert_eq!(parts.len(), 4, "{r}");
        for earlier in &seen {
            let earlier: &Vec<String> = earlier;
            for i in 0..4 {
                assert_ne!(earlier[i], parts[i], "draw {i} repeated: {r}");
            }
        }
        seen.push(parts);
    }
    s.stop().await;
}

/// A killed template is replaced; kernels forked from it live on; sessions
/// keep starting meanwhile (launched while there is none) and are forked
/// again once the new one is ready. Interrupts and timeouts reach a forked
/// kernel through its wrapper.
#[tokio::test(flavor = "multi_thread")]
async fn a_killed_template_is_replaced() {
    let s = start_boxed(
        Transport::Stdio,
        &["--pool-size", "1", "--execution-timeout", "3"],
        None,
    )
    .await;
    let first = wait_template(s.pid, None).await;
    let (old, _) = s.new_session("x = 41").await;
    assert!(is_forked(kernel_pid(&old).unwrap()));

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(first),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert!(common::wait_gone(first, Duration::from_secs(10)).await);
    for _ in 0..3 {
        let (_, v) = s.new_session("40 + 2").await;
        assert_eq!(result(&v), "42");
    }
    assert_eq!(result(&s.exec(&old, "x + 1").await), "42");
    // The old kernel was the dead template's child; its wrapper, to which
    // it passed, notices its death and how it died.
    let v = s.exec(&old, "import os; os._exit(7)").await;
    assert!(
        err(&v).contains("KernelDied") && err(&v).contains("7"),
        "{v}"
    );

    let second = wait_template(s.pid, Some(first)).await;
    assert_ne!(first, second);
    // Sessions made after the replacement is ready are forked from it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (id, _) = s.new_session("1").await;
        if is_forked(kernel_pid(&id).unwrap()) {
            // Interrupted at the time limit, and still usable.
            let v = s.exec(&id, "import time\ny = 5\ntime.sleep(60)").await;
            assert_eq!(v["success"], false, "{v}");
            assert!(err(&v).contains("Timeout"), "{v}");
            assert_eq!(result(&s.exec(&id, "y").await), "5");
            // A forked kernel that dies is noticed, with its exit code
            // (the template reaps it and tells its wrapper).
            let v = s.exec(&id, "import os; os._exit(3)").await;
            assert!(
                err(&v).contains("KernelDied") && err(&v).contains("exit code 3"),
                "{v}"
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no forked session after the template was replaced"
        );
    }
    s.stop().await;
}

/// A template that may not fork (a preloaded module starts a thread at
/// import, so forking would copy a process with locks held) refuses and
/// exits; kernels are then launched, at once after that first failure, and
/// sessions work as before.
#[tokio::test(flavor = "multi_thread")]
async fn a_template_that_may_not_fork_gives_way_to_launched_kernels() {
    // The module goes where the template finds it, the kernel environment
    // (the template gets no PYTHONPATH of ours: kernels start from an
    // allowlisted environment), and is removed however the test ends.
    let out = std::process::Command::new(common::kernel_python())
        .args([
            "-c",
            "import sysconfig; print(sysconfig.get_paths()['purelib'])",
        ])
        .output()
        .unwrap();
    let site = std::path::PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
    struct Remove(std::path::PathBuf);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    let module = Remove(site.join(format!(
        "mcp_test_thread_at_import_{}.py",
        std::process::id()
    )));
    std::fs::write(
        &module.0,
        "import threading, time\n\
         threading.Thread(target=time.sleep, args=(3600,), daemon=True).start()\n",
    )
    .unwrap();
    let name = module.0.file_stem().unwrap().to_string_lossy().into_owned();
    let data = tempfile::tempdir().unwrap();
    let mut cmd = tokio::process::Command::new(common::BIN);
    cmd.args(["--transport", "stdio", "--data-dir"])
        .arg(data.path())
        .arg("--preload")
        .arg(format!("numpy,{name}"))
        .env("LOG_LEVEL", "error");
    let client = common::connect_stdio(cmd).await;
    let started = std::time::Instant::now();
    let v = common::call(
        &client,
        "execute_code",
        serde_json::json!({"code": "import sys\n'numpy' in sys.modules", "session_id": ""}),
    )
    .await
    .structured_content
    .unwrap();
    assert_eq!(result(&v), "True");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the first session waited {:?}",
        started.elapsed()
    );
    let id = v["session_id"].as_str().unwrap();
    assert!(!is_forked(kernel_pid(id).unwrap()), "a kernel was forked");
    let _ = client.cancel().await;
}

/// A forked and a launched kernel see the same file system: the working
/// folder is the one inside the kernel's own view (so `..` is its parent
/// there, not the host folder the view covers), and the folders made for
/// that view may be passed through, not listed.
#[tokio::test(flavor = "multi_thread")]
async fn forked_and_launched_kernels_see_the_same_folders() {
    let probe = "import os\n\
        def ls(p):\n    try:\n        os.listdir(p); return 'listed'\n    except OSError as e:\n        return type(e).__name__\n\
        print(os.path.samestat(os.stat('..'), os.stat(os.path.dirname(os.getcwd()))), \
        ls('..'), ls('/tmp'), sep='|')";
    let mut seen = Vec::new();
    for (extra, forked) in [(&[][..], true), (&["--no-fork"][..], false)] {
        let s = start_boxed(Transport::Stdio, extra, None).await;
        if forked {
            wait_template(s.pid, None).await;
        }
        let (id, v) = s.new_session(probe).await;
        assert_eq!(is_forked(kernel_pid(&id).unwrap()), forked);
        seen.push(output(&v).trim().to_string());
        s.stop().await;
    }
    assert_eq!(seen[0], "True|PermissionError|listed", "forked");
    assert_eq!(seen[1], seen[0], "launched");
}

/// What a kernel's start derives from its environment (temporary folder,
/// IPython's profile, matplotlib's cache) is its own in a forked kernel too,
/// not the template's (which no kernel may reach), and what identifies a
/// kernel on the wire differs between siblings.
#[tokio::test(flavor = "multi_thread")]
async fn forked_kernels_have_their_own_folders_and_identity() {
    let s = start_boxed(Transport::Stdio, &[], None).await;
    wait_template(s.pid, None).await;
    let probe = "import os, tempfile, matplotlib\n\
        ip = get_ipython()\n\
        tmp = os.environ['TMPDIR']\n\
        with tempfile.NamedTemporaryFile() as f:\n    made = os.path.dirname(f.name)\n\
        cache = matplotlib.get_cachedir()\n\
        open(os.path.join(cache, 'probe'), 'w').write('x')\n\
        checks = [tempfile.gettempdir() == tmp, made == tmp,\n\
                  ip.profile_dir.location.startswith(os.environ['IPYTHONDIR']),\n\
                  os.access(ip.profile_dir.location, os.W_OK),\n\
                  ip.starting_dir == os.getcwd(), ip.kernel is not None]\n\
        print(checks, ip.kernel.ident, ip.kernel.session.session, sep='|')";
    let mut idents = Vec::new();
    for _ in 0..2 {
        let (id, v) = s.new_session(probe).await;
        assert!(is_forked(kernel_pid(&id).unwrap()));
        let out = output(&v);
        let parts: Vec<&str> = out.trim().split('|').collect();
        assert_eq!(parts.len(), 3, "{v:#}");
        assert_eq!(parts[0], "[True, True, True, True, True, True]", "{v:#}");
        idents.push((parts[1].to_string(), parts[2].to_string()));
    }
    assert_ne!(idents[0].0, idents[1].0, "kernel idents repeat");
    assert_ne!(idents[0].1, idents[1].1, "session ids repeat");
    s.stop().await;
}

/// Kernels forked once the template has warmed up start on the template's
/// ipykernel objects (and with its compiled start-up code); they behave as
/// any kernel: streams in order, results, displays, errors, the execution
/// count, `input()` refused, interrupts at the time limit, state kept.
#[tokio::test(flavor = "multi_thread")]
async fn kernels_on_the_templates_objects_behave_as_any() {
    let s = start_boxed(
        Transport::Stdio,
        &["--pool-size", "1", "--execution-timeout", "3"],
        None,
    )
    .await;
    wait_template(s.pid, None).await;
    let marker = "import sys\n\
        print(getattr(get_ipython().kernel.parent, '_mcp_from_template', False), \
        '_mcp_startup' in sys.modules)";
    // The first kernel may be forked before the warm-up: wait (bounded) for one after it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let id = loop {
        let (id, v) = s.new_session(marker).await;
        if output(&v).trim() == "True False" {
            break id;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no kernel on the template's objects: {v:#}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(is_forked(kernel_pid(&id).unwrap()));
    // Its messages are signed with its own connection file's key, by one
    // session object (the template's warm-up used a throwaway one).
    let v = s
        .exec(
            &id,
            "import json, ipykernel\nip = get_ipython()\nk = ip.kernel\n\
             key = json.load(open(ipykernel.get_connection_file()))['key'].encode()\n\
             (k.session.key == key, len(key) > 0, ip.display_pub.session is k.session, \
             ip.displayhook.session is k.session, ip.display_pub.pub_socket is k.iopub_socket)",
        )
        .await;
    assert_eq!(result(&v), "(True, True, True, True, True)");
    let v = s
        .exec(
            &id,
            "import sys\nfor i in range(3):\n    print('out', i, flush=True)\n    \
             print('err', i, file=sys.stderr, flush=True)\n\
             from IPython.display import display, Markdown\ndisplay(Markdown('**hi**'))\n41 + 1",
        )
        .await;
    assert_eq!(result(&v), "42");
    let text = output(&v);
    let order: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("out") || l.starts_with("err"))
        .collect();
    assert_eq!(
        order,
        ["out 0", "err 0", "out 1", "err 1", "out 2", "err 2"],
        "{v:#}"
    );
    assert!(text.contains("**hi**"), "{v:#}");
    let v = s.exec(&id, "1/0").await;
    assert_eq!(v["success"], false);
    assert!(err(&v).contains("ZeroDivisionError"), "{v}");
    let v = s.exec(&id, "input('name? ')").await;
    assert_eq!(v["success"], false, "{v}");
    let v = s.exec(&id, "import time\nkept = 7\ntime.sleep(60)").await;
    assert!(err(&v).contains("Timeout"), "{v}");
    assert_eq!(result(&s.exec(&id, "kept").await), "7");
    assert_eq!(
        result(&s.exec(&id, "get_ipython().execution_count").await),
        result(&s.exec(&id, "get_ipython().execution_count - 1").await)
    );
    // From Python 3.12 on, what the template made is immortal in kernels
    // forked after its warm-up (their references are not counted, so its
    // pages stay shared); what a kernel makes is counted as usual.
    let (_, v) = s
        .new_session(
            "import sys, json\nmine = [object()]\n\
             (sys.version_info >= (3, 12), sys.getrefcount(json.dumps) >= 2**31, \
             sys.getrefcount(json) >= 2**31, sys.getrefcount(mine) < 100, \
             sys.getrefcount(mine[0]) < 100)",
        )
        .await;
    let r = result(&v);
    assert!(
        r == "(True, True, True, True, True)" || r == "(False, False, False, True, True)",
        "{r}"
    );
    s.stop().await;
}
