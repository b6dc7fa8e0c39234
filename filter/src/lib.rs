//! Sluice as an Envoy proxy-wasm HTTP filter. See `docs/filter.md` for the
//! design and the Envoy behaviour it relies on.
//!
//! The proxy-wasm callbacks are thin glue over state machines that are
//! generic over [`host::Host`], so the tests run them against a fake host.

mod admin;
mod health;
mod host;
mod leader;
mod metrics;
mod path;
mod replies;
mod root;
mod routes;
mod shares;
mod stream;
mod sync_stream;
mod worker;

#[cfg(test)]
mod class_tests;
#[cfg(test)]
mod cost_tests;
#[cfg(test)]
mod fake_host;
#[cfg(test)]
mod instance_tests;
#[cfg(test)]
mod share_tests;
#[cfg(test)]
mod sync_tests;
#[cfg(test)]
mod tests;

use proxy_wasm::hostcalls;
use proxy_wasm::types::LogLevel;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| {
        // Envoy's level for its wasm logger (`-l debug`, or
        // `--component-log-level wasm:debug`), so lines below it are dropped
        // before they are formatted. Asked here, not above: Envoy allows no
        // hostcalls in `_initialize` ("restricted_callback").
        if let Ok(level) = hostcalls::get_log_level() {
            proxy_wasm::set_log_level(level);
        }
        Box::new(root::Root::new(host::Envoy))
    });
}}
