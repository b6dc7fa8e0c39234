//! The docker-compose stack run as local processes, from the very files
//! compose mounts. No image can be pulled here, so this test reads
//! `docker-compose.yml` and runs each service's own command, environment
//! and mounted files with only addresses changed: compose's host names and
//! `0.0.0.0` listeners become loopback ports, and the filter's path inside
//! the image becomes the module `make wasm` built. What compose mounts is
//! what is tested; a compose address left over, or a substitution that
//! matched nothing, fails the test rather than testing something else.
//!
//! On top, the pipeline check of the sync issue: Envoy starts with the
//! capacity the compose files give (none), the prober measures one instance
//! as `docker compose run prober` does and pushes to Redis, sluice-sync
//! streams the figure to the running Envoy, and a burst through the main
//! listener never has more than that in flight at either instance (Sluice
//! picks the instance, as `envoy/instances/` does; the instances' fixed
//! addresses on compose's network become their loopback ports). `deploy_manifests.rs` checks the
//! same files offline (compose schema, `envoy --mode validate`).
//! Needs `make build`.

use serde_json::{Map, Value};
use sluice_harness::{
    bin_path, free_port, most_at_once, wait_until, wasm_path, workspace_root, Backend, Envoy,
    EnvoyOptions, Redis, ScratchDir, SyncService, PRECISE_TIMER_ENV,
};
use sluice_loadgen::{run_blocking, summarize, Burst};
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// redis-server's default port: compose's redis command sets none.
const REDIS_PORT: u16 = 6379;

/// Added to the prober's command, its only change besides addresses: the
/// default 1 s warm-up, 5 s and 300 samples per level would take minutes.
/// The figure is the same (sync_pipeline.rs measures with these too).
const QUICK_PROBE: &str = " --warmup 0.2 --duration 0.8 --min-samples 0";

/// `docker-compose.yml`, parsed.
struct Compose {
    services: Map<String, Value>,
}

impl Compose {
    fn load() -> Compose {
        let path = workspace_root().join("docker-compose.yml");
        let text = fs::read_to_string(&path).unwrap();
        let doc: Value =
            yaml_serde::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let services = doc["services"]
            .as_object()
            .expect("docker-compose.yml has services")
            .clone();
        Compose { services }
    }

    fn service(&self, name: &str) -> &Value {
        self.services
            .get(name)
            .unwrap_or_else(|| panic!("docker-compose.yml has no service {name}"))
    }

    /// `entrypoint` then `command`, in compose's list form.
    fn argv(&self, name: &str) -> Vec<String> {
        let service = self.service(name);
        let list = |key: &str| -> Vec<String> {
            match &service[key] {
                Value::Null => Vec::new(),
                Value::Array(items) => items
                    .iter()
                    .map(|v| {
                        v.as_str()
                            .unwrap_or_else(|| panic!("{name}.{key}: {v} is not a string"))
                            .to_string()
                    })
                    .collect(),
                other => panic!("{name}.{key} is not in list form: {other}"),
            }
        };
        let argv: Vec<String> = list("entrypoint")
            .into_iter()
            .chain(list("command"))
            .collect();
        assert!(!argv.is_empty(), "{name} has no command");
        argv
    }

    /// The one service whose command runs `program` (a word of it: the
    /// prober's runs in `sh -c`).
    fn running(&self, program: &str) -> String {
        let names = self.all_running(program);
        assert_eq!(names.len(), 1, "services running {program}: {names:?}");
        names.into_iter().next().unwrap()
    }

    fn all_running(&self, program: &str) -> Vec<String> {
        self.services
            .keys()
            .filter(|name| {
                self.argv(name)
                    .iter()
                    .any(|arg| arg.split_whitespace().any(|word| word == program))
            })
            .cloned()
            .collect()
    }

    /// `environment`, in compose's map form.
    fn environment(&self, name: &str) -> Vec<(String, String)> {
        match &self.service(name)["environment"] {
            Value::Null => Vec::new(),
            Value::Object(vars) => vars
                .iter()
                .map(|(k, v)| {
                    let value = match v {
                        Value::String(s) => s.clone(),
                        other => other.to_string(),
                    };
                    (k.clone(), value)
                })
                .collect(),
            other => panic!("{name}.environment is not in map form: {other}"),
        }
    }

    /// Bind mounts: path in the container -> file in the repository.
    fn mounts(&self, name: &str) -> BTreeMap<String, PathBuf> {
        let Some(volumes) = self.service(name)["volumes"].as_array() else {
            return BTreeMap::new();
        };
        volumes
            .iter()
            .map(|v| {
                let v = v.as_str().expect("volumes in short form");
                let mut parts = v.split(':');
                let (source, target) = (parts.next().unwrap(), parts.next().unwrap());
                let source = source.strip_prefix("./").expect("a path in the repository");
                (target.to_string(), workspace_root().join(source))
            })
            .collect()
    }
}

/// The compose network on this machine: every `host:port` a service
/// listens on, as a loopback address, and which of them the files used.
struct Network {
    /// Every service name: a host name nothing may be left pointing at.
    hosts: Vec<String>,
    addrs: BTreeMap<String, SocketAddr>,
    used: BTreeSet<String>,
}

impl Network {
    fn new(hosts: Vec<String>) -> Network {
        Network {
            hosts,
            addrs: BTreeMap::new(),
            used: BTreeSet::new(),
        }
    }

    fn add(&mut self, host: &str, port: u16, local: SocketAddr) {
        assert!(self.hosts.iter().any(|h| h == host), "no service {host}");
        let previous = self.addrs.insert(format!("{host}:{port}"), local);
        assert!(previous.is_none(), "{host}:{port} twice");
    }

    /// The fixed address `ip` compose gives a service on its network (an
    /// instance Sluice lists by address) is that service's `local` too, and
    /// is checked like a host name: none may be left over.
    fn alias(&mut self, ip: &str, port: u16, local: SocketAddr) {
        self.hosts.push(ip.to_string());
        self.add(ip, port, local);
    }

    /// Where `host:port` is here; panics if no service of the stack
    /// listens there.
    fn local(&mut self, host: &str, port: u16) -> SocketAddr {
        let key = format!("{host}:{port}");
        let local = *self.addrs.get(&key).unwrap_or_else(|| {
            panic!(
                "{key}: no service listens there (the stack has {:?})",
                self.addrs.keys()
            )
        });
        self.used.insert(key);
        local
    }

    /// Every `host:port` of the network in `text` replaced by its loopback
    /// address (whole host names and ports only: not `xbackend-1:8080`,
    /// not `backend-1:80801`). Does not check what is left: see
    /// [`Network::assert_none_left`].
    fn replace(&mut self, text: &str) -> String {
        let mut out = text.to_string();
        for (key, local) in &self.addrs {
            let mut replaced = String::with_capacity(out.len());
            let mut copied = 0;
            for (at, _) in out.match_indices(key.as_str()) {
                let before = out[..at].chars().next_back();
                let after = out[at + key.len()..].chars().next();
                if before.is_some_and(is_host_char) || after.is_some_and(|c| c.is_ascii_digit()) {
                    continue;
                }
                replaced.push_str(&out[copied..at]);
                replaced.push_str(&local.to_string());
                copied = at + key.len();
            }
            if copied > 0 {
                self.used.insert(key.clone());
            }
            replaced.push_str(&out[copied..]);
            out = replaced;
        }
        out
    }

    /// Panics if `text` still names a compose host as a host (`host:PORT`
    /// or `//host`) or listens on `0.0.0.0`.
    fn assert_none_left(&self, text: &str, what: &str) {
        assert!(
            !text.contains("0.0.0.0"),
            "{what}: a 0.0.0.0 address left unsubstituted in {text:?}"
        );
        for host in &self.hosts {
            for (at, _) in text.match_indices(host.as_str()) {
                let before = text[..at].chars().last();
                let after = &text[at + host.len()..];
                if before.is_some_and(is_host_char) || after.starts_with(is_host_char) {
                    continue; // part of a longer word, e.g. sluice-sync in sluice-syncd
                }
                let as_host = text[..at].ends_with("//")
                    || after
                        .strip_prefix(':')
                        .is_some_and(|p| p.starts_with(|c: char| c.is_ascii_digit()));
                assert!(
                    !as_host,
                    "{what}: compose host {host} left unsubstituted in {text:?} \
                     (the test knows {:?})",
                    self.addrs.keys()
                );
            }
        }
    }
}

fn is_host_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')
}

/// Every string in a parsed document: keys and values.
fn strings(doc: &Value, out: &mut Vec<String>) {
    match doc {
        Value::String(s) => out.push(s.clone()),
        Value::Array(items) => items.iter().for_each(|v| strings(v, out)),
        Value::Object(map) => {
            for (k, v) in map {
                out.push(k.clone());
                strings(v, out);
            }
        }
        _ => {}
    }
}

/// A YAML file compose mounts, with its addresses replaced, written to
/// `dir`. Checked on the parsed document, so a comment can name a host.
fn substituted_yaml(source: &Path, network: &mut Network, dir: &Path) -> PathBuf {
    let text = fs::read_to_string(source).unwrap();
    let local = network.replace(&text);
    let doc: Value = yaml_serde::from_str(&local)
        .unwrap_or_else(|e| panic!("{} with local addresses: {e}", source.display()));
    let mut all = Vec::new();
    strings(&doc, &mut all);
    for s in &all {
        network.assert_none_left(s, &source.display().to_string());
    }
    let path = dir.join(source.file_name().unwrap());
    assert!(!path.exists(), "{} mounted twice", path.display());
    fs::write(&path, local).unwrap();
    path
}

/// A service's command with its own `0.0.0.0:PORT` listener turned into
/// `127.0.0.1:0` (the binaries print the port they took), container paths
/// replaced in the order given (`paths`: container path, local path; each
/// must occur) and other addresses replaced. Returns the command and the
/// port it listens on inside compose's network.
fn local_command(
    compose: &Compose,
    service: &str,
    network: &mut Network,
    paths: &[(String, String)],
) -> (Vec<String>, Option<u16>) {
    let mut own_port = None;
    let mut argv = compose.argv(service);
    for (container, _) in paths {
        assert!(
            argv.iter().any(|arg| arg.contains(container.as_str())),
            "{service}'s command never names {container}: {argv:?}"
        );
    }
    for arg in &mut argv {
        if let Some(port) = arg.strip_prefix("0.0.0.0:") {
            assert!(own_port.is_none(), "{service} listens twice: {arg}");
            own_port = Some(port.parse::<u16>().expect("a port"));
            *arg = "127.0.0.1:0".to_string();
        }
        for (container, local) in paths {
            *arg = arg.replace(container.as_str(), local);
        }
        *arg = network.replace(arg);
        network.assert_none_left(arg, &format!("{service}'s command"));
    }
    (argv, own_port)
}

/// Mounted files of `service`, each a local copy with addresses replaced:
/// (path in the container, local path).
fn local_files(
    compose: &Compose,
    service: &str,
    network: &mut Network,
    scratch: &Path,
) -> Vec<(String, String)> {
    let dir = scratch.join(service);
    fs::create_dir_all(&dir).unwrap();
    compose
        .mounts(service)
        .into_iter()
        .map(|(target, source)| {
            let local = substituted_yaml(&source, network, &dir);
            (target, local.to_string_lossy().into_owned())
        })
        .collect()
}

/// envoy.yaml as compose mounts it, rewritten as a parsed document: every
/// `0.0.0.0` listener on a free loopback port (entered in the network as
/// `envoy_host:PORT`), every other `socket_address` at the local address of
/// the service it names, and the module `make wasm` built. Any other
/// address, or a compose host left in any string, fails.
fn local_envoy(source: &Path, envoy_host: &str, network: &mut Network) -> Value {
    let text = fs::read_to_string(source).unwrap();
    let mut doc: Value =
        yaml_serde::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", source.display()));
    let mut modules = 0;
    rewrite_envoy(&mut doc, envoy_host, network, &mut modules);
    assert!(
        modules > 0,
        "{} loads no sluice_filter.wasm",
        source.display()
    );
    doc
}

fn rewrite_envoy(doc: &mut Value, envoy_host: &str, network: &mut Network, modules: &mut usize) {
    match doc {
        Value::Object(map) => {
            for (key, value) in map.iter_mut() {
                network.assert_none_left(key, "envoy.yaml");
                match (key.as_str(), value) {
                    ("socket_address", Value::Object(addr)) => {
                        let host = addr["address"].as_str().expect("address").to_string();
                        let port = addr["port_value"].as_u64().expect("port_value") as u16;
                        let local = if host == "0.0.0.0" {
                            let local = SocketAddr::from(([127, 0, 0, 1], free_port()));
                            network.add(envoy_host, port, local);
                            local
                        } else {
                            network.local(&host, port)
                        };
                        addr.insert("address".into(), local.ip().to_string().into());
                        addr.insert("port_value".into(), local.port().into());
                    }
                    ("filename", Value::String(path))
                        if path.rsplit('/').next() == Some("sluice_filter.wasm") =>
                    {
                        *path = wasm_path().to_string_lossy().into_owned();
                        *modules += 1;
                    }
                    (_, value) => rewrite_envoy(value, envoy_host, network, modules),
                }
            }
        }
        Value::Array(items) => {
            for item in items {
                rewrite_envoy(item, envoy_host, network, modules);
            }
        }
        // The plugin's JSON names the instances by address.
        Value::String(s) => {
            *s = network.replace(s);
            network.assert_none_left(s, "envoy.yaml");
        }
        _ => {}
    }
}

/// The port of an `address` of the rewritten bootstrap.
fn port_of(address: &Value) -> u16 {
    address["socket_address"]["port_value"].as_u64().unwrap() as u16
}

/// `capacity=K` of `path`'s `--route` in a sluice-backend command.
fn route_capacity(argv: &[String], path: &str) -> u32 {
    let spec = argv
        .windows(2)
        .find(|w| w[0] == "--route" && w[1].starts_with(&format!("{path}:")))
        .map(|w| w[1].clone())
        .unwrap_or_else(|| panic!("no --route {path}:... in {argv:?}"));
    spec.split_once(':')
        .unwrap()
        .1
        .split(',')
        .find_map(|kv| kv.strip_prefix("capacity="))
        .unwrap_or_else(|| panic!("{spec} has no capacity"))
        .parse()
        .unwrap()
}

/// The filter's stats through the main listener (read by the load
/// generator, which reads a response by its length: see sync_pipeline.rs).
fn stats(listener: SocketAddr) -> Value {
    let got = run_blocking(&Burst::new(listener, "/balancer/stats", 1));
    let o = &got[0];
    assert_eq!(o.status, 200, "{o:?}");
    serde_json::from_str(&o.body).unwrap_or_else(|e| panic!("stats ({e}): {}", o.body))
}

/// The endpoint of the service's sluice.yaml (the compose demo has one).
struct Endpoint {
    service: String,
    path: String,
    method: String,
    body: Option<Value>,
}

/// sluice-sync with its command, environment and mounted sluice.yaml; the
/// endpoint that file describes.
fn start_sync(compose: &Compose, network: &mut Network, scratch: &Path) -> (SyncService, Endpoint) {
    let name = compose.running("sluice-sync");
    let files = local_files(compose, &name, network, scratch);
    let (argv, port) = local_command(compose, &name, network, &files);
    let env: Vec<(String, String)> = compose
        .environment(&name)
        .into_iter()
        .map(|(k, v)| {
            let v = network.replace(&v);
            network.assert_none_left(&v, &format!("{name}'s {k}"));
            (k, v)
        })
        .collect();
    let args: Vec<&str> = argv[1..].iter().map(String::as_str).collect();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let sync = SyncService::start_with(&args, &env);
    network.add(
        &name,
        port.expect("sluice-sync listens on 0.0.0.0"),
        sync.addr(),
    );

    let config = argv
        .windows(2)
        .find(|w| w[0] == "--config")
        .map(|w| &w[1])
        .expect("sluice-sync is given a sluice.yaml");
    assert!(
        files.iter().any(|(_, local)| local == config),
        "sluice-sync's --config {config} is not a file compose mounts"
    );
    let doc: Value = yaml_serde::from_str(&fs::read_to_string(config).unwrap()).unwrap();
    let endpoints = doc["endpoints"].as_object().unwrap();
    assert_eq!(endpoints.len(), 1, "one endpoint to probe: {endpoints:?}");
    let (path, endpoint) = endpoints.iter().next().unwrap();
    let endpoint = Endpoint {
        service: doc["service"].as_str().unwrap().to_string(),
        path: path.clone(),
        method: endpoint["method"].as_str().unwrap_or("GET").to_string(),
        body: endpoint.get("body").cloned(),
    };
    (sync, endpoint)
}

/// Every instance of sluice-backend with its own command, recording each
/// request's arrival and departure (`--trace`: what each had in flight);
/// each with the command it runs. An instance's fixed address on compose's
/// network (`networks.default.ipv4_address`, how Sluice lists it) is an
/// alias of its local address.
fn start_backends(compose: &Compose, network: &mut Network) -> Vec<(Backend, Vec<String>)> {
    let names = compose.all_running("sluice-backend");
    assert_eq!(names.len(), 2, "compose runs two instances: {names:?}");
    names
        .iter()
        .map(|name| {
            let (mut argv, port) = local_command(compose, name, network, &[]);
            let command = argv.clone();
            argv.push("--trace".into());
            let args: Vec<&str> = argv[1..].iter().map(String::as_str).collect();
            let backend = Backend::start_with_args(&args);
            let port = port.expect("the backend listens on 0.0.0.0");
            network.add(name, port, backend.addr());
            let ip = compose.service(name)["networks"]["default"]["ipv4_address"]
                .as_str()
                .unwrap_or_else(|| {
                    panic!("{name} has no fixed address: Sluice lists instances by address")
                });
            network.alias(ip, port, backend.addr());
            (backend, command)
        })
        .collect()
}

/// Envoy with compose's command and the envoy.yaml it mounts; the listener
/// with the Sluice filter is the one the harness waits for.
fn start_envoy(compose: &Compose, network: &mut Network) -> Envoy {
    let name = compose.running("envoy");
    let argv = compose.argv(&name);
    let mounts = compose.mounts(&name);
    // Without --concurrency Envoy runs a worker per core: 4 here, several
    // workers as in the sync tests.
    let (mut source, mut concurrency, mut extra_args) = (None, 4, Vec::new());
    let mut words = argv[1..].iter();
    while let Some(word) = words.next() {
        match word.as_str() {
            "-c" | "--config-path" => {
                let target = words.next().unwrap();
                source = Some(mounts.get(target).unwrap_or_else(|| {
                    panic!("envoy -c {target}, which is not mounted: {mounts:?}")
                }));
            }
            "--concurrency" => concurrency = words.next().unwrap().parse().unwrap(),
            other => {
                network.assert_none_left(other, "envoy's command");
                extra_args.push(other.to_string());
            }
        }
    }
    let source = source.expect("envoy is given a config with -c");
    let bootstrap = local_envoy(source, &name, network);
    let front = bootstrap["static_resources"]["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l.to_string().contains("envoy.filters.http.wasm"))
        .expect("a listener with the Sluice filter");
    let mut opts = EnvoyOptions::new(
        serde_json::to_string_pretty(&bootstrap).unwrap(),
        port_of(&bootstrap["admin"]["address"]),
    );
    opts.listener_port = Some(port_of(&front["address"]));
    opts.concurrency = concurrency;
    opts.extra_args = extra_args;
    // Compose's environment for Envoy must be the timer setting alone,
    // which the harness passes (`precise_timers`, on by default).
    let (key, value) = PRECISE_TIMER_ENV;
    assert_eq!(
        compose.environment(&name),
        [(key.to_string(), value.to_string())],
        "envoy.environment: docs/filter.md, Timer precision"
    );
    Envoy::start_with(opts)
}

/// The prober as `docker compose run --rm prober` runs it, with
/// [`QUICK_PROBE`] added; what it printed.
fn run_prober(compose: &Compose, network: &mut Network, scratch: &Path) -> String {
    let name = compose.running("sluice-prober");
    // Its copy of sluice.yaml goes to /tmp in the container: a scratch
    // directory here (replaced first: the scratch directory is in /tmp too).
    let tmp = scratch.join("tmp");
    fs::create_dir_all(&tmp).unwrap();
    let mut paths = vec![("/tmp/".to_string(), format!("{}/", tmp.display()))];
    paths.extend(local_files(compose, &name, network, scratch));
    let (mut argv, _) = local_command(compose, &name, network, &paths);
    let script = argv.last_mut().unwrap();
    assert!(script.contains("sluice-prober probe"), "{script}");
    script.push_str(QUICK_PROBE);
    // A container path left would be a path on this machine.
    for word in script.split_whitespace().filter(|w| w.starts_with('/')) {
        assert!(
            word.starts_with(&*scratch.to_string_lossy()),
            "{name}: {word} is a path in the container"
        );
    }
    // Our sluice-prober first on PATH, as the image's /usr/local/bin.
    let bin_dir = bin_path("sluice-prober").parent().unwrap().to_path_buf();
    let path_var = std::env::join_paths(std::iter::once(bin_dir).chain(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    )))
    .unwrap();
    let out = Command::new(&argv[0])
        .args(&argv[1..])
        .env("PATH", path_var)
        .current_dir(scratch)
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{argv:?}: {}\n{said}", out.status);
    said
}

#[test]
fn the_compose_stack_probes_pushes_and_enforces_as_local_processes() {
    let compose = Compose::load();
    let scratch = ScratchDir::new("compose-local");
    let mut network = Network::new(compose.services.keys().cloned().collect());

    // The harness runs redis-server with compose's flags (no saving, no
    // AOF) on a free port.
    let redis_name = compose.running("redis-server");
    assert!(!compose.argv(&redis_name).contains(&"--port".to_string()));
    let redis = Redis::start();
    network.add(
        &redis_name,
        REDIS_PORT,
        ([127, 0, 0, 1], redis.port()).into(),
    );
    // The backends first: sluice.yaml lists them by address.
    let instances = start_backends(&compose, &mut network);
    let (sync, endpoint) = start_sync(&compose, &mut network, scratch.path());
    let path = endpoint.path.as_str();
    let capacities: Vec<u32> = instances
        .iter()
        .map(|(_, argv)| route_capacity(argv, path))
        .collect();
    let backends: Vec<Backend> = instances.into_iter().map(|(b, _)| b).collect();
    let envoy = start_envoy(&compose, &mut network);
    let listener = envoy.listener_addr();

    // Sluice starts with what the files give the endpoint: no figure from
    // sync yet.
    let first = wait_until(Duration::from_secs(10), "the sync stream", || {
        let s = stats(listener);
        (s["sync"]["state"] == "connected").then_some(s)
    });
    assert_ne!(
        first["endpoints"][path]["capacity_source"], "sync",
        "{first}"
    );

    let said = run_prober(&compose, &mut network, scratch.path());
    eprintln!("{said}");

    // Every service the stack runs was reached through the files (each
    // instance by name and by its fixed address), and the prober measured
    // one instance straight, not through Envoy: capacity is per instance.
    let envoy_name = compose.running("envoy");
    let is_envoy = |key: &String| key.starts_with(&format!("{envoy_name}:"));
    for key in network.addrs.keys().filter(|k| !is_envoy(k)) {
        assert!(
            network.used.contains(key),
            "nothing in the compose files reaches {key}: used {:?}",
            network.used
        );
    }
    assert!(
        !network.used.iter().any(is_envoy),
        "the prober measures one instance, not through Envoy: used {:?}",
        network.used
    );

    let measured: u32 = redis
        .command(&[
            "HGET",
            &format!("sluice:{{{}}}:capacity:{path}", endpoint.service),
            "capacity",
        ])
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("the prober pushed a capacity");
    let smallest = *capacities.iter().min().unwrap();
    assert!(
        (1..=smallest).contains(&measured),
        "measured {measured}; an instance takes {capacities:?}"
    );

    // In the running Envoy, through sluice-sync.
    wait_until(Duration::from_secs(10), "the capacity from sync", || {
        let ep = &stats(listener)["endpoints"][path];
        (ep["capacity"] == measured && ep["capacity_source"] == "sync").then_some(())
    });

    // A burst of three times what the instances take together, as the
    // README's: served in waves, each instance never above the capacity.
    for backend in &backends {
        backend.reset();
    }
    let n = 3 * measured as usize * backends.len();
    let mut burst = Burst::new(listener, path, n);
    burst.method = endpoint.method.clone();
    if let Some(body) = &endpoint.body {
        burst.body = body.to_string().into();
    }
    burst.spacing = Duration::from_micros(500);
    let outcomes = run_blocking(&burst);
    let summary = summarize(&outcomes);
    assert_eq!(summary.ok, n, "{summary:?}");
    assert!(summary.queued_then_admitted > 0, "it queued: {summary:?}");
    let traces: Vec<_> = backends.iter().map(|b| b.trace(path)).collect();
    let served: Vec<usize> = traces.iter().map(Vec::len).collect();
    assert_eq!(served.iter().sum::<usize>(), n, "{served:?}");
    let most: Vec<usize> = traces.iter().map(most_at_once).collect();
    assert_eq!(
        most,
        vec![measured as usize; backends.len()],
        "each instance held to the capacity, and filled to it: {served:?} served"
    );
    assert!(
        envoy.workers_that_served() > 1,
        "the capacity holds across workers"
    );
    eprintln!(
        "measured {measured} on one instance; burst of {n}: {served:?} per instance, \
         at most {most:?} at once; sync at {}",
        sync.addr()
    );
}

/// The substitution itself: whole addresses only, and nothing left over.
#[cfg(test)]
mod substitution {
    use super::*;
    use serde_json::json;

    fn network() -> Network {
        let hosts = ["redis", "sluice-sync", "backend-1", "envoy"];
        let mut network = Network::new(hosts.iter().map(|h| h.to_string()).collect());
        network.add("redis", 6379, "127.0.0.1:1001".parse().unwrap());
        network.add("backend-1", 8080, "127.0.0.1:1002".parse().unwrap());
        network
    }

    #[test]
    fn replaces_whole_host_and_port_only() {
        let mut network = network();
        let cases = [
            ("redis://redis:6379/0", "redis://127.0.0.1:1001/0"),
            (
                "backend-1:8080 backend-1:80801",
                "127.0.0.1:1002 backend-1:80801",
            ),
            ("xbackend-1:8080", "xbackend-1:8080"),
            ("type: redis", "type: redis"),
        ];
        for (text, want) in cases {
            assert_eq!(network.replace(text), want, "{text}");
        }
        assert_eq!(network.used.len(), 2);
    }

    #[test]
    fn a_compose_address_left_over_fails() {
        let network = network();
        for fine in [
            "sluice-sync --listen 127.0.0.1:0",
            "/etc/envoy/envoy.yaml",
            "storage of redis",
            "--name backend-1",
            "sluice_sync",
        ] {
            network.assert_none_left(fine, "fine");
        }
        for left in [
            "redis://redis:6380",
            "http://envoy:10001",
            "sluice-sync:50051",
            "--listen 0.0.0.0:8080",
            "http://backend-1/",
        ] {
            let caught = std::panic::catch_unwind(|| network.assert_none_left(left, "t"));
            assert!(caught.is_err(), "{left} passed");
        }
    }

    #[test]
    fn envoy_socket_addresses_must_name_a_service_of_the_stack() {
        let mut network = network();
        let mut doc = json!({
            "admin": {"address": {"socket_address": {"address": "0.0.0.0", "port_value": 9901}}},
            "upstream": {"socket_address": {"address": "backend-1", "port_value": 8080}},
            "code": {"local": {"filename": "/etc/envoy/sluice_filter.wasm"}},
        });
        let mut modules = 0;
        rewrite_envoy(&mut doc, "envoy", &mut network, &mut modules);
        assert_eq!(modules, 1);
        assert_eq!(
            doc["upstream"]["socket_address"],
            json!({"address": "127.0.0.1", "port_value": 1002})
        );
        let admin = network.addrs["envoy:9901"];
        assert_eq!(port_of(&doc["admin"]["address"]), admin.port());

        let mut unknown = json!({"socket_address": {"address": "backend-2", "port_value": 8080}});
        let caught = std::panic::catch_unwind(move || {
            rewrite_envoy(&mut unknown, "envoy", &mut network, &mut modules)
        });
        assert!(caught.is_err(), "backend-2 is not in the stack");
    }
}
