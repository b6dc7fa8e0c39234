//! The path a request is matched on: its `:path` without query or fragment,
//! normalised per RFC 3986 (percent-encoded unreserved characters decoded,
//! dot segments removed) with repeated slashes merged, and percent-encoded
//! UTF-8 decoded. Application servers route `/pre%64ict`, `//predict`,
//! `/x/../predict` to `/predict` and `/pr%C3%A9dict` to `/prédict`, so the
//! filter must count them there too, or they go around its capacity.
//! Configuration keys must already be in this form
//! ([`crate::config::enforcement::path_problem`]), so both sides compare alike.
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
/// (`A-Z a-z 0-9 - . _ ~`), and runs of `%XX` that spell valid UTF-8 of
/// non-ASCII characters (`%C3%A9` is `é`, as uvicorn decodes it); other
/// escapes stay, hex digits upper-cased, so `%2f` and `%2F` (an encoded
/// slash, not a separator) compare equal.
fn decode_unreserved(path: &str) -> Cow<'_, str> {
    if !path.contains('%') {
        return Cow::Borrowed(path);
    }
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        if let Some(c) = escape_at(bytes, i) {
            if c >= 0x80 {
                // A run of escaped non-ASCII bytes: decoded if it is UTF-8.
                let mut run = Vec::new();
                let mut j = i;
                while let Some(b) = escape_at(bytes, j).filter(|&b| b >= 0x80) {
                    run.push(b);
                    j += 3;
                }
                match std::str::from_utf8(&run) {
                    Ok(text) => out.push_str(text),
                    Err(_) => {
                        for b in run {
                            out.push_str(&format!("%{b:02X}"));
                        }
                    }
                }
                i = j;
                continue;
            }
            if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') {
                out.push(c as char);
            } else {
                out.push_str(&format!("%{c:02X}"));
            }
            i += 3;
            continue;
        }
        // Not an escape: copy up to the next '%' as is (UTF-8 stays whole).
        let next = path[i + 1..].find('%').map_or(bytes.len(), |n| i + 1 + n);
        out.push_str(&path[i..next]);
        i = next;
    }
    Cow::Owned(out)
}

/// The byte a `%XX` escape at `i` stands for.
fn escape_at(bytes: &[u8], i: usize) -> Option<u8> {
    match bytes.get(i..i + 3)? {
        [b'%', h, l] => Some(hex(*h)? * 16 + hex(*l)?),
        _ => None,
    }
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

#[cfg(test)]
mod tests {
    use super::request_path;

    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

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
            // Escaped UTF-8 is decoded (uvicorn routes it so); bytes that
            // are not UTF-8 stay escaped.
            ("/caf%C3%A9", "/café"),
            ("/caf%c3%a9", "/café"),
            ("/pr%C3%A9dict", "/prédict"),
            ("/a%E2%82%AC%41", "/a€A"),
            ("/a%C3", "/a%C3"),
            ("/a%FF%FEb", "/a%FF%FEb"),
            ("/a%C3%2F", "/a%C3%2F"),
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
