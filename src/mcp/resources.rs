//! `kernel://{session_id}/{path}` resources: URIs, reads, and completions
//! of `path`. The file is opened and read by
//! [`crate::workspace::Workspace::read_file`] (beneath the session folder, no
//! symlinks); this module only maps its answers to MCP.
//!
//! Completion offers the files of the session named by the request's
//! already-resolved `session_id`, if the caller owns it; session ids
//! themselves are never completed (that would list every session of the
//! principal to anyone holding its token, which `resources/list` avoids too).

use base64::Engine;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use rmcp::ErrorData as McpError;
use rmcp::model::{
    CompleteRequestParams, CompleteResult, CompletionInfo, ReadResourceResult, Reference,
    ResourceContents, ResourceTemplate,
};

use crate::auth::Principal;
use crate::session::Registry;
use crate::workspace::{self, PathError, ReadError};

const SCHEME: &str = "kernel://";
const TEMPLATE: &str = "kernel://{session_id}/{path}";
/// At most this many values in one completion (the protocol's limit).
const MAX_COMPLETIONS: usize = CompletionInfo::MAX_VALUES;
/// Largest file served through a resource read.
const MAX_RESOURCE_BYTES: u64 = 64 * 1024 * 1024;
/// Characters left as they are in a URI path segment.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

pub fn template() -> ResourceTemplate {
    ResourceTemplate::new(TEMPLATE, "session-file")
        .with_title("Session file")
        .with_description(
            "A file in an interpreter session's folder (figures, CSVs, anything the code wrote). \
             `path` is relative to the session folder and may contain '/'.",
        )
}

/// The URI of `rel` (a `/`-separated relative path) in a session.
pub fn uri(session_id: &str, rel: &str) -> String {
    let path: Vec<String> = rel
        .split('/')
        .map(|seg| utf8_percent_encode(seg, SEGMENT).to_string())
        .collect();
    format!("{SCHEME}{session_id}/{}", path.join("/"))
}

pub async fn read(
    registry: &Registry,
    uri: &str,
    caller: &Principal,
) -> Result<ReadResourceResult, McpError> {
    let rest = uri.strip_prefix(SCHEME).ok_or_else(|| {
        McpError::invalid_params(
            format!("unsupported resource URI {uri:?}: expected kernel://{{session_id}}/{{path}}"),
            None,
        )
    })?;
    let (session_id, rel) = rest.split_once('/').ok_or_else(|| {
        McpError::invalid_params(
            "resource URI has no file path: expected kernel://{session_id}/{path}",
            None,
        )
    })?;
    let session = registry.get(session_id, caller).await.map_err(|e| {
        McpError::resource_not_found(
            format!("{e}; start a new session with execute_code and session_id \"\""),
            None,
        )
    })?;
    registry.files_ready(&session).await;
    let (bytes, file) = session
        .workspace
        .read_file(rel, MAX_RESOURCE_BYTES)
        .await
        .map_err(|e| match e {
            ReadError::Path(PathError::NotFound) => McpError::resource_not_found(
                format!("no file {rel:?} in session {session_id}"),
                None,
            ),
            ReadError::Folder => McpError::invalid_params(
                format!("{rel:?} is a folder, not a file; list_session_files lists the files"),
                None,
            ),
            ReadError::Unavailable(why) => {
                McpError::internal_error(format!("cannot read {rel:?} now: {why}"), None)
            }
            ReadError::Io(e) => {
                tracing::warn!(session = session_id, "reading {rel:?}: {e}");
                McpError::internal_error("could not read the file", None)
            }
            other => {
                McpError::invalid_params(format!("refused resource path {rel:?}: {other}"), None)
            }
        })?;
    let mime = file.mime;
    let contents = if workspace::is_textual(&mime) {
        match String::from_utf8(bytes) {
            Ok(text) => ResourceContents::text(text, uri.to_string()).with_mime_type(mime),
            Err(e) => blob(e.into_bytes(), uri, mime),
        }
    } else {
        blob(bytes, uri, mime)
    };
    Ok(ReadResourceResult::new(vec![contents]))
}

/// Completes the template's `path` argument: the caller's session's files
/// whose path starts with the value typed so far (sorted, at most
/// [`MAX_COMPLETIONS`], with the total). Anything else completes to nothing.
pub async fn complete(
    registry: &Registry,
    request: &CompleteRequestParams,
    caller: &Principal,
) -> Result<CompleteResult, McpError> {
    let none =
        || CompleteResult::new(CompletionInfo::with_all_values(Vec::new()).unwrap_or_default());
    match &request.r#ref {
        Reference::Resource(r) if r.uri == TEMPLATE => {}
        Reference::Resource(r) => {
            return Err(McpError::invalid_params(
                format!(
                    "unknown resource template {:?}; this server has {TEMPLATE}",
                    r.uri
                ),
                None,
            ));
        }
        _ => return Err(McpError::invalid_params("this server has no prompts", None)),
    }
    if request.argument.name != "path" {
        return Ok(none());
    }
    let Some(id) = request
        .context
        .as_ref()
        .and_then(|c| c.get_argument("session_id"))
    else {
        return Ok(none());
    };
    let Ok(session) = registry.get(id, caller).await else {
        return Ok(none());
    };
    let typed = &request.argument.value;
    let prefix = percent_encoding::percent_decode_str(typed)
        .decode_utf8()
        .map_or_else(|_| typed.clone(), |p| p.into_owned());
    let mut values: Vec<String> = session
        .files()
        .await
        .into_iter()
        .map(|f| f.path)
        .filter(|p| p.starts_with(&prefix))
        .collect();
    let total = values.len();
    values.truncate(MAX_COMPLETIONS);
    let info =
        CompletionInfo::with_pagination(values, u32::try_from(total).ok(), total > MAX_COMPLETIONS)
            .unwrap_or_default();
    Ok(CompleteResult::new(info))
}

fn blob(bytes: Vec<u8>, uri: &str, mime: String) -> ResourceContents {
    ResourceContents::blob(
        base64::engine::general_purpose::STANDARD.encode(bytes),
        uri.to_string(),
    )
    .with_mime_type(mime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_encode_each_segment() {
        assert_eq!(uri("abc", "plot.png"), "kernel://abc/plot.png");
        assert_eq!(
            uri("abc", "out/my data.csv"),
            "kernel://abc/out/my%20data.csv"
        );
        assert_eq!(uri("abc", "a%b"), "kernel://abc/a%25b");
    }
}
