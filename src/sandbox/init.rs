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

use std::io::Read;
use std::process::Command;

use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::Pid;

use super::SandboxError;

/// Runs `cmd` as our child and never returns (but on a failed start).
pub(super) fn run(mut cmd: Command) -> SandboxError {
    // The kernel's parent is this process (pid 1): ipykernel's own parent
    // poller is off for JPY_PARENT_PID=1; the stdin watch below does its job.
    cmd.env("JPY_PARENT_PID", "1")
        .stdin(std::process::Stdio::null());
    let child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return SandboxError::Exec(cmd.get_program().to_owned(), e),
    };
    let kernel = Pid::from_raw(child.id() as i32);
    std::thread::spawn(|| {
        let mut buf = [0u8; 64];
        let mut stdin = std::io::stdin();
        while matches!(stdin.read(&mut buf), Ok(n) if n > 0) {}
        // The server is gone (or closed the pipe to stop us).
        std::process::exit(137);
    });
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
