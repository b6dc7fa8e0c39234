//! Baseline for `make bench`: the same SDK, an HTTP context per request, and
//! no work. Sluice's hot-path cost is measured against this.
//!
//! With the plugin configuration `{"hostcalls": true}` it makes, per
//! request, the same hostcalls as Sluice admitting and releasing a request
//! (read `:path`, read and compare-and-swap a shared-data record, read the
//! clock; at the end read `:status` and the clock, read and swap the record
//! again) and nothing else: what those hostcalls cost, apart from Sluice's
//! own code.

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType};
use std::cell::Cell;
use std::rc::Rc;
use std::time::UNIX_EPOCH;

proxy_wasm::main! {{
    proxy_wasm::set_root_context(|_| Box::new(EmptyRoot { hostcalls: Rc::new(Cell::new(false)) }));
}}

struct EmptyRoot {
    hostcalls: Rc<Cell<bool>>,
}
impl Context for EmptyRoot {}
impl RootContext for EmptyRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        let config = self.get_plugin_configuration().unwrap_or_default();
        let config = String::from_utf8_lossy(&config);
        self.hostcalls
            .set(config.replace(' ', "").contains("\"hostcalls\":true"));
        true
    }
    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        if self.hostcalls.get() {
            Some(Box::new(HostcallStream { done: false }))
        } else {
            Some(Box::new(EmptyStream))
        }
    }
    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct EmptyStream;
impl Context for EmptyStream {}
impl HttpContext for EmptyStream {}

const KEY: &str = "bench.hostcalls";

/// Reads the record and writes it back changed, retrying on a lost race:
/// Sluice's `update`, without its codec.
fn swap_record() {
    for _ in 0..8 {
        let (value, cas) = hostcalls::get_shared_data(KEY).unwrap_or((None, None));
        let mut value = value.unwrap_or_else(|| vec![0; 16]);
        value[0] = value[0].wrapping_add(1);
        if hostcalls::set_shared_data(KEY, Some(&value), cas).is_ok() {
            return;
        }
    }
}

fn now_ns() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos() as u64)
}

struct HostcallStream {
    done: bool,
}
impl Context for HostcallStream {}
impl HttpContext for HostcallStream {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        if self.get_http_request_header(":path").is_some() {
            swap_record();
            std::hint::black_box(now_ns());
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _n: usize, eos: bool) -> Action {
        std::hint::black_box(self.get_http_response_header(":status"));
        if eos {
            self.end();
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, _size: usize, eos: bool) -> Action {
        if eos {
            self.end();
        }
        Action::Continue
    }
}

impl HostcallStream {
    fn end(&mut self) {
        if !std::mem::replace(&mut self.done, true) {
            std::hint::black_box(now_ns());
            swap_record();
        }
    }
}
