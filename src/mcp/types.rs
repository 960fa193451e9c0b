//! Tool arguments and results as the model sees them. Doc comments here
//! become the JSON Schema descriptions in `tools/list`.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(Debug, Deserialize, JsonSchema)]
pub struct ExecuteCodeArgs {
    /// Python code to run (multi-line). The value of the last expression is returned in `result`.
    pub code: String,
    /// Session to run in. Empty string or "0" starts a new session; pass the returned
    /// `session_id` on later calls to keep variables, imports and files.
    #[serde(default)]
    pub session_id: Option<String>,
    /// Time limit for this call in seconds (default: the server's execution timeout, 300 s).
    /// On timeout the code is interrupted and the session's variables are kept.
    #[serde(default)]
    pub timeout: Option<f64>,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct SessionArgs {
    /// The `session_id` returned by `execute_code`.
    pub session_id: String,
}

/// A file in a session folder, readable as an MCP resource at `uri`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct FileRef {
    /// `kernel://{session_id}/{path}`
    pub uri: String,
    pub mime_type: String,
    /// Path relative to the session folder.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct SessionInfo {
    pub session_id: String,
    pub instructions: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct ExecuteCodeResult {
    /// False when the code raised, timed out, or the session could not be used.
    pub success: bool,
    /// The session this call ran in (empty if none could be used).
    pub session_id: String,
    /// stdout/stderr text and notices, in order.
    pub output: Vec<String>,
    /// Text of the last expression's value, if any.
    pub result: Option<String>,
    /// `ExceptionName: message`, e.g. `ZeroDivisionError: division by zero`,
    /// `TimeoutError: ...`, `KernelDiedError: ...`, `SessionExpiredError: ...`.
    pub error: Option<String>,
    /// Traceback lines (no colour codes).
    pub traceback: Vec<String>,
    /// Files this call created or changed.
    pub files: Vec<FileRef>,
    /// Present on the call that created the session.
    pub session_info: Option<SessionInfo>,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct ListFilesResult {
    pub session_id: String,
    pub files: Vec<FileRef>,
    /// Set when the session does not exist (`SessionExpiredError: ...`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct ClearSessionResult {
    pub success: bool,
    pub message: String,
}
