//! Checks on what comes from outside (CSI requests, berthctl, the gRPC APIs,
//! node registrations): names, paths, sizes and labels. One set of rules for
//! every program, so that a name the metadata service accepts is one the
//! node plugin can stage and the volume server can store, and an error
//! message never echoes megabytes back.

/// The longest volume, snapshot or node name.
pub const MAX_NAME_BYTES: usize = 128;
/// The longest path a CSI node call may name.
pub const MAX_PATH_BYTES: usize = 4096;
/// The largest volume: the store's limit (2^60 bytes).
pub const MAX_VOLUME_BYTES: u64 = 1 << 60;
/// How much of an outside string an error message or audit entry quotes.
pub const QUOTE_CHARS: usize = 80;

/// `s` as an error message or log line may quote it: at most
/// [`QUOTE_CHARS`] characters, control characters escaped, and an ellipsis
/// with the full length when it was cut.
pub fn quote(s: &str) -> String {
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i == QUOTE_CHARS {
            out.push_str(&format!("…({} bytes)", s.len()));
            break;
        }
        out.extend(c.escape_debug());
    }
    format!("\"{out}\"")
}

/// At most `max` bytes of `s` (cut at a character boundary): what an audit
/// entry keeps of a field that came from outside.
pub fn bounded(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// The longest field an audit entry keeps of an outside string.
pub const AUDIT_FIELD_BYTES: usize = 256;
/// The longest free-text detail or result an audit entry keeps.
pub const AUDIT_TEXT_BYTES: usize = 4096;

/// A volume, snapshot or node name: 1 to 128 ASCII letters, digits, '-', '_'
/// or '.', starting with a letter or a digit (names become file names, keys
/// and export names; '/', '@', whitespace and dot files are never needed).
pub fn name(kind: &str, s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err(format!("{kind} name is required"));
    }
    if s.len() > MAX_NAME_BYTES {
        return Err(format!(
            "{kind} name {} is {} bytes, more than {MAX_NAME_BYTES}",
            quote(s),
            s.len()
        ));
    }
    let ok_first = s.as_bytes()[0].is_ascii_alphanumeric();
    if !ok_first
        || !s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(format!(
            "{kind} name {} is not letters, digits, '-', '_' and '.' starting with a letter or digit",
            quote(s)
        ));
    }
    Ok(())
}

/// A path from the container orchestrator (NodeStage's staging path,
/// NodePublish's target): absolute, at most 4096 bytes, no control
/// characters (NUL among them), no "." or ".." components, and no component
/// starting with '-' (it would read as an option to mount and umount).
pub fn path(field: &str, s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err(format!("{field} is required"));
    }
    if s.len() > MAX_PATH_BYTES {
        return Err(format!(
            "{field} is {} bytes, more than {MAX_PATH_BYTES}",
            s.len()
        ));
    }
    if !s.starts_with('/') {
        return Err(format!("{field} {} is not an absolute path", quote(s)));
    }
    if s.chars().any(char::is_control) {
        return Err(format!("{field} {} contains a control character", quote(s)));
    }
    for c in s.split('/') {
        if c == "." || c == ".." {
            return Err(format!("{field} {} has a '{c}' component", quote(s)));
        }
        if c.starts_with('-') {
            return Err(format!(
                "{field} {} has a component starting with '-'",
                quote(s)
            ));
        }
    }
    Ok(())
}

/// `v` rounded up to a multiple of `block`, refused past
/// [`MAX_VOLUME_BYTES`] (and never overflowing on the way).
pub fn volume_bytes(field: &str, v: u64, block: u64) -> Result<u64, String> {
    let rounded = v
        .checked_next_multiple_of(block)
        .filter(|r| *r <= MAX_VOLUME_BYTES);
    rounded.ok_or_else(|| {
        format!("{field} {v} is more than the largest volume, {MAX_VOLUME_BYTES} bytes (1 EiB)")
    })
}

/// Kubernetes' rule for a label name segment (and a value): at most 63
/// characters, alphanumerics with '-', '_' or '.' inside.
fn label_segment(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() <= 63
        && b.first().is_none_or(u8::is_ascii_alphanumeric)
        && b.last().is_none_or(u8::is_ascii_alphanumeric)
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

/// A DNS subdomain (a label key's prefix): at most 253 characters, dot-
/// separated lowercase alphanumerics with '-' inside.
fn dns_subdomain(s: &str) -> bool {
    s.len() <= 253
        && s.split('.').all(|p| {
            let b = p.as_bytes();
            !b.is_empty()
                && b.len() <= 63
                && b[0].is_ascii_alphanumeric()
                && b[b.len() - 1].is_ascii_alphanumeric()
                && b.iter()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        })
}

/// A topology label as Kubernetes accepts it (nodes' labels become CSI
/// topology segments): key `[prefix/]name`, value empty or a name segment.
pub fn label(key: &str, value: &str) -> Result<(), String> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if name.is_empty() || !label_segment(name) || prefix.is_some_and(|p| !dns_subdomain(p)) {
        return Err(format!(
            "label key {} is not [DNS-subdomain/]name (name: at most 63 alphanumerics, '-', '_', '.')",
            quote(key)
        ));
    }
    if !label_segment(value) {
        return Err(format!(
            "label value {} for {key} is not at most 63 alphanumerics, '-', '_', '.'",
            quote(value)
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        let long = "a".repeat(129);
        let huge = "x".repeat(4 << 20);
        for (s, ok) in [
            ("pvc-0b6c5a9e-1d2f-4c1a-9e8f-2a4b6c8d0e1f", true),
            ("snapshot-1.2_3", true),
            ("a", true),
            (&"a".repeat(128), true),
            ("", false),
            (long.as_str(), false),
            (huge.as_str(), false),
            (".", false),
            ("..", false),
            ("../etc", false),
            (".hidden", false),
            ("-rf", false),
            ("_x", false),
            ("a/b", false),
            ("a\\b", false),
            ("db@token", false),
            ("a b", false),
            ("a\tb", false),
            ("a\nb", false),
            ("a\0b", false),
            ("a\u{7f}", false),
            ("caf\u{e9}", false),
            ("a\u{200b}b", false),
            ("%2e%2e", false),
            ("a:b", false),
            ("a#b", false),
        ] {
            assert_eq!(name("volume", s).is_ok(), ok, "{}", quote(s));
        }
        // The message quotes at most 80 characters of a 4 MiB name.
        let e = name("volume", &huge).expect_err("huge");
        assert!(e.len() < 200, "{}", e.len());
        assert!(e.contains("4194304 bytes"), "{e}");
        let e = name("snapshot", "a\nb").expect_err("newline");
        assert!(e.contains("a\\nb"), "control characters are escaped: {e}");
    }

    #[test]
    fn bounded_cuts_at_character_boundaries() {
        assert_eq!(bounded("abc", 5), "abc");
        assert_eq!(bounded("abcdef", 3), "abc");
        assert_eq!(bounded("ééé", 3), "é");
        assert_eq!(bounded("", 0), "");
    }

    #[test]
    fn paths() {
        let long = format!("/{}", "a".repeat(4096));
        for (s, ok) in [
            (
                "/var/lib/kubelet/pods/1/volumes/kubernetes.io~csi/pvc-1/mount",
                true,
            ),
            (
                "/var/lib/kubelet/plugins/kubernetes.io/csi/csi.berth.dev/abc/globalmount",
                true,
            ),
            ("/a/b.c/..d/e..", true),
            ("/", true),
            ("", false),
            ("relative/path", false),
            ("/a/../etc", false),
            ("/a/./b", false),
            ("/a/..", false),
            ("/a\0b", false),
            ("/a\nb", false),
            ("/a/-o/b", false),
            ("/--bind", false),
            (long.as_str(), false),
        ] {
            assert_eq!(path("target_path", s).is_ok(), ok, "{}", quote(s));
        }
    }

    #[test]
    fn sizes() {
        for (v, want) in [
            (0, Some(0)),
            (1, Some(4096)),
            (4096, Some(4096)),
            (4097, Some(8192)),
            (MAX_VOLUME_BYTES, Some(MAX_VOLUME_BYTES)),
            (MAX_VOLUME_BYTES + 1, None),
            (u64::MAX - 4095, None),
            (u64::MAX, None),
            (i64::MAX as u64, None),
        ] {
            assert_eq!(volume_bytes("required_bytes", v, 4096).ok(), want, "{v}");
        }
    }

    #[test]
    fn labels() {
        let long_value = "v".repeat(64);
        for (k, v, ok) in [
            ("topology.kubernetes.io/zone", "eu-west-1a", true),
            ("topology.berth.dev/node", "n1", true),
            ("rack", "r1", true),
            ("rack", "", true),
            ("", "x", false),
            ("/zone", "x", false),
            ("Topology.Kubernetes.io/zone", "x", false),
            ("a..b/zone", "x", false),
            ("zone", long_value.as_str(), false),
            ("zone", "-a", false),
            ("zone", "a b", false),
            ("zone", "a\nb", false),
            ("zo ne", "a", false),
            ("x/y/z", "a", false),
        ] {
            assert_eq!(label(k, v).is_ok(), ok, "{k:?}={v:?}");
        }
    }

    /// Arbitrary strings: the checks never panic, and what they accept has
    /// the properties callers rely on (no separator, no traversal, no
    /// control character, bounded). `BERTH_FUZZ_CASES` sets the count.
    #[test]
    fn fuzzed_inputs_never_panic_and_accepted_ones_are_safe() {
        use proptest::prelude::*;
        use proptest::test_runner::{Config, TestRunner};
        let n = std::env::var("BERTH_FUZZ_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(5000u32);
        let text = prop_oneof![
            ".{0,200}",
            "[a-z0-9./_-]{0,40}",
            "(/[a-z.-]{0,6}){0,8}",
            "[ -~]{0,300}",
        ];
        let mut runner = TestRunner::new(Config {
            failure_persistence: None,
            ..Config::with_cases(n)
        });
        let accepted = std::cell::Cell::new([0u32; 3]);
        let count = |i: usize| {
            let mut c = accepted.get();
            c[i] += 1;
            accepted.set(c);
        };
        runner
            .run(&(text.clone(), text), |(a, b)| {
                if name("volume", &a).is_ok() {
                    count(0);
                    prop_assert!(a.len() <= MAX_NAME_BYTES && !a.starts_with('.'));
                    prop_assert!(!a.contains('/') && !a.contains('@') && !a.contains('\\'));
                    prop_assert!(a.bytes().all(|c| c.is_ascii_graphic()));
                }
                if path("p", &a).is_ok() {
                    count(1);
                    prop_assert!(a.starts_with('/'));
                    prop_assert!(!a
                        .split('/')
                        .any(|c| c == ".." || c == "." || c.starts_with('-')));
                    prop_assert!(!a.chars().any(char::is_control));
                }
                if label(&a, &b).is_ok() {
                    count(2);
                    prop_assert!(b.len() <= 63 && !a.is_empty());
                }
                let q = quote(&a);
                prop_assert!(q.chars().count() <= QUOTE_CHARS * 10 + 40);
                prop_assert!(!q.chars().any(char::is_control));
                Ok(())
            })
            .expect("fuzzed validation");
        let [names, paths, labels] = accepted.get();
        eprintln!(
            "{n} fuzzed strings checked against name, path, label and quote \
             ({names} names, {paths} paths, {labels} labels accepted)"
        );
        // Each generator reaches accepted inputs, so the checks above ran.
        assert!(
            names > 0 && paths > 0 && labels > 0,
            "{names} {paths} {labels}"
        );
    }
}
