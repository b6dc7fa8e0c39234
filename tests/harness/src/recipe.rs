//! A recipe shipped under `envoy/<name>/envoy.yaml`, run as it is: only its
//! ports and the path of the wasm module are changed, so what the folder
//! ships is what the tests run.

use crate::envoy::EnvoyOptions;
use std::fs;

/// The recipes' listener port (`127.0.0.1:10000`).
pub const RECIPE_LISTENER_PORT: u16 = 10000;
/// The recipes' admin port (`127.0.0.1:9901`).
pub const RECIPE_ADMIN_PORT: u16 = 9901;

#[derive(Debug, Clone)]
pub struct Recipe {
    pub name: String,
    yaml: String,
    listener_port: u16,
    admin_port: u16,
}

impl Recipe {
    /// `envoy/<name>/envoy.yaml` with the module this build made and free
    /// listener and admin ports. Upstream ports are changed with
    /// [`Recipe::upstream`].
    pub fn load(name: &str) -> Recipe {
        let path = crate::workspace_root()
            .join("envoy")
            .join(name)
            .join("envoy.yaml");
        let shipped = fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        let listener_port = crate::free_port();
        let admin_port = crate::free_port();
        let yaml = with_built_wasm(&shipped);
        let yaml = replace_port(&yaml, RECIPE_LISTENER_PORT, listener_port, name);
        let yaml = replace_port(&yaml, RECIPE_ADMIN_PORT, admin_port, name);
        Recipe {
            name: name.to_string(),
            yaml,
            listener_port,
            admin_port,
        }
    }

    /// Points every `port_value: shipped` at `port` instead (e.g. the
    /// recipe's backend 8081 at a test backend's free port). Panics if the
    /// recipe has no such port, so a recipe that changes its ports breaks
    /// its test loudly instead of running against nothing.
    pub fn upstream(mut self, shipped: u16, port: u16) -> Recipe {
        self.yaml = replace_port(&self.yaml, shipped, port, &self.name);
        self
    }

    /// The bootstrap as it will run.
    pub fn render(&self) -> &str {
        &self.yaml
    }

    pub fn listener_port(&self) -> u16 {
        self.listener_port
    }

    pub fn admin_port(&self) -> u16 {
        self.admin_port
    }

    /// What [`crate::Envoy::start_with`] needs to run this recipe.
    pub fn envoy_options(&self, concurrency: u32) -> EnvoyOptions {
        let mut opts = EnvoyOptions::new(self.yaml.clone(), self.admin_port);
        opts.listener_port = Some(self.listener_port);
        opts.concurrency = concurrency;
        opts
    }
}

/// Repo configs load the filter from where `make wasm` puts it
/// (`target/wasm32-wasip1/release/`, relative to the repo root) or from where
/// an image puts it (`/etc/envoy/sluice_filter.wasm`). Points every
/// `filename:` of a module this workspace builds at the module this build
/// made, which differs when `CARGO_TARGET_DIR` is set.
pub fn with_built_wasm(yaml: &str) -> String {
    let mut out = String::with_capacity(yaml.len());
    for line in yaml.split_inclusive('\n') {
        let trimmed = line.trim_start();
        let module = trimmed
            .strip_prefix("filename:")
            .map(|value| value.trim().trim_matches('"'))
            .and_then(|value| value.rsplit('/').next())
            .filter(|file| ["sluice_filter.wasm", "sluice_empty_filter.wasm"].contains(file));
        match module {
            Some(file) => {
                let indent = &line[..line.len() - trimmed.len()];
                let built = crate::built_wasm(file);
                let ending = if line.ends_with('\n') { "\n" } else { "" };
                out.push_str(&format!(
                    "{indent}filename: {}{ending}",
                    serde_json::Value::from(built.to_string_lossy()),
                ));
            }
            None => out.push_str(line),
        }
    }
    out
}

/// Replaces `port_value: from` (not `port_value: 80811`) with `to`; panics
/// if `from` does not occur.
fn replace_port(yaml: &str, from: u16, to: u16, recipe: &str) -> String {
    let needle = format!("port_value: {from}");
    let mut out = String::with_capacity(yaml.len());
    let mut rest = yaml;
    let mut found = 0;
    while let Some(at) = rest.find(&needle) {
        let after = &rest[at + needle.len()..];
        out.push_str(&rest[..at]);
        if after.starts_with(|c: char| c.is_ascii_digit()) {
            out.push_str(&needle);
        } else {
            out.push_str(&format!("port_value: {to}"));
            found += 1;
        }
        rest = after;
    }
    out.push_str(rest);
    assert!(found > 0, "envoy/{recipe}/envoy.yaml has no `{needle}`");
    out
}

#[cfg(test)]
mod tests {
    use super::replace_port;

    #[test]
    fn replaces_whole_ports_only() {
        let yaml = "a: { port_value: 8081 }\nb: { port_value: 80811 }\nc:\n  port_value: 8081\n";
        assert_eq!(
            replace_port(yaml, 8081, 4242, "t"),
            "a: { port_value: 4242 }\nb: { port_value: 80811 }\nc:\n  port_value: 4242\n"
        );
    }

    #[test]
    #[should_panic(expected = "has no `port_value: 8083`")]
    fn a_missing_port_is_an_error() {
        replace_port("port_value: 8081", 8083, 1, "t");
    }
}
