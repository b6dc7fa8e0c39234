//! Which Redis the prober writes to, and how: one node or a Redis Cluster,
//! plain or TLS (`rediss://`, with a CA file and an optional client
//! certificate). The names of the options are sync's (docs/redis-keys.md).

use crate::cli::RedisConnArgs;
use crate::error::ProberError;
use sluice_core::redact::redact_urls;
use std::path::Path;

#[derive(Debug, Clone)]
pub struct RedisTarget {
    /// One URL, or the seed nodes of a cluster.
    pub urls: Vec<String>,
    pub cluster: bool,
    pub tls: Option<redis::TlsCertificates>,
}

impl RedisTarget {
    /// `urls`: one `redis://` / `rediss://` URL, or several comma-separated
    /// (a cluster's nodes).
    pub fn new(urls: &str, args: &RedisConnArgs) -> Result<RedisTarget, ProberError> {
        let list: Vec<String> = urls
            .split(',')
            .map(|u| u.trim().to_string())
            .filter(|u| !u.is_empty())
            .collect();
        let shown = redact_urls(urls);
        if list.is_empty() {
            return Err(ProberError::Usage("--redis: no URL given".into()));
        }
        let secure = list.iter().filter(|u| u.starts_with("rediss://")).count();
        if secure != 0 && secure != list.len() {
            return Err(ProberError::Usage(format!(
                "--redis {shown}: mix of rediss:// and redis:// nodes: use one scheme"
            )));
        }
        let files_given = args.redis_ca.is_some() || args.redis_cert.is_some();
        if files_given && secure == 0 {
            return Err(ProberError::Usage(format!(
                "--redis-ca/--redis-cert need a rediss:// URL, got {shown}"
            )));
        }
        let tls = if files_given {
            let read = |path: &Path, flag: &str| {
                std::fs::read(path).map_err(|e| {
                    ProberError::Usage(format!("{flag} {}: cannot read it: {e}", path.display()))
                })
            };
            let client_tls = match (&args.redis_cert, &args.redis_key) {
                (Some(cert), Some(key)) => Some(redis::ClientTlsConfig {
                    client_cert: read(cert, "--redis-cert")?,
                    client_key: read(key, "--redis-key")?,
                }),
                (None, None) => None,
                _ => {
                    return Err(ProberError::Usage(
                        "--redis-cert and --redis-key go together: give both".into(),
                    ))
                }
            };
            Some(redis::TlsCertificates {
                client_tls,
                root_cert: match &args.redis_ca {
                    Some(ca) => Some(read(ca, "--redis-ca")?),
                    None => None,
                },
            })
        } else {
            None
        };
        Ok(RedisTarget {
            cluster: args.redis_cluster || list.len() > 1,
            urls: list,
            tls,
        })
    }

    /// A single plain or TLS URL with no files: what `--redis URL` alone means.
    pub fn plain(url: &str) -> RedisTarget {
        RedisTarget {
            urls: vec![url.to_string()],
            cluster: false,
            tls: None,
        }
    }

    /// The URLs, passwords masked.
    pub fn shown(&self) -> String {
        redact_urls(&self.urls.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn nodes_tls_files_and_their_mistakes() {
        let none = RedisConnArgs::default();
        let one = RedisTarget::new("redis://h:1", &none).unwrap();
        assert!(!one.cluster && one.tls.is_none());
        let list = RedisTarget::new("redis://a:1, redis://:pw@b:2", &none).unwrap();
        assert!(list.cluster);
        assert_eq!(list.urls, ["redis://a:1", "redis://:pw@b:2"]);
        assert_eq!(list.shown(), "redis://a:1,redis://:***@b:2");
        let flagged = RedisConnArgs {
            redis_cluster: true,
            ..Default::default()
        };
        assert!(RedisTarget::new("redis://a:1", &flagged).unwrap().cluster);

        let ca = RedisConnArgs {
            redis_ca: Some(PathBuf::from("/nonexistent/ca.pem")),
            ..Default::default()
        };
        let cert_only = RedisConnArgs {
            redis_cert: Some(PathBuf::from("/nonexistent/c.pem")),
            ..Default::default()
        };
        for (urls, args, message) in [
            ("", &none, "--redis: no URL given"),
            (
                "rediss://a:1,redis://b:2",
                &none,
                "--redis rediss://a:1,redis://b:2: mix of rediss:// and redis:// nodes: use one scheme",
            ),
            (
                "redis://:pw@a:1",
                &ca,
                "--redis-ca/--redis-cert need a rediss:// URL, got redis://:***@a:1",
            ),
            (
                "rediss://a:1",
                &ca,
                "--redis-ca /nonexistent/ca.pem: cannot read it: No such file or directory (os error 2)",
            ),
            (
                "rediss://a:1",
                &cert_only,
                "--redis-cert and --redis-key go together: give both",
            ),
        ] {
            let e = RedisTarget::new(urls, args).unwrap_err();
            assert_eq!(e.to_string(), message, "{urls}");
            assert_eq!(e.exit_code(), crate::exit::USAGE);
        }
    }
}
