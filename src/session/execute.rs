//! Running one cell in a session: the kernel's events, the time limit, the
//! files that changed, and recovery when the kernel dies.
//!
//! Events go to the model's view of the output ([`Collector`]) and to the
//! session's history ([`Recorder`]). Displayed images are saved as
//! `figure_N.png`, HTML-only displays as `display_N.html` (as they arrive);
//! then the folder is looked at for changed files, and the images to return
//! inline are picked ([`super::inline`]).

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::history::Recorder;
use super::inline::{self, InlineImage};
use super::output::{CellOutput, Collector};
use super::{Registry, Session, SessionError, State};
use crate::kernel::{ExecEnd, ExecMessage, ExecutionStream, KernelError};
use crate::workspace::{Change, FileInfo};

/// Progress updates are sent at most this often.
const PROGRESS_EVERY: Duration = Duration::from_millis(500);
/// Without new output, an update is still sent this often (keeps clients patient).
const PROGRESS_HEARTBEAT: Duration = Duration::from_secs(5);
/// At most this many created or changed files are reported by one call (a
/// cell that writes thousands would otherwise flood the model's context).
const MAX_REPORTED_FILES: usize = 100;
/// How much of the newest output a progress update carries.
const PROGRESS_CHARS: usize = 500;

/// How the caller steers a running call.
#[derive(Debug, Clone, Default)]
pub struct CallControl {
    /// Fired when the client cancels: the cell is interrupted.
    pub cancel: CancellationToken,
    /// Receives progress while the cell runs, if the client asked for it.
    pub progress: Option<tokio::sync::mpsc::Sender<ProgressUpdate>>,
}

/// A running cell's progress.
#[derive(Debug, Clone)]
pub struct ProgressUpdate {
    pub elapsed: Duration,
    /// The newest output lines (up to a few hundred characters).
    pub recent_output: String,
}

/// What one call produced, in domain terms (the MCP layer renders it).
#[derive(Debug, Clone, Default)]
pub struct ExecutionReport {
    pub success: bool,
    pub output: Vec<String>,
    pub result: Option<String>,
    /// `ExceptionName: message`, also for `TimeoutError` and `KernelDiedError`.
    pub error: Option<String>,
    pub traceback: Vec<String>,
    /// Files this call created or changed.
    pub files: Vec<FileInfo>,
    /// Images to show with the result: displayed figures, then image files
    /// the call wrote, fitted to the inline budget.
    pub images: Vec<InlineImage>,
}

/// How the wait for a cell ended.
enum Outcome {
    Completed,
    Died(String),
    /// Interrupted at the deadline, or because the client cancelled the call;
    /// `stopped` tells whether the cell then ended.
    Interrupted {
        stopped: bool,
        cancelled: bool,
    },
}

impl Registry {
    /// Runs `code` in `session`, waiting for calls queued before it.
    ///
    /// The call runs in its own task, so a client that goes away mid-call
    /// cannot leave the kernel half-way through a cell: `control.cancel` (the
    /// client's cancellation) interrupts the cell instead, like a timeout.
    pub async fn execute(
        self: &Arc<Self>,
        session: Arc<Session>,
        code: String,
        timeout: Option<Duration>,
        control: CallControl,
    ) -> Result<ExecutionReport, SessionError> {
        let registry = self.clone();
        let task = tokio::spawn(async move {
            let limit = timeout.unwrap_or(registry.settings.execution_timeout);
            let mut state = session.state.lock().await;
            if state.closed {
                return Err(SessionError::NotFound(format!("'{}'", session.id)));
            }
            session.touch();
            let report = registry
                .run_locked(&session, &mut state, code, limit, &control)
                .await;
            session.touch();
            report
        });
        task.await.unwrap_or_else(|e| {
            tracing::error!("execution task failed: {e}");
            Err(SessionError::Io(std::io::Error::other(
                "execution task failed",
            )))
        })
    }

    async fn run_locked(
        &self,
        session: &Session,
        state: &mut State,
        code: String,
        limit: Duration,
        control: &CallControl,
    ) -> Result<ExecutionReport, SessionError> {
        let mut notes: Vec<String> = state.notice.take().into_iter().collect();
        if let Some(dormant) = state.dormant.take() {
            match self.wake(session, state, dormant.clone()).await {
                Ok(note) => notes.push(note),
                Err(e) => {
                    state.dormant = Some(dormant);
                    return Err(e);
                }
            }
        }
        let recorded = state.record.is_some().then(|| code.clone());
        let stream = match self.start_cell(session, state, code.clone()).await {
            Ok(s) => s,
            Err(SessionError::Kernel(KernelError::Dead(detail))) => {
                // Died between calls: start afresh and say the state is gone.
                state.kernel = None;
                notes.push(lost_state_note(&detail));
                self.start_cell(session, state, code.clone()).await?
            }
            Err(e) => return Err(e),
        };

        let deadline = Instant::now() + limit;
        let mut sink = Sink {
            collector: Collector::new(self.settings.max_output_chars),
            recorder: Recorder::new(self.settings.max_output_chars),
            spill: Spill::default(),
        };
        let outcome = self
            .wait(stream, &mut sink, session, state, deadline, control)
            .await;
        let Sink {
            collector,
            recorder,
            mut spill,
        } = sink;
        // The file's last bytes must be on disk before the folder is looked at.
        spill.flush().await;
        let mut cell: CellOutput = collector.finish(spill.name());

        let mut report = ExecutionReport {
            success: cell.error.is_none(),
            ..Default::default()
        };
        match outcome {
            Outcome::Completed => {}
            Outcome::Died(detail) => {
                state.kernel = None;
                report.success = false;
                cell.error = Some(format!(
                    "KernelDiedError: the Python kernel died while running this code ({detail}). \
                     All variables and imports are lost. Files in the session folder are kept; \
                     the next call in this session starts a fresh kernel, so re-run your setup code."
                ));
                state.notice = Some(lost_state_note(&detail));
            }
            Outcome::Interrupted { stopped, cancelled } => {
                report.success = false;
                let secs = limit.as_secs_f64();
                let (name, why) = if cancelled {
                    (
                        "CancelledError",
                        "the client cancelled the call, so the code was interrupted".to_string(),
                    )
                } else {
                    (
                        "TimeoutError",
                        format!("execution exceeded the {secs:.0} s limit and was interrupted"),
                    )
                };
                cell.error = Some(if stopped {
                    format!(
                        "{name}: {why}. The session and its variables are kept; \
                         pass a larger `timeout` for long work."
                    )
                } else {
                    if let Some(k) = state.kernel.take() {
                        k.shutdown().await;
                    }
                    state.notice = Some(
                        "The previous call's kernel did not stop after an interrupt and was restarted: \
                         variables and imports are lost, files are kept. Re-run your setup code."
                            .into(),
                    );
                    format!(
                        "{name}: {why}, but it did not stop, so the kernel was restarted. \
                         Variables are lost; files are kept."
                    )
                });
            }
        }

        let mut shown = Vec::new();
        for img in std::mem::take(&mut cell.images) {
            match session
                .workspace
                .save_new("figure", img.ext, img.bytes.clone())
                .await
            {
                Ok(file) => shown.push((file, img.bytes)),
                Err(e) => tracing::warn!(session = %session.id, "could not save a figure: {e}"),
            }
        }
        let mut changes = session.workspace.refresh(&mut state.baseline).await;
        let used = state.baseline.total_bytes();
        if used > self.settings.max_session_bytes && cell.error.is_none() {
            report.success = false;
            cell.error = Some(format!(
                "DiskQuotaError: the session folder holds {used} bytes, over its limit of {} bytes. \
                 Delete files you no longer need (os.remove) before writing more.",
                self.settings.max_session_bytes
            ));
        }

        report.output = notes.into_iter().map(|n| format!("[{n}]\n")).collect();
        report.output.extend(cell.output);
        let more = changes.len().saturating_sub(MAX_REPORTED_FILES);
        changes.truncate(MAX_REPORTED_FILES);
        for (f, change) in &changes {
            let verb = match change {
                Change::Created => "File created",
                Change::Updated => "File updated",
            };
            report
                .output
                .push(format!("{verb}: {} ({}, {} bytes)", f.path, f.mime, f.size));
        }
        if more > 0 {
            report.output.push(format!(
                "… and {more} more files created or changed (not listed here); \
                 list_session_files lists every file"
            ));
        }
        report.files = changes.into_iter().map(|(f, _)| f).collect();
        let (images, image_notes) = inline::choose(
            &session.workspace,
            shown,
            &report.files,
            &self.settings.inline_images,
        )
        .await;
        report.images = images;
        report
            .output
            .extend(image_notes.into_iter().map(|n| format!("[{n}]")));
        state
            .history
            .record(code, report.success, recorder.finish(cell.error.as_deref()));
        report.result = cell.result;
        report.error = cell.error;
        report.traceback = cell.traceback;
        // A kernel that outlives us (remote) is found again by the id in the
        // record: keep it current when the kernel was replaced.
        let kernel_now = state
            .kernel
            .as_ref()
            .and_then(|k| k.resume_id())
            .map(String::from);
        if let Some(record) = &mut state.record
            && kernel_now.is_some()
            && record.kernel != kernel_now
        {
            record.kernel = kernel_now;
            self.save_record(record.clone()).await;
        }
        if let (Some(record), Some(code)) = (&mut state.record, recorded) {
            // Only cells that completed are replayed after a restart.
            let write = if report.success {
                record.push_cell(&code)
            } else {
                None
            };
            self.record_call(&session.id, record, write, code).await;
        }
        Ok(report)
    }

    /// Sends the code to the session's kernel, starting one if it has none.
    async fn start_cell(
        &self,
        session: &Session,
        state: &mut State,
        code: String,
    ) -> Result<ExecutionStream, SessionError> {
        if state.kernel.is_none() {
            state.kernel = Some(self.factory.start(session.workspace.root()).await?);
        }
        let kernel = state.kernel.as_ref().expect("kernel just set");
        Ok(kernel.execute(code).await?)
    }

    async fn wait(
        &self,
        mut stream: ExecutionStream,
        sink: &mut Sink,
        session: &Session,
        state: &State,
        deadline: Instant,
        control: &CallControl,
    ) -> Outcome {
        let mut interrupted_at: Option<Instant> = None;
        let mut cancelled = false;
        let started = Instant::now();
        let mut progress = tokio::time::interval_at(started + PROGRESS_EVERY, PROGRESS_EVERY);
        progress.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // What the last progress update showed, to send only what is new.
        let mut shown_seq = 0u64;
        let mut last_sent = started;
        loop {
            let until = match interrupted_at {
                None => deadline,
                Some(t) => t + self.settings.interrupt_grace,
            };
            let next = tokio::select! {
                next = tokio::time::timeout_at(until, stream.recv()) => next,
                _ = progress.tick(), if control.progress.is_some() => {
                    let collector = &sink.collector;
                    let seq = collector.seq();
                    let heartbeat = last_sent.elapsed() >= PROGRESS_HEARTBEAT;
                    if (seq != shown_seq || heartbeat)
                        && let Some(tx) = &control.progress
                    {
                        let _ = tx.try_send(ProgressUpdate {
                            elapsed: started.elapsed(),
                            recent_output: collector.recent(PROGRESS_CHARS),
                        });
                        shown_seq = seq;
                        last_sent = Instant::now();
                    }
                    continue;
                }
                _ = control.cancel.cancelled(), if interrupted_at.is_none() => {
                    if let Some(k) = &state.kernel {
                        k.interrupt().await;
                    }
                    interrupted_at = Some(Instant::now());
                    cancelled = true;
                    continue;
                }
            };
            match next {
                Ok(Some(ExecMessage::Event(ev))) => sink.push(ev, session).await,
                Ok(Some(ExecMessage::End(ExecEnd::Completed))) => {
                    return match interrupted_at {
                        None => Outcome::Completed,
                        Some(_) => Outcome::Interrupted {
                            stopped: true,
                            cancelled,
                        },
                    };
                }
                Ok(Some(ExecMessage::End(ExecEnd::Died { detail }))) => {
                    return Outcome::Died(detail);
                }
                Ok(None) => return Outcome::Died("the kernel task stopped".into()),
                Err(_) if interrupted_at.is_none() => {
                    if let Some(k) = &state.kernel {
                        k.interrupt().await;
                    }
                    interrupted_at = Some(Instant::now());
                }
                Err(_) => {
                    return Outcome::Interrupted {
                        stopped: false,
                        cancelled,
                    };
                }
            }
        }
    }
}

fn lost_state_note(detail: &str) -> String {
    format!(
        "Note: the previous kernel of this session died ({detail}); this call ran in a fresh kernel. \
         Variables and imports from earlier calls are lost (files are kept): re-run your setup code."
    )
}

/// Where a running cell's events go.
struct Sink {
    /// What the model reads.
    collector: Collector,
    /// What the session's history keeps.
    recorder: Recorder,
    /// The full text of an output too long to return.
    spill: Spill,
}

impl Sink {
    async fn push(&mut self, ev: crate::kernel::KernelEvent, session: &Session) {
        self.recorder.push(&ev);
        self.collector.push(ev);
        if let Some(text) = self.collector.take_spill() {
            self.spill.write(session, &text).await;
        }
        if let Some(html) = self.collector.take_html() {
            match session
                .workspace
                .save_new("display", "html", html.into_bytes())
                .await
            {
                Ok(file) => self.collector.html_saved(Some(&file.path)),
                Err(e) => {
                    tracing::warn!(session = %session.id, "could not save an HTML display: {e}");
                    self.collector.html_saved(None);
                }
            }
        }
    }
}

/// The file that receives the full text of an output too long to return.
#[derive(Default)]
struct Spill {
    file: Option<(tokio::fs::File, String)>,
    failed: bool,
}

impl Spill {
    async fn write(&mut self, session: &Session, text: &str) {
        use tokio::io::AsyncWriteExt;
        if self.failed {
            return;
        }
        if self.file.is_none() {
            match session.workspace.create_new("output", "txt").await {
                Ok(f) => self.file = Some(f),
                Err(e) => {
                    tracing::warn!(session = %session.id, "cannot save long output: {e}");
                    self.failed = true;
                    return;
                }
            }
        }
        if let Some((f, _)) = &mut self.file
            && f.write_all(text.as_bytes()).await.is_err()
        {
            self.failed = true;
        }
    }

    /// Waits until everything written has reached the file (tokio's `File`
    /// completes writes in the background).
    async fn flush(&mut self) {
        use tokio::io::AsyncWriteExt;
        if let Some((f, _)) = &mut self.file
            && f.flush().await.is_err()
        {
            self.failed = true;
        }
    }

    fn name(&self) -> Option<&str> {
        match (&self.file, self.failed) {
            (Some((_, name)), false) => Some(name),
            _ => None,
        }
    }
}
