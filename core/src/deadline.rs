//! A request's own deadline: gRPC's `grpc-timeout` header. A client that
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

#[cfg(test)]
mod tests {
    use super::grpc_timeout_ns;

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
