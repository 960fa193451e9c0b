//! PID 1 of a kernel's PID namespace.
//!
//! When the server could start the wrapper in a new PID namespace, the
//! wrapper is that namespace's init: it starts the kernel as its child,
//! reaps every process orphaned inside the namespace (so they do not pile
//! up as zombies against the process limit), and exits with the kernel's
//! status. When init exits, Linux kills everything left in the namespace,
//! so nothing a cell started can outlive its kernel.
//!
//! Signals: the server interrupts the kernel by signalling the process
//! group (which the kernel shares with init); as a namespace init, this
//! process ignores every signal it has no handler for, so only the kernel
//! and its children see them. The server keeps the write end of our stdin:
//! when the server goes away, even by SIGKILL, the read ends and init exits,
//! taking the kernel with it.

//!
//! A forked kernel (see `kernel::template`): init prints the [`super::ForkPlan`]
//! on stdout once the namespaces are made, then reads one line on stdin:
//! `pid N` (the template forked the kernel into this namespace as pid N) or
//! `launch` (no template: start the kernel as above). A forked kernel is
//! the template's child, not init's: the template reaps it and writes
//! `exit CODE` on init's stdin (the server's lifeline pipe), and init exits
//! with that code; that line may even come before the server's word. (If
//! the template dies first, the server, a child subreaper, inherits the
//! kernel and does the template's part.) Init reaps the namespace's orphans
//! as they come (SIGCHLD). The kernel leads a session of its own,
//! so init forwards the signals the server sends its process group
//! (interrupts) to the kernel's group.

use std::io::{BufRead, Read};
use std::process::Command;

use nix::sys::signal::{SigSet, Signal, killpg};
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::Pid;

use super::SandboxError;

/// Prints `plan`, waits for the server's word (see the module doc), then
/// serves as the kernel's init. Never returns but on a failed start.
pub(super) fn await_fork(plan: &str, fallback: Command) -> SandboxError {
    use std::io::Write;
    // Blocked before any thread exists, so every thread inherits the mask
    // and only the forwarding thread takes these signals.
    let mut forwarded = SigSet::empty();
    for sig in [
        Signal::SIGINT,
        Signal::SIGTERM,
        Signal::SIGHUP,
        Signal::SIGQUIT,
        Signal::SIGUSR1,
        Signal::SIGUSR2,
    ] {
        forwarded.add(sig);
    }
    let mut stdout = std::io::stdout();
    if writeln!(stdout, "{plan}")
        .and_then(|()| stdout.flush())
        .is_err()
    {
        std::process::exit(1);
    }
    let mut stdin = std::io::BufReader::new(std::io::stdin());
    // The template may tell how the kernel ended (`exit CODE`) before the
    // server's word arrives: a kernel that died at once.
    let mut ended = None;
    let kernel = loop {
        let mut line = String::new();
        if !matches!(stdin.read_line(&mut line), Ok(n) if n > 0) {
            std::process::exit(137); // the server is gone
        }
        if let Some(code) = exit_code(&line) {
            ended = Some(code);
            continue;
        }
        match line.trim().strip_prefix("pid ") {
            Some(n) => match n.parse::<i32>() {
                Ok(n) if n > 1 => break Pid::from_raw(n),
                _ => return SandboxError::Spec(format!("bad kernel pid {n:?}")),
            },
            None => return run_with(fallback, stdin),
        }
    };
    if let Some(code) = ended {
        std::process::exit(code);
    }
    // Orphans of the namespace come to us (SIGCHLD, taken by the main
    // thread below); the kernel is the template's child, not ours.
    // Blocked here, before any thread exists.
    let mut chld = SigSet::empty();
    chld.add(Signal::SIGCHLD);
    let _ = chld.thread_block();
    if forwarded.thread_block().is_ok() {
        std::thread::spawn(move || {
            while let Ok(sig) = forwarded.wait() {
                let _ = killpg(kernel, sig);
            }
        });
    }
    std::thread::spawn(move || {
        // The lifeline, on which the template also writes `exit CODE`.
        let mut line = String::new();
        while matches!(stdin.read_line(&mut line), Ok(n) if n > 0) {
            if let Some(code) = exit_code(&line) {
                std::process::exit(code);
            }
            line.clear();
        }
        std::process::exit(137);
    });
    loop {
        let _ = chld.wait();
        reap_orphans();
    }
}

/// `exit CODE`: how the template says a forked kernel ended.
fn exit_code(line: &str) -> Option<i32> {
    line.trim().strip_prefix("exit ")?.parse().ok()
}

/// Reaps every orphan of the namespace that has ended. (The kernel is never
/// one: if its template dies, it goes to the server, which then does the
/// template's part, see `kernel::template`.)
fn reap_orphans() {
    use nix::sys::wait::WaitPidFlag;
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => return,
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(_) => return, // no children
        }
    }
}

/// Runs `cmd` as our child and never returns (but on a failed start).
pub(super) fn run(cmd: Command) -> SandboxError {
    run_with(cmd, std::io::BufReader::new(std::io::stdin()))
}

fn run_with(mut cmd: Command, lifeline: impl Read + Send + 'static) -> SandboxError {
    // The kernel's parent is this process (pid 1): ipykernel's own parent
    // poller is off for JPY_PARENT_PID=1; the stdin watch below does its job.
    cmd.env("JPY_PARENT_PID", "1")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null());
    let child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return SandboxError::Exec(cmd.get_program().to_owned(), e),
    };
    let kernel = Pid::from_raw(child.id() as i32);
    watch_lifeline(lifeline);
    reap_until(kernel)
}

/// Exits when the server closes our stdin (or dies).
fn watch_lifeline(mut stdin: impl Read + Send + 'static) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        while matches!(stdin.read(&mut buf), Ok(n) if n > 0) {}
        // The server is gone (or closed the pipe to stop us).
        std::process::exit(137);
    });
}

/// Reaps every process of the namespace; exits with `kernel`'s status.
fn reap_until(kernel: Pid) -> ! {
    loop {
        match waitpid(None, None) {
            Ok(WaitStatus::Exited(pid, code)) if pid == kernel => std::process::exit(code),
            Ok(WaitStatus::Signaled(pid, sig, _)) if pid == kernel => {
                // A namespace init cannot kill itself with a signal: report
                // it the way shells do.
                std::process::exit(128 + sig as i32)
            }
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => {}
            Err(_) => std::process::exit(1),
        }
    }
}
