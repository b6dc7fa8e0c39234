//! The path a request is matched on: its `:path` without query or fragment,
//! normalised per RFC 3986 (percent-encoded unreserved characters decoded,
//! dot segments removed) with repeated slashes merged. Application servers
//! route `/pre%64ict`, `//predict` and `/x/../predict` to `/predict`, so the
//! filter must count them there too, or they go around its capacity.
//!
//! Most paths need none of this: only one containing `%`, `//` or `/.` is
//! copied; every other path is matched as the host handed it over.

use std::borrow::Cow;

/// The normalised path of a request's `:path` header.
pub fn request_path(raw: &str) -> Cow<'_, str> {
    let path = match raw.find(['?', '#']) {
        Some(end) => &raw[..end],
        None => raw,
    };
    if needs_work(path) {
        Cow::Owned(normalize(path))
    } else {
        Cow::Borrowed(path)
    }
}

fn needs_work(path: &str) -> bool {
    path.contains('%') || path.contains("//") || path.contains("/.")
}

fn normalize(path: &str) -> String {
    let decoded = decode_unreserved(path);
    let mut segments: Vec<&str> = Vec::new();
    // The last segment decides the trailing slash: "/a/" and "/a/b/.." end
    // in a directory (RFC 3986 5.2.4), "/a" does not.
    let mut trailing_slash = false;
    for segment in decoded.split('/').skip(1) {
        trailing_slash = matches!(segment, "" | "." | "..");
        match segment {
            // Empty segments are repeated slashes: merged.
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(decoded.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if trailing_slash || out.is_empty() {
        out.push('/');
    }
    out
}

/// Decodes `%XX` where it stands for an unreserved character
/// (`A-Z a-z 0-9 - . _ ~`); other escapes stay, hex digits upper-cased, so
/// `%2f` and `%2F` (an encoded slash, not a separator) compare equal.
fn decode_unreserved(path: &str) -> Cow<'_, str> {
    if !path.contains('%') {
        return Cow::Borrowed(path);
    }
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                let c = h * 16 + l;
                if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') {
                    out.push(c as char);
                } else {
                    out.push('%');
                    out.push(bytes[i + 1].to_ascii_uppercase() as char);
                    out.push(bytes[i + 2].to_ascii_uppercase() as char);
                }
                i += 3;
                continue;
            }
        }
        // Not an escape: copy up to the next '%' as is (UTF-8 stays whole).
        let next = path[i + 1..].find('%').map_or(bytes.len(), |n| i + 1 + n);
        out.push_str(&path[i..next]);
        i = next;
    }
    Cow::Owned(out)
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

#[cfg(test)]
mod tests {
    use super::request_path;

    #[test]
    fn spellings_of_one_path_normalise_alike() {
        let cases = [
            ("/predict", "/predict"),
            ("/predict?x=1", "/predict"),
            ("/predict#frag", "/predict"),
            ("/pre%64ict", "/predict"),
            ("/%70redict", "/predict"),
            ("/%70%72%65%64%69%63%74", "/predict"),
            ("//predict", "/predict"),
            ("/predict//", "/predict/"),
            ("///a//b", "/a/b"),
            ("/./predict", "/predict"),
            ("/x/../predict", "/predict"),
            ("/x/y/../../predict", "/predict"),
            ("/../predict", "/predict"),
            ("/a/b/..", "/a/"),
            ("/a/.", "/a/"),
            ("/..", "/"),
            ("/.", "/"),
            // Encoded dots are dot segments once decoded.
            ("/x/%2e%2E/predict", "/predict"),
            ("/%2E/predict", "/predict"),
            // Not dot segments: names that start with a dot.
            ("/.well-known/x", "/.well-known/x"),
            ("/a/..b", "/a/..b"),
            // Reserved characters stay encoded (an encoded slash is data).
            ("/a%2fb", "/a%2Fb"),
            ("/a%2Fb", "/a%2Fb"),
            ("/a%20b", "/a%20b"),
            // Not escapes: left alone.
            ("/100%", "/100%"),
            ("/a%zzb", "/a%zzb"),
            ("/a%4", "/a%4"),
            ("/caf%C3%A9", "/caf%C3%A9"),
            ("/café%41", "/caféA"),
            ("/%7euser", "/~user"),
        ];
        for (raw, want) in cases {
            assert_eq!(request_path(raw), want, "{raw}");
        }
    }

    #[test]
    fn plain_paths_are_not_copied() {
        for raw in ["/predict", "/a/b/c", "/v1.2/x", "/predict?a=%41"] {
            assert!(
                matches!(request_path(raw), std::borrow::Cow::Borrowed(_)),
                "{raw}"
            );
        }
    }
}
