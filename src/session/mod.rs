//! Interpreter sessions: the registry, their lifetime, and running code in them.
//!
//! A [`Registry`] maps [`SessionId`]s to [`Session`]s under a short
//! `std::sync::Mutex` that is never held across an `.await`. Each session
//! serialises its own calls with a FIFO `tokio::sync::Mutex` around its
//! kernel, so calls on one session run in arrival order while different
//! sessions run in parallel. Expiry: every call refreshes `last_used`;
//! [`Registry::sweep`] (run by [`expiry::run`]) removes idle sessions, and a
//! lookup of a session past its deadline treats it as gone at once.
//!
//! Sessions outlive the server ([`store`]): each has a record on disk,
//! rewritten after every call with the code of the cells that completed.
//! A shutdown keeps folders and records (unless `ephemeral`); at start-up
//! [`Registry::adopt`] brings every unexpired session back *dormant* (no
//! kernel) and removes expired and pooled ones. The first call on a dormant
//! session starts a kernel and replays its cells ([`replay`]).
//! Each session keeps its [`history::History`] (code, success and outputs of
//! every call, bounded), which [`Registry::export_notebook`] writes as a
//! Jupyter notebook into the session folder.
//! Uploads ([`upload`]) take the same queue as calls.

mod execute;
pub mod expiry;
pub mod history;
mod html;
pub mod id;
pub mod inline;
pub mod output;
pub mod pool;
mod replay;
pub mod store;
mod upload;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::auth::Principal;
use crate::kernel::{KernelError, KernelFactory, KernelHandle};
use crate::workspace::{Folders, Snapshot, Workspace};

pub use execute::{CallControl, ExecutionReport, ProgressUpdate};
pub use id::SessionId;
pub use inline::{InlineBudget, InlineImage};
use pool::{Pool, Prepared};
pub use upload::UploadError;

/// What the registry needs to know, fixed at start-up.
#[derive(Debug, Clone)]
pub struct SessionSettings {
    /// Parent of every session folder.
    pub data_dir: PathBuf,
    /// A session unused for this long is gone.
    pub idle_timeout: Duration,
    /// Default per-call execution limit.
    pub execution_timeout: Duration,
    /// After an interrupt, how long a cell gets to stop before its kernel is restarted.
    pub interrupt_grace: Duration,
    /// Most characters (bytes) of output returned per call; the rest goes to a file.
    pub max_output_chars: usize,
    /// Most live sessions at once.
    pub max_sessions: usize,
    /// Disk quota of one session folder.
    pub max_session_bytes: u64,
    /// Sessions (folders and records) are kept across restarts.
    pub durable: bool,
    /// How a dormant session gets its state back.
    pub restore: Restore,
    /// Longest a replay may take in all.
    pub replay_timeout: Duration,
    /// Images returned inline with a call's result.
    pub inline_images: InlineBudget,
    /// Host folders every kernel sees (`--mount`), as each session's
    /// instructions tell the model.
    pub host_folders: Vec<crate::sandbox::HostMount>,
}

/// How a session adopted after a restart gets its state back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restore {
    /// Its files, and its variables by replaying the cells that completed.
    Replay,
    /// Its files only.
    Files,
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// Unknown, expired, cleared, or malformed id: all look the same.
    #[error("Session {0} not found or has expired")]
    NotFound(String),
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error("session folder: {0}")]
    Io(#[from] std::io::Error),
    /// `--max-sessions` sessions are live already.
    #[error("the server already runs {0} sessions, its limit")]
    TooMany(usize),
}

/// The live sessions.
pub struct Registry {
    sessions: Mutex<HashMap<SessionId, Arc<Session>>>,
    /// Kernels started ahead of demand (see [`pool`]).
    pool: Pool,
    /// Sessions whose kernel is starting (not yet in `sessions`).
    starting: std::sync::atomic::AtomicUsize,
    factory: Arc<dyn KernelFactory>,
    /// Where session folders are: on our disk, or beside remote kernels.
    folders: Folders,
    settings: SessionSettings,
    /// Session records; `None` when sessions are not durable.
    store: Option<store::Store>,
}

/// One interpreter session: a kernel, a folder, a deadline.
pub struct Session {
    pub id: SessionId,
    /// Who created it; nobody else can see it.
    owner: Principal,
    pub workspace: Workspace,
    /// Refreshed at the start and end of every call.
    last_used: Mutex<Instant>,
    /// The kernel and what the folder looked like after the last call. The
    /// lock is the session's queue: FIFO, held for a whole call.
    state: tokio::sync::Mutex<State>,
}

struct State {
    /// `None` after the kernel died or the session was closed.
    kernel: Option<KernelHandle>,
    /// Set when the session is removed; later calls see "not found".
    closed: bool,
    baseline: Snapshot,
    /// Said in the next result: why the state was lost.
    notice: Option<String>,
    /// What is kept on disk about this session (when durable).
    record: Option<store::Record>,
    /// Adopted after a restart and not used since: the cells to replay when
    /// a kernel is next started.
    dormant: Option<replay::Dormant>,
    /// Every completed call, for notebook export (bounded).
    history: history::History,
}

/// Why [`Registry::export_notebook`] wrote no notebook.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Session(#[from] SessionError),
    /// The name asked for is not a plain file name.
    #[error("{0}")]
    BadName(String),
    /// A file (or anything else) already has the name asked for.
    #[error("{0} already exists in the session folder")]
    Exists(String),
}

/// A notebook written by [`Registry::export_notebook`].
#[derive(Debug, Clone)]
pub struct ExportedNotebook {
    pub file: crate::workspace::FileInfo,
    /// Code cells in it.
    pub cells: usize,
    /// The session's earliest calls left out (see [`history`]).
    pub dropped: usize,
}

/// The longest notebook name accepted.
const MAX_NOTEBOOK_NAME: usize = 120;

impl Registry {
    pub fn new(factory: Arc<dyn KernelFactory>, settings: SessionSettings) -> Self {
        let store = if settings.durable {
            match store::Store::open(&settings.data_dir) {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::warn!(
                        "cannot keep session records in {}: {e}; sessions will not survive a restart",
                        settings.data_dir.display()
                    );
                    None
                }
            }
        } else {
            None
        };
        let folders = match factory.remote_files() {
            Some((base, files)) => Folders::Remote { base, files },
            None => Folders::Local {
                data_dir: settings.data_dir.clone(),
            },
        };
        Self {
            folders,
            pool: Pool::default(),
            sessions: Mutex::new(HashMap::new()),
            starting: std::sync::atomic::AtomicUsize::new(0),
            factory,
            settings,
            store,
        }
    }

    /// Runs `f` on the record store off the reactor (the store does blocking
    /// I/O), if sessions are durable. A failure is logged: no call's result
    /// depends on its record.
    async fn with_store<F>(&self, id: &SessionId, f: F)
    where
        F: FnOnce(&store::Store) -> std::io::Result<()> + Send + 'static,
    {
        let Some(store) = self.store.clone() else {
            return;
        };
        let done = tokio::task::spawn_blocking(move || f(&store)).await;
        match done {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(session = %id, "cannot update the session record: {e}"),
            Err(e) => tracing::warn!(session = %id, "cannot update the session record: {e}"),
        }
    }

    async fn save_record(&self, record: store::Record) {
        let Some(id) = SessionId::parse(&record.id) else {
            return;
        };
        self.with_store(&id, move |store| store.save(&record)).await;
    }

    /// After a call: the cell appended to the log when it completed (or the
    /// record rewritten when the history was just cut), and the session
    /// marked used. Two small writes, whatever the session's length.
    async fn record_call(
        &self,
        id: &SessionId,
        record: &store::Record,
        write: Option<bool>,
        code: String,
    ) {
        let key = id.clone();
        let cut = (write == Some(false)).then(|| record.clone());
        self.with_store(id, move |store| {
            match (write, cut) {
                (Some(true), _) => store.append_cell(&key, &code)?,
                (Some(false), Some(record)) => {
                    store.save(&record)?;
                    store.drop_cells(&key);
                }
                _ => {}
            }
            store.touch(&key)
        })
        .await;
    }

    async fn remove_record(&self, id: &SessionId) {
        let key = id.clone();
        self.with_store(id, move |store| {
            store.remove(&key);
            Ok(())
        })
        .await;
    }

    /// Throws a pooled session-to-be away: kernel, folder and record.
    pub(crate) async fn discard(&self, p: Prepared) {
        p.kernel.shutdown().await;
        let _ = p.workspace.remove().await;
        self.remove_record(&p.id).await;
    }

    pub fn settings(&self) -> &SessionSettings {
        &self.settings
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<SessionId, Arc<Session>>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts a kernel in a new folder and registers the session for `owner`.
    pub async fn create(&self, owner: &Principal) -> Result<Arc<Session>, SessionError> {
        // Count sessions being created too, so a burst cannot overshoot the limit.
        let _slot = {
            let live = self.map().len();
            let starting = self
                .starting
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let guard = StartingGuard(&self.starting);
            if live + starting >= self.settings.max_sessions {
                return Err(SessionError::TooMany(self.settings.max_sessions));
            }
            guard
        };
        let Prepared {
            id,
            workspace,
            kernel,
        } = match self.pool.take(self).await {
            Some(p) => p,
            None => self.prepare().await?,
        };
        let baseline = workspace.snapshot().await;
        let record = self.store.is_some().then(|| store::Record {
            kernel: kernel.resume_id().map(String::from),
            ..store::Record::new(&id, &owner.0, false)
        });
        if let Some(r) = &record {
            self.save_record(r.clone()).await;
        }
        let session = Arc::new(Session {
            id: id.clone(),
            owner: owner.clone(),
            workspace,
            last_used: Mutex::new(Instant::now()),
            state: tokio::sync::Mutex::new(State {
                kernel: Some(kernel),
                closed: false,
                baseline,
                notice: None,
                record,
                dormant: None,
                history: history::History::default(),
            }),
        });
        self.map().insert(id, session.clone());
        tracing::info!(session = %session.id, "session created");
        Ok(session)
    }

    /// A new id, its folder, and a kernel started in it. Until a session
    /// takes it, its record says it is pooled (removed after a crash).
    pub(crate) async fn prepare(&self) -> Result<Prepared, SessionError> {
        let id = SessionId::generate();
        self.save_record(store::Record::new(&id, "", true)).await;
        let workspace = match self.folders.open(id.as_str()).await {
            Ok(w) => w,
            Err(e) => {
                self.remove_record(&id).await;
                return Err(e.into());
            }
        };
        match self.factory.start(workspace.root()).await {
            Ok(kernel) => {
                if let Some(k) = kernel.resume_id() {
                    // So that a crash before a session takes it cannot leak it.
                    self.save_record(store::Record {
                        kernel: Some(k.to_string()),
                        ..store::Record::new(&id, "", true)
                    })
                    .await;
                }
                Ok(Prepared {
                    id,
                    workspace,
                    kernel,
                })
            }
            Err(e) => {
                let _ = workspace.remove().await;
                self.remove_record(&id).await;
                Err(e.into())
            }
        }
    }

    /// Looks a client-supplied id up for `caller`. Malformed, unknown, expired
    /// and other principals' ids all give the same [`SessionError::NotFound`].
    pub async fn get(&self, raw: &str, caller: &Principal) -> Result<Arc<Session>, SessionError> {
        let not_found = || SessionError::NotFound(display_id(raw));
        let id = SessionId::parse(raw).ok_or_else(not_found)?;
        let session = self.map().get(&id).cloned().ok_or_else(not_found)?;
        if session.owner != *caller {
            return Err(not_found());
        }
        if session.idle_for(Instant::now()) >= self.settings.idle_timeout && !session.is_busy() {
            self.close(&id).await;
            return Err(not_found());
        }
        Ok(session)
    }

    /// Writes the history of `session` as a Jupyter notebook into its folder,
    /// after the calls queued before this one. `name` (a plain file name;
    /// `.ipynb` is added if missing) is refused if taken; without one the
    /// notebook is `notebook_N.ipynb` with the first free `N`. Nothing is
    /// ever overwritten.
    pub async fn export_notebook(
        &self,
        session: &Session,
        name: Option<&str>,
    ) -> Result<ExportedNotebook, ExportError> {
        let name = name.map(notebook_name).transpose()?;
        self.files_ready(session).await;
        let mut state = session.state.lock().await;
        if state.closed {
            return Err(SessionError::NotFound(format!("'{}'", session.id)).into());
        }
        session.touch();
        let text = state.history.to_notebook().into_bytes();
        let saved = match &name {
            Some(n) => session.workspace.save_as(n, text).await,
            None => session.workspace.save_new("notebook", "ipynb", text).await,
        };
        let file = saved.map_err(|e| match (e.kind(), &name) {
            (std::io::ErrorKind::AlreadyExists, Some(n)) => ExportError::Exists(n.clone()),
            _ => ExportError::Session(SessionError::Io(e)),
        })?;
        // The next call reports what it changed, not this notebook.
        session.workspace.refresh(&mut state.baseline).await;
        Ok(ExportedNotebook {
            file,
            cells: state.history.len(),
            dropped: state.history.dropped(),
        })
    }

    /// Removes a session: shuts its kernel down and deletes its folder.
    pub async fn remove(&self, raw: &str, caller: &Principal) -> Result<(), SessionError> {
        let session = self.get(raw, caller).await?;
        self.close(&session.id).await;
        Ok(())
    }

    async fn close(&self, id: &SessionId) {
        let Some(session) = self.map().remove(id) else {
            return;
        };
        if let Some(kernel) = session.close().await {
            self.factory
                .discard(&kernel, session.workspace.root())
                .await;
        }
        self.remove_record(id).await;
        tracing::info!(session = %id, "session closed");
    }

    /// Removes every session idle for longer than the timeout; returns how many.
    pub async fn sweep(&self) -> usize {
        let now = Instant::now();
        let expired: Vec<SessionId> = self
            .map()
            .values()
            .filter(|s| s.idle_for(now) >= self.settings.idle_timeout && !s.is_busy())
            .map(|s| s.id.clone())
            .collect();
        for id in &expired {
            self.close(id).await;
        }
        expired.len()
    }

    pub fn len(&self) -> usize {
        self.map().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Server shutdown, all sessions at once: kernels are shut down; folders
    /// and records are kept when sessions are durable (else deleted). Pooled
    /// sessions-to-be are always deleted.
    pub async fn shutdown(self: &Arc<Self>) {
        let all: Vec<Arc<Session>> = self.map().drain().map(|(_, s)| s).collect();
        let mut set = tokio::task::JoinSet::new();
        for p in self.pool.drain() {
            let registry = self.clone();
            set.spawn(async move { registry.discard(p).await });
        }
        let keep = self.store.is_some();
        for s in all {
            let registry = self.clone();
            set.spawn(async move {
                if keep {
                    s.stop_kernel().await;
                } else {
                    if let Some(kernel) = s.close().await {
                        registry.factory.discard(&kernel, s.workspace.root()).await;
                    }
                    registry.remove_record(&s.id).await;
                }
            });
        }
        while set.join_next().await.is_some() {}
        if let Some(store) = self.store.clone() {
            let _ = tokio::task::spawn_blocking(move || store.sync()).await;
        }
    }

    /// Start-up: takes over the sessions a previous server left (see the
    /// module doc). Returns how many came back.
    pub async fn adopt(&self) -> usize {
        let Some(store) = self.store.clone() else {
            return 0;
        };
        let loaded = tokio::task::spawn_blocking({
            let store = store.clone();
            move || store.load_all()
        })
        .await
        .unwrap_or_default();
        let mut adopted = 0;
        let remote = matches!(self.folders, Folders::Remote { .. });
        let mut discards = tokio::task::JoinSet::new();
        for store::Loaded { id, record } in loaded {
            // The id was validated like a client's; only then is it a path.
            let folder = self.settings.data_dir.join(id.as_str());
            let expired = record.idle_for() >= self.settings.idle_timeout;
            if record.pooled || expired {
                if remote {
                    if let Some(kernel) = record.kernel.clone() {
                        // Its kernel (and folder, beside it) on the gateway.
                        let (factory, folders, id) =
                            (self.factory.clone(), self.folders.clone(), id.clone());
                        discards.spawn(async move {
                            if let Ok(w) = folders.open(id.as_str()).await {
                                factory.discard(&kernel, w.root()).await;
                            }
                        });
                    }
                } else {
                    let _ = tokio::fs::remove_dir_all(&folder).await;
                }
                store.remove(&id);
                if expired && !record.pooled {
                    tracing::info!(session = %id, "session expired while the server was down: removed");
                }
                continue;
            }
            let is_dir = remote
                || tokio::fs::symlink_metadata(&folder)
                    .await
                    .is_ok_and(|m| m.is_dir());
            if !is_dir {
                tracing::warn!(session = %id, "session folder missing; record removed");
                store.remove(&id);
                continue;
            }
            let workspace = match self.folders.open(id.as_str()).await {
                Ok(w) => w,
                Err(e) => {
                    tracing::warn!(session = %id, "cannot open the session folder ({e}); left alone");
                    continue;
                }
            };
            // A remote folder is listed when its kernel is back.
            let baseline = if remote {
                Snapshot::default()
            } else {
                workspace.snapshot().await
            };
            let idle = record.idle_for();
            let last_used = Instant::now()
                .checked_sub(idle)
                .unwrap_or_else(Instant::now);
            let dormant = replay::Dormant::from_record(&record, self.settings.restore);
            // The notebook of an adopted session keeps the code of its earlier
            // cells (their outputs were not kept).
            let mut history = history::History::default();
            for code in &record.cells {
                history.record(code.clone(), true, Vec::new());
            }
            let session = Arc::new(Session {
                id: id.clone(),
                owner: Principal(Arc::from(record.owner.as_str())),
                workspace,
                last_used: Mutex::new(last_used),
                state: tokio::sync::Mutex::new(State {
                    kernel: None,
                    closed: false,
                    baseline,
                    notice: None,
                    record: Some(record),
                    dormant: Some(dormant),
                    history,
                }),
            });
            self.map().insert(id, session);
            adopted += 1;
        }
        // Bounded: a gateway that does not answer must not hold the start-up.
        let _ = tokio::time::timeout(Duration::from_secs(60), async {
            while discards.join_next().await.is_some() {}
        })
        .await;
        adopted
    }
}

impl Session {
    fn idle_for(&self, now: Instant) -> Duration {
        now.saturating_duration_since(*self.last_used.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn touch(&self) {
        *self.last_used.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
    }

    /// A call holds the state lock for its whole length.
    fn is_busy(&self) -> bool {
        self.state.try_lock().is_err()
    }

    /// Lets go of the kernel and keeps the folder (server shutdown, durable
    /// sessions): a kernel that can outlive us (remote) keeps running for
    /// the next start; waits for the current call.
    async fn stop_kernel(&self) {
        let mut state = self.state.lock().await;
        state.closed = true;
        if let Some(k) = state.kernel.take() {
            k.detach().await;
        }
    }

    /// Shuts the kernel down and deletes the folder; waits for the current
    /// call. A remote folder is deleted through its kernel, so before the
    /// kernel goes; a local one (again) after, since the kernel may have
    /// written meanwhile. Returns the kernel a dormant session left running
    /// (remote), for the caller to discard.
    async fn close(&self) -> Option<String> {
        let mut state = self.state.lock().await;
        state.closed = true;
        let _ = self.workspace.remove().await;
        if let Some(k) = state.kernel.take() {
            k.shutdown().await;
        }
        if let Err(e) = self.workspace.remove().await {
            tracing::warn!(session = %self.id, "could not delete session folder: {e}");
        }
        state.dormant.take().and_then(|d| d.kernel)
    }

    pub async fn files(&self) -> Vec<crate::workspace::FileInfo> {
        self.workspace.list().await
    }
}

/// Releases a place among the sessions being created.
struct StartingGuard<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for StartingGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A client's notebook name as a file name: letters, digits, `-`, `_`,
/// `.` and spaces, not starting with `.`, one folder level; `.ipynb` added
/// when missing.
fn notebook_name(raw: &str) -> Result<String, ExportError> {
    let ok = !raw.is_empty()
        && raw.len() <= MAX_NOTEBOOK_NAME
        && !raw.starts_with(['.', ' '])
        && raw
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ' '));
    if !ok {
        return Err(ExportError::BadName(format!(
            "invalid notebook name {raw:?}: use up to {MAX_NOTEBOOK_NAME} letters, digits, \
             '-', '_', '.' or spaces, not starting with '.' (no folders)"
        )));
    }
    Ok(if raw.ends_with(".ipynb") {
        raw.to_string()
    } else {
        format!("{raw}.ipynb")
    })
}

/// An id as it may be shown back: only if it is a well-formed id.
fn display_id(raw: &str) -> String {
    match SessionId::parse(raw) {
        Some(id) => format!("'{id}'"),
        None => "(malformed id)".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notebook_names_are_plain_file_names() {
        assert_eq!(notebook_name("analysis").unwrap(), "analysis.ipynb");
        assert_eq!(notebook_name("run 2.ipynb").unwrap(), "run 2.ipynb");
        for bad in ["", ".hidden", "a/b", "../x", "x\0y", "ü", &"n".repeat(200)] {
            assert!(
                matches!(notebook_name(bad), Err(ExportError::BadName(_))),
                "{bad:?}"
            );
        }
    }
}
