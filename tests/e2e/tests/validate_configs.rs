//! Every Envoy bootstrap in the repo, and every shape of the rendered front
//! proxy, passes `envoy --mode validate`. Validation loads the wasm module and
//! runs its `on_configure`, so the plugin configurations are checked too
//! (needs `make wasm`).
//!
//! Which files are bootstraps: a `.yaml`/`.yml` file under `envoy/` with a
//! top-level `static_resources:` or `dynamic_resources:` key. Everything else
//! (Istio and Kubernetes manifests, which start with `apiVersion:`; LDS/CDS
//! fragments, which hold `resources:`) is skipped, and listed on stderr.

use sluice_harness::{
    empty_wasm_path, files_under, with_built_wasm, workspace_root, Envoy, FrontProxy, ScratchDir,
};
use std::fs;
use std::path::PathBuf;

const PLUGIN_CONFIG: &str = r#"{"service":"demo","queue_timeout":30,"max_queue":1000,"endpoints":{"/predict":{"capacity":10,"queue_timeout":2,"max_queue":100,"match":"exact","methods":["POST"]}}}"#;

fn is_bootstrap(yaml: &str) -> bool {
    yaml.lines()
        .any(|line| line.starts_with("static_resources:") || line.starts_with("dynamic_resources:"))
}

#[test]
fn every_envoy_bootstrap_in_the_repo_is_valid() {
    let root = workspace_root();
    let mut files = Vec::new();
    files.extend(files_under(&root.join("envoy"), &["yaml", "yml"]));
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
    // One folder per scenario, each with its README and a bootstrap that
    // was validated above.
    for recipe in recipe_dirs() {
        let name = recipe.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            recipe.join("README.md").is_file(),
            "envoy/{name}/ has no README.md"
        );
        let bootstrap = format!("envoy/{name}/envoy.yaml");
        assert!(
            validated.contains(&bootstrap),
            "{bootstrap} is missing or is not a bootstrap: {validated:?}"
        );
    }
}

fn recipe_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = fs::read_dir(workspace_root().join("envoy"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    dirs
}

/// What Sluice needs from every HTTP listener we ship (docs/deploy.md), as
/// text checks on the bootstrap: each HTTP connection manager normalizes
/// paths and refuses encoded slashes (no spelling of a path escapes its
/// capacity) and sets `stream_idle_timeout` above every queue timeout in
/// the file (the idle timer runs on queued requests); each listener raises
/// its accept backlog; no route retries with a per-try timeout or on
/// anything but a failed connection (a retry that reached a backend
/// repeats its work).
fn hardening_problems(yaml: &str) -> Vec<String> {
    // Comments may name a setting to say why it is absent.
    let yaml: String = yaml
        .lines()
        .filter(|line| !line.trim_start().starts_with('#'))
        .map(|line| format!("{line}\n"))
        .collect();
    let yaml = yaml.as_str();
    let mut problems = Vec::new();
    let managers = yaml
        .matches("name: envoy.filters.network.http_connection_manager")
        .count();
    if managers == 0 {
        problems.push("no HTTP connection manager".to_string());
    }
    for setting in [
        "normalize_path: true",
        "merge_slashes: true",
        "path_with_escaped_slashes_action: REJECT_REQUEST",
        "stream_idle_timeout: ",
    ] {
        let found = yaml.matches(setting).count();
        if found != managers {
            problems.push(format!(
                "`{setting}` {found} times for {managers} HTTP connection managers"
            ));
        }
    }
    let listeners = yaml.matches("filter_chains:").count();
    let backlogs = yaml.matches("tcp_backlog_size: 4096").count();
    if backlogs != listeners {
        problems.push(format!(
            "`tcp_backlog_size: 4096` {backlogs} times for {listeners} listeners"
        ));
    }
    if yaml.contains("per_try_timeout") {
        problems.push("a retry_policy sets per_try_timeout".to_string());
    }
    for retry_on in values_of(yaml, "retry_on:") {
        if retry_on.trim_matches('"') != "connect-failure" {
            problems.push(format!(
                "retry_on: {retry_on} (only connect-failure never reached a backend)"
            ));
        }
    }
    // The plugin configuration is JSON, sometimes inside a quoted string.
    let longest_queue_timeout = values_of(&yaml.replace('\\', ""), "\"queue_timeout\":")
        .iter()
        .map(|v| {
            let number: String = v
                .chars()
                .take_while(|c| c.is_ascii_digit() || *c == '.')
                .collect();
            number.parse::<f64>().unwrap_or(f64::MAX)
        })
        .fold(0.0, f64::max);
    for idle in values_of(yaml, "stream_idle_timeout:") {
        let seconds = idle.strip_suffix('s').and_then(|s| s.parse::<f64>().ok());
        if seconds.is_none_or(|s| s <= longest_queue_timeout) {
            problems.push(format!(
                "stream_idle_timeout: {idle} is not above the longest queue_timeout ({longest_queue_timeout} s)"
            ));
        }
    }
    problems
}

/// The word after each `key` in `text`.
fn values_of(text: &str, key: &str) -> Vec<String> {
    text.match_indices(key)
        .filter_map(|(at, _)| text[at + key.len()..].split_whitespace().next())
        .map(str::to_string)
        .collect()
}

#[test]
fn every_shipped_listener_keeps_paths_and_queues_safe() {
    let root = workspace_root();
    let mut files = Vec::new();
    files.extend(files_under(&root.join("envoy"), &["yaml", "yml"]));
    let mut checked = Vec::new();
    let mut problems = Vec::new();
    for path in &files {
        let relative = path.strip_prefix(&root).unwrap().display().to_string();
        let yaml = fs::read_to_string(path).unwrap();
        if !is_bootstrap(&yaml) {
            continue;
        }
        problems.extend(
            hardening_problems(&yaml)
                .into_iter()
                .map(|p| format!("{relative}: {p}")),
        );
        checked.push(relative);
    }
    let rendered = FrontProxy::new(8080, PLUGIN_CONFIG).render();
    problems.extend(
        hardening_problems(&rendered)
            .into_iter()
            .map(|p| format!("FrontProxy::render: {p}")),
    );
    eprintln!("checked: {checked:?}");
    assert!(checked.len() >= 8, "too few bootstraps found: {checked:?}");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_hardening_check_catches_what_it_is_for() {
    let good = fs::read_to_string(workspace_root().join("envoy/round-robin/envoy.yaml")).unwrap();
    assert_eq!(hardening_problems(&good), Vec::<String>::new());
    for (from, to, expected) in [
        (
            "merge_slashes: true",
            "merge_slashes: false",
            "`merge_slashes: true` 0 times",
        ),
        (
            "REJECT_REQUEST",
            "KEEP_UNCHANGED",
            "`path_with_escaped_slashes_action: REJECT_REQUEST` 0 times",
        ),
        (
            "stream_idle_timeout: 600s",
            "stream_idle_timeout: 20s",
            "is not above the longest queue_timeout (30 s)",
        ),
        (
            "tcp_backlog_size: 4096",
            "",
            "`tcp_backlog_size: 4096` 0 times for 1 listeners",
        ),
        (
            "timeout: 0s",
            "timeout: 0s\n                  retry_policy: { retry_on: 5xx, per_try_timeout: 1s }",
            "per_try_timeout",
        ),
    ] {
        let bad = good.replacen(from, to, 1);
        let problems = hardening_problems(&bad).join("\n");
        assert!(problems.contains(expected), "{from} -> {to}: {problems}");
    }
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
