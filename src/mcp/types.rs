//! Tool arguments and results as the model sees them. Doc comments here
//! become the JSON Schema descriptions in `tools/list`.

use std::any::TypeId;
use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};

use rmcp::model::JsonObject;
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
pub struct ExportNotebookArgs {
    /// The `session_id` returned by `execute_code`.
    pub session_id: String,
    /// File name for the notebook, e.g. "analysis" or "analysis.ipynb" (letters, digits,
    /// '-', '_', '.', spaces; no folders). Refused if a file of that name exists.
    /// Default: notebook_N.ipynb with the first free N.
    #[serde(default)]
    pub name: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct SessionArgs {
    /// The `session_id` returned by `execute_code`.
    pub session_id: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct UploadFileArgs {
    /// Session to put the file in: the `session_id` returned by `execute_code`. Empty string
    /// or "0" starts a new session.
    pub session_id: String,
    /// Where the file goes, relative to the session folder (the code's working directory),
    /// e.g. "sales.csv" or "data/sales.csv"; missing folders are created. Absolute paths, ".."
    /// and symbolic links are refused. As in resource URIs, "%" starts a percent-escape
    /// (write "%25" for a literal "%").
    pub path: String,
    /// The content as text (written as UTF-8). Give exactly one of `content` and `content_base64`.
    #[serde(default)]
    pub content: Option<String>,
    /// The content as base64, for binary files (images, Excel, Parquet, zip).
    #[serde(default)]
    pub content_base64: Option<String>,
    /// Replace a file that already exists at `path` (default false: that is an error).
    #[serde(default)]
    pub overwrite: bool,
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
    /// Files this call created or changed (each also a resource_link content block;
    /// images among them are also image content blocks, within a per-call budget).
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
pub struct ExportNotebookResult {
    pub success: bool,
    pub session_id: String,
    /// The notebook written (null on failure).
    pub file: Option<FileRef>,
    /// Code cells in the notebook: one per execute_code call of the session (in a very long
    /// session, the earliest calls are left out; `message` says so).
    pub cells: u64,
    /// What was written, or why nothing was (`FileExistsError: ...`, `SessionExpiredError: ...`).
    pub message: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct UploadFileResult {
    /// False when nothing was written (see `error`).
    pub success: bool,
    /// The session the file is in (empty if none could be used).
    pub session_id: String,
    /// The path to open from code, relative to its working directory, e.g.
    /// `pd.read_csv("data/sales.csv")`.
    pub path: Option<String>,
    /// The file written, readable as a resource at its `uri`.
    pub file: Option<FileRef>,
    /// An existing file was replaced.
    pub replaced: bool,
    /// Why nothing was written: `SessionExpiredError: ...`, `InvalidPathError: ...`,
    /// `FileExistsError: ...`, `DiskQuotaError: ...`, `FileTooLargeError: ...`.
    pub error: Option<String>,
    /// Present when this call created the session.
    pub session_info: Option<SessionInfo>,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct ClearSessionResult {
    pub success: bool,
    pub message: String,
}

/// The output schema of a result type: JSON Schema 2020-12 for what it
/// serialises to, with every sub-schema inlined (no `$ref`, which some
/// clients cannot resolve) and `Option<Struct>` written as
/// `"type": ["object", "null"]` rather than an `anyOf`. Clients such as the
/// Python SDK validate every result against it, so simpler is cheaper.
/// Computed once per type (tool routers are built per HTTP request).
pub fn output_schema<T: JsonSchema + 'static>() -> Arc<JsonObject> {
    static CACHE: SchemaCache = LazyLock::new(Default::default);
    cached::<T>(&CACHE, generate_output_schema::<T>)
}

type SchemaCache = LazyLock<Mutex<HashMap<TypeId, Arc<JsonObject>>>>;

/// `make()` once per type `T` in `cache`.
fn cached<T: 'static>(
    cache: &SchemaCache,
    make: impl FnOnce() -> Arc<JsonObject>,
) -> Arc<JsonObject> {
    let mut cache = cache.lock().unwrap_or_else(|p| p.into_inner());
    cache.entry(TypeId::of::<T>()).or_insert_with(make).clone()
}

fn generate_output_schema<T: JsonSchema>() -> Arc<JsonObject> {
    let settings = schemars::generate::SchemaSettings::draft2020_12()
        .for_serialize()
        .with(|s| s.inline_subschemas = true);
    let schema = settings.into_generator().into_root_schema_for::<T>();
    let mut value = serde_json::to_value(schema).expect("a schema serialises");
    flatten_nullable(&mut value);
    strip_unknown_formats(&mut value);
    let serde_json::Value::Object(mut object) = value else {
        panic!("output schemas are objects");
    };
    object.remove("title");
    object.remove("description");
    Arc::new(object)
}

/// `{"anyOf": [S, {"type": "null"}]}` with `S` of one named type becomes `S`
/// with `"type": [that, "null"]`, everywhere in the schema.
fn flatten_nullable(value: &mut serde_json::Value) {
    use serde_json::{Value, json};
    match value {
        Value::Object(map) => {
            let merged = match map.get("anyOf") {
                Some(Value::Array(any)) if any.len() == 2 => {
                    let null = json!({"type": "null"});
                    let other = if any[1] == null {
                        Some(&any[0])
                    } else if any[0] == null {
                        Some(&any[1])
                    } else {
                        None
                    };
                    match other {
                        Some(Value::Object(s)) => match s.get("type") {
                            Some(Value::String(t)) => {
                                let mut s = s.clone();
                                s.insert("type".into(), json!([t, "null"]));
                                Some(s)
                            }
                            _ => None,
                        },
                        _ => None,
                    }
                }
                _ => None,
            };
            if let Some(s) = merged {
                map.remove("anyOf");
                for (k, v) in s {
                    map.entry(k).or_insert(v);
                }
            }
            map.values_mut().for_each(flatten_nullable);
        }
        Value::Array(items) => items.iter_mut().for_each(flatten_nullable),
        _ => {}
    }
}

/// The input schema of an argument type: rmcp's, without the Rust-specific
/// `format`s (see [`strip_unknown_formats`]). Computed once per type.
pub fn input_schema<T: JsonSchema + 'static>() -> Arc<JsonObject> {
    static CACHE: SchemaCache = LazyLock::new(Default::default);
    cached::<T>(&CACHE, || {
        let schema = rmcp::handler::server::common::schema_for_input::<T>()
            .expect("argument types are objects");
        let mut object = schema.as_ref().clone();
        object.values_mut().for_each(strip_unknown_formats);
        Arc::new(object)
    })
}

/// Drops `format` values JSON Schema does not define (schemars writes
/// `uint64`, `double`, ...): validators such as Ajv, used by TypeScript
/// clients, warn about every unknown format on every call.
fn strip_unknown_formats(value: &mut serde_json::Value) {
    const KNOWN: &[&str] = &[
        "date-time",
        "date",
        "time",
        "duration",
        "email",
        "idn-email",
        "hostname",
        "idn-hostname",
        "ipv4",
        "ipv6",
        "uri",
        "uri-reference",
        "iri",
        "iri-reference",
        "uuid",
        "uri-template",
        "json-pointer",
        "relative-json-pointer",
        "regex",
    ];
    match value {
        serde_json::Value::Object(map) => {
            if let Some(serde_json::Value::String(f)) = map.get("format")
                && !KNOWN.contains(&f.as_str())
            {
                map.remove("format");
            }
            map.values_mut().for_each(strip_unknown_formats);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(strip_unknown_formats),
        _ => {}
    }
}
