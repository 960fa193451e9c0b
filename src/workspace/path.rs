//! Resolving client-supplied relative paths inside a session folder.
//!
//! Every path that comes from a client goes through [`resolve`]; nothing else
//! in the server joins client text onto a path.

use std::path::{Component, Path, PathBuf};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PathError {
    #[error("the path is empty")]
    Empty,
    #[error("the path contains a NUL byte")]
    Nul,
    #[error("the path is not valid percent-encoded UTF-8")]
    Encoding,
    #[error("the path must be relative to the session folder")]
    Absolute,
    #[error("the path may not contain '..' or '.' segments")]
    Traversal,
    #[error("the path leads outside the session folder")]
    Escapes,
    #[error("no such file in this session")]
    NotFound,
}

/// Turns `rel` (as found in a `kernel://` URI, possibly percent-encoded)
/// into an existing path inside `root`, or refuses.
///
/// Symlinks are followed only when their target stays inside `root`.
pub fn resolve(root: &Path, rel: &str) -> Result<PathBuf, PathError> {
    let decoded = percent_encoding::percent_decode_str(rel)
        .decode_utf8()
        .map_err(|_| PathError::Encoding)?;
    if decoded.is_empty() {
        return Err(PathError::Empty);
    }
    if decoded.contains('\0') {
        return Err(PathError::Nul);
    }
    if decoded.starts_with('/') || decoded.starts_with('\\') {
        return Err(PathError::Absolute);
    }
    let mut clean = PathBuf::new();
    for part in decoded.split('/') {
        if part.is_empty() {
            continue;
        }
        if part == ".." || part == "." {
            return Err(PathError::Traversal);
        }
        match Path::new(part).components().next() {
            Some(Component::Normal(c)) => clean.push(c),
            _ => return Err(PathError::Traversal),
        }
    }
    if clean.as_os_str().is_empty() {
        return Err(PathError::Empty);
    }
    let root = root.canonicalize().map_err(|_| PathError::NotFound)?;
    let full = root
        .join(&clean)
        .canonicalize()
        .map_err(|_| PathError::NotFound)?;
    if !full.starts_with(&root) {
        return Err(PathError::Escapes);
    }
    Ok(full)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("session");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::write(root.join("a.txt"), "a").unwrap();
        std::fs::write(root.join("sub/b.csv"), "b").unwrap();
        std::fs::write(dir.path().join("secret"), "s").unwrap();
        (dir, root)
    }

    #[test]
    fn plain_and_nested_paths_resolve() {
        let (_d, root) = setup();
        assert!(resolve(&root, "a.txt").unwrap().ends_with("session/a.txt"));
        assert!(
            resolve(&root, "sub/b.csv")
                .unwrap()
                .ends_with("session/sub/b.csv")
        );
        assert!(
            resolve(&root, "sub%2Fb.csv")
                .unwrap()
                .ends_with("session/sub/b.csv")
        );
    }

    #[test]
    fn traversal_is_refused() {
        let (_d, root) = setup();
        assert_eq!(resolve(&root, "../secret"), Err(PathError::Traversal));
        assert_eq!(
            resolve(&root, "sub/../../secret"),
            Err(PathError::Traversal)
        );
        assert_eq!(resolve(&root, "%2e%2e/secret"), Err(PathError::Traversal));
        assert_eq!(resolve(&root, "%2E%2E%2Fsecret"), Err(PathError::Traversal));
        assert_eq!(resolve(&root, "./a.txt"), Err(PathError::Traversal));
    }

    #[test]
    fn absolute_nul_and_bad_encoding_are_refused() {
        let (_d, root) = setup();
        assert_eq!(resolve(&root, "/etc/passwd"), Err(PathError::Absolute));
        assert_eq!(resolve(&root, "%2Fetc%2Fpasswd"), Err(PathError::Absolute));
        assert_eq!(resolve(&root, "a.txt%00"), Err(PathError::Nul));
        assert_eq!(resolve(&root, "%ff"), Err(PathError::Encoding));
        assert_eq!(resolve(&root, ""), Err(PathError::Empty));
        assert_eq!(resolve(&root, "missing.txt"), Err(PathError::NotFound));
    }

    #[test]
    fn symlinks_must_stay_inside() {
        let (d, root) = setup();
        std::os::unix::fs::symlink(d.path().join("secret"), root.join("out")).unwrap();
        std::os::unix::fs::symlink("/etc", root.join("etc")).unwrap();
        std::os::unix::fs::symlink(root.join("a.txt"), root.join("in")).unwrap();
        assert_eq!(resolve(&root, "out"), Err(PathError::Escapes));
        assert_eq!(resolve(&root, "etc/passwd"), Err(PathError::Escapes));
        assert!(resolve(&root, "in").unwrap().ends_with("session/a.txt"));
    }
}
