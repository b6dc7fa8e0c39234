//! The dashboard page at `ui.path` and the HTTP Basic guard in front of it
//! and of the stats JSON. The page is one self-contained HTML file (inline
//! script and SVG, nothing fetched from elsewhere) that polls the stats.

use crate::host::Host;
use crate::replies::details;
use sluice_core::config::Ui;

const PAGE: &str = include_str!("../../assets/dashboard.html");
/// The realm browsers show in their password prompt.
pub const REALM: &str = "sluice";

/// Serves the page and guards the page and the stats.
pub struct Dashboard {
    /// The page, with its settings filled in; `None` when disabled.
    page: Option<(String, String)>,
    /// Where the stats are served; `None`: nowhere.
    stats_path: Option<String>,
    /// This worker's last stats body ([`super::stats`]).
    pub stats_cache: super::stats::Cache,
    /// The base64 token of `Authorization: Basic <token>` that lets a
    /// client in.
    expected: Option<String>,
}

impl Dashboard {
    pub fn new(ui: &Ui) -> Dashboard {
        // Config parsing refuses the page without the stats.
        let page = ui.enable.then(|| {
            // A JS string literal, whatever the configured path holds.
            let stats_path = serde_json::Value::from(ui.stats_path.as_deref().unwrap_or_default());
            let html = PAGE
                .replace("\"{{STATS_PATH}}\"", &stats_path.to_string())
                .replace("{{REFRESH_MS}}", &ui.refresh.as_millis().to_string());
            (ui.path.clone(), html)
        });
        let expected = ui
            .credentials
            .as_ref()
            .map(|(user, password)| base64(format!("{user}:{password}").as_bytes()));
        Dashboard {
            page,
            stats_path: ui.stats_path.clone(),
            stats_cache: Default::default(),
            expected,
        }
    }

    /// Where the stats are served, if anywhere.
    pub fn stats_path(&self) -> Option<&str> {
        self.stats_path.as_deref()
    }

    /// Answers a request for the page, or a request for the page or the
    /// stats without valid credentials; whether it did. The stats
    /// themselves are answered by the caller.
    pub fn answer<H: Host>(&self, host: &H, raw_path: &str) -> bool {
        let path = raw_path.split(['?', '#']).next().unwrap_or(raw_path);
        let page = self.page.as_ref().filter(|(p, _)| p == path);
        if page.is_none() && self.stats_path() != Some(path) {
            return false;
        }
        if let Some(expected) = &self.expected {
            let header = host.get_http_request_header("authorization");
            if !authorized(header.as_deref(), expected) {
                let challenge = format!("Basic realm=\"{REALM}\"");
                send(
                    host,
                    401,
                    details::UNAUTHORIZED,
                    vec![
                        ("www-authenticate", &challenge),
                        ("content-type", "application/json"),
                        ("x-sluice-reason", "unauthorized"),
                    ],
                    "{\"error\":\"credentials required\",\"reason\":\"unauthorized\"}\n",
                );
                return true;
            }
        }
        let Some((_, html)) = page else { return false };
        send(
            host,
            200,
            details::DASHBOARD,
            vec![
                ("content-type", "text/html; charset=utf-8"),
                ("cache-control", "no-store"),
                ("x-sluice-reason", "dashboard"),
                // Nothing but this page and the stats, even if it were changed
                // to fetch more: it must work in an air-gapped cluster.
                (
                    "content-security-policy",
                    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:",
                ),
                ("x-content-type-options", "nosniff"),
            ],
            html,
        );
        true
    }
}

fn send<H: Host>(host: &H, status: u32, details: &str, headers: Vec<(&str, &str)>, body: &str) {
    if let Err(e) = host.send_local_reply(status, None, details, headers, body.as_bytes()) {
        log::warn!("cannot send the {status} reply: {e:?}");
    }
}

/// Whether an `Authorization` header carries the expected Basic token (the
/// scheme's name is case-insensitive, RFC 9110).
fn authorized(header: Option<&str>, expected: &str) -> bool {
    let token = header
        .and_then(|h| h.trim().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("basic"))
        .map_or("", |(_, token)| token.trim());
    constant_time_eq(token.as_bytes(), expected.as_bytes())
}

/// Compares every byte whatever the first difference, so the time taken
/// says nothing about how much of a guess was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= usize::from(x ^ y);
    }
    std::hint::black_box(diff) == 0
}

/// Standard base64 with padding, as browsers send Basic credentials.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | (u32::from(b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake_host::{FakeEnvoy, FakeWorker};
    use proxy_wasm::types::Action;
    use serde_json::json;

    #[test]
    fn base64_matches_the_rfc_vectors() {
        let cases = [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
            ("admin:secret", "YWRtaW46c2VjcmV0"),
        ];
        for (plain, encoded) in cases {
            assert_eq!(base64(plain.as_bytes()), encoded, "{plain}");
        }
    }

    #[test]
    fn authorization_header_forms() {
        let t = "YWRtaW46c2VjcmV0";
        assert!(authorized(Some("Basic YWRtaW46c2VjcmV0"), t));
        assert!(authorized(Some("basic  YWRtaW46c2VjcmV0 "), t));
        assert!(!authorized(Some("Bearer YWRtaW46c2VjcmV0"), t));
        assert!(!authorized(Some("Basic"), t));
        assert!(!authorized(Some(""), t));
        assert!(!authorized(None, t));
        assert!(!authorized(Some("Basic YWRtaW46c2VjcmV"), t));
    }

    #[test]
    fn constant_time_eq_is_eq() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(!constant_time_eq(b"", b"a"));
        assert!(constant_time_eq(b"", b""));
    }

    fn config(ui: serde_json::Value) -> serde_json::Value {
        json!({"service": "t", "ui": ui, "endpoints": {"/p": {"capacity": 1}}})
    }

    #[test]
    fn page_and_stats_ask_for_credentials_when_set() {
        let envoy = FakeEnvoy::new();
        let ui = json!({"enable": true, "username": "admin", "password": "secret", "refresh": 0.5});
        let w = FakeWorker::start(&envoy, &config(ui));
        for path in ["/balancer/ui", "/balancer/stats", "/balancer/ui?x=1"] {
            for auth in [None, Some("Basic YWRtaW46c2VjcmVX"), Some("Bearer x")] {
                let s = w.request_with("GET", path, auth.map(|a| ("authorization", a)).as_slice());
                assert_eq!(s.action, Action::Pause);
                let reply = s.reply();
                assert_eq!(reply.status, 401, "{path} {auth:?}");
                assert_eq!(
                    reply.header("www-authenticate"),
                    Some("Basic realm=\"sluice\"")
                );
            }
        }
        let ok = Some(("authorization", "Basic YWRtaW46c2VjcmV0"));
        let page = w.request_with("GET", "/balancer/ui", ok.as_slice()).reply();
        assert_eq!(page.status, 200);
        assert_eq!(
            page.header("content-type"),
            Some("text/html; charset=utf-8")
        );
        assert!(
            page.body.contains("const REFRESH_MS = 500;"),
            "settings filled in"
        );
        assert!(page.body.contains("\"/balancer/stats\""));
        assert!(!page.body.contains("{{"), "a placeholder left in the page");
        let stats = w
            .request_with("GET", "/balancer/stats", ok.as_slice())
            .reply();
        assert_eq!(stats.status, 200);
        assert_eq!(stats.json()["endpoints"]["/p"]["capacity"], 1);
        // Other paths are none of its business.
        let other = w.request_with("GET", "/elsewhere", &[]);
        assert_eq!(other.action, Action::Continue);
    }

    #[test]
    fn without_credentials_both_are_open_and_disabled_means_no_page() {
        let envoy = FakeEnvoy::new();
        let w = FakeWorker::start(&envoy, &config(json!({"enable": true, "path": "/ops"})));
        assert_eq!(w.request("GET", "/ops").reply().status, 200);
        assert_eq!(w.request("GET", "/balancer/stats").reply().status, 200);
        assert_eq!(w.request("GET", "/balancer/ui").action, Action::Continue);

        let w = FakeWorker::start(&envoy, &config(json!(null)));
        assert_eq!(w.request("GET", "/balancer/ui").action, Action::Continue);
        assert_eq!(w.request("GET", "/balancer/stats").reply().status, 200);
        // Credentials guard the stats even with the page off.
        let ui = json!({"enable": false, "username": "a", "password": "b"});
        let w = FakeWorker::start(&envoy, &config(ui));
        assert_eq!(w.request("GET", "/balancer/stats").reply().status, 401);
        assert_eq!(w.request("GET", "/balancer/ui").action, Action::Continue);
    }
}
