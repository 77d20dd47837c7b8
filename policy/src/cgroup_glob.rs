//! Cgroup path globs for `cgroupSelector.paths`: paths below the cgroup2
//! mount, `*` matching within one segment, `**` any number of segments.

/// Why a glob is malformed, if it is.
pub fn check(glob: &str) -> Result<(), &'static str> {
    let Some(rest) = glob.strip_prefix('/') else {
        return Err("must start with '/'");
    };
    if rest.is_empty() {
        return Ok(());
    }
    for segment in rest.split('/') {
        match segment {
            "" => return Err("has an empty path segment"),
            "." | ".." => return Err("may not contain '.' or '..' segments"),
            s if s.contains("**") && s != "**" => {
                return Err("may use '**' only as a whole segment");
            }
            _ => {}
        }
    }
    Ok(())
}

/// Whether `path` (like "/kubepods/pod1/c1") matches `glob`.
pub fn matches(glob: &str, path: &str) -> bool {
    let globs: Vec<&str> = glob.split('/').filter(|s| !s.is_empty()).collect();
    let parts: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    match_segments(&globs, &parts)
}

fn match_segments(globs: &[&str], parts: &[&str]) -> bool {
    match globs.split_first() {
        None => parts.is_empty(),
        Some((&"**", rest)) => (0..=parts.len()).any(|skip| match_segments(rest, &parts[skip..])),
        Some((glob, rest)) => parts.split_first().is_some_and(|(part, parts)| {
            match_segment(glob.as_bytes(), part.as_bytes()) && match_segments(rest, parts)
        }),
    }
}

/// `*` matches any run of characters within one segment.
fn match_segment(glob: &[u8], text: &[u8]) -> bool {
    match glob.split_first() {
        None => text.is_empty(),
        Some((b'*', rest)) => (0..=text.len()).any(|skip| match_segment(rest, &text[skip..])),
        Some((c, rest)) => text
            .split_first()
            .is_some_and(|(t, text)| t == c && match_segment(rest, text)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks() {
        assert!(check("/").is_ok());
        assert!(check("/tgtest/*").is_ok());
        assert!(check("/kubepods/**/cri-*").is_ok());
        assert_eq!(check("tgtest"), Err("must start with '/'"));
        assert!(check("/a//b").is_err());
        assert!(check("/a/../b").is_err());
        assert!(check("/a/x**").is_err());
    }

    #[test]
    fn matching() {
        assert!(matches("/tgtest/*", "/tgtest/a"));
        assert!(!matches("/tgtest/*", "/tgtest"));
        assert!(!matches("/tgtest/*", "/tgtest/a/b"));
        assert!(matches("/tgtest/**", "/tgtest"));
        assert!(matches("/tgtest/**", "/tgtest/a/b"));
        assert!(matches(
            "/kubepods/**/cri-containerd-*.scope",
            "/kubepods/burstable/pod1/cri-containerd-ab.scope"
        ));
        assert!(matches("/system.slice/ssh*", "/system.slice/ssh.service"));
        assert!(!matches("/a*b", "/acbd"));
        assert!(matches("/", "/"));
        assert!(!matches("/", "/a"));
    }
}
