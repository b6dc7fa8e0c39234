//! Secrets kept out of messages and logs: the one URL-masking function of
//! the prober and sync (and of anything else that prints a URL it was given).

/// `url` with the password of its user info replaced by `***`:
/// `rediss://user:secret@host:6380/0` → `rediss://user:***@host:6380/0`.
///
/// A URL without user info comes back unchanged; a user without a password
/// (`redis://token@host`, which Redis reads as the password) is masked too,
/// since that name is the secret. The last `@` ends the user info, so a
/// password holding an unescaped `@` is still hidden whole.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let Some((userinfo, host)) = rest.rsplit_once('@') else {
        return url.to_string();
    };
    match userinfo.split_once(':') {
        Some((user, _password)) => format!("{scheme}://{user}:***@{host}"),
        None if userinfo.is_empty() => url.to_string(),
        None => format!("{scheme}://***@{host}"),
    }
}

/// Each of a comma-separated list of URLs (a Redis Cluster node list)
/// through [`redact_url`].
pub fn redact_urls(urls: &str) -> String {
    urls.split(',')
        .map(|u| redact_url(u.trim()))
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_show() {
        for (url, shown) in [
            ("redis://:pw@h:1/0", "redis://:***@h:1/0"),
            ("redis://u:pw@h", "redis://u:***@h"),
            ("rediss://u:p@ss:w@h:6380/2", "rediss://u:***@h:6380/2"),
            ("redis://token@h:6379", "redis://***@h:6379"),
            ("redis://h:6379", "redis://h:6379"),
            ("redis://@h:6379", "redis://@h:6379"),
            ("http://u:pw@example:8000/x", "http://u:***@example:8000/x"),
            ("not a url", "not a url"),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
        }
        assert_eq!(
            redact_urls("redis://:a@h1:1, redis://:b@h2:2"),
            "redis://:***@h1:1,redis://:***@h2:2"
        );
    }
}
