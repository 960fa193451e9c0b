//! The MCP surface: tools, resources, and the conversion of domain results
//! into tool results. The only module that knows MCP and JSON.
//!
//! Two error channels: what the model should read (a Python exception, a
//! timeout, an unknown session, a dead kernel) is a normal tool result with
//! `isError: true`; malformed arguments are JSON-RPC `invalid_params`.
//!
//! A result's content is its JSON as text first (for clients that read only
//! text), then an `image` block per inline image, then a `resource_link` per
//! file it reports.

mod resources;
pub mod types;
mod upload;

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use rmcp::handler::server::tool::ToolRouter;
use rmcp::model::{
    CallToolResult, CompleteRequestParams, CompleteResult, ContentBlock, Implementation,
    JsonObject, ListResourceTemplatesResult, ListResourcesResult, PaginatedRequestParams,
    ProgressNotificationParam, ReadResourceRequestParams, ReadResourceResponse, Resource,
    ServerCapabilities, ServerConfig,
};
use rmcp::service::RequestContext;
use rmcp::{ErrorData as McpError, RoleServer, ServerHandler, tool, tool_handler, tool_router};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::auth::Principal;
use crate::session::{
    CallControl, ExecutionReport, ExportError, InlineImage, ProgressUpdate, Registry, SessionError,
};
use crate::workspace::FileInfo;
use types::*;

/// Longest `timeout` a call may ask for (one day).
const MAX_TIMEOUT_SECS: f64 = 86_400.0;

/// The MCP server handler. Cheap to clone: one per HTTP request or stdio connection.
#[derive(Clone)]
pub struct Interpreter {
    registry: Arc<Registry>,
    tool_router: ToolRouter<Self>,
}

#[tool_router]
impl Interpreter {
    pub fn new(registry: Arc<Registry>) -> Self {
        Self {
            registry,
            tool_router: Self::tool_router(),
        }
    }

    /// Execute Python code in a persistent Jupyter (IPython) kernel. Variables, imports and
    /// files persist between calls of the same session. Use "" as session_id to start a new
    /// session. matplotlib/seaborn figures shown with plt.show() (or left open) and plotly
    /// fig.show() are saved as PNG files and returned as images in the result, as are image
    /// files the code writes (a few per call, large ones scaled down). Every file the code
    /// creates or changes is listed in `files` and readable as the resource
    /// `kernel://{session_id}/{path}`. Markdown and LaTeX displays come back as their text;
    /// HTML-only displays (an IPython HTML object, a plotly figure shown with an HTML
    /// renderer) are saved as display_N.html with their text in `output`. `!pip install NAME`
    /// works. There is no interactive input (input() fails at once).
    #[tool(
        input_schema = types::input_schema::<ExecuteCodeArgs>(),
        output_schema = types::output_schema::<ExecuteCodeResult>()
    )]
    async fn execute_code(
        &self,
        args: JsonObject,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, McpError> {
        let args: ExecuteCodeArgs = parse(args)?;
        let timeout = match args.timeout {
            None => None,
            Some(t) if t.is_finite() && t > 0.0 && t <= MAX_TIMEOUT_SECS => {
                Some(Duration::from_secs_f64(t))
            }
            Some(t) => {
                return Err(McpError::invalid_params(
                    format!(
                        "timeout must be a number of seconds in (0, {MAX_TIMEOUT_SECS}], got {t}"
                    ),
                    None,
                ));
            }
        };
        let raw_id = args.session_id.unwrap_or_default();
        let new_session = raw_id.is_empty() || raw_id == "0";
        let session = if new_session {
            self.registry.create(&principal(&ctx)).await
        } else {
            self.registry.get(&raw_id, &principal(&ctx)).await
        };
        let session = match session {
            Ok(s) => s,
            Err(e) => return Ok(execute_failure(&raw_id, e)),
        };
        let id = session.id.clone();
        let (control, progress) = call_control(&ctx);
        let over_http = ctx.extensions.get::<axum::http::request::Parts>().is_some();
        let call = self.registry.execute(session, args.code, timeout, control);
        let report = if over_http && progress.is_none() {
            with_long_call_notice(call, &ctx.peer).await
        } else {
            call.await
        };
        if let Some(p) = progress {
            // The sender side is gone with the call; the forwarder ends by itself.
            let _ = p.await;
        }
        let report = match report {
            Ok(r) => r,
            Err(e) => return Ok(execute_failure(id.as_str(), e)),
        };
        let id = id.as_str();
        let session_info = new_session.then(|| SessionInfo {
            session_id: id.to_string(),
            instructions: self.session_instructions(id),
        });
        let failed = !report.success;
        let mut report = report;
        let images = std::mem::take(&mut report.images);
        let value = execute_result(id, report, session_info);
        let mut result = render(&value, failed);
        result.content.extend(images.into_iter().map(image_block));
        result.content.extend(value.files.iter().map(resource_link));
        Ok(result)
    }

    /// Save the session's history as a Jupyter notebook (.ipynb) in its folder: every
    /// execute_code call of the session in order, as a code cell with its outputs (printed
    /// text, figures, results, errors). Returns the file, readable as a resource. Existing
    /// files are never overwritten.
    #[tool(
        input_schema = types::input_schema::<ExportNotebookArgs>(),
        output_schema = types::output_schema::<ExportNotebookResult>()
    )]
    async fn export_notebook(
        &self,
        args: JsonObject,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, McpError> {
        let args: ExportNotebookArgs = parse(args)?;
        let failure = |message: String| ExportNotebookResult {
            success: false,
            session_id: args.session_id.clone(),
            file: None,
            cells: 0,
            message,
        };
        let session = match self.registry.get(&args.session_id, &principal(&ctx)).await {
            Ok(s) => s,
            Err(e) => return Ok(render(&failure(model_error(&e)), true)),
        };
        let exported = self
            .registry
            .export_notebook(&session, args.name.as_deref())
            .await;
        let exported = match exported {
            Ok(n) => n,
            Err(ExportError::BadName(why)) => return Err(McpError::invalid_params(why, None)),
            Err(ExportError::Exists(name)) => {
                let message = format!(
                    "FileExistsError: {name} already exists in the session folder; \
                     choose another name, or omit `name` for notebook_N.ipynb"
                );
                return Ok(render(&failure(message), true));
            }
            Err(ExportError::Session(e)) => return Ok(render(&failure(model_error(&e)), true)),
        };
        let id = session.id.as_str();
        let file = file_ref(id, &exported.file);
        let mut message = format!(
            "Notebook {} written with {} code cell(s), one per execute_code call.",
            file.name, exported.cells
        );
        if exported.dropped > 0 {
            message.push_str(&format!(
                " The {} earliest calls are not included (the history is bounded).",
                exported.dropped
            ));
        }
        let value = ExportNotebookResult {
            success: true,
            session_id: id.to_string(),
            cells: exported.cells as u64,
            message,
            file: Some(file),
        };
        let mut result = render(&value, false);
        result.content.extend(value.file.iter().map(resource_link));
        Ok(result)
    }

    /// List every file in a session's folder, with its resource URI, MIME type and size.
    #[tool(
        input_schema = types::input_schema::<SessionArgs>(),
        output_schema = types::output_schema::<ListFilesResult>()
    )]
    async fn list_session_files(
        &self,
        args: JsonObject,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, McpError> {
        let args: SessionArgs = parse(args)?;
        match self.registry.get(&args.session_id, &principal(&ctx)).await {
            Ok(s) => {
                self.registry.files_ready(&s).await;
                let files = s
                    .files()
                    .await
                    .iter()
                    .map(|f| file_ref(s.id.as_str(), f))
                    .collect();
                Ok(render(
                    &ListFilesResult {
                        session_id: s.id.to_string(),
                        files,
                        error: None,
                    },
                    false,
                ))
            }
            Err(e) => Ok(render(
                &ListFilesResult {
                    session_id: args.session_id,
                    files: Vec::new(),
                    error: Some(model_error(&e)),
                },
                true,
            )),
        }
    }

    /// Put a file into a session's folder, the code's working directory: uploaded as
    /// "data/sales.csv", it opens in execute_code as pd.read_csv("data/sales.csv"). Give the
    /// content as `content` (text) or `content_base64` (binary), at most 12 MiB. Missing
    /// folders are created; an existing file is replaced only with `overwrite: true`. Waits
    /// for a cell still running in that session. For larger data, fetch it from code
    /// (pd.read_csv(URL), !curl -O URL, where the network allows) or use a host folder the
    /// session instructions name.
    #[tool(
        input_schema = types::input_schema::<UploadFileArgs>(),
        output_schema = types::output_schema::<UploadFileResult>()
    )]
    async fn upload_file(
        &self,
        args: JsonObject,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, McpError> {
        let args: UploadFileArgs = parse(args)?;
        let bytes = upload::content(args.content, args.content_base64)?;
        let new_session = args.session_id.is_empty() || args.session_id == "0";
        let failure = |session_id: &str, error: String, session_info| {
            render(
                &UploadFileResult {
                    success: false,
                    session_id: session_id.to_string(),
                    path: None,
                    file: None,
                    replaced: false,
                    error: Some(error),
                    session_info,
                },
                true,
            )
        };
        // Refusals that need no session come first: no session is made for them.
        let checked = bytes.map_err(upload::too_large).and_then(|bytes| {
            crate::workspace::path::parse(&args.path)
                .map(|rel| (rel, bytes))
                .map_err(|e| upload::bad_path(&args.path, e))
        });
        let (rel, bytes) = match checked {
            Ok(ok) => ok,
            Err(e) => return Ok(failure("", e, None)),
        };
        let caller = principal(&ctx);
        let session = if new_session {
            self.registry.create(&caller).await
        } else {
            self.registry.get(&args.session_id, &caller).await
        };
        let session = match session {
            Ok(s) => s,
            Err(e) => return Ok(failure("", model_error(&e), None)),
        };
        let id = session.id.as_str();
        let session_info = new_session.then(|| SessionInfo {
            session_id: id.to_string(),
            instructions: self.session_instructions(id),
        });
        match self
            .registry
            .upload(&session, &rel, bytes, args.overwrite)
            .await
        {
            Ok(w) => Ok(render(
                &UploadFileResult {
                    success: true,
                    session_id: id.to_string(),
                    path: Some(w.info.path.clone()),
                    file: Some(file_ref(id, &w.info)),
                    replaced: w.replaced,
                    error: None,
                    session_info,
                },
                false,
            )),
            Err(e) => Ok(failure(
                id,
                upload::refusal(&args.path, e, model_error),
                session_info,
            )),
        }
    }

    /// End a session now: shut its kernel down and delete its folder and files.
    #[tool(
        input_schema = types::input_schema::<SessionArgs>(),
        output_schema = types::output_schema::<ClearSessionResult>()
    )]
    async fn clear_session(
        &self,
        args: JsonObject,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, McpError> {
        let args: SessionArgs = parse(args)?;
        match self
            .registry
            .remove(&args.session_id, &principal(&ctx))
            .await
        {
            Ok(()) => Ok(render(
                &ClearSessionResult {
                    success: true,
                    message: format!(
                        "Session {} cleared: its kernel was shut down and its files deleted.",
                        args.session_id
                    ),
                },
                false,
            )),
            Err(e) => Ok(render(
                &ClearSessionResult {
                    success: false,
                    message: model_error(&e),
                },
                true,
            )),
        }
    }
}

impl Interpreter {
    fn session_instructions(&self, id: &str) -> String {
        let idle = human_duration(self.registry.settings().idle_timeout);
        format!(
            "Use this `session_id` (\"{id}\") in subsequent execute_code calls to keep variables, \
             imports and files. The session expires after {idle} without use; after that, \
             start a new session and re-run your setup code. Files are readable as resources \
             kernel://{id}/{{path}} and listed by list_session_files; upload_file puts a file \
             into the session folder; export_notebook saves the session's calls and outputs as \
             a Jupyter notebook.{}",
            self.host_folders_note()
        )
    }

    /// What the model should know of the host folders shared with every
    /// kernel (`--mount`); empty when there are none.
    fn host_folders_note(&self) -> String {
        let folders = &self.registry.settings().host_folders;
        let Some(first) = folders.first() else {
            return String::new();
        };
        let list: Vec<String> = folders
            .iter()
            .map(|m| {
                let access = if m.writable {
                    "read-write"
                } else {
                    "read-only"
                };
                format!("{} ({access})", m.target.display())
            })
            .collect();
        format!(
            " Host folders shared with every session: {}. Code reads files there directly \
             (e.g. pd.read_csv(\"{}/FILE.csv\")), no upload needed; read-only ones cannot be \
             changed (copy a file into the session folder first); files written to a \
             read-write one stay on the host and are not session files.",
            list.join(", "),
            first.target.display()
        )
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for Interpreter {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new({
            // Logging is declared for the one notice long HTTP calls send
            // (see `with_long_call_notice`).
            #[allow(deprecated)]
            ServerCapabilities::builder()
                .enable_logging()
                .enable_completions()
                .enable_tools()
                .enable_resources()
                .build()
        })
        .with_server_info(Implementation::new(
            env!("CARGO_PKG_NAME"),
            env!("CARGO_PKG_VERSION"),
        ))
        .with_instructions(format!(
            "A stateful Python interpreter. Call execute_code with session_id \"\" to start a \
             session, then reuse the returned session_id. Figures come back as images; files \
             the code writes are listed in `files` (and as resource links) and readable as \
             resources kernel://{{session_id}}/{{path}}; upload_file puts a file into a \
             session's folder; export_notebook saves a session as a Jupyter notebook.{}",
            self.host_folders_note()
        ))
    }

    /// Accepted: the only log message sent is the info-level notice of a
    /// long HTTP call, which exists to keep its reply stream alive.
    #[allow(deprecated)]
    async fn set_level(
        &self,
        _request: rmcp::model::SetLevelRequestParams,
        _ctx: RequestContext<RoleServer>,
    ) -> Result<(), McpError> {
        Ok(())
    }

    async fn list_resources(
        &self,
        _request: Option<PaginatedRequestParams>,
        _ctx: RequestContext<RoleServer>,
    ) -> Result<ListResourcesResult, McpError> {
        // Session files are reachable only by who knows the session id: listing
        // them here would hand every client every session's id.
        Ok(ListResourcesResult::with_all_items(Vec::new()))
    }

    async fn list_resource_templates(
        &self,
        _request: Option<PaginatedRequestParams>,
        _ctx: RequestContext<RoleServer>,
    ) -> Result<ListResourceTemplatesResult, McpError> {
        Ok(ListResourceTemplatesResult::with_all_items(vec![
            resources::template(),
        ]))
    }

    /// Completes `path` in `kernel://{session_id}/{path}` from the caller's
    /// session's files (see [`resources::complete`]).
    async fn complete(
        &self,
        request: CompleteRequestParams,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CompleteResult, McpError> {
        resources::complete(&self.registry, &request, &principal(&ctx)).await
    }

    async fn read_resource(
        &self,
        request: ReadResourceRequestParams,
        ctx: RequestContext<RoleServer>,
    ) -> Result<ReadResourceResponse, McpError> {
        resources::read(&self.registry, &request.uri, &principal(&ctx))
            .await
            .map(Into::into)
    }
}

/// Who is calling: the principal the HTTP authentication put on the request,
/// or the local user (stdio, or HTTP without tokens).
fn principal(ctx: &RequestContext<RoleServer>) -> Principal {
    ctx.extensions
        .get::<axum::http::request::Parts>()
        .and_then(|parts| parts.extensions.get::<Principal>())
        .cloned()
        .unwrap_or_else(Principal::local)
}

/// After this long, a call over HTTP without progress sends one notice.
const LONG_CALL_NOTICE: Duration = Duration::from_secs(5);

/// Over HTTP a reply is one JSON body unless something is sent before it
/// (cheapest for clients). A call still running after [`LONG_CALL_NOTICE`]
/// sends one log notice, which turns its reply into an SSE stream with
/// keep-alive pings, so a long cell outlasts client read timeouts (the
/// Python SDK's is 300 s, as long as the default execution timeout).
async fn with_long_call_notice<F: std::future::Future>(
    call: F,
    peer: &rmcp::Peer<RoleServer>,
) -> F::Output {
    tokio::pin!(call);
    tokio::select! {
        out = &mut call => return out,
        _ = tokio::time::sleep(LONG_CALL_NOTICE) => {}
    }
    // Logging is deprecated by SEP-2577, but a log message is the one
    // notification a server may send without being asked for it.
    #[allow(deprecated)]
    let notice = rmcp::model::LoggingMessageNotificationParam::new(
        rmcp::model::LoggingLevel::Info,
        serde_json::json!("execute_code is still running"),
    )
    .with_logger(env!("CARGO_PKG_NAME"));
    #[allow(deprecated)]
    let _ = peer.notify_logging_message(notice).await;
    call.await
}

/// The call's cancellation and, when the client sent a progress token, a
/// task that turns [`ProgressUpdate`]s into `notifications/progress`.
fn call_control(
    ctx: &RequestContext<RoleServer>,
) -> (CallControl, Option<tokio::task::JoinHandle<()>>) {
    let mut control = CallControl {
        cancel: ctx.ct.clone(),
        progress: None,
    };
    let Some(token) = ctx.meta.get_progress_token() else {
        return (control, None);
    };
    let (tx, mut rx) = tokio::sync::mpsc::channel::<ProgressUpdate>(4);
    control.progress = Some(tx);
    let peer = ctx.peer.clone();
    let forward = tokio::spawn(async move {
        while let Some(u) = rx.recv().await {
            let secs = u.elapsed.as_secs_f64();
            let message = if u.recent_output.is_empty() {
                format!("running for {secs:.1} s")
            } else {
                format!(
                    "running for {secs:.1} s; latest output:\n{}",
                    u.recent_output
                )
            };
            let param = ProgressNotificationParam::new(token.clone(), secs).with_message(message);
            if peer.notify_progress(param).await.is_err() {
                break;
            }
        }
    });
    (control, Some(forward))
}

/// "30 minutes", "1 minute", "90 seconds".
fn human_duration(d: Duration) -> String {
    let secs = d.as_secs();
    let (n, unit) = if secs.is_multiple_of(3600) && secs >= 3600 {
        (secs / 3600, "hour")
    } else if secs.is_multiple_of(60) && secs >= 60 {
        (secs / 60, "minute")
    } else {
        (secs, "second")
    };
    format!("{n} {unit}{}", if n == 1 { "" } else { "s" })
}

/// Deserialises tool arguments; a mismatch is `invalid_params` with serde's explanation.
fn parse<T: DeserializeOwned>(args: JsonObject) -> Result<T, McpError> {
    serde_json::from_value(serde_json::Value::Object(args))
        .map_err(|e| McpError::invalid_params(format!("invalid arguments: {e}"), None))
}

/// Structured content plus the same JSON as text, for clients that read only text.
fn render<T: Serialize>(value: &T, is_error: bool) -> CallToolResult {
    let value = serde_json::to_value(value)
        .unwrap_or_else(|e| serde_json::json!({ "error": e.to_string() }));
    let mut result = CallToolResult::structured(value);
    result.is_error = Some(is_error);
    result
}

/// The message a model reads for a session-level failure.
fn model_error(e: &SessionError) -> String {
    match e {
        SessionError::NotFound(id) => format!(
            "SessionExpiredError: Session {id} not found or has expired (sessions end after a \
             period without use, or when cleared). Start a new session with session_id \"\" \
             and re-run your setup code (imports, data loading) before continuing."
        ),
        SessionError::Kernel(k) => format!("KernelStartError: {k}"),
        SessionError::TooMany(n) => format!(
            "SessionLimitError: the server already runs {n} sessions, its limit. Reuse an \
             existing session, or end one you no longer need with clear_session."
        ),
        SessionError::Io(io) => {
            tracing::error!("session I/O failure: {io}");
            "InternalError: the server could not prepare the session folder".to_string()
        }
    }
}

fn execute_failure(raw_id: &str, e: SessionError) -> CallToolResult {
    let session_id = match &e {
        SessionError::NotFound(_) => String::new(),
        _ => raw_id.to_string(),
    };
    render(
        &ExecuteCodeResult {
            success: false,
            session_id,
            output: Vec::new(),
            result: None,
            error: Some(model_error(&e)),
            traceback: Vec::new(),
            files: Vec::new(),
            session_info: None,
        },
        true,
    )
}

fn execute_result(
    id: &str,
    r: ExecutionReport,
    session_info: Option<SessionInfo>,
) -> ExecuteCodeResult {
    ExecuteCodeResult {
        success: r.success,
        session_id: id.to_string(),
        output: r.output,
        result: r.result,
        error: r.error,
        traceback: r.traceback,
        files: r.files.iter().map(|f| file_ref(id, f)).collect(),
        session_info,
    }
}

/// An inline image as an MCP `image` block.
fn image_block(img: InlineImage) -> ContentBlock {
    ContentBlock::image(
        base64::engine::general_purpose::STANDARD.encode(&img.bytes),
        img.mime,
    )
}

/// A reported file as a `resource_link` block.
fn resource_link(f: &FileRef) -> ContentBlock {
    ContentBlock::resource_link(
        Resource::new(f.uri.clone(), f.name.clone())
            .with_mime_type(f.mime_type.clone())
            .with_size(f.size),
    )
}

fn file_ref(session_id: &str, f: &FileInfo) -> FileRef {
    FileRef {
        uri: resources::uri(session_id, &f.path),
        mime_type: f.mime.clone(),
        name: f.path.clone(),
        size: f.size,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_naturally() {
        assert_eq!(human_duration(Duration::from_secs(1800)), "30 minutes");
        assert_eq!(human_duration(Duration::from_secs(60)), "1 minute");
        assert_eq!(human_duration(Duration::from_secs(3)), "3 seconds");
        assert_eq!(human_duration(Duration::from_secs(7200)), "2 hours");
    }

    #[test]
    fn python_errors_render_as_tool_results_not_protocol_errors() {
        let r = render(
            &execute_result(
                "abc",
                ExecutionReport {
                    success: false,
                    error: Some("ZeroDivisionError: division by zero".into()),
                    ..Default::default()
                },
                None,
            ),
            true,
        );
        assert_eq!(r.is_error, Some(true));
        let v = r.structured_content.unwrap();
        assert_eq!(v["error"], "ZeroDivisionError: division by zero");
        assert_eq!(v["success"], false);
        let text = r.content[0].as_text().unwrap().text.clone();
        assert_eq!(serde_json::from_str::<serde_json::Value>(&text).unwrap(), v);
    }
}
