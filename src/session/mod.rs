//! Interpreter sessions: the registry, their lifetime, and running code in them.
//!
//! A [`Registry`] maps [`SessionId`]s to [`Session`]s under a short
//! `std::sync::Mutex` that is never held across an `.await`. Each session
//! serialises its own calls with a FIFO `tokio::sync::Mutex` around its
//! kernel, so calls on one session run in arrival order while different
//! sessions run in parallel. Expiry: every call refreshes `last_used`;
//! [`Registry::sweep`] (run by [`expiry::run`]) removes idle sessions, and a
//! lookup of a session past its deadline treats it as gone at once.
//! Uploads ([`upload`]) take the same queue as calls.

mod execute;
pub mod expiry;
pub mod id;
pub mod output;
pub mod pool;
mod upload;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::auth::Principal;
use crate::kernel::{KernelError, KernelFactory, KernelHandle};
use crate::workspace::{Snapshot, Workspace};

pub use execute::{CallControl, ExecutionReport, ProgressUpdate};
pub use id::SessionId;
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
    /// Host folders every kernel sees (`--mount`), as each session's
    /// instructions tell the model.
    pub host_folders: Vec<crate::sandbox::HostMount>,
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
    settings: SessionSettings,
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
}

impl Registry {
    pub fn new(factory: Arc<dyn KernelFactory>, settings: SessionSettings) -> Self {
        Self {
            pool: Pool::default(),
            sessions: Mutex::new(HashMap::new()),
            starting: std::sync::atomic::AtomicUsize::new(0),
            factory,
            settings,
        }
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
        } = match self.pool.take().await {
            Some(p) => p,
            None => self.prepare().await?,
        };
        let baseline = workspace.snapshot().await;
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
            }),
        });
        self.map().insert(id, session.clone());
        tracing::info!(session = %session.id, "session created");
        Ok(session)
    }

    /// A new id, its folder, and a kernel started in it.
    pub(crate) async fn prepare(&self) -> Result<Prepared, SessionError> {
        let id = SessionId::generate();
        let workspace = Workspace::create(self.settings.data_dir.join(id.as_str())).await?;
        match self.factory.start(workspace.root()).await {
            Ok(kernel) => Ok(Prepared {
                id,
                workspace,
                kernel,
            }),
            Err(e) => {
                let _ = workspace.remove().await;
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
        session.close().await;
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

    /// Closes every session (server shutdown), all at once.
    pub async fn shutdown(&self) {
        let all: Vec<Arc<Session>> = self.map().drain().map(|(_, s)| s).collect();
        let mut set = tokio::task::JoinSet::new();
        for p in self.pool.drain() {
            set.spawn(async move {
                p.kernel.shutdown().await;
                let _ = p.workspace.remove().await;
            });
        }
        for s in all {
            set.spawn(async move { s.close().await });
        }
        while set.join_next().await.is_some() {}
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

    /// Shuts the kernel down and deletes the folder; waits for the current call.
    async fn close(&self) {
        let mut state = self.state.lock().await;
        state.closed = true;
        if let Some(k) = state.kernel.take() {
            k.shutdown().await;
        }
        if let Err(e) = self.workspace.remove().await {
            tracing::warn!(session = %self.id, "could not delete session folder: {e}");
        }
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

/// An id as it may be shown back: only if it is a well-formed id.
fn display_id(raw: &str) -> String {
    match SessionId::parse(raw) {
        Some(id) => format!("'{id}'"),
        None => "(malformed id)".to_string(),
    }
}
