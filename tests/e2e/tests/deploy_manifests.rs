//! The deployment files, checked offline and strictly (a misspelled field
//! fails): the Istio and Kubernetes manifests against their schemas, the
//! Envoy part of the Istio resources with `envoy --mode validate` and the
//! real wasm, the compose file with compose v1 and the compose-spec schema,
//! the Dockerfile's stages, and the OCI image `make wasm-image` builds.
//!
//! Schemas and tools come from `make deps` (scripts/deps.sh): in the repo's
//! Python environment (`target/py`), `kubernetes-validate`,
//! `cloudcoil-models-istio`, `check-jsonschema`; and Debian's `docker-compose` and `buildah`. The checks themselves are in
//! `scripts/validate_manifests.py`. Needs `make wasm`.

use serde_json::Value;
use sluice_harness::{
    files_under, venv_program, wasm_path, with_built_wasm, workspace_root, Envoy, ScratchDir,
    PRECISE_TIMER_ENV,
};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const SYNC_CLUSTER: &str = "outbound|50051||sluice-sync.sluice-system.svc.cluster.local";

fn run(program: &str, args: &[&str]) -> Output {
    // Python (and anything else of PyPI's) from the repo's environment.
    Command::new(venv_program(program))
        .args(args)
        .current_dir(workspace_root())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} (make deps installs it): {e}"))
}

/// `scripts/validate_manifests.py ARGS`: (success, stdout, stderr).
fn validator(args: &[&str]) -> (bool, String, String) {
    let mut full = vec!["scripts/validate_manifests.py"];
    full.extend_from_slice(args);
    let out = run("python3", &full);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The Istio deployment's two Kustomize bases, one per namespace.
const ISTIO_BASES: [&str; 2] = ["deploy/istio/system", "deploy/istio/app"];

fn istio_manifests() -> Vec<String> {
    let mut files: Vec<String> = ISTIO_BASES
        .iter()
        .flat_map(|dir| fs::read_dir(workspace_root().join(dir)).unwrap())
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        // Kustomize's own file is no manifest: rendered in its own test.
        .filter(|p| !p.ends_with("kustomization.yaml"))
        .map(|p| {
            p.strip_prefix(workspace_root())
                .unwrap()
                .display()
                .to_string()
        })
        .collect();
    files.sort();
    files
}

/// A YAML file as JSON (PyYAML; the tests need Python anyway).
fn yaml_as_json(path: &Path) -> Value {
    let out = run(
        "python3",
        &[
            "-c",
            "import json, sys, yaml; print(json.dumps(yaml.safe_load(open(sys.argv[1]))))",
            &path.to_string_lossy(),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A copy of `relative` in `dir` with `from` replaced by `to` (once).
fn broken_copy(dir: &Path, relative: &str, from: &str, to: &str) -> PathBuf {
    let text = fs::read_to_string(workspace_root().join(relative)).unwrap();
    assert!(text.contains(from), "{relative} has no {from:?}");
    let path = dir.join(Path::new(relative).file_name().unwrap());
    fs::write(&path, text.replacen(from, to, 1)).unwrap();
    path
}

#[test]
fn every_istio_and_kubernetes_manifest_matches_its_schema_strictly() {
    let files = istio_manifests();
    let args: Vec<&str> = ["k8s"]
        .into_iter()
        .chain(files.iter().map(String::as_str))
        .collect();
    let (ok, stdout, stderr) = validator(&args);
    assert!(ok, "{stderr}\n{stdout}");
    eprint!("{stdout}");
    // Every document was checked against a schema, none skipped: the kinds
    // the docs promise are all there.
    for kind in [
        "WasmPlugin demo/sluice (Istio",
        "EnvoyFilter demo/sluice (Istio",
        "EnvoyFilter demo/sluice-listener-settings (Istio",
        "Sidecar demo/default (Istio",
        "VirtualService demo/demo (Istio",
        "Deployment sluice-system/sluice-sync (Kubernetes",
        "Service sluice-system/sluice-sync (Kubernetes",
        "Deployment sluice-system/redis (Kubernetes",
        "ConfigMap demo/sluice-stats-bootstrap (Kubernetes",
        "Deployment demo/demo (Kubernetes",
    ] {
        assert!(stdout.contains(kind), "{kind} not validated:\n{stdout}");
    }
    let documents = files
        .iter()
        .map(|f| {
            let text = fs::read_to_string(workspace_root().join(f)).unwrap();
            text.lines().filter(|l| l.starts_with("kind:")).count()
        })
        .sum::<usize>();
    assert_eq!(
        stdout.lines().filter(|l| l.starts_with("ok ")).count(),
        documents
    );
}

#[test]
fn a_misspelled_field_fails_schema_validation() {
    let scratch = ScratchDir::new("bad-manifests");
    let dir = scratch.path();
    let cases = [
        (
            broken_copy(dir, "deploy/istio/app/wasmplugin.yaml", "  failStrategy:", "  failStrategyy:"),
            "$.spec: Additional properties are not allowed ('failStrategyy' was unexpected)",
        ),
        (
            broken_copy(dir, "deploy/istio/app/envoyfilter.yaml", "      context: SIDECAR_INBOUND", "      contex: SIDECAR_INBOUND"),
            // match is one of several shapes, so the message names the object.
            "$.spec.configPatches[0].match: {'contex': 'SIDECAR_INBOUND'} is not valid",
        ),
        (
            broken_copy(dir, "deploy/istio/app/sidecar.yaml", "  egress:", "  egres:"),
            "Additional properties are not allowed ('egres' was unexpected)",
        ),
        (
            broken_copy(dir, "deploy/istio/system/sluice-sync.yaml", "  replicas: 2", "  replica: 2"),
            "Deployment sluice-system/sluice-sync: $.spec: Additional properties are not allowed ('replica' was unexpected)",
        ),
        (
            broken_copy(dir, "deploy/kubernetes-discovery/rbac.yaml", "  resources:", "  resource:"),
            "Role demo/sluice-sync-endpointslices: $.rules[0]: Additional properties are not allowed ('resource' was unexpected)",
        ),
        (
            broken_copy(dir, "deploy/istio/app/demo-app.yaml", "        readinessProbe:", "        readynessProbe:"),
            "$.spec.template.spec.containers[0]: Additional properties are not allowed ('readynessProbe' was unexpected)",
        ),
    ];
    // A wrong enum value fails too.
    let phase_dir = dir.join("phase");
    fs::create_dir_all(&phase_dir).unwrap();
    let phase = broken_copy(
        &phase_dir,
        "deploy/istio/app/wasmplugin.yaml",
        "phase: UNSPECIFIED_PHASE",
        "phase: BEFORE_ROUTER",
    );
    // One run for all (loading the schemas takes a while).
    let paths: Vec<String> = cases
        .iter()
        .map(|(path, _)| path)
        .chain([&phase])
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let args: Vec<&str> = ["k8s"]
        .into_iter()
        .chain(paths.iter().map(String::as_str))
        .collect();
    let (ok, stdout, stderr) = validator(&args);
    assert!(!ok, "broken manifests passed:\n{stdout}");
    for (path, expected) in &cases {
        let file = path.to_string_lossy();
        let line = stderr
            .lines()
            .find(|l| l.starts_with(&*file))
            .unwrap_or_else(|| panic!("no error for {file}:\n{stderr}"));
        assert!(line.contains(expected), "{line}");
    }
    assert!(
        stderr.contains("$.spec.phase: 'BEFORE_ROUTER' is not one of"),
        "{stderr}"
    );
    // Nothing else was wrong in them.
    assert_eq!(stderr.lines().count(), cases.len() + 1, "{stderr}");
}

/// The Envoy part of each WasmPlugin and EnvoyFilter, as bootstraps.
fn istio_bootstraps(files: &[String]) -> Vec<(String, String)> {
    let args: Vec<&str> = ["envoy-bootstraps"]
        .into_iter()
        .chain(files.iter().map(String::as_str))
        .collect();
    let (ok, stdout, stderr) = validator(&args);
    assert!(ok, "{stderr}");
    let wasm = wasm_path().to_string_lossy().into_owned();
    let items: Vec<Value> = serde_json::from_str(&stdout).unwrap();
    items
        .iter()
        .map(|item| {
            let bootstrap = item["bootstrap"].to_string().replace("@WASM@", &wasm);
            (item["name"].as_str().unwrap().to_string(), bootstrap)
        })
        .collect()
}

#[test]
fn the_envoy_part_of_the_istio_resources_passes_envoy_validate_with_the_real_wasm() {
    let bootstraps = istio_bootstraps(&istio_manifests());
    let names: Vec<&str> = bootstraps.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "deploy/istio/app/envoyfilter.yaml#0 EnvoyFilter demo/sluice",
            "deploy/istio/app/listener-settings.yaml#0 EnvoyFilter demo/sluice-listener-settings",
            "deploy/istio/app/wasmplugin.yaml#0 WasmPlugin demo/sluice",
        ]
    );
    for (name, bootstrap) in &bootstraps {
        if let Err(e) = Envoy::validate_yaml(bootstrap) {
            panic!("{name}: {e}");
        }
    }
    // The filter really read the plugin configuration: a bad one is refused,
    // with the filter's own message naming the key.
    let scratch = ScratchDir::new("bad-plugin-config");
    let bad = broken_copy(
        scratch.path(),
        "deploy/istio/app/wasmplugin.yaml",
        "        capacity: 4",
        "        capacity: 0",
    );
    let (name, bootstrap) = istio_bootstraps(&[bad.to_string_lossy().into_owned()]).remove(0);
    let err = Envoy::validate_yaml(&bootstrap).expect_err(&name);
    assert!(err.contains("endpoints./predict.capacity"), "{err}");
    // And a misspelled Envoy field in an EnvoyFilter patch (which Istio's
    // schema leaves open) is caught by Envoy.
    let bad = broken_copy(
        scratch.path(),
        "deploy/istio/app/listener-settings.yaml",
        "merge_slashes: true",
        "merge_slash: true",
    );
    let (name, bootstrap) = istio_bootstraps(&[bad.to_string_lossy().into_owned()]).remove(0);
    let err = Envoy::validate_yaml(&bootstrap).expect_err(&name);
    assert!(err.contains("merge_slash"), "{err}");
}

#[test]
fn the_istio_resources_agree_on_the_plugin_configuration_and_the_sync_cluster() {
    let root = workspace_root();
    let plugin = yaml_as_json(&root.join("deploy/istio/app/wasmplugin.yaml"));
    let plugin_config = &plugin["spec"]["pluginConfig"];
    let filter = yaml_as_json(&root.join("deploy/istio/app/envoyfilter.yaml"));
    let configuration = filter["spec"]["configPatches"][0]["patch"]["value"]["typed_config"]
        ["config"]["configuration"]["value"]
        .as_str()
        .unwrap();
    let filter_config: Value = serde_json::from_str(configuration).unwrap();
    assert_eq!(
        &filter_config, plugin_config,
        "WasmPlugin and EnvoyFilter differ"
    );
    assert_eq!(plugin_config["sync"]["cluster"], SYNC_CLUSTER);

    // That cluster is what Istio makes of the sluice-sync Service: port
    // 50051, named grpc (so HTTP/2), in sluice-system.
    let sync = fs::read_to_string(root.join("deploy/istio/system/sluice-sync.yaml")).unwrap();
    let service = sync
        .split("\n---\n")
        .find(|doc| doc.contains("kind: Service\n"))
        .expect("a Service in sluice-sync.yaml");
    for needle in [
        "  name: sluice-sync\n",
        "  namespace: sluice-system\n",
        "  - name: grpc\n",
        "    port: 50051\n",
    ] {
        assert!(service.contains(needle), "{needle:?} not in:\n{service}");
    }
    // And the Sidecar's egress scope lets the proxies see it.
    let sidecar = fs::read_to_string(root.join("deploy/istio/app/sidecar.yaml")).unwrap();
    assert!(sidecar.contains("\"sluice-system/sluice-sync.sluice-system.svc.cluster.local\""));
}

#[test]
fn docker_compose_v1_accepts_the_compose_file_and_refuses_a_misspelled_key() {
    let out = run(
        "docker-compose",
        &["-f", "docker-compose.yml", "config", "-q"],
    );
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The broken copy's relative paths resolve from the repository, as the
    // original's do.
    let scratch = ScratchDir::new("bad-compose-v1");
    let broken = broken_copy(
        scratch.path(),
        "docker-compose.yml",
        "    image: sluice-envoy:dev",
        "    imagee: sluice-envoy:dev",
    );
    let root = workspace_root().to_string_lossy().into_owned();
    let out = run(
        "docker-compose",
        &[
            "--project-directory",
            &root,
            "-f",
            &broken.to_string_lossy(),
            "config",
            "-q",
        ],
    );
    assert!(!out.status.success(), "a misspelled key passed");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("'imagee'"), "{stderr}");
}

#[test]
fn the_compose_file_matches_the_compose_spec_and_mounts_files_that_exist() {
    let (ok, stdout, stderr) = validator(&["compose", "docker-compose.yml"]);
    assert!(ok, "{stderr}");
    let summary: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(
        summary["services"],
        serde_json::json!([
            "backend-1",
            "backend-2",
            "envoy",
            "prober",
            "redis",
            "sluice-sync"
        ])
    );
    let mounts = summary["bind_mounts"].as_array().unwrap();
    assert!(mounts.len() >= 3, "{mounts:?}");
    for mount in mounts {
        let source = mount["source"].as_str().unwrap();
        assert!(
            workspace_root().join(source).is_file(),
            "{} mounts {source}, which is not a file in the repository",
            mount["service"]
        );
    }

    // The schema is strict too.
    let scratch = ScratchDir::new("bad-compose");
    let bad = broken_copy(
        scratch.path(),
        "docker-compose.yml",
        "    profiles:",
        "    profile:",
    );
    let (ok, _, stderr) = validator(&["compose", &bad.to_string_lossy()]);
    assert!(!ok && stderr.contains("'profile'"), "{stderr}");
}

#[test]
fn the_compose_envoy_runs_the_real_wasm_with_the_services_sluice_yaml() {
    let root = workspace_root();
    let compose = yaml_as_json(&root.join("docker-compose.yml"));
    let envoy = &compose["services"]["envoy"];
    let mount = envoy["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .find(|v| v.contains(":/etc/envoy/envoy.yaml"))
        .expect("the envoy service mounts its config");
    let config_path = root.join(mount.split(':').next().unwrap());
    let config = fs::read_to_string(&config_path).unwrap();

    // The image puts the module where the config loads it from.
    let dockerfile = fs::read_to_string(root.join("deploy/docker/Dockerfile")).unwrap();
    assert!(config.contains("filename: /etc/envoy/sluice_filter.wasm"));
    assert!(dockerfile.contains("/etc/envoy/sluice_filter.wasm"));
    if let Err(e) = Envoy::validate_yaml(&with_built_wasm(&config)) {
        panic!("{}: {e}", config_path.display());
    }

    // The filter's configuration is the JSON form of the sluice.yaml that
    // sluice-sync and the prober read: same service, endpoints, settings.
    let sluice_mount = compose["services"]["sluice-sync"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .find(|v| v.contains(":/etc/sluice/sluice.yaml"))
        .expect("sluice-sync mounts sluice.yaml");
    let sluice = yaml_as_json(&root.join(sluice_mount.split(':').next().unwrap()));
    let bootstrap = yaml_as_json(&config_path);
    let wasm_filter = &bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"]
        [0]["typed_config"]["http_filters"][0];
    let plugin: Value = serde_json::from_str(
        wasm_filter["typed_config"]["config"]["configuration"]["value"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    for key in ["service", "queue_timeout", "max_queue"] {
        assert_eq!(plugin[key], sluice[key], "{key}");
    }
    let endpoints = |doc: &Value| -> Vec<String> {
        doc["endpoints"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect()
    };
    assert_eq!(endpoints(&plugin), endpoints(&sluice));
    for (path, endpoint) in plugin["endpoints"].as_object().unwrap() {
        for (key, value) in endpoint.as_object().unwrap() {
            assert_eq!(value, &sluice["endpoints"][path][key], "{path}.{key}");
        }
    }
    assert_eq!(plugin["sync"]["cluster"], "sluice_sync");
    assert!(config.contains("- name: sluice_sync\n"));
    assert!(config.contains("{ address: sluice-sync, port_value: 50051 }"));
}

/// Every shipped way of starting Envoy sets `EVENT_PRECISE_TIMER=1`, without
/// which Envoy's timers (queue timeouts) run up to a kernel tick late
/// (docs/filter.md, Timer precision): the image, the Istio pod's sidecar
/// environment, and every recipe's command.
#[test]
fn every_shipped_envoy_runs_with_precise_timers() {
    let root = workspace_root();
    let (name, value) = PRECISE_TIMER_ENV;
    let dockerfile = fs::read_to_string(root.join("deploy/docker/Dockerfile")).unwrap();
    let envoy_stage = dockerfile
        .split(" AS envoy\n")
        .nth(1)
        .and_then(|rest| rest.split("\nFROM ").next())
        .expect("an envoy stage");
    assert!(
        envoy_stage
            .lines()
            .any(|l| l == format!("ENV {name}={value}")),
        "the envoy image does not set {name}={value}:\n{envoy_stage}"
    );
    let demo = fs::read_to_string(root.join("deploy/istio/app/demo-app.yaml")).unwrap();
    let deployment = demo
        .split("\n---\n")
        .map(|doc| yaml_serde::from_str::<Value>(doc).unwrap())
        .find(|doc| doc["kind"] == "Deployment")
        .expect("a Deployment in demo-app.yaml");
    let proxy_config = deployment["spec"]["template"]["metadata"]["annotations"]
        ["proxy.istio.io/config"]
        .as_str()
        .expect("the proxy.istio.io/config annotation");
    let proxy_config: Value = yaml_serde::from_str(proxy_config).unwrap();
    assert_eq!(proxy_config["proxyMetadata"][name], value, "{proxy_config}");
    let mut recipes = 0;
    for readme in fs::read_dir(root.join("envoy")).unwrap() {
        let readme = readme.unwrap().path().join("README.md");
        let Ok(text) = fs::read_to_string(&readme) else {
            continue;
        };
        for line in text.lines().filter(|l| l.contains("envoy -c ")) {
            recipes += 1;
            assert!(
                line.starts_with(&format!("{name}={value} envoy -c ")),
                "{}: {line}",
                readme.display()
            );
        }
    }
    assert!(recipes >= 8, "{recipes} recipe commands found");
}

#[test]
fn the_dockerfile_builds_what_compose_uses_as_an_unprivileged_user() {
    let root = workspace_root();
    let dockerfile = fs::read_to_string(root.join("deploy/docker/Dockerfile")).unwrap();
    let stages: Vec<(&str, &str)> = dockerfile
        .lines()
        .filter_map(|l| l.strip_prefix("FROM "))
        .filter_map(|l| l.split_once(" AS "))
        .collect();
    let names: Vec<&str> = stages.iter().map(|(_, name)| *name).collect();
    assert_eq!(
        names,
        ["deps", "builder", "wasm", "envoy", "base", "backend", "runtime"]
    );
    assert!(stages.contains(&("envoyproxy/envoy:v1.40-latest", "envoy")));
    assert!(stages.contains(&("scratch", "wasm")));
    // The runtime stage ends as a numeric non-root user.
    let runtime = dockerfile.split("AS runtime").nth(1).unwrap();
    let user = runtime
        .lines()
        .filter_map(|l| l.strip_prefix("USER "))
        .next_back()
        .expect("runtime sets USER");
    let uid: u32 = user
        .split(':')
        .next()
        .unwrap()
        .parse()
        .expect("numeric uid");
    assert!(uid >= 1000, "USER {user}");
    // The runtime image holds sync and the prober; the test backend has its
    // own image.
    let copied = |stage: &str| -> String {
        let body = dockerfile
            .split(&format!(" AS {stage}\n"))
            .nth(1)
            .unwrap()
            .split("\nFROM ")
            .next()
            .unwrap();
        body.lines()
            .filter(|l| l.starts_with("COPY --from=builder"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(
        copied("runtime"),
        "COPY --from=builder /out/sluice-sync /out/sluice-prober /usr/local/bin/"
    );
    assert_eq!(
        copied("backend"),
        "COPY --from=builder /out/sluice-backend /usr/local/bin/"
    );
    // Every image says what it is (OCI annotations), and nothing installs
    // protoc: no build script needs it.
    for stage in ["wasm", "envoy", "backend", "runtime"] {
        let body = dockerfile.split(&format!(" AS {stage}\n")).nth(1).unwrap();
        let body = body.split("\nFROM ").next().unwrap();
        for label in [
            "org.opencontainers.image.title=",
            "org.opencontainers.image.version=",
            "org.opencontainers.image.licenses=\"Apache-2.0\"",
        ] {
            assert!(body.contains(label), "stage {stage} lacks {label}");
        }
    }
    assert!(!dockerfile.contains("protobuf-compiler"));
    // The crates are fetched in a layer of their own, from the manifests
    // alone, before the sources are copied.
    let deps = dockerfile.split(" AS deps\n").nth(1).unwrap();
    let deps = deps.split("\nFROM ").next().unwrap();
    assert!(deps.contains("COPY Cargo.toml Cargo.lock ./"), "{deps}");
    assert!(deps.contains("cargo fetch --locked"), "{deps}");
    assert!(!deps.contains("COPY . ."), "{deps}");
    let members = fs::read_to_string(root.join("Cargo.toml")).unwrap();
    let members = members
        .split("members = [")
        .nth(1)
        .unwrap()
        .split(']')
        .next()
        .unwrap();
    for member in members
        .split(',')
        .map(|m| m.trim().trim_matches('"'))
        .filter(|m| !m.is_empty())
    {
        assert!(
            deps.contains(&format!("COPY {member}/Cargo.toml {member}/")),
            "the deps stage does not copy {member}/Cargo.toml"
        );
    }
    // Every target compose builds exists.
    let compose = yaml_as_json(&root.join("docker-compose.yml"));
    for (service, definition) in compose["services"].as_object().unwrap() {
        if let Some(build) = definition.get("build") {
            assert_eq!(build["dockerfile"], "deploy/docker/Dockerfile", "{service}");
            let target = build["target"].as_str().unwrap();
            assert!(names.contains(&target), "{service}: no stage {target}");
        }
    }
    // The build context leaves out what is big or local.
    let ignore = fs::read_to_string(root.join(".dockerignore")).unwrap();
    assert!(ignore.lines().any(|l| l == "target/"), "{ignore}");
}

/// The image must carry the wasm that was tested and benchmarked: the one
/// `make wasm` builds, with the same profile settings.
#[test]
fn the_dockerfile_builds_the_wasm_as_make_wasm_does() {
    let root = workspace_root();
    let makefile = fs::read_to_string(root.join("Makefile")).unwrap();
    let profile = makefile
        .lines()
        .find_map(|l| l.strip_prefix("WASM_PROFILE := "))
        .expect("the Makefile defines WASM_PROFILE")
        .trim();
    assert!(
        profile.contains("CARGO_PROFILE_RELEASE_LTO=fat"),
        "{profile}"
    );
    let make_wasm = makefile
        .split("\nwasm:\n")
        .nth(1)
        .expect("a wasm target")
        .lines()
        .next()
        .unwrap()
        .trim();
    assert!(
        make_wasm.starts_with(
            "$(WASM_PROFILE) cargo build --release --target wasm32-wasip1 -p sluice-filter"
        ),
        "{make_wasm}"
    );
    let dockerfile = fs::read_to_string(root.join("deploy/docker/Dockerfile")).unwrap();
    let wasm_builds: Vec<&str> = dockerfile
        .lines()
        .filter(|l| l.contains("--target wasm32-wasip1 -p sluice-filter"))
        .map(|l| l.trim().trim_start_matches("&& ").trim_end_matches(" \\"))
        .collect();
    assert_eq!(
        wasm_builds,
        [format!(
            "{profile} cargo build --release --locked --offline --target wasm32-wasip1 -p sluice-filter"
        )],
        "the Dockerfile's wasm build differs from `make wasm` ({profile})"
    );
    // The panic=abort of .cargo/config.toml reaches the build context.
    let ignore = fs::read_to_string(root.join(".dockerignore")).unwrap();
    assert!(!ignore.lines().any(|l| l.starts_with(".cargo")), "{ignore}");
    assert!(fs::read_to_string(root.join(".cargo/config.toml"))
        .unwrap()
        .contains("panic=abort"));
}

/// What is wrong with the RBAC of Kubernetes discovery in a rendered
/// deployment: the RoleBinding must name the ServiceAccount the sync
/// Deployment runs as (and that exists) and the Role beside it; the Role
/// must grant exactly what sync's discovery asks (`API_VERBS` on
/// `endpointslices` of `discovery.k8s.io`), nothing more; and the
/// Deployment's `--discover-k8s` must watch a Service in the Role's
/// namespace.
fn discovery_rbac_problems(docs: &[Value]) -> Vec<String> {
    use sluice_sync::kube_discovery::{KubeTarget, API_GROUP, API_RESOURCE, API_VERBS};
    let mut problems = Vec::new();
    let find = |kind: &'static str| docs.iter().filter(move |d| d["kind"] == kind);
    let Some(deployment) = find("Deployment").find(|d| d["metadata"]["name"] == "sluice-sync")
    else {
        return vec!["no sluice-sync Deployment".into()];
    };
    let pod = &deployment["spec"]["template"]["spec"];
    let account = pod["serviceAccountName"].as_str().unwrap_or_default();
    let sync_namespace = deployment["metadata"]["namespace"]
        .as_str()
        .unwrap_or_default();
    if !find("ServiceAccount")
        .any(|a| a["metadata"]["name"] == account && a["metadata"]["namespace"] == sync_namespace)
    {
        problems.push(format!(
            "the Deployment runs as ServiceAccount {sync_namespace}/{account:?}, which is not in the manifests"
        ));
    }
    let bindings: Vec<&Value> = find("RoleBinding").collect();
    if bindings.len() != 1 {
        problems.push(format!("{} RoleBindings, not one", bindings.len()));
        return problems;
    }
    let binding = bindings[0];
    let namespace = binding["metadata"]["namespace"]
        .as_str()
        .unwrap_or_default();
    let subjects = binding["subjects"].as_array().cloned().unwrap_or_default();
    let wanted =
        serde_json::json!({"kind": "ServiceAccount", "name": account, "namespace": sync_namespace});
    if subjects != [wanted.clone()] {
        problems.push(format!(
            "the RoleBinding's subjects are {subjects:?}, not [{wanted}]"
        ));
    }
    let role_ref = &binding["roleRef"];
    if role_ref["kind"] != "Role" || role_ref["apiGroup"] != "rbac.authorization.k8s.io" {
        problems.push(format!("the RoleBinding refers to {role_ref}, not a Role"));
    }
    let Some(role) = find("Role").find(|r| {
        r["metadata"]["name"] == role_ref["name"] && r["metadata"]["namespace"] == namespace
    }) else {
        problems.push(format!(
            "the RoleBinding names Role {namespace}/{}, which is not in the manifests",
            role_ref["name"]
        ));
        return problems;
    };
    let mut verbs: Vec<&str> = API_VERBS.to_vec();
    verbs.sort();
    let wanted_rules = serde_json::json!([
        {"apiGroups": [API_GROUP], "resources": [API_RESOURCE], "verbs": verbs}
    ]);
    let mut rules = role["rules"].clone();
    for rule in rules.as_array_mut().into_iter().flatten() {
        if let Some(v) = rule["verbs"].as_array_mut() {
            v.sort_by(|a, b| a.as_str().cmp(&b.as_str()));
        }
    }
    if rules != wanted_rules {
        problems.push(format!(
            "the Role grants {rules}, not exactly {wanted_rules}"
        ));
    }
    let args: Vec<&str> = pod["containers"][0]["args"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    let flag = args.iter().position(|a| *a == "--discover-k8s");
    match flag.and_then(|i| args.get(i + 1)) {
        None => problems.push(format!(
            "the sync Deployment has no --discover-k8s: {args:?}"
        )),
        Some(value) => {
            let source = value.split_once('=').map_or(*value, |(_, s)| s);
            match KubeTarget::parse(source, "x", "--discover-k8s") {
                Ok(t) if t.source.namespace == namespace => {}
                Ok(t) => problems.push(format!(
                    "--discover-k8s watches namespace {}, the Role is in {namespace}",
                    t.source.namespace
                )),
                Err(e) => problems.push(e),
            }
        }
    }
    problems
}

/// A change made to rendered manifests.
type Change<'a> = dyn Fn(&mut Vec<Value>) + 'a;

#[test]
fn a_discovery_rbac_that_grants_too_much_or_binds_the_wrong_account_is_caught() {
    let root = workspace_root();
    let yaml = kustomize(&root.join("deploy/kubernetes-discovery")).unwrap();
    let docs = yaml_stream(&yaml);
    assert_eq!(discovery_rbac_problems(&docs), Vec::<String>::new());
    let changed = |f: &dyn Fn(&mut Vec<Value>)| {
        let mut d = docs.clone();
        f(&mut d);
        discovery_rbac_problems(&d)
    };
    let of = |d: &mut Vec<Value>, kind: &str| -> usize {
        d.iter().position(|x| x["kind"] == kind).unwrap()
    };
    let cases: Vec<(Box<Change<'_>>, &str)> = vec![
        (
            Box::new(|d| {
                let i = of(d, "Role");
                d[i]["rules"][0]["verbs"] = serde_json::json!(["get", "list", "watch"]);
            }),
            "the Role grants",
        ),
        (
            Box::new(|d| {
                let i = of(d, "Role");
                d[i]["rules"][0]["resources"] = serde_json::json!(["endpointslices", "pods"]);
            }),
            "the Role grants",
        ),
        (
            Box::new(|d| {
                let i = of(d, "RoleBinding");
                d[i]["subjects"][0]["namespace"] = "default".into();
            }),
            "the RoleBinding's subjects are",
        ),
        (
            Box::new(|d| {
                let i = of(d, "RoleBinding");
                d[i]["roleRef"]["name"] = "other".into();
            }),
            "which is not in the manifests",
        ),
        (
            Box::new(|d| {
                let i = d
                    .iter()
                    .position(|x| {
                        x["kind"] == "Deployment" && x["metadata"]["name"] == "sluice-sync"
                    })
                    .unwrap();
                d[i]["spec"]["template"]["spec"]["serviceAccountName"] = "default".into();
            }),
            "which is not in the manifests",
        ),
        (
            Box::new(|d| {
                let i = of(d, "Role");
                d[i]["metadata"]["namespace"] = "other".into();
            }),
            "the RoleBinding names Role demo/",
        ),
    ];
    for (change, want) in cases {
        let problems = changed(&*change);
        assert!(
            problems.iter().any(|p| p.contains(want)),
            "{want}: {problems:?}"
        );
    }
    // The flag pointed at another namespace than the Role's.
    let moved = yaml.replace("gateway=demo/demo:http", "gateway=shop/demo:http");
    assert_eq!(
        discovery_rbac_problems(&yaml_stream(&moved)),
        ["--discover-k8s watches namespace shop, the Role is in demo"]
    );
}

/// `kubectl kustomize DIR` (kustomize inside kubectl), the rendered YAML.
fn kustomize(dir: &Path) -> Result<String, String> {
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run kubectl (make deps installs it): {e}"));
    if out.status.success() {
        Ok(String::from_utf8(out.stdout).unwrap())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// The documents of a rendered YAML stream, parsed.
fn yaml_stream(yaml: &str) -> Vec<Value> {
    let mut docs = vec![String::new()];
    for line in yaml.lines() {
        if line == "---" {
            docs.push(String::new());
        } else {
            let doc = docs.last_mut().unwrap();
            doc.push_str(line);
            doc.push('\n');
        }
    }
    docs.iter()
        .filter(|d| !d.trim().is_empty())
        .map(|d| yaml_serde::from_str::<Value>(d).unwrap_or_else(|e| panic!("{e}:\n{d}")))
        .collect()
}

/// "Kind namespace/name" of each document (a Namespace as "Namespace NAME").
fn resource_names(docs: &[Value]) -> Vec<String> {
    let mut names: Vec<String> = docs
        .iter()
        .map(|d| {
            let kind = d["kind"].as_str().unwrap();
            let name = d["metadata"]["name"].as_str().unwrap();
            match d["metadata"]["namespace"].as_str() {
                Some(ns) => format!("{kind} {ns}/{name}"),
                None => format!("{kind} {name}"),
            }
        })
        .collect();
    names.sort();
    names
}

#[test]
fn the_kustomizations_render_to_manifests_that_pass_the_strict_schemas() {
    let root = workspace_root();
    let scratch = ScratchDir::new("kustomize");
    let dirs = [
        "deploy/autoscaling",
        "deploy/istio/app",
        "deploy/istio/system",
        "deploy/kubernetes-discovery",
        "deploy/kustomize/example/app",
        "deploy/kustomize/example/system",
    ];
    // Every kustomization in the repository is rendered here.
    let found: Vec<String> = files_under(&root.join("deploy"), &["yaml"])
        .into_iter()
        .filter(|p| p.ends_with("kustomization.yaml"))
        .map(|p| {
            p.parent()
                .unwrap()
                .strip_prefix(&root)
                .unwrap()
                .display()
                .to_string()
        })
        .collect();
    assert_eq!(found, dirs);
    let mut rendered = std::collections::BTreeMap::new();
    let mut paths = Vec::new();
    for dir in dirs {
        let yaml = kustomize(&root.join(dir)).unwrap_or_else(|e| panic!("{dir}: {e}"));
        let path = scratch
            .path()
            .join(format!("{}.yaml", dir.replace('/', "-")));
        fs::write(&path, &yaml).unwrap();
        paths.push(path.to_string_lossy().into_owned());
        rendered.insert(dir, (yaml_stream(&yaml), yaml));
    }
    let args: Vec<&str> = ["k8s"]
        .into_iter()
        .chain(paths.iter().map(String::as_str))
        .collect();
    let (ok, stdout, stderr) = validator(&args);
    assert!(ok, "{stderr}\n{stdout}");
    assert_eq!(
        stdout.lines().filter(|l| l.starts_with("ok ")).count(),
        rendered.values().map(|(docs, _)| docs.len()).sum::<usize>(),
        "{stdout}"
    );

    // The two Istio bases hold what the docs apply by hand, nothing more,
    // each in its own namespace.
    let names = |dir: &str| resource_names(&rendered[dir].0);
    assert_eq!(
        names("deploy/istio/system"),
        [
            "ConfigMap sluice-system/sluice-sync",
            "Deployment sluice-system/redis",
            "Deployment sluice-system/sluice-sync",
            "Namespace sluice-system",
            "PodDisruptionBudget sluice-system/sluice-sync",
            "Service sluice-system/redis",
            "Service sluice-system/sluice-sync",
            "ServiceAccount sluice-system/sluice-sync",
        ]
    );
    // Kubernetes discovery: the system base plus the Role and its binding,
    // in the watched Service's namespace.
    let mut with_rbac = names("deploy/istio/system");
    with_rbac.extend([
        "Role demo/sluice-sync-endpointslices".to_string(),
        "RoleBinding demo/sluice-sync-endpointslices".to_string(),
    ]);
    with_rbac.sort();
    assert_eq!(names("deploy/kubernetes-discovery"), with_rbac);
    assert_eq!(
        discovery_rbac_problems(&rendered["deploy/kubernetes-discovery"].0),
        Vec::<String>::new()
    );
    let app = [
        "ConfigMap demo/sluice-stats-bootstrap",
        "Deployment demo/demo",
        "EnvoyFilter demo/sluice-listener-settings",
        "Namespace demo",
        "Service demo/demo",
        "VirtualService demo/demo",
        "WasmPlugin demo/sluice",
    ];
    assert_eq!(names("deploy/istio/app"), app);
    // The autoscaling base puts the ScaledObject in the namespace it names.
    assert_eq!(
        names("deploy/autoscaling"),
        ["ScaledObject demo/demo-predict"]
    );

    // The app overlay moves both bases to the namespace it sets, the
    // Namespace object and the KEDA query included; the system overlay
    // leaves sync and Redis in sluice-system, where the sidecars' sync
    // cluster names them.
    let mut expected: Vec<String> = app
        .iter()
        .chain(&["ScaledObject demo/demo-predict"])
        .map(|n| {
            n.replace(" demo/", " shop/")
                .replace("Namespace demo", "Namespace shop")
        })
        .collect();
    expected.sort();
    assert_eq!(names("deploy/kustomize/example/app"), expected);
    assert_eq!(
        names("deploy/kustomize/example/system"),
        names("deploy/istio/system")
    );
    let (app_docs, app_yaml) = &rendered["deploy/kustomize/example/app"];
    let scaled = app_docs
        .iter()
        .find(|d| d["kind"] == "ScaledObject")
        .unwrap();
    let query = scaled["spec"]["triggers"][0]["metadata"]["query"]
        .as_str()
        .unwrap();
    assert!(query.contains("namespace=\"shop\""), "{query}");
    let namespace = app_docs.iter().find(|d| d["kind"] == "Namespace").unwrap();
    assert_eq!(
        namespace["metadata"]["labels"]["istio-injection"],
        "enabled"
    );
    // Nothing in the app names its old namespace in a string.
    assert!(!app_yaml.contains("demo.demo"), "{app_yaml}");
    assert!(!app_yaml.contains("namespace=\"demo\""), "{app_yaml}");
    let plugin = app_docs.iter().find(|d| d["kind"] == "WasmPlugin").unwrap();
    assert_eq!(
        plugin["spec"]["pluginConfig"]["sync"]["cluster"],
        SYNC_CLUSTER
    );
    assert_eq!(
        plugin["spec"]["url"],
        "oci://ghcr.io/acme/sluice-filter:0.1.0"
    );

    // The overlays set every image, the filter's included: no placeholder
    // registry is left to edit by hand.
    let images = |yaml: &str| -> Vec<String> {
        yaml.lines()
            .filter_map(|l| l.trim().strip_prefix("image: "))
            .map(str::to_string)
            .collect()
    };
    let (_, system_yaml) = &rendered["deploy/kustomize/example/system"];
    for yaml in [app_yaml, system_yaml] {
        assert!(!yaml.contains("registry.example.com"), "{yaml}");
    }
    assert_eq!(
        images(system_yaml),
        ["redis:7-bookworm", "ghcr.io/acme/sluice:0.1.0"]
    );
    assert_eq!(images(app_yaml), ["ghcr.io/acme/sluice-backend:0.1.0"]);

    // A misspelled field in a kustomization is refused by kustomize itself.
    let bad = scratch.path().join("bad");
    fs::create_dir_all(&bad).unwrap();
    fs::write(
        bad.join("kustomization.yaml"),
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresource:\n- x.yaml\n",
    )
    .unwrap();
    let err = kustomize(&bad).expect_err("a misspelled key");
    assert!(err.contains("resource"), "{err}");
}

#[test]
fn the_wasm_image_holds_exactly_the_built_wasm_in_a_layout_istio_accepts() {
    let scratch = ScratchDir::new("wasm-image");
    let layout = scratch.path().join("image");
    let wasm = wasm_path();
    let out = run(
        "scripts/wasm-image.sh",
        &[&wasm.to_string_lossy(), &layout.to_string_lossy(), "test"],
    );
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let (ok, stdout, stderr) = validator(&["oci-image", &layout.to_string_lossy()]);
    assert!(ok, "{stderr}");
    let image: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(image["oci_layout"]["imageLayoutVersion"], "1.0.0");
    let images = image["images"].as_array().unwrap();
    assert_eq!(images.len(), 1, "{image}");
    let manifest = &images[0];
    assert_eq!(manifest["ref_name"], "test");
    assert_eq!(
        manifest["manifest_media_type"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    // Istio's "compat" variant: exactly one tar+gzip layer holding plugin.wasm.
    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1, "{manifest}");
    assert_eq!(
        layers[0]["media_type"],
        "application/vnd.oci.image.layer.v1.tar+gzip"
    );
    let files = layers[0]["files"].as_array().unwrap();
    assert_eq!(files.len(), 1, "exactly one file in the layer: {files:?}");
    assert_eq!(files[0]["name"], "plugin.wasm");
    assert_eq!(files[0]["type"], "file");
    let built = fs::read(&wasm).unwrap();
    assert_eq!(files[0]["size"], built.len());
    let sha256 = run("sha256sum", &[&wasm.to_string_lossy()]);
    let expected = String::from_utf8_lossy(&sha256.stdout);
    assert_eq!(
        files[0]["sha256"].as_str().unwrap(),
        expected.split_whitespace().next().unwrap()
    );
    // The script says the same digest it wrote (for the WasmPlugin's sha256).
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains(manifest["digest"].as_str().unwrap()),
        "{said}"
    );
}
