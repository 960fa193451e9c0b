//! Session records on disk, so sessions outlive the server.
//!
//! One small JSON file per session in `DATA_DIR/.records/` (mode 0700, the
//! server's; kernels cannot write it: their Landlock rules and uids allow
//! only their own session folder). A record holds the id, the owning
//! principal's name, when the session was created and last used, whether it
//! is still a pooled session-to-be, and the code of the cells that
//! completed successfully (bounded), which a restarted server replays.
//!
//! Records are written atomically (a temporary file in the same folder, then
//! `rename`), so a crash leaves the old record or the new one, never half of
//! one. They are not `fsync`ed on every call: a process crash loses nothing
//! (the data is in the page cache), and a power loss costs at most the last
//! calls' cells (see ARCHITECTURE.md). A file that does not parse, has
//! another version, or whose id is not a valid session id is skipped with a
//! warning; the id is the only part of a record ever used in a path, and
//! only after the same validation a client-supplied id gets.

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
    pub last_used: u64,
    /// A pooled session nobody has taken yet: removed at start-up.
    pub pooled: bool,
    /// Code of the cells that completed successfully, in order.
    pub cells: Vec<String>,
    /// Cells were dropped (over the bounds): replay is impossible.
    pub cells_truncated: bool,
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
            cells_truncated: false,
        }
    }

    /// Appends a successful cell, or marks the history truncated when it
    /// would pass the bounds.
    pub fn push_cell(&mut self, code: &str) {
        if self.cells_truncated {
            return;
        }
        let bytes: usize = self.cells.iter().map(String::len).sum::<usize>() + code.len();
        if self.cells.len() >= MAX_CELLS || bytes > MAX_CELL_BYTES {
            self.cells.clear();
            self.cells_truncated = true;
        } else {
            self.cells.push(code.to_string());
        }
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
    let record: Record = serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
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
    Ok(Loaded { id, record })
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
        r.push_cell("x = 1");
        store.save(&r).unwrap();
        let recs = dir.path().join(".records");
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
        assert_eq!(loaded[0].record, r);
        assert!(!recs.join(".x.tmp").exists());
        assert!(recs.join("garbage.json").exists(), "nothing deleted");
        store.remove(&id);
        assert!(store.load_all().is_empty());
    }

    #[test]
    fn history_is_bounded() {
        let id = SessionId::generate();
        let mut r = Record::new(&id, "local", false);
        for _ in 0..MAX_CELLS {
            r.push_cell("1");
        }
        assert_eq!(r.cells.len(), MAX_CELLS);
        r.push_cell("2");
        assert!(r.cells_truncated && r.cells.is_empty());
        r.push_cell("3");
        assert!(r.cells.is_empty());
    }
}
