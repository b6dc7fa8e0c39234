//! Sluice as an Envoy proxy-wasm HTTP filter. See `docs/filter.md` for the
//! design and the Envoy behaviour it relies on.
//!
//! The proxy-wasm callbacks are thin glue over state machines that are
//! generic over [`host::Host`], so the tests run them against a fake host.

mod host;
mod replies;
mod root;
mod routes;
mod stream;
mod worker;

#[cfg(test)]
mod fake_host;
#[cfg(test)]
mod tests;

use proxy_wasm::types::LogLevel;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| Box::new(root::Root::new(host::Envoy)));
}}
