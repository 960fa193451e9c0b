//! `upload_file`: the content a client sends (text or base64, bounded), and
//! why a write was refused, in words a model can act on. The write itself
//! is [`crate::session::Registry::upload`].

use base64::Engine;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use rmcp::ErrorData as McpError;

use crate::session::UploadError;
use crate::workspace::{PathError, WriteError};

/// Largest file one upload carries. A streamable HTTP request is at most
/// 16 MiB (`serve::MAX_REQUEST_BYTES`), and base64 makes a file 4/3 larger,
/// so 12 MiB of binary content is what fits; the same limit holds for
/// text and over stdio, so a model meets one rule.
pub const MAX_UPLOAD_BYTES: usize = 12 * 1024 * 1024;

/// Standard base64; padding optional (models drop it now and then).
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// The file's bytes, or `Err(size)` when they are over [`MAX_UPLOAD_BYTES`]
/// (a refusal the model reads). Both or neither of `content` and
/// `content_base64`, or invalid base64, is `invalid_params`.
pub fn content(
    text: Option<String>,
    base64: Option<String>,
) -> Result<Result<Vec<u8>, usize>, McpError> {
    let bytes = match (text, base64) {
        (Some(t), None) => t.into_bytes(),
        (None, Some(b)) => {
            // Line breaks and spaces (MIME-style wrapping) are ignored.
            let b: String = b.chars().filter(|c| !c.is_ascii_whitespace()).collect();
            let size = b.len() / 4 * 3;
            if size > MAX_UPLOAD_BYTES {
                return Ok(Err(size));
            }
            BASE64.decode(b.as_bytes()).map_err(|e| {
                McpError::invalid_params(format!("content_base64 is not valid base64: {e}"), None)
            })?
        }
        (Some(_), Some(_)) => {
            return Err(McpError::invalid_params(
                "give either `content` (text) or `content_base64` (binary), not both",
                None,
            ));
        }
        (None, None) => {
            return Err(McpError::invalid_params(
                "missing the file's content: give `content` (text) or `content_base64` (binary)",
                None,
            ));
        }
    };
    Ok(match bytes.len() {
        n if n > MAX_UPLOAD_BYTES => Err(n),
        _ => Ok(bytes),
    })
}

/// The message for an upload over [`MAX_UPLOAD_BYTES`].
pub fn too_large(size: usize) -> String {
    format!(
        "FileTooLargeError: the file is {size} bytes; uploads are limited to {MAX_UPLOAD_BYTES} \
         bytes (12 MiB). Fetch large data from code instead (pd.read_csv(URL), !curl -O URL, \
         where the network allows), upload it in parts and join them in code, or ask the user \
         to share a host folder with the server (--mount)."
    )
}

/// The message for a refused path.
pub fn bad_path(rel: &str, e: PathError) -> String {
    format!(
        "InvalidPathError: refused path {rel:?}: {e}. Give a path relative to the session \
         folder, such as \"data.csv\" or \"input/data.csv\"."
    )
}

/// The message for an upload that wrote nothing; `session` renders
/// session-level errors (an unknown session).
pub fn refusal(
    rel: &str,
    e: UploadError,
    session: impl FnOnce(&crate::session::SessionError) -> String,
) -> String {
    match e {
        UploadError::Session(e) => session(&e),
        UploadError::Write(WriteError::Path(p)) => bad_path(rel, p),
        UploadError::Write(WriteError::Exists) => format!(
            "FileExistsError: {rel:?} already exists in the session folder. Pass \
             overwrite: true to replace it, or choose another path."
        ),
        UploadError::Write(WriteError::Folder) => {
            format!("IsADirectoryError: {rel:?} is a folder in the session; choose a file path.")
        }
        UploadError::Write(WriteError::NotAFolder) => format!(
            "NotADirectoryError: part of {rel:?} is a file, not a folder; choose another path."
        ),
        UploadError::Write(WriteError::NotAFile) => format!(
            "InvalidPathError: {rel:?} is not a regular file (a FIFO, socket or device) and is \
             not replaced; choose another path."
        ),
        UploadError::Write(WriteError::Quota { used, size, max }) => format!(
            "DiskQuotaError: the session folder holds {used} bytes; this {size}-byte file would \
             take it over its limit of {max} bytes. Nothing was written. Delete files you no \
             longer need (os.remove in execute_code), or replace a file with overwrite: true."
        ),
        UploadError::Write(WriteError::Io(e)) => {
            tracing::error!("upload of {rel:?} failed: {e}");
            "InternalError: the server could not write the file".to_string()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_is_text_or_base64_never_both() {
        assert_eq!(
            content(Some("é".into()), None).unwrap(),
            Ok("é".as_bytes().to_vec())
        );
        assert_eq!(
            content(None, Some("AAEC/w==".into())).unwrap(),
            Ok(vec![0, 1, 2, 255])
        );
        // Unpadded, or wrapped over lines.
        assert_eq!(
            content(None, Some("AAEC/w".into())).unwrap(),
            Ok(vec![0, 1, 2, 255])
        );
        assert_eq!(
            content(None, Some("AAEC\n/w==\n".into())).unwrap(),
            Ok(vec![0, 1, 2, 255])
        );
        assert!(content(None, Some("not base64!".into())).is_err());
        assert!(content(Some("a".into()), Some("YQ==".into())).is_err());
        assert!(content(None, None).is_err());
    }

    #[test]
    fn content_is_bounded() {
        let big = "a".repeat(MAX_UPLOAD_BYTES + 1);
        assert_eq!(content(Some(big), None).unwrap(), Err(MAX_UPLOAD_BYTES + 1));
        let big64 = "A".repeat((MAX_UPLOAD_BYTES / 3 + 1) * 4);
        assert!(content(None, Some(big64)).unwrap().is_err());
        let fits = "A".repeat(MAX_UPLOAD_BYTES / 3 * 4);
        assert_eq!(
            content(None, Some(fits)).unwrap().map(|b| b.len()),
            Ok(MAX_UPLOAD_BYTES)
        );
    }
}
