//! Node paths as the shell reads them: absolute, or relative to the current
//! directory, with `.` and `..`.

/// Resolves `argument` against the absolute directory `cwd` into a clean
/// absolute path (`/`, or `/a/b` without a trailing slash). `..` above the
/// root stays at the root, as in a file system.
pub fn resolve(cwd: &str, argument: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    if !argument.starts_with('/') {
        parts.extend(cwd.split('/').filter(|part| !part.is_empty()));
    }
    for part in argument.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            name => parts.push(name),
        }
    }
    if parts.is_empty() {
        "/".to_string()
    } else {
        format!("/{}", parts.join("/"))
    }
}

/// The full path of child `name` of `parent`.
pub fn child(parent: &str, name: &str) -> String {
    if parent == "/" {
        format!("/{name}")
    } else {
        format!("{parent}/{name}")
    }
}

/// Splits a partly typed path into the part up to and including its last
/// `/` (the directory whose children complete it) and the name being typed.
pub fn split_partial(partial: &str) -> (&str, &str) {
    match partial.rfind('/') {
        Some(index) => partial.split_at(index + 1),
        None => ("", partial),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_absolute_relative_dot_and_dotdot() {
        assert_eq!(resolve("/", "a"), "/a");
        assert_eq!(resolve("/a", "b/c"), "/a/b/c");
        assert_eq!(resolve("/a/b", ".."), "/a");
        assert_eq!(resolve("/a/b", "../../.."), "/");
        assert_eq!(resolve("/a", "/x/./y/"), "/x/y");
        assert_eq!(resolve("/a", ""), "/a");
        assert_eq!(resolve("/a", "."), "/a");
        assert_eq!(resolve("/", "/"), "/");
    }

    #[test]
    fn children_and_partials() {
        assert_eq!(child("/", "a"), "/a");
        assert_eq!(child("/a", "b"), "/a/b");
        assert_eq!(split_partial("/a/bc"), ("/a/", "bc"));
        assert_eq!(split_partial("bc"), ("", "bc"));
        assert_eq!(split_partial("a/"), ("a/", ""));
    }
}
