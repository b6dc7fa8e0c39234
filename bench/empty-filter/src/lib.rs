//! Baseline for `make bench`: the same SDK, an HTTP context per request, and
//! no work. Sluice's hot-path cost is measured against this.

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::ContextType;

proxy_wasm::main! {{
    proxy_wasm::set_root_context(|_| Box::new(EmptyRoot));
}}

struct EmptyRoot;
impl Context for EmptyRoot {}
impl RootContext for EmptyRoot {
    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(EmptyStream))
    }
    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct EmptyStream;
impl Context for EmptyStream {}
impl HttpContext for EmptyStream {}
