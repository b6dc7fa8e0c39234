//! A request's own deadline: gRPC's `grpc-timeout` header, or a number of
//! milliseconds (Envoy's `x-envoy-expected-rq-timeout-ms`, a configured
//! `deadline_header`). A client that
//! does not cancel at its deadline (a raw HTTP/2 client, a proxy in front)
//! would otherwise be admitted after it and run by the backend for nobody.

/// The `grpc-timeout` header value in nanoseconds: at most 8 digits and a
/// unit (`H`, `M`, `S`, `m`, `u`, `n`), per the gRPC HTTP/2 protocol.
/// `None` for anything else, which leaves the request without a deadline.
pub fn grpc_timeout_ns(value: &str) -> Option<u64> {
    let value = value.trim();
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    let ns_per_unit: u64 = match unit {
        "H" => 3_600_000_000_000,
        "M" => 60_000_000_000,
        "S" => 1_000_000_000,
        "m" => 1_000_000,
        "u" => 1_000,
        "n" => 1,
        _ => return None,
    };
    n.checked_mul(ns_per_unit)
}

/// A whole number of milliseconds (at most 10 digits: 115 days) in
/// nanoseconds; `None` for anything else, which leaves the request without
/// a deadline from it.
pub fn millis_ns(value: &str) -> Option<u64> {
    let value = value.trim();
    if value.is_empty() || value.len() > 10 || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value.parse::<u64>().ok()?.checked_mul(1_000_000)
}

#[cfg(test)]
mod tests {
    use super::{grpc_timeout_ns, millis_ns};

    #[test]
    fn parses_milliseconds() {
        for (value, want) in [
            ("200", Some(200_000_000)),
            (" 15000 ", Some(15_000_000_000)),
            ("0", Some(0)),
            ("9999999999", Some(9_999_999_999_000_000)),
            ("99999999999", None),
            ("1.5", None),
            ("-1", None),
            ("", None),
            ("10ms", None),
        ] {
            assert_eq!(millis_ns(value), want, "{value:?}");
        }
    }

    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn parses_the_grpc_timeout_header() {
        let cases = [
            ("300m", Some(300_000_000)),
            ("1S", Some(1_000_000_000)),
            ("2M", Some(120_000_000_000)),
            ("1H", Some(3_600_000_000_000)),
            ("5u", Some(5_000)),
            ("7n", Some(7)),
            (" 10m ", Some(10_000_000)),
            ("99999999S", Some(99_999_999_000_000_000)),
            // Past what u64 nanoseconds hold: no deadline, as good as one.
            ("99999999H", None),
            ("123456789m", None),
            ("m", None),
            ("", None),
            ("10", None),
            ("10s", None),
            ("-1S", None),
            ("1.5S", None),
        ];
        for (value, want) in cases {
            assert_eq!(grpc_timeout_ns(value), want, "{value:?}");
        }
    }
}
