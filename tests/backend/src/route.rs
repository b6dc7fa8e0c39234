//! `--route PATH[:key=value,...]`: how one path of the backend behaves.

use std::str::FromStr;

/// What a route does with a request that finds all of its slots taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overload {
    /// Wait, first come first served, until a slot frees.
    Queue,
    /// Answer 503 at once.
    Reject,
    /// Answer 200 at once with an error body (`{"error":"over capacity"}`),
    /// as some services do: a status check alone takes it for success.
    Error200,
}

/// What a route does with a request whose client goes away mid-request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnDisconnect {
    /// Stop working on it (hyper drops the handler): what most async servers do.
    Cancel,
    /// Finish the work anyway and keep counting it, like a thread-pool server
    /// (uvicorn running a `def` endpoint) that cannot notice the client left.
    Finish,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RouteSpec {
    /// Matched exactly against the request path without its query string.
    pub path: String,
    /// Requests served at the same time; `None` is unlimited.
    pub capacity: Option<usize>,
    /// How long serving one request takes, unless `x-service-ms` says otherwise.
    pub service_ms: f64,
    pub overload: Overload,
    pub on_disconnect: OnDisconnect,
    /// Every `slow_every`-th request of the route takes `slow_ms` instead of
    /// `service_ms`: a mix of fast and slow requests on one endpoint.
    pub slow: Option<(u64, f64)>,
    /// Stream the response as this many tokens (chunks), one every
    /// `service_ms / tokens`, headers first, like an LLM generating; with
    /// `on_disconnect=finish` generation goes on after the client leaves.
    pub tokens: Option<u32>,
    /// How each request's service time is drawn around `service_ms`.
    pub service_dist: ServiceDist,
    /// Seeds `service_dist`'s draws, so a run can be repeated: the same
    /// seed gives the same sequence of service times (in arrival order).
    pub seed: u64,
    /// Milliseconds of service time added per MB (10^6 bytes) of request
    /// body, read whole before service: an upload endpoint whose work
    /// grows with the size of what it is sent.
    pub ms_per_mb: f64,
}

/// How a route's service times vary around its `service_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceDist {
    /// Every request takes `service_ms`.
    Fixed,
    /// Exponential with mean `service_ms`, as the durations of inference
    /// calls vary: most short, a few several times the mean.
    Exponential,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteSpecError {
    #[error("the path must start with '/', got {0:?}")]
    BadPath(String),
    #[error("{0:?} is not key=value")]
    NotKeyValue(String),
    #[error("unknown key {0:?} (expected capacity, service_ms, service_dist, seed, overload, on_disconnect, slow_every, slow_ms, tokens or ms_per_mb)")]
    UnknownKey(String),
    #[error("key {0:?} is given twice")]
    DuplicateKey(String),
    #[error("capacity must be a whole number >= 1, got {0:?}")]
    BadCapacity(String),
    #[error("service_ms must be a number of milliseconds >= 0, got {0:?}")]
    BadServiceMs(String),
    #[error("ms_per_mb must be a number of milliseconds >= 0, got {0:?}")]
    BadMsPerMb(String),
    #[error("overload must be queue, reject or error200, got {0:?}")]
    BadOverload(String),
    #[error("on_disconnect must be cancel or finish, got {0:?}")]
    BadOnDisconnect(String),
    #[error("{0} must be a whole number >= 1, got {1:?}")]
    BadCount(&'static str, String),
    #[error("slow_every and slow_ms go together")]
    SlowHalf,
    #[error("service_dist must be fixed or exponential, got {0:?}")]
    BadServiceDist(String),
    #[error("seed must be a whole number, got {0:?}")]
    BadSeed(String),
}

impl FromStr for RouteSpec {
    type Err = RouteSpecError;

    fn from_str(spec: &str) -> Result<RouteSpec, RouteSpecError> {
        let (path, options) = match spec.split_once(':') {
            Some((path, options)) => (path, Some(options)),
            None => (spec, None),
        };
        if !path.starts_with('/') {
            return Err(RouteSpecError::BadPath(path.to_string()));
        }
        let mut route = RouteSpec {
            path: path.to_string(),
            capacity: None,
            service_ms: 0.0,
            overload: Overload::Queue,
            on_disconnect: OnDisconnect::Cancel,
            slow: None,
            tokens: None,
            service_dist: ServiceDist::Fixed,
            seed: 1,
            ms_per_mb: 0.0,
        };
        let (mut slow_every, mut slow_ms) = (None, None);
        let count = |key: &'static str, value: &str| {
            value
                .parse::<u32>()
                .ok()
                .filter(|&n| n >= 1)
                .ok_or_else(|| RouteSpecError::BadCount(key, value.to_string()))
        };
        let mut seen: Vec<&str> = Vec::new();
        for pair in options.into_iter().flat_map(|o| o.split(',')) {
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| RouteSpecError::NotKeyValue(pair.to_string()))?;
            let (key, value) = (key.trim(), value.trim());
            if seen.contains(&key) {
                return Err(RouteSpecError::DuplicateKey(key.to_string()));
            }
            seen.push(key);
            match key {
                "capacity" => {
                    let capacity = value
                        .parse::<usize>()
                        .ok()
                        .filter(|&c| c >= 1)
                        .ok_or_else(|| RouteSpecError::BadCapacity(value.to_string()))?;
                    route.capacity = Some(capacity);
                }
                "service_ms" => {
                    route.service_ms = parse_service_ms(value)
                        .ok_or_else(|| RouteSpecError::BadServiceMs(value.to_string()))?;
                }
                "overload" => {
                    route.overload = match value {
                        "queue" => Overload::Queue,
                        "reject" => Overload::Reject,
                        "error200" => Overload::Error200,
                        _ => return Err(RouteSpecError::BadOverload(value.to_string())),
                    };
                }
                "on_disconnect" => {
                    route.on_disconnect = match value {
                        "cancel" => OnDisconnect::Cancel,
                        "finish" => OnDisconnect::Finish,
                        _ => return Err(RouteSpecError::BadOnDisconnect(value.to_string())),
                    };
                }
                "slow_every" => slow_every = Some(u64::from(count("slow_every", value)?)),
                "slow_ms" => {
                    slow_ms = Some(
                        parse_service_ms(value)
                            .ok_or_else(|| RouteSpecError::BadServiceMs(value.to_string()))?,
                    );
                }
                "tokens" => route.tokens = Some(count("tokens", value)?),
                "ms_per_mb" => {
                    route.ms_per_mb = parse_service_ms(value)
                        .ok_or_else(|| RouteSpecError::BadMsPerMb(value.to_string()))?;
                }
                "service_dist" => {
                    route.service_dist = match value {
                        "fixed" => ServiceDist::Fixed,
                        "exponential" => ServiceDist::Exponential,
                        _ => return Err(RouteSpecError::BadServiceDist(value.to_string())),
                    };
                }
                "seed" => {
                    route.seed = value
                        .parse()
                        .map_err(|_| RouteSpecError::BadSeed(value.to_string()))?;
                }
                _ => return Err(RouteSpecError::UnknownKey(key.to_string())),
            }
        }
        route.slow = match (slow_every, slow_ms) {
            (Some(every), Some(ms)) => Some((every, ms)),
            (None, None) => None,
            _ => return Err(RouteSpecError::SlowHalf),
        };
        Ok(route)
    }
}

/// A service time in milliseconds: finite and not negative. Shared by
/// `--route` and the `x-service-ms` request header.
pub fn parse_service_ms(text: &str) -> Option<f64> {
    text.trim()
        .parse::<f64>()
        .ok()
        .filter(|ms| ms.is_finite() && *ms >= 0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_good_specs() {
        let cases = [
            ("/p", None, 0.0, Overload::Queue),
            ("/p:capacity=4", Some(4), 0.0, Overload::Queue),
            (
                "/predict:capacity=4,service_ms=200",
                Some(4),
                200.0,
                Overload::Queue,
            ),
            (
                "/a/b:service_ms=2.5,overload=reject,capacity=1",
                Some(1),
                2.5,
                Overload::Reject,
            ),
            ("/p:service_ms=0", None, 0.0, Overload::Queue),
            (
                "/p:capacity=4,overload=error200",
                Some(4),
                0.0,
                Overload::Error200,
            ),
        ];
        for (spec, capacity, service_ms, overload) in cases {
            let route: RouteSpec = spec.parse().unwrap_or_else(|e| panic!("{spec}: {e}"));
            assert_eq!(route.capacity, capacity, "{spec}");
            assert_eq!(route.service_ms, service_ms, "{spec}");
            assert_eq!(route.overload, overload, "{spec}");
        }
        assert_eq!("/a/b:capacity=1".parse::<RouteSpec>().unwrap().path, "/a/b");
        let finish: RouteSpec = "/p:on_disconnect=finish".parse().unwrap();
        assert_eq!(finish.on_disconnect, OnDisconnect::Finish);
        assert_eq!(
            "/p".parse::<RouteSpec>().unwrap().on_disconnect,
            OnDisconnect::Cancel
        );
    }

    #[test]
    fn parses_slow_mixes_and_token_streams() {
        let r: RouteSpec = "/p:service_ms=50,slow_every=10,slow_ms=3000,tokens=5"
            .parse()
            .unwrap();
        assert_eq!(r.slow, Some((10, 3000.0)));
        assert_eq!(r.tokens, Some(5));
        assert_eq!("/p".parse::<RouteSpec>().unwrap().slow, None);
    }

    #[test]
    fn parses_a_service_time_per_mb_of_body() {
        let r: RouteSpec = "/upload:service_ms=5,ms_per_mb=4".parse().unwrap();
        assert_eq!((r.service_ms, r.ms_per_mb), (5.0, 4.0));
        assert_eq!("/p".parse::<RouteSpec>().unwrap().ms_per_mb, 0.0);
        assert_eq!(
            "/p:ms_per_mb=-1"
                .parse::<RouteSpec>()
                .unwrap_err()
                .to_string(),
            "ms_per_mb must be a number of milliseconds >= 0, got \"-1\""
        );
    }

    #[test]
    fn parses_service_time_distributions() {
        let r: RouteSpec = "/p:service_ms=60,service_dist=exponential,seed=7"
            .parse()
            .unwrap();
        assert_eq!((r.service_dist, r.seed), (ServiceDist::Exponential, 7));
        let r: RouteSpec = "/p:service_ms=60".parse().unwrap();
        assert_eq!((r.service_dist, r.seed), (ServiceDist::Fixed, 1));
        let r: RouteSpec = "/p:service_dist=fixed".parse().unwrap();
        assert_eq!(r.service_dist, ServiceDist::Fixed);
    }

    #[test]
    fn names_the_bad_part() {
        let cases = [
            ("predict", "the path must start with '/', got \"predict\""),
            ("/p:capacity", "\"capacity\" is not key=value"),
            ("/p:capacity=4,", "\"\" is not key=value"),
            (
                "/p:slots=4",
                "unknown key \"slots\" (expected capacity, service_ms, service_dist, seed, overload, on_disconnect, slow_every, slow_ms, tokens or ms_per_mb)",
            ),
            (
                "/p:capacity=0",
                "capacity must be a whole number >= 1, got \"0\"",
            ),
            (
                "/p:capacity=x",
                "capacity must be a whole number >= 1, got \"x\"",
            ),
            (
                "/p:service_ms=-1",
                "service_ms must be a number of milliseconds >= 0, got \"-1\"",
            ),
            (
                "/p:service_ms=inf",
                "service_ms must be a number of milliseconds >= 0, got \"inf\"",
            ),
            (
                "/p:overload=drop",
                "overload must be queue, reject or error200, got \"drop\"",
            ),
            (
                "/p:on_disconnect=ignore",
                "on_disconnect must be cancel or finish, got \"ignore\"",
            ),
            (
                "/p:capacity=1,capacity=2",
                "key \"capacity\" is given twice",
            ),
            ("/p:tokens=0", "tokens must be a whole number >= 1, got \"0\""),
            ("/p:slow_every=10", "slow_every and slow_ms go together"),
            (
                "/p:service_dist=normal",
                "service_dist must be fixed or exponential, got \"normal\"",
            ),
            ("/p:seed=-1", "seed must be a whole number, got \"-1\""),
        ];
        for (spec, message) in cases {
            let err = spec.parse::<RouteSpec>().unwrap_err();
            assert_eq!(err.to_string(), message, "{spec}");
        }
    }
}
