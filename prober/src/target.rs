//! The service under test: its URL, and the request sent to an endpoint.

use crate::config_file::{self, body_bytes, EndpointSpec};
use crate::error::ProberError;
use crate::load::{RequestSpec, Target};
use crate::redis_records::redact;
use bytes::Bytes;
use hyper::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use hyper::{Method, Uri};
use serde_json::Value;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

const PREFLIGHT_TIMEOUT: Duration = Duration::from_secs(3);

/// Parses `--url`, resolves it, and checks that something listens there.
pub fn connect_target(url: &str) -> Result<Target, ProberError> {
    let (host, port) = parse_url(url)?;
    let unreachable = |reason: String| ProberError::Unreachable {
        url: redact(url),
        reason,
    };
    let addrs: Vec<SocketAddr> = (host.as_str(), port)
        .to_socket_addrs()
        .map_err(|e| unreachable(format!("cannot resolve {host}: {e}")))?
        .collect();
    let mut last = String::from("no address");
    for addr in &addrs {
        match TcpStream::connect_timeout(addr, PREFLIGHT_TIMEOUT) {
            Ok(_) => {
                let host_header = if port == 80 {
                    host.clone()
                } else {
                    format!("{host}:{port}")
                };
                return Ok(Target {
                    addr: *addr,
                    host: host_header,
                });
            }
            Err(e) => last = format!("{addr}: {e}"),
        }
    }
    Err(unreachable(last))
}

/// `http://host[:port][/]` → host and port.
pub fn parse_url(url: &str) -> Result<(String, u16), ProberError> {
    let bad = |why: &str| ProberError::Usage(format!("--url {:?}: {why}", redact(url)));
    let uri: Uri = url
        .parse()
        .map_err(|_| bad("not a URL; expected http://host:port"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(bad(
                "https is not supported; probe the service's plain-HTTP port (the pod or container port)",
            ))
        }
        _ => return Err(bad("expected http://host:port")),
    }
    if let Some(pq) = uri.path_and_query() {
        if pq.as_str() != "/" && !pq.as_str().is_empty() {
            return Err(bad(
                "must not have a path; endpoint paths come from --endpoint or the config",
            ));
        }
    }
    let host = uri.host().ok_or_else(|| bad("has no host"))?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    Ok((host, uri.port_u16().unwrap_or(80)))
}

/// The endpoint from command-line flags.
pub fn spec_from_flags(
    path: &str,
    method: Option<&str>,
    headers: &[String],
    body: Option<&str>,
) -> Result<EndpointSpec, ProberError> {
    check_path(path)?;
    let usage = |e: sluice_core::config::ConfigError| ProberError::Usage(e.to_string());
    let mut spec = EndpointSpec::new(path);
    if let Some(m) = method {
        spec.method = config_file::method(m, "--method").map_err(usage)?;
    }
    for h in headers {
        let (name, value) = h.split_once(':').ok_or_else(|| {
            ProberError::Usage(format!("--header {h:?}: expected \"Name: value\""))
        })?;
        spec.headers
            .push(config_file::header(name.trim(), value.trim(), "--header").map_err(usage)?);
    }
    spec.body = body.map(|b| match serde_json::from_str::<Value>(b) {
        Ok(v @ (Value::Object(_) | Value::Array(_))) => v,
        _ => Value::String(b.to_string()),
    });
    Ok(spec)
}

pub fn check_path(path: &str) -> Result<(), ProberError> {
    if !path.starts_with('/') || path.contains('?') || path.contains(char::is_whitespace) {
        return Err(ProberError::Usage(format!(
            "--endpoint {path:?}: must be a path starting with '/', without a query string"
        )));
    }
    Ok(())
}

/// The request the load generator sends for an endpoint.
pub fn request_spec(spec: &EndpointSpec) -> Result<RequestSpec, ProberError> {
    let bad = |what: String| ProberError::Usage(format!("endpoint {}: {what}", spec.path));
    let method = Method::from_bytes(spec.method.as_bytes())
        .map_err(|_| bad(format!("bad method {:?}", spec.method)))?;
    let mut headers = Vec::new();
    for (n, v) in &spec.headers {
        let name = HeaderName::from_bytes(n.as_bytes())
            .map_err(|_| bad(format!("bad header name {n:?}")))?;
        let value = HeaderValue::from_str(v).map_err(|_| bad(format!("bad header value {v:?}")))?;
        headers.push((name, value));
    }
    let (body, content_type) = body_bytes(spec.body.as_ref());
    if let Some(ct) = content_type {
        if !headers.iter().any(|(n, _)| n == CONTENT_TYPE) {
            headers.push((CONTENT_TYPE, HeaderValue::from_static(ct)));
        }
    }
    Ok(RequestSpec {
        method,
        path: spec.path.clone(),
        headers,
        body: Bytes::from(body),
        check: Default::default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            parse_url("http://127.0.0.1:8080").unwrap(),
            ("127.0.0.1".into(), 8080)
        );
        assert_eq!(parse_url("http://svc/").unwrap(), ("svc".into(), 80));
        assert_eq!(parse_url("http://[::1]:9").unwrap(), ("::1".into(), 9));
        for (url, why) in [
            ("https://x", "https is not supported"),
            ("http://x/api", "must not have a path"),
            ("127.0.0.1:80", "expected http://host:port"),
            ("ht tp://x", "not a URL"),
        ] {
            let e = parse_url(url).unwrap_err().to_string();
            assert!(e.contains(why), "{url}: {e}");
        }
    }

    #[test]
    fn passwords_in_the_url_are_masked() {
        let e = parse_url("http://u:hunter2@x/api").unwrap_err().to_string();
        assert!(e.contains("u:***@x") && !e.contains("hunter2"), "{e}");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let e = connect_target(&format!("http://u:hunter2@127.0.0.1:{port}"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("u:***@127.0.0.1") && !e.contains("hunter2"),
            "{e}"
        );
    }

    #[test]
    fn flags_make_a_request() {
        let spec = spec_from_flags(
            "/predict",
            Some("post"),
            &["X-Key: a:b".to_string()],
            Some(r#"{"input": 1}"#),
        )
        .unwrap();
        let req = request_spec(&spec).unwrap();
        assert_eq!(req.method, Method::POST);
        assert_eq!(req.body.as_ref(), br#"{"input":1}"#);
        assert_eq!(req.headers[0].1, "a:b");
        assert_eq!(req.headers[1].0, CONTENT_TYPE);
        // A body that is not a JSON object is sent as it is, with no type.
        let spec = spec_from_flags("/t", None, &[], Some("hello")).unwrap();
        let req = request_spec(&spec).unwrap();
        assert_eq!(req.body.as_ref(), b"hello");
        assert!(req.headers.is_empty());
        assert!(spec_from_flags("predict", None, &[], None).is_err());
        assert!(spec_from_flags("/p", None, &["nocolon".into()], None).is_err());
    }

    #[test]
    fn unreachable_is_its_own_error() {
        // Bind then drop to find a port where nothing listens.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let e = connect_target(&format!("http://127.0.0.1:{port}")).unwrap_err();
        assert_eq!(e.exit_code(), crate::exit::UNREACHABLE, "{e}");
    }
}
