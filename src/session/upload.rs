//! Putting a client's file into a session folder (the `upload_file` tool).
//!
//! An upload waits its turn on the session's FIFO lock, like a call: a file
//! never changes under a running cell, clearing cannot race it, and the
//! session's snapshot records the new file, so the next call does not
//! report it as something the code created. The write itself is the
//! workspace's ([`crate::workspace::Workspace::write_file`]): beneath the
//! folder, no symlink followed, within the session's disk quota.

use super::{Registry, Session, SessionError};
use crate::workspace::path::RelPath;
use crate::workspace::{WriteError, WriteOptions, Written};

/// Why an upload wrote nothing.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error(transparent)]
    Session(#[from] SessionError),
    #[error(transparent)]
    Write(#[from] WriteError),
}

impl Registry {
    /// Writes `bytes` to `rel` in `session`'s folder once the calls queued
    /// before it are done; replaces an existing file only with `overwrite`.
    pub async fn upload(
        &self,
        session: &Session,
        rel: &RelPath,
        bytes: Vec<u8>,
        overwrite: bool,
    ) -> Result<Written, UploadError> {
        self.files_ready(session).await;
        let mut state = session.state.lock().await;
        if state.closed {
            return Err(SessionError::NotFound(format!("'{}'", session.id)).into());
        }
        session.touch();
        let options = WriteOptions {
            overwrite,
            max_folder_bytes: self.settings.max_session_bytes,
        };
        let written = session.workspace.write_file(rel, bytes, options).await?;
        state.baseline.record(&written);
        Ok(written)
    }
}
