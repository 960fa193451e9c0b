//! Session records on disk, so sessions outlive the server.
//!
//! Two files per session in `DATA_DIR/.records/` (mode 0700, the server's;
//! kernels cannot write it: their Landlock rules and uids allow only their
//! own session folder):
//! - `ID.json`, the record: id, the owning principal's name, when the session
//!   was created, whether it is still a pooled session-to-be, and whether its
//!   history was cut (too long to replay). Written atomically (a temporary
//!   file, then `rename`), so a crash leaves the old record or the new one.
//!   Its modification time is the session's last use: every call touches it,
//!   which costs no rewrite.
//! - `ID.cells`, the code of the cells that completed, one JSON string per
//!   line, appended after each such call (bounded). A crash can leave at most
//!   a partial last line, which loading ignores.
//!
//! So a call costs an append and a touch, whatever the session's length.
//! Nothing is `fsync`ed per call: a process crash loses nothing (the data is
//! in the page cache); a power loss costs at most the last calls. Everything
//! is synced at shutdown. A record that does not parse, has another version,
//! or whose id is not a valid session id is skipped with a warning; the id
//! is the only part of a record ever used in a path, and only after the same
//! validation a client-supplied id gets.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::SessionId;

/// Version of the record format.
const VERSION: u32 = 1;
/// Most cells kept for replay, and most bytes of code in all of them; a
/// session past either can no longer be replayed (its files are kept).
pub const MAX_CELLS: usize = 2000;
pub const MAX_CELL_BYTES: usize = 4 * 1024 * 1024;

/// What is kept of one session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub version: u32,
    pub id: String,
    /// Name of the principal that owns the session.
    pub owner: String,
    /// Seconds since the Unix epoch.
    pub created: u64,
    /// Last use as written; the record file's modification time, touched
    /// by every call, is later when the session was used since.
    pub last_used: u64,
    /// A pooled session nobody has taken yet: removed at start-up.
    pub pooled: bool,
    /// Code of the cells that completed successfully, in order (kept in
    /// `ID.cells`, not in the record file).
    #[serde(skip)]
    pub cells: Vec<String>,
    /// Bytes of code in `cells`.
    #[serde(skip)]
    pub cells_bytes: usize,
    /// Cells were dropped (over the bounds): replay is impossible.
    pub cells_truncated: bool,
    /// The kernel that may outlive the server (a remote kernel's id), to
    /// reconnect to after a restart instead of replaying.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
}

/// A record, checked on load.
#[derive(Debug)]
pub struct Loaded {
    pub id: SessionId,
    pub record: Record,
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Record {
    pub fn new(id: &SessionId, owner: &str, pooled: bool) -> Self {
        let now = unix_now();
        Self {
            version: VERSION,
            id: id.as_str().to_string(),
            owner: owner.to_string(),
            created: now,
            last_used: now,
            pooled,
            cells: Vec::new(),
            cells_bytes: 0,
            cells_truncated: false,
            kernel: None,
        }
    }

    /// Adds a successful cell. Returns what to write: `Some(true)` to append
    /// it to the log, `Some(false)` when the history has just passed its
    /// bounds (the record must be rewritten, the log dropped), `None` when
    /// there is nothing to write (already cut).
    pub fn push_cell(&mut self, code: &str) -> Option<bool> {
        if self.cells_truncated {
            return None;
        }
        if self.cells.len() >= MAX_CELLS || self.cells_bytes + code.len() > MAX_CELL_BYTES {
            self.cells.clear();
            self.cells_bytes = 0;
            self.cells_truncated = true;
            return Some(false);
        }
        self.cells_bytes += code.len();
        self.cells.push(code.to_string());
        Some(true)
    }

    /// How long ago the session was last used.
    pub fn idle_for(&self) -> Duration {
        Duration::from_secs(unix_now().saturating_sub(self.last_used))
    }
}

/// The folder of records.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    /// The store under `data_dir`, created if needed (0700).
    pub fn open(data_dir: &Path) -> std::io::Result<Self> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        let dir = data_dir.join(".records");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)?;
        let meta = std::fs::symlink_metadata(&dir)?;
        if !meta.is_dir() {
            return Err(std::io::Error::other(format!(
                "{} is not a folder",
                dir.display()
            )));
        }
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
        Ok(Self { dir })
    }

    fn path_of(&self, id: &SessionId) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    fn cells_of(&self, id: &SessionId) -> PathBuf {
        self.dir.join(format!("{id}.cells"))
    }

    /// Appends one completed cell to the session's log (blocking).
    pub fn append_cell(&self, id: &SessionId, code: &str) -> std::io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut line = serde_json::to_string(code).map_err(std::io::Error::other)?;
        line.push('\n');
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
            .open(self.cells_of(id))?;
        // One write: a crash leaves the line whole or cut short, never mixed.
        f.write_all(line.as_bytes())
    }

    /// Drops the session's cell log (its history was cut).
    pub fn drop_cells(&self, id: &SessionId) {
        let _ = std::fs::remove_file(self.cells_of(id));
    }

    /// Marks the session used now (the record's modification time).
    pub fn touch(&self, id: &SessionId) -> std::io::Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
            .open(self.path_of(id))?;
        f.set_modified(std::time::SystemTime::now())
    }

    /// Writes `record` atomically (blocking; call from `spawn_blocking`).
    pub fn save(&self, record: &Record) -> std::io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let id = SessionId::parse(&record.id)
            .ok_or_else(|| std::io::Error::other("invalid session id in record"))?;
        let json = serde_json::to_vec(record).map_err(std::io::Error::other)?;
        let tmp = self
            .dir
            .join(format!(".{id}.{}.tmp", crate::random_token(8)));
        let result = (|| {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
                .open(&tmp)?;
            f.write_all(&json)?;
            std::fs::rename(&tmp, self.path_of(&id))
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }

    /// Makes every record written so far durable (at shutdown).
    pub fn sync(&self) {
        if let Ok(d) = std::fs::File::open(&self.dir) {
            let _ = d.sync_all();
        }
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for e in entries.flatten() {
                if let Ok(f) = std::fs::File::open(e.path()) {
                    let _ = f.sync_all();
                }
            }
        }
    }

    pub fn remove(&self, id: &SessionId) {
        let _ = std::fs::remove_file(self.path_of(id));
        let _ = std::fs::remove_file(self.cells_of(id));
    }

    /// Every valid record; invalid ones are skipped with a warning and left
    /// alone (nothing is deleted on their say-so). Leftover temporary files
    /// of interrupted writes are removed.
    pub fn load_all(&self) -> Vec<Loaded> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for e in entries.flatten() {
            let name = e.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.starts_with('.') && name.ends_with(".tmp") {
                let _ = std::fs::remove_file(e.path());
                continue;
            }
            let Some(stem) = name.strip_suffix(".json") else {
                continue;
            };
            match load(&e.path(), stem) {
                Ok(l) => out.push(l),
                Err(why) => tracing::warn!("ignoring session record {name}: {why}"),
            }
        }
        out
    }
}

/// Reads and checks one record file named `{stem}.json`.
fn load(path: &Path, stem: &str) -> Result<Loaded, String> {
    let meta = std::fs::symlink_metadata(path).map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    if meta.len() > (MAX_CELL_BYTES as u64) * 2 + 65536 {
        return Err("too large".into());
    }
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    let mut record: Record = serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
    if record.version != VERSION {
        return Err(format!("unknown version {}", record.version));
    }
    let id = SessionId::parse(&record.id).ok_or("invalid session id")?;
    if id.as_str() != stem {
        return Err("the id does not match the file name".into());
    }
    if (record.owner.is_empty() && !record.pooled) || record.owner.len() > 256 {
        return Err("invalid owner".into());
    }
    // The last use: as written, or later if a call touched the record since.
    if let Some(touched) = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
    {
        record.last_used = record.last_used.max(touched.as_secs());
    }
    if !record.cells_truncated {
        load_cells(&path.with_extension("cells"), &mut record);
    }
    Ok(Loaded { id, record })
}

/// Reads a cell log into `record`: one JSON string per line; a line that
/// does not parse (a write cut short by a crash) ends it. Past the bounds,
/// the history counts as cut.
fn load_cells(path: &Path, record: &mut Record) {
    use std::io::BufRead;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return;
    };
    if !meta.is_file() || meta.len() > (MAX_CELL_BYTES as u64) * 2 + (MAX_CELLS as u64) * 16 {
        record.cells_truncated = true;
        return;
    }
    let Ok(f) = std::fs::File::open(path) else {
        return;
    };
    for line in std::io::BufReader::new(f).lines() {
        let Ok(line) = line else { break };
        let Ok(code) = serde_json::from_str::<String>(&line) else {
            break;
        };
        if record.push_cell(&code) == Some(false) {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_bad_ones_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let id = SessionId::generate();
        let mut r = Record::new(&id, "alice", false);
        store.save(&r).unwrap();
        for code in ["x = 1", "y = 'two\nlines'"] {
            assert_eq!(r.push_cell(code), Some(true));
            store.append_cell(&id, code).unwrap();
        }
        store.touch(&id).unwrap();
        let recs = dir.path().join(".records");
        // A line cut short by a crash ends the log.
        {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .open(recs.join(format!("{id}.cells")))
                .unwrap();
            f.write_all(b"\"unfinished").unwrap();
        }
        std::fs::write(recs.join("garbage.json"), "{not json").unwrap();
        let evil = Record {
            id: "../../etc".into(),
            ..r.clone()
        };
        std::fs::write(
            recs.join("AAAAAAAAAAAAAAAAAAAAAA.json"),
            serde_json::to_vec(&evil).unwrap(),
        )
        .unwrap();
        let other = Record {
            id: "BBBBBBBBBBBBBBBBBBBBBB".into(),
            ..r.clone()
        };
        // The id inside does not match the file name.
        std::fs::write(
            recs.join("CCCCCCCCCCCCCCCCCCCCCC.json"),
            serde_json::to_vec(&other).unwrap(),
        )
        .unwrap();
        std::fs::write(recs.join(".x.tmp"), "half").unwrap();
        let loaded = store.load_all();
        assert_eq!(loaded.len(), 1);
        assert_eq!(loaded[0].id, id);
        assert_eq!(loaded[0].record.cells, r.cells);
        assert_eq!(loaded[0].record.owner, "alice");
        assert!(loaded[0].record.last_used >= r.last_used);
        assert!(!recs.join(".x.tmp").exists());
        assert!(recs.join("garbage.json").exists(), "nothing deleted");
        store.remove(&id);
        assert!(store.load_all().is_empty());
        assert!(!recs.join(format!("{id}.cells")).exists());
    }

    #[test]
    fn history_is_bounded() {
        let id = SessionId::generate();
        let mut r = Record::new(&id, "local", false);
        for _ in 0..MAX_CELLS {
            assert_eq!(r.push_cell("1"), Some(true));
        }
        assert_eq!(r.cells.len(), MAX_CELLS);
        assert_eq!(r.push_cell("2"), Some(false));
        assert!(r.cells_truncated && r.cells.is_empty());
        assert_eq!(r.push_cell("3"), None);
        assert!(r.cells.is_empty());
    }
}
