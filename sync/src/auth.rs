//! Who may call CapacitySync: with a token configured (`--token-file`,
//! `SLUICE_SYNC_TOKEN`), only callers sending `authorization: Bearer
//! <token>` in their call metadata; anyone otherwise. The health service is
//! not behind it (probes carry no token). docs/sync.md, "Who may watch".

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
use tonic::{Request, Status};
use tracing::warn;

/// At most one warning about refused calls this often (a scanner must not
/// flood the log); the rest are counted into the next one.
const WARN_EVERY_MS: u64 = 10_000;

/// A shared secret, never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(Arc<[u8]>);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("{source_name}: is empty")]
    Empty { source_name: String },
    #[error(
        "{source_name}: holds a character that cannot travel in an HTTP/2 header \
         (use printable ASCII without spaces)"
    )]
    NotHeaderSafe { source_name: String },
    #[error("--token-file {path}: cannot read it: {problem}")]
    Unreadable { path: String, problem: String },
}

impl Token {
    /// The token from a value (`SLUICE_SYNC_TOKEN`) or a file's text, without
    /// surrounding whitespace (a file's final newline).
    pub fn parse(text: &str, source_name: &str) -> Result<Token, TokenError> {
        let text = text.trim();
        if text.is_empty() {
            return Err(TokenError::Empty {
                source_name: source_name.to_string(),
            });
        }
        if !text.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(TokenError::NotHeaderSafe {
                source_name: source_name.to_string(),
            });
        }
        Ok(Token(text.as_bytes().into()))
    }

    /// `Bearer <token>`: what a call to another replica carries.
    pub fn bearer(&self) -> String {
        format!("Bearer {}", String::from_utf8_lossy(&self.0))
    }

    pub fn from_file(path: &Path) -> Result<Token, TokenError> {
        let text = std::fs::read_to_string(path).map_err(|e| TokenError::Unreadable {
            path: path.display().to_string(),
            problem: e.to_string(),
        })?;
        Token::parse(&text, &format!("--token-file {}", path.display()))
    }

    /// Constant time in the content of `given` (its length aside), so the
    /// token cannot be guessed byte by byte from response times.
    fn matches(&self, given: &[u8]) -> bool {
        let want = &self.0;
        let mut diff = (want.len() != given.len()) as u8;
        for i in 0..want.len().max(given.len()) {
            let a = want.get(i).copied().unwrap_or(0);
            let b = given.get(i).copied().unwrap_or(0xff);
            diff |= a ^ b;
        }
        std::hint::black_box(diff) == 0
    }
}

/// The tonic interceptor in front of CapacitySync.
#[derive(Clone)]
pub struct TokenCheck {
    token: Option<Token>,
    refused: Arc<Refusals>,
}

#[derive(Default)]
struct Refusals {
    since_warning: AtomicU64,
    last_warning_ms: AtomicU64,
}

impl TokenCheck {
    pub fn new(token: Option<Token>) -> TokenCheck {
        TokenCheck {
            token,
            refused: Arc::default(),
        }
    }

    pub fn check(&self, request: &Request<()>) -> Result<(), Status> {
        let Some(token) = &self.token else {
            return Ok(());
        };
        let problem = match request.metadata().get("authorization") {
            None => "no authorization metadata: send `authorization: Bearer <token>`",
            Some(value) => match value.as_bytes().strip_prefix(b"Bearer ") {
                None => "authorization is not `Bearer <token>`",
                Some(given) if token.matches(given) => return Ok(()),
                Some(_) => "wrong token",
            },
        };
        self.count_refusal(request, problem);
        Err(Status::unauthenticated(format!(
            "sluice-sync requires a token: {problem} (docs/sync.md, \"Who may watch\")"
        )))
    }

    fn count_refusal(&self, request: &Request<()>, problem: &str) {
        let refused = self.refused.since_warning.fetch_add(1, Ordering::Relaxed) + 1;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let last = self.refused.last_warning_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= WARN_EVERY_MS
            && self
                .refused
                .last_warning_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.refused.since_warning.store(0, Ordering::Relaxed);
            warn!(
                peer = ?request.remote_addr(), problem, refused_since_last_warning = refused,
                "refused a call without the right token"
            );
        }
    }
}

impl tonic::service::Interceptor for TokenCheck {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        self.check(&request)?;
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    fn request(authorization: Option<&str>) -> Request<()> {
        let mut request = Request::new(());
        if let Some(value) = authorization {
            request
                .metadata_mut()
                .insert("authorization", value.parse().unwrap());
        }
        request
    }

    #[test]
    fn without_a_token_anyone_may_call() {
        let check = TokenCheck::new(None);
        assert!(check.check(&request(None)).is_ok());
        assert!(check.check(&request(Some("Bearer x"))).is_ok());
    }

    #[test]
    fn with_a_token_only_its_holders() {
        let check = TokenCheck::new(Some(Token::parse("s3cret\n", "SLUICE_SYNC_TOKEN").unwrap()));
        assert!(check.check(&request(Some("Bearer s3cret"))).is_ok());
        for (given, problem) in [
            (None, "no authorization metadata"),
            (Some("s3cret"), "is not `Bearer <token>`"),
            (Some("Basic s3cret"), "is not `Bearer <token>`"),
            (Some("Bearer s3cre"), "wrong token"),
            (Some("Bearer s3crett"), "wrong token"),
            (Some("Bearer S3cret"), "wrong token"),
            (Some("Bearer "), "wrong token"),
        ] {
            let status = check.check(&request(given)).unwrap_err();
            assert_eq!(status.code(), Code::Unauthenticated, "{given:?}");
            assert!(status.message().contains(problem), "{given:?}: {status}");
            assert!(!status.message().contains("s3cret"), "never echoed");
        }
    }

    #[test]
    fn bad_tokens_are_named() {
        assert_eq!(
            Token::parse(" \n", "SLUICE_SYNC_TOKEN"),
            Err(TokenError::Empty {
                source_name: "SLUICE_SYNC_TOKEN".into()
            })
        );
        assert!(matches!(
            Token::parse("a b", "x"),
            Err(TokenError::NotHeaderSafe { .. })
        ));
        assert_eq!(
            format!("{:?}", Token::parse("s3cret", "x").unwrap()),
            "Token(<redacted>)"
        );
        let error = Token::from_file(Path::new("/nonexistent/token")).unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with("--token-file /nonexistent/token: cannot read it: "),
            "{error}"
        );
    }
}
