//! Waking a dormant session: a fresh kernel, then its recorded cells again.
//!
//! A session adopted after a restart has its folder and the code of the
//! cells that completed, but no kernel. Its next call starts one and, unless
//! `--restore files` was chosen, replays those cells in order (bounded by
//! `--replay-timeout` in all; output discarded) before running the call.
//!
//! **Replay never costs a file.** Before the first cell, the kernel copies
//! its session folder (regular files and folders; symlinks are skipped) into
//! a scratch folder in its private temporary folder and works there; after
//! the last one it returns to the session folder and deletes the scratch
//! copy. A replayed cell that writes `data.csv` therefore writes the copy,
//! and the newer `data.csv` a later cell produced stays as it is. (A cell
//! that wrote to the session folder by absolute path would still reach it;
//! cells almost always use relative paths.) Folders larger than
//! [`MAX_REPLAY_BYTES`] are not copied and not replayed: their files are
//! kept, their variables are not.
//!
//! After a kernel *death* (`os._exit`, a segfault, the memory limit) nothing
//! is replayed: the death was most likely caused by the session's own state,
//! which a replay would rebuild (and would make every call after a crash
//! slow); the model is told that variables were lost and re-runs what it
//! needs.

use std::time::Duration;

use tokio::time::Instant;

use super::store::Record;
use super::{Registry, Restore, Session, SessionError, State};
use crate::kernel::{ExecEnd, ExecMessage, KernelEvent, KernelHandle};

/// A folder larger than this is restored without replay (the scratch copy
/// would cost too much time and disk).
const MAX_REPLAY_BYTES: u64 = 512 * 1024 * 1024;

/// Run in the kernel before the replayed cells: work in a copy of the folder.
const BEGIN: &str = r#"
def __mcp_replay_begin():
    import os, shutil, sys, tempfile, types
    state = types.ModuleType("__mcp_replay")
    state.root = os.getcwd()
    state.scratch = tempfile.mkdtemp(prefix="replay-")
    def skip_links(folder, names):
        return [n for n in names if os.path.islink(os.path.join(folder, n))]
    shutil.copytree(state.root, state.scratch, ignore=skip_links, dirs_exist_ok=True)
    sys.modules["__mcp_replay"] = state
    os.chdir(state.scratch)
__mcp_replay_begin()
del __mcp_replay_begin
"#;

/// Run after the replayed cells (whatever happened to them): back to the
/// session folder, scratch copy and replayed figures gone.
const END: &str = r#"
def __mcp_replay_end():
    import os, shutil, sys
    state = sys.modules.pop("__mcp_replay", None)
    if state is not None:
        os.chdir(state.root)
        shutil.rmtree(state.scratch, ignore_errors=True)
    if "matplotlib.pyplot" in sys.modules:
        sys.modules["matplotlib.pyplot"].close("all")
__mcp_replay_end()
del __mcp_replay_end
"#;

/// What a dormant session brings back with it.
#[derive(Debug, Clone)]
pub(super) struct Dormant {
    /// The kernel that may still run (remote), to reconnect to first.
    pub(super) kernel: Option<String>,
    cells: Vec<String>,
    truncated: bool,
    restore: Restore,
}

impl Dormant {
    pub(super) fn from_record(record: &Record, restore: Restore) -> Self {
        Self {
            kernel: record.kernel.clone(),
            cells: record.cells.clone(),
            truncated: record.cells_truncated,
            restore,
        }
    }
}

/// How one replayed cell went.
enum Ran {
    Ok,
    Failed(String),
    /// Past the replay's deadline; the kernel stopped (or was shut down).
    TimedOut,
    /// The kernel died (or was shut down): no kernel left.
    Lost(String),
}

/// What a session reconnected to its kernel says in its next result.
const RECONNECTED: &str = "The server restarted since this session was last used; the session \
                           reconnected to its kernel, which kept running, so its variables, \
                           imports and files are as they were.";

impl Registry {
    /// Before a remote session's files are read or listed: they are reached
    /// through its kernel, so a dormant session whose kernel kept running
    /// (on the gateway) is reconnected to it now. A session in a call is
    /// not dormant; nothing is waited for.
    pub async fn files_ready(&self, session: &Session) {
        if !session.workspace.is_remote() {
            return;
        }
        let Ok(mut state) = session.state.try_lock() else {
            return;
        };
        let Some(id) = state.dormant.as_ref().and_then(|d| d.kernel.clone()) else {
            return;
        };
        if let Ok(Some(kernel)) = self.factory.resume(&id, session.workspace.root()).await {
            state.kernel = Some(kernel);
            state.dormant = None;
            let state = &mut *state;
            let _ = session.workspace.refresh(&mut state.baseline).await;
            state.notice = Some(RECONNECTED.into());
        }
    }

    /// Starts the session's kernel and restores what `dormant` allows.
    /// Returns the note the call's result opens with.
    pub(super) async fn wake(
        &self,
        session: &Session,
        state: &mut State,
        dormant: Dormant,
    ) -> Result<String, SessionError> {
        if let Some(id) = &dormant.kernel {
            match self.factory.resume(id, session.workspace.root()).await {
                Ok(Some(kernel)) => {
                    state.kernel = Some(kernel);
                    let _ = session.workspace.refresh(&mut state.baseline).await;
                    return Ok(RECONNECTED.into());
                }
                Ok(None) => {
                    tracing::info!(session = %session.id, "its kernel is gone; starting a new one");
                }
                Err(e) => {
                    tracing::warn!(session = %session.id, "cannot reconnect to its kernel: {e}");
                    self.factory.discard(id, session.workspace.root()).await;
                }
            }
        }
        let kernel = self.factory.start(session.workspace.root()).await?;
        state.kernel = Some(kernel.clone());
        let head = "The server restarted since this session was last used. Its files are \
                    exactly as they were";
        let n = dormant.cells.len();
        let why_not = if dormant.restore == Restore::Files {
            Some("the server restores files only (--restore files)".to_string())
        } else if dormant.truncated {
            Some("its history was too long to keep".to_string())
        } else if state.baseline.total_bytes() > MAX_REPLAY_BYTES {
            Some(format!(
                "its folder is larger than {} MiB, too large to replay safely",
                MAX_REPLAY_BYTES >> 20
            ))
        } else {
            None
        };
        if let Some(why) = why_not {
            return Ok(format!(
                "{head}, but variables and imports are not: {why}. Re-run your setup code."
            ));
        }
        if n == 0 {
            return Ok(format!("{head}; it had no variables to restore."));
        }

        let started = Instant::now();
        let deadline = started + self.settings.replay_timeout;
        if let Ran::Failed(e) | Ran::Lost(e) = self.run_quiet(state, &kernel, BEGIN, deadline).await
        {
            return Ok(format!(
                "{head}, but variables and imports are not: the replay could not start ({e}). \
                 Re-run your setup code."
            ));
        }
        let mut failed: Vec<String> = Vec::new();
        let mut replayed = 0;
        let mut stopped: Option<String> = None;
        for (i, code) in dormant.cells.iter().enumerate() {
            match self.run_quiet(state, &kernel, code, deadline).await {
                Ran::Ok => replayed += 1,
                Ran::Failed(e) => {
                    replayed += 1;
                    failed.push(format!("cell {} ({e})", i + 1));
                }
                Ran::TimedOut => {
                    stopped = Some(format!(
                        "the replay took longer than {:.0} s and stopped before cell {} of {n}",
                        self.settings.replay_timeout.as_secs_f64(),
                        i + 1
                    ));
                    break;
                }
                Ran::Lost(e) => {
                    stopped = Some(format!(
                        "the kernel died during the replay of cell {} ({e})",
                        i + 1
                    ));
                    break;
                }
            }
        }
        if state.kernel.is_some() {
            let end_by = Instant::now() + Duration::from_secs(10);
            let _ = self.run_quiet(state, &kernel, END, end_by).await;
        }
        // The replay worked in a scratch copy; look at the folder afresh so
        // nothing it did is reported as this call's.
        let _ = session.workspace.refresh(&mut state.baseline).await;
        let took = started.elapsed().as_secs_f64();
        if state.kernel.is_none() {
            return Ok(format!(
                "{head}, but variables and imports are not: {}. Re-run your setup code.",
                stopped.unwrap_or_else(|| "the replay failed".into())
            ));
        }
        let mut note = format!(
            "{head}; its variables were restored by replaying {replayed} of its {n} recorded \
             cells in a fresh kernel ({took:.1} s; their output is not shown and their file \
             writes went to a scratch copy)"
        );
        if !failed.is_empty() {
            note.push_str(&format!(
                ". These failed this time, so what they define may be missing: {}",
                failed.join("; ")
            ));
        }
        if let Some(s) = stopped {
            note.push_str(&format!(
                ". Not complete: {s}; re-run what the later cells defined"
            ));
        }
        note.push('.');
        Ok(note)
    }

    /// Runs `code` with output discarded, until it ends or `deadline`.
    async fn run_quiet(
        &self,
        state: &mut State,
        kernel: &KernelHandle,
        code: &str,
        deadline: Instant,
    ) -> Ran {
        let mut stream = match kernel.execute(code.to_string()).await {
            Ok(s) => s,
            Err(e) => {
                state.kernel = None;
                return Ran::Lost(e.to_string());
            }
        };
        let mut error: Option<String> = None;
        let mut interrupted_at: Option<Instant> = None;
        loop {
            let wait_until = match interrupted_at {
                None => deadline,
                Some(t) => t + self.settings.interrupt_grace,
            };
            match tokio::time::timeout_at(wait_until, stream.recv()).await {
                Ok(Some(ExecMessage::Event(KernelEvent::Error { ename, evalue, .. }))) => {
                    error.get_or_insert(if evalue.is_empty() {
                        ename
                    } else {
                        format!("{ename}: {evalue}")
                    });
                }
                Ok(Some(ExecMessage::Event(_))) => {}
                Ok(Some(ExecMessage::End(ExecEnd::Completed))) => {
                    return match (interrupted_at, error) {
                        (Some(_), _) => Ran::TimedOut,
                        (None, Some(e)) => Ran::Failed(e),
                        (None, None) => Ran::Ok,
                    };
                }
                Ok(Some(ExecMessage::End(ExecEnd::Died { detail }))) => {
                    state.kernel = None;
                    return Ran::Lost(detail);
                }
                Ok(None) => {
                    state.kernel = None;
                    return Ran::Lost("the kernel task stopped".into());
                }
                Err(_) if interrupted_at.is_none() => {
                    kernel.interrupt().await;
                    interrupted_at = Some(Instant::now());
                }
                Err(_) => {
                    // Ignored the interrupt: this kernel is not worth keeping.
                    kernel.shutdown().await;
                    state.kernel = None;
                    return Ran::TimedOut;
                }
            }
        }
    }
}
