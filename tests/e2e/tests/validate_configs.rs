//! Every Envoy bootstrap in the repo, and every shape of the rendered front
//! proxy, passes `envoy --mode validate`. Validation loads the wasm module and
//! runs its `on_configure`, so the plugin configurations are checked too
//! (needs `make wasm`).
//!
//! Which files are bootstraps: a `.yaml`/`.yml` file under `envoy/` with a
//! top-level `static_resources:` or `dynamic_resources:` key. Everything else
//! (Istio and Kubernetes manifests, which start with `apiVersion:`; LDS/CDS
//! fragments, which hold `resources:`) is skipped, and listed on stderr.

use sluice_harness::{empty_wasm_path, wasm_path, workspace_root, Envoy, FrontProxy, ScratchDir};
use std::fs;
use std::path::{Path, PathBuf};

const PLUGIN_CONFIG: &str = r#"{"service":"demo","queue_timeout":30,"max_queue":1000,"endpoints":{"/predict":{"capacity":10,"queue_timeout":2,"max_queue":100,"match":"exact","methods":["POST"]}}}"#;

fn yaml_files(dir: &Path, found: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            yaml_files(&path, found);
        } else if path
            .extension()
            .is_some_and(|ext| ext == "yaml" || ext == "yml")
        {
            found.push(path);
        }
    }
}

fn is_bootstrap(yaml: &str) -> bool {
    yaml.lines()
        .any(|line| line.starts_with("static_resources:") || line.starts_with("dynamic_resources:"))
}

/// Repo configs load the filter as `target/wasm32-wasip1/release/...`
/// (relative to the repo root). Point them at the module this build made,
/// which differs when `CARGO_TARGET_DIR` is set.
fn with_built_wasm(yaml: &str) -> String {
    let built_dir = wasm_path().parent().unwrap().to_string_lossy().into_owned();
    yaml.replace(
        "filename: target/wasm32-wasip1/release/",
        &format!("filename: {built_dir}/"),
    )
}

#[test]
fn every_envoy_bootstrap_in_the_repo_is_valid() {
    let root = workspace_root();
    let mut files = Vec::new();
    yaml_files(&root.join("envoy"), &mut files);
    let scratch = ScratchDir::new("validate-repo");
    let mut validated = Vec::new();
    let mut failures = Vec::new();
    for (i, path) in files.iter().enumerate() {
        let relative = path.strip_prefix(&root).unwrap().display().to_string();
        let yaml = fs::read_to_string(path).unwrap();
        if !is_bootstrap(&yaml) {
            eprintln!("skipped (not an Envoy bootstrap): {relative}");
            continue;
        }
        // Same file name, so Envoy's messages still make sense.
        let copy_dir = scratch.path().join(i.to_string());
        fs::create_dir_all(&copy_dir).unwrap();
        let copy = copy_dir.join(path.file_name().unwrap());
        fs::write(&copy, with_built_wasm(&yaml)).unwrap();
        match Envoy::validate(&copy) {
            Ok(()) => validated.push(relative),
            Err(e) => failures.push(format!("{relative}: {e}")),
        }
    }
    eprintln!("validated: {validated:?}");
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    assert!(
        validated.contains(&"envoy/front-proxy/envoy.yaml".to_string()),
        "the demo config was not found or not recognised as a bootstrap: {validated:?}"
    );
}

#[test]
fn rendered_front_proxy_is_valid_in_every_shape() {
    let sluice = FrontProxy::new(8080, PLUGIN_CONFIG);
    let lds = FrontProxy {
        use_lds: true,
        ..sluice.clone()
    };
    let empty_filter = FrontProxy {
        wasm_path: Some(empty_wasm_path()),
        ..sluice.clone()
    };
    let plain = FrontProxy::without_wasm(8080);
    for (name, proxy) in [
        ("static", &sluice),
        ("lds", &lds),
        ("empty filter", &empty_filter),
        ("no wasm", &plain),
    ] {
        if let Err(e) = Envoy::validate_yaml(&proxy.render()) {
            panic!("{name}: {e}");
        }
    }
    // Validation does not read the LDS file; its listener is the static one.
    let lds_yaml = lds.render_lds();
    assert!(lds_yaml.contains("type.googleapis.com/envoy.config.listener.v3.Listener"));
    assert!(lds.render().contains(&*lds.lds_path().to_string_lossy()));
}

#[test]
fn a_bad_plugin_configuration_fails_validation() {
    let proxy = FrontProxy::new(8080, r#"{"endpoints":{"/predict":{"capacity":0}}}"#);
    let err = Envoy::validate_yaml(&proxy.render()).expect_err("capacity 0 must be refused");
    // The filter's own message, naming the field (not just the config dump).
    assert!(err.contains("endpoints./predict.capacity"), "{err}");
}
