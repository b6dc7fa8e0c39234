//! The path an application server routes on: uvicorn hands Starlette the
//! percent-decoded path, so `/pre%64ict` runs the `/predict` handler. The
//! backend does the same (and resolves `.`/`..` segments and merges slashes,
//! as frameworks behind a normalising proxy see them), so its counters show
//! what really ran, whatever spelling reached it.

use std::borrow::Cow;

pub fn app_path(raw: &str) -> Cow<'_, str> {
    if !raw.contains('%') && !raw.contains("//") && !raw.contains("/.") {
        return Cow::Borrowed(raw);
    }
    let bytes = raw.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1), bytes.get(i + 2)) {
            (b'%', Some(&h), Some(&l)) if hex(h).is_some() && hex(l).is_some() => {
                decoded.push((hex(h).unwrap() * 16 + hex(l).unwrap()) as u8);
                i += 3;
            }
            (b, ..) => {
                decoded.push(b);
                i += 1;
            }
        }
    }
    let decoded = String::from_utf8_lossy(&decoded);
    let mut segments: Vec<&str> = Vec::new();
    for segment in decoded.split('/').filter(|s| !s.is_empty()) {
        match segment {
            "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(raw.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if out.is_empty() || (decoded.ends_with('/') && !segments.is_empty()) {
        out.push('/');
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::app_path;

    #[test]
    fn spellings_of_one_path_route_alike() {
        for raw in [
            "/predict",
            "/pre%64ict",
            "/%70redict",
            "//predict",
            "/./predict",
            "/x/../predict",
        ] {
            assert_eq!(app_path(raw), "/predict", "{raw}");
        }
        assert_eq!(app_path("/a/b/"), "/a/b/");
        assert_eq!(app_path("/.."), "/");
    }
}
