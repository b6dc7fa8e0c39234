//! A small blocking HTTP/1.1 client: one request per connection
//! (`connection: close`), enough for admin endpoints, stats and single
//! requests in tests. Load goes through `sluice-loadgen` instead.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    /// In the order received; names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON; panics with the body if it is not.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "expected a JSON body ({e}), got status {}: {}",
                self.status,
                self.text()
            )
        })
    }
}

/// One request, built up and then sent with [`Request::send`].
#[derive(Debug, Clone)]
pub struct Request {
    pub addr: SocketAddr,
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub timeout: Duration,
}

impl Request {
    pub fn new(method: &str, addr: SocketAddr, path: &str) -> Request {
        Request {
            addr,
            method: method.to_string(),
            path: path.to_string(),
            headers: Vec::new(),
            body: Vec::new(),
            timeout: Duration::from_secs(30),
        }
    }

    pub fn header(mut self, name: &str, value: &str) -> Request {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Request {
        self.body = body.into();
        self
    }

    pub fn timeout(mut self, timeout: Duration) -> Request {
        self.timeout = timeout;
        self
    }

    pub fn send(&self) -> io::Result<HttpResponse> {
        let mut stream = TcpStream::connect_timeout(&self.addr, self.timeout)?;
        stream.set_read_timeout(Some(self.timeout))?;
        stream.set_write_timeout(Some(self.timeout))?;
        stream.set_nodelay(true)?;
        let mut head = format!(
            "{} {} HTTP/1.1\r\nconnection: close\r\ncontent-length: {}\r\n",
            self.method,
            self.path,
            self.body.len()
        );
        // The address as `host`, unless the request names its own.
        if !self
            .headers
            .iter()
            .any(|(n, _)| n.eq_ignore_ascii_case("host"))
        {
            head.push_str(&format!("host: {}\r\n", self.addr));
        }
        for (name, value) in &self.headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes())?;
        stream.write_all(&self.body)?;
        // Read up to the end of the response, not of the connection: Envoy
        // holds a local reply's connection for its 1 s delayed close, and a
        // client that waits for it measures that instead of the proxy.
        let mut raw = Vec::new();
        let mut buf = [0u8; 65536];
        loop {
            if let Some(len) = complete_len(&raw, self.method.eq_ignore_ascii_case("HEAD")) {
                return parse_response(&raw[..len]);
            }
            let n = stream.read(&mut buf)?;
            if n == 0 {
                return parse_response(&raw);
            }
            raw.extend_from_slice(&buf[..n]);
        }
    }
}

pub fn get(addr: SocketAddr, path: &str) -> io::Result<HttpResponse> {
    Request::new("GET", addr, path).send()
}

pub fn post(addr: SocketAddr, path: &str, body: impl Into<Vec<u8>>) -> io::Result<HttpResponse> {
    Request::new("POST", addr, path).body(body).send()
}

/// `GET path` on a keep-alive connection the caller keeps, read up to its
/// `content-length` (no `connection: close`: Envoy holds a local reply's
/// connection for its 1 s delayed-close timeout before closing, too slow to
/// watch a queue). Panics on a closed connection or a 5 s silence.
pub fn keep_alive_get(stream: &mut TcpStream, path: &str) -> HttpResponse {
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nhost: sluice\r\n\r\n").unwrap();
    let mut raw = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        let n = stream.read(&mut buf).expect("a response");
        assert!(
            n > 0,
            "connection closed: {}",
            String::from_utf8_lossy(&raw)
        );
        raw.extend_from_slice(&buf[..n]);
        let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .expect("content-length");
        if raw.len() >= end + 4 + length {
            return parse_response(&raw[..end + 4 + length]).expect("an HTTP response");
        }
    }
}

/// The length of the whole response in `raw` once it is all there, when
/// its framing tells (a `content-length`, or no body at all); `None` while
/// more is to come or only the connection's end can tell (chunked bodies
/// and bodies that run to the close are read to the end).
fn complete_len(raw: &[u8], head_request: bool) -> Option<usize> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
    let status: u16 = head.split(' ').nth(1)?.parse().ok()?;
    if head_request || status == 204 || status == 304 || (100..200).contains(&status) {
        return (status >= 200).then_some(end);
    }
    if head.contains("transfer-encoding:") {
        return None;
    }
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())?;
    (raw.len() >= end + length).then_some(end + length)
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

fn parse_response(raw: &[u8]) -> io::Result<HttpResponse> {
    let head_end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| invalid("response ended before its headers did"))?;
    let head = std::str::from_utf8(&raw[..head_end]).map_err(|_| invalid("non-UTF-8 head"))?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| invalid("bad status line"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let rest = &raw[head_end + 4..];
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    let content_length = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse::<usize>().ok());
    let body = if chunked {
        decode_chunked(rest)?
    } else if let Some(len) = content_length {
        rest.get(..len)
            .ok_or_else(|| invalid("body shorter than content-length"))?
            .to_vec()
    } else {
        rest.to_vec()
    };
    Ok(HttpResponse {
        status,
        headers,
        body,
    })
}

fn decode_chunked(mut rest: &[u8]) -> io::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line_end = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| invalid("truncated chunk size"))?;
        let size_text =
            std::str::from_utf8(&rest[..line_end]).map_err(|_| invalid("chunk size"))?;
        let size_text = size_text.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16).map_err(|_| invalid("chunk size"))?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            return Ok(body);
        }
        let chunk = rest.get(..size).ok_or_else(|| invalid("truncated chunk"))?;
        body.extend_from_slice(chunk);
        rest = rest
            .get(size + 2..)
            .ok_or_else(|| invalid("truncated chunk"))?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_response_is_complete_by_its_framing_not_the_connection() {
        let head = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n";
        assert_eq!(complete_len(head, false), None);
        let mut full = head.to_vec();
        full.extend_from_slice(b"hel");
        assert_eq!(complete_len(&full, false), None);
        full.extend_from_slice(b"lo");
        assert_eq!(complete_len(&full, false), Some(full.len()));
        assert_eq!(complete_len(head, true), Some(head.len()), "HEAD: no body");
        let chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n";
        assert_eq!(complete_len(chunked, false), None, "read to the end");
        let empty = b"HTTP/1.1 204 No Content\r\n\r\n";
        assert_eq!(complete_len(empty, false), Some(empty.len()));
        assert_eq!(complete_len(b"HTTP/1.1 200 OK\r\n", false), None);
    }

    #[test]
    fn parses_content_length_and_chunked_bodies() {
        let r =
            parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A: b\r\n\r\nhi").unwrap();
        assert_eq!(
            (r.status, r.text().as_str(), r.header("x-a")),
            (200, "hi", Some("b"))
        );
        let r = parse_response(
            b"HTTP/1.1 503 Service Unavailable\r\ntransfer-encoding: chunked\r\n\r\n4\r\nLIVE\r\n3;x=1\r\n ok\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!((r.status, r.text().as_str()), (503, "LIVE ok"));
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n").is_err());
    }
}
