//! The one task that owns a remote kernel's WebSocket.
//!
//! Like the local actor it answers [`Command`]s; the differences are the
//! transport (one socket for every channel), interrupts (REST), death (the
//! server reports `restarting`/`dead` on iopub, or the kernel is gone when
//! we reconnect) and the end of an execution: it needs both the iopub
//! `idle` and the shell reply, since the reply carries the folder's listing
//! (a user expression, see [`super::files`]). Shutdown deletes the kernel;
//! detaching (and our own shutdown) leaves it running for a later resume.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use jupyter_protocol::{
    Channel, ExecuteRequest, ExecutionState, ExpressionResult, JupyterMessage,
    JupyterMessageContent, KernelInfoRequest,
};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::Shared;
use super::ws::{self, KernelSocket};
use crate::kernel::actor::{parent_id, to_event};
use crate::kernel::{Command, ExecEnd, ExecMessage, KernelError};

/// The user expression that lists the session folder after each call.
pub(super) const SNAPSHOT_KEY: &str = "_mcp_snapshot";
const QUERY_KEY: &str = "r";
/// How long a reconnect after a dropped socket may take.
const RECONNECT: Duration = Duration::from_secs(20);
/// After our shutdown began, how long the registry has to say what becomes
/// of the kernel (less than the server's wait for its tasks).
const LET_GO_AFTER: Duration = Duration::from_secs(8);

enum Pending {
    Exec {
        events: mpsc::Sender<ExecMessage>,
        idle: bool,
        replied: bool,
    },
    Query {
        reply: oneshot::Sender<Result<String, KernelError>>,
    },
}

pub(super) struct Actor {
    pub shared: Arc<Shared>,
    pub kernel_id: String,
    /// Our session id on the socket: the server keeps messages for it while
    /// we reconnect.
    pub session: String,
    pub sock: KernelSocket,
    pub commands: mpsc::Receiver<Command>,
    pub exited: Arc<AtomicBool>,
    pub cancel: CancellationToken,
    /// This kernel's entry in the folder map (see [`super::files`]).
    pub folder: Option<(std::path::PathBuf, u64)>,
}

/// Connects to a kernel's channels and waits until it answers
/// `kernel_info`, within `limit`.
pub(super) async fn open(
    shared: &Shared,
    kernel_id: &str,
    session: &str,
    limit: Duration,
) -> Result<KernelSocket, KernelError> {
    let url = shared.rest.channels_url(kernel_id, session);
    let mut sock = ws::connect(&url, shared.settings.token.as_deref())
        .await
        .map_err(|e| KernelError::Start(format!("kernel WebSocket: {e}")))?;
    let ready = tokio::time::timeout(limit, async {
        loop {
            let msg: JupyterMessage = KernelInfoRequest {}.into();
            let id = msg.header.msg_id.clone();
            sock.send(&msg.with_session(session), Channel::Shell)
                .await
                .map_err(KernelError::Start)?;
            let answered = tokio::time::timeout(Duration::from_secs(1), async {
                while let Some(m) = sock.recv().await {
                    if matches!(m.content, JupyterMessageContent::KernelInfoReply(_))
                        && parent_id(&m) == Some(id.as_str())
                    {
                        return Ok(());
                    }
                }
                Err(KernelError::Start("the kernel socket closed".into()))
            })
            .await;
            match answered {
                Ok(r) => return r,
                Err(_) => continue,
            }
        }
    })
    .await;
    match ready {
        Ok(Ok(())) => Ok(sock),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(KernelError::Start(format!(
            "the remote kernel did not answer within {limit:?}"
        ))),
    }
}

/// Runs `code` silently and waits for its reply; an exception is an error.
pub(super) async fn run_silent(
    sock: &mut KernelSocket,
    session: &str,
    code: String,
    limit: Duration,
) -> Result<(), KernelError> {
    let msg: JupyterMessage = ExecuteRequest {
        code,
        silent: true,
        store_history: false,
        user_expressions: None,
        allow_stdin: false,
        stop_on_error: false,
    }
    .into();
    let id = msg.header.msg_id.clone();
    sock.send(&msg.with_session(session), Channel::Shell)
        .await
        .map_err(KernelError::Start)?;
    let waited = tokio::time::timeout(limit, async {
        while let Some(m) = sock.recv().await {
            if parent_id(&m) != Some(id.as_str()) {
                continue;
            }
            if let JupyterMessageContent::ExecuteReply(r) = &m.content {
                return match &r.error {
                    Some(e) => Err(KernelError::Start(format!(
                        "set-up code failed: {}: {}",
                        e.ename, e.evalue
                    ))),
                    None => Ok(()),
                };
            }
        }
        Err(KernelError::Start("the kernel socket closed".into()))
    })
    .await;
    waited.unwrap_or_else(|_| {
        Err(KernelError::Start(format!(
            "set-up code did not finish within {limit:?}"
        )))
    })
}

impl Actor {
    pub(super) async fn run(mut self) {
        let mut pending: HashMap<String, Pending> = HashMap::new();
        let mut running: Option<String> = None;
        let mut dead: Option<String> = None;
        // Our shutdown: the registry says next what becomes of this kernel
        // (detach a durable session's, delete a pooled one's); if it does
        // not in time, the kernel is let go, never deleted by default.
        let mut let_go_at: Option<tokio::time::Instant> = None;
        let delete = loop {
            tokio::select! {
                cmd = self.commands.recv() => match cmd {
                    None => break true,
                    Some(Command::Shutdown { done }) => {
                        self.end(true).await;
                        let _ = done.send(());
                        return;
                    }
                    Some(Command::Detach { done }) => {
                        self.end(dead.is_some()).await;
                        let _ = done.send(());
                        return;
                    }
                    Some(Command::Interrupt) => {
                        if dead.is_none()
                            && let Err(e) = self.shared.rest.interrupt(&self.kernel_id).await
                        {
                            tracing::warn!("{e}");
                        }
                    }
                    Some(Command::Execute { code, events, accepted }) => {
                        if let Some(detail) = &dead {
                            let _ = accepted.send(Err(KernelError::Dead(detail.clone())));
                            continue;
                        }
                        if running.is_some() {
                            let _ = accepted.send(Err(KernelError::Busy));
                            continue;
                        }
                        let expressions = HashMap::from([(
                            SNAPSHOT_KEY.to_string(),
                            super::files::snapshot_expr(),
                        )]);
                        let request = ExecuteRequest {
                            code,
                            silent: false,
                            store_history: true,
                            user_expressions: Some(expressions),
                            allow_stdin: false,
                            stop_on_error: true,
                        };
                        match self.send(request).await {
                            Ok(id) => {
                                pending.insert(id.clone(), Pending::Exec { events, idle: false, replied: false });
                                running = Some(id);
                                let _ = accepted.send(Ok(()));
                            }
                            Err(e) => {
                                let _ = accepted.send(Err(KernelError::Dead(e)));
                            }
                        }
                    }
                    Some(Command::Query { expr, reply }) => {
                        if let Some(detail) = &dead {
                            let _ = reply.send(Err(KernelError::Dead(detail.clone())));
                            continue;
                        }
                        let request = ExecuteRequest {
                            code: String::new(),
                            silent: true,
                            store_history: false,
                            user_expressions: Some(HashMap::from([(QUERY_KEY.to_string(), expr)])),
                            allow_stdin: false,
                            stop_on_error: false,
                        };
                        match self.send(request).await {
                            Ok(id) => {
                                pending.insert(id, Pending::Query { reply });
                            }
                            Err(e) => {
                                let _ = reply.send(Err(KernelError::Dead(e)));
                            }
                        }
                    }
                },
                msg = self.sock.recv() => {
                    let Some(msg) = msg else {
                        if dead.is_some() {
                            // Nothing to keep a socket for: wait for commands only.
                            self.park(&mut dead).await;
                            break false;
                        }
                        match self.reconnect().await {
                            Ok(()) => continue,
                            Err(detail) => {
                                self.died(&detail, &mut pending, &mut running);
                                dead = Some(detail);
                                continue;
                            }
                        }
                    };
                    if let JupyterMessageContent::Status(st) = &msg.content
                        && matches!(
                            st.execution_state,
                            ExecutionState::Restarting | ExecutionState::AutoRestarting | ExecutionState::Dead
                        )
                    {
                        if dead.is_none() {
                            let detail = format!(
                                "the gateway reports the kernel {}",
                                if st.execution_state == ExecutionState::Dead { "dead" } else { "died and is restarting" }
                            );
                            self.died(&detail, &mut pending, &mut running);
                            dead = Some(detail);
                        }
                        continue;
                    }
                    let Some(parent) = parent_id(&msg).map(str::to_string) else { continue };
                    self.route(msg, &parent, &mut pending, &mut running).await;
                },
                _ = self.cancel.cancelled(), if let_go_at.is_none() => {
                    let_go_at = Some(tokio::time::Instant::now() + LET_GO_AFTER);
                }
                _ = sleep_until(let_go_at) => break false,
            }
        };
        self.end(delete).await;
    }

    /// After the socket closed for good: answer commands until told to end.
    async fn park(&mut self, dead: &mut Option<String>) {
        let detail = dead.clone().unwrap_or_default();
        while let Some(cmd) = self.commands.recv().await {
            match cmd {
                Command::Shutdown { done } | Command::Detach { done } => {
                    let _ = done.send(());
                    break;
                }
                Command::Execute { accepted, .. } => {
                    let _ = accepted.send(Err(KernelError::Dead(detail.clone())));
                }
                Command::Query { reply, .. } => {
                    let _ = reply.send(Err(KernelError::Dead(detail.clone())));
                }
                Command::Interrupt => {}
            }
        }
    }

    async fn send(&mut self, request: ExecuteRequest) -> Result<String, String> {
        let msg: JupyterMessage = request.into();
        let msg = msg.with_session(&self.session);
        let id = msg.header.msg_id.clone();
        self.sock.send(&msg, Channel::Shell).await?;
        Ok(id)
    }

    async fn route(
        &mut self,
        msg: JupyterMessage,
        parent: &str,
        pending: &mut HashMap<String, Pending>,
        running: &mut Option<String>,
    ) {
        let Some(entry) = pending.get_mut(parent) else {
            return;
        };
        let reply = match msg.content {
            JupyterMessageContent::ExecuteReply(r) => Some(r),
            JupyterMessageContent::Status(st) => {
                if let Pending::Exec { idle, .. } = entry
                    && st.execution_state == ExecutionState::Idle
                {
                    *idle = true;
                }
                None
            }
            other => {
                if let Pending::Exec { events, .. } = entry
                    && let Some(ev) = to_event(other)
                {
                    let _ = events.send(ExecMessage::Event(ev)).await;
                }
                None
            }
        };
        match entry {
            Pending::Exec {
                idle,
                replied,
                events,
            } => {
                if let Some(r) = reply {
                    *replied = true;
                    if let Some(ExpressionResult::Ok { data, .. }) = r
                        .user_expressions
                        .as_ref()
                        .and_then(|m| m.get(SNAPSHOT_KEY))
                        && let Some(text) = plain_text(data)
                        && let Some((root, _)) = &self.folder
                    {
                        self.shared.files.deliver(root, &text);
                    }
                }
                if *idle && *replied {
                    let _ = events.send(ExecMessage::End(ExecEnd::Completed)).await;
                    pending.remove(parent);
                    *running = None;
                }
            }
            Pending::Query { .. } => {
                let Some(r) = reply else { return };
                let Some(Pending::Query { reply }) = pending.remove(parent) else {
                    return;
                };
                let answer = match r.user_expressions.and_then(|mut m| m.remove(QUERY_KEY)) {
                    Some(ExpressionResult::Ok { data, .. }) => plain_text(&data)
                        .ok_or_else(|| KernelError::Query("the answer had no text".into())),
                    Some(ExpressionResult::Error { ename, evalue, .. }) => {
                        Err(KernelError::Query(format!("{ename}: {evalue}")))
                    }
                    None => Err(KernelError::Query("no answer".into())),
                };
                let _ = reply.send(answer);
            }
        }
    }

    fn died(
        &mut self,
        detail: &str,
        pending: &mut HashMap<String, Pending>,
        running: &mut Option<String>,
    ) {
        tracing::info!(kernel = %self.kernel_id, "remote kernel lost: {detail}");
        self.exited.store(true, Ordering::SeqCst);
        *running = None;
        for (_, p) in pending.drain() {
            match p {
                Pending::Exec { events, .. } => {
                    let _ = events.try_send(ExecMessage::End(ExecEnd::Died {
                        detail: detail.to_string(),
                    }));
                }
                Pending::Query { reply } => {
                    let _ = reply.send(Err(KernelError::Dead(detail.to_string())));
                }
            }
        }
    }

    /// The socket closed: connect again with the same session id (the
    /// server replays what it kept for us), if the kernel still exists.
    async fn reconnect(&mut self) -> Result<(), String> {
        let limit = tokio::time::Instant::now() + RECONNECT;
        loop {
            match self.shared.rest.exists(&self.kernel_id).await {
                Ok(false) => return Err("the kernel is gone from the gateway".into()),
                Ok(true) => {
                    let url = self
                        .shared
                        .rest
                        .channels_url(&self.kernel_id, &self.session);
                    match ws::connect(&url, self.shared.settings.token.as_deref()).await {
                        Ok(s) => {
                            tracing::info!(kernel = %self.kernel_id, "kernel socket reconnected");
                            self.sock = s;
                            return Ok(());
                        }
                        Err(e) => tracing::debug!("reconnecting: {e}"),
                    }
                }
                Err(e) => tracing::debug!("reconnecting: {e}"),
            }
            if tokio::time::Instant::now() >= limit {
                return Err("the connection to the gateway was lost".into());
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Lets go of the kernel; `delete` also removes it from the server.
    async fn end(&mut self, delete: bool) {
        self.exited.store(true, Ordering::SeqCst);
        if let Some((root, token)) = self.folder.take() {
            self.shared.files.unregister(&root, token);
        }
        if delete && let Err(e) = self.shared.rest.delete(&self.kernel_id).await {
            tracing::warn!("{e}");
        }
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn plain_text(data: &jupyter_protocol::Media) -> Option<String> {
    let v = serde_json::to_value(data).ok()?;
    v.get("text/plain")?.as_str().map(String::from)
}
