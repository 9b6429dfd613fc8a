//! Path syntax: validation and the parent / name / child-range helpers that
//! the ordered namespace relies on.

use synod_proto::Error;

/// An owned node or lock path as the state's maps key it. Paths up to 24
/// bytes (most paths) are held inline, so a map compares keys without
/// following a pointer and a path costs no heap block of its own.
pub(crate) type PathKey = compact_str::CompactString;

/// Checks that `path` is a valid node path: absolute, at most
/// `path_bytes_max` bytes, no empty segment, no trailing slash except the
/// root, no `.` or `..` segment, and no control character.
///
/// # Errors
/// [`Error::BadArgument`] naming the path and what is wrong with it.
pub fn validate_path(path: &str, path_bytes_max: u64) -> Result<(), Error> {
    let bad = |why: &str| Error::bad_argument(format!("path {path:?} {why}"));
    if path.is_empty() {
        return Err(Error::bad_argument("path is empty; paths start with '/'"));
    }
    if path.len() as u64 > path_bytes_max {
        return Err(Error::bad_argument(format!(
            "path of {} bytes exceeds the limit of {path_bytes_max} bytes",
            path.len()
        )));
    }
    if !path.starts_with('/') {
        return Err(bad("must be absolute (start with '/')"));
    }
    if path == "/" {
        return Ok(());
    }
    if path.ends_with('/') {
        return Err(bad("must not end with '/'"));
    }
    if let Some(c) = path.chars().find(|c| c.is_control()) {
        return Err(bad(&format!("contains the control character {c:?}")));
    }
    for segment in path[1..].split('/') {
        match segment {
            "" => return Err(bad("has an empty segment ('//')")),
            "." | ".." => return Err(bad("has a '.' or '..' segment; use a resolved path")),
            _ => {}
        }
    }
    Ok(())
}

/// The parent of a valid path; `None` for the root.
pub fn parent(path: &str) -> Option<&str> {
    if path == "/" {
        return None;
    }
    match path.rfind('/') {
        Some(0) => Some("/"),
        Some(index) => Some(&path[..index]),
        None => None,
    }
}

/// The last segment of a valid path (empty for the root).
pub fn name(path: &str) -> &str {
    match path.rfind('/') {
        Some(index) => &path[index + 1..],
        None => path,
    }
}

/// The prefix shared by every path below `path`: `"/"` for the root, else
/// `path + "/"`.
pub fn descendant_prefix(path: &str) -> String {
    if path == "/" {
        "/".to_owned()
    } else {
        format!("{path}/")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_good_paths() {
        for path in ["/", "/a", "/a/b-c/d.e", "/ünïcode/x", "/a/...", "/a/.x"] {
            assert!(validate_path(path, 4096).is_ok(), "{path}");
        }
    }

    #[test]
    fn refuses_bad_paths_with_a_reason() {
        for (path, why) in [
            ("", "empty"),
            ("a", "absolute"),
            ("/a/", "end with"),
            ("//a", "empty segment"),
            ("/a//b", "empty segment"),
            ("/a/./b", "'.'"),
            ("/a/..", "'..'"),
            ("/a\u{0}b", "control"),
            ("/a\nb", "control"),
        ] {
            let message = validate_path(path, 4096).expect_err(path).to_string();
            assert!(message.contains(why), "{path}: {message}");
        }
        let long = format!("/{}", "x".repeat(10));
        assert!(validate_path(&long, 10).is_err());
        assert!(validate_path(&long, 11).is_ok());
    }

    #[test]
    fn parent_and_name() {
        assert_eq!(parent("/"), None);
        assert_eq!(parent("/a"), Some("/"));
        assert_eq!(parent("/a/b"), Some("/a"));
        assert_eq!(name("/a/b"), "b");
        assert_eq!(name("/"), "");
        assert_eq!(descendant_prefix("/"), "/");
        assert_eq!(descendant_prefix("/a"), "/a/");
    }
}
