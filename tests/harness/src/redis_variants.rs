//! Redis as managed offerings run it: a `redis-server` that speaks only TLS
//! (certificates made here with the `openssl` CLI, client certificates
//! required), and a three-node Redis Cluster (`--cluster-enabled yes`,
//! `redis-cli --cluster create`), each on free loopback ports.

use crate::process::{Process, ScratchDir};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const READY_TIMEOUT: Duration = Duration::from_secs(15);

fn run(program: &str, args: &[&str], dir: &Path) -> Output {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn spawn_redis(name: &str, dir: ScratchDir, args: &[String]) -> Process {
    let log_path = dir.path().join("redis.log");
    let log = File::create(&log_path).expect("redis log file");
    let child = Command::new("redis-server")
        .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(dir.path())
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("redis log file"))
        .stderr(log)
        .spawn()
        .expect("cannot run redis-server (apt-get install redis-server)");
    Process {
        name: name.to_string(),
        child,
        logs: vec![log_path],
        dir,
    }
}

/// The PEM files of a TLS Redis and of its client.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

/// A `redis-server` listening only on a TLS port, requiring client
/// certificates signed by its own CA, for `127.0.0.1`.
pub struct TlsRedis {
    port: u16,
    files: TlsFiles,
    process: Process,
}

impl TlsRedis {
    pub fn start() -> TlsRedis {
        let dir = ScratchDir::new("redis-tls");
        let d = dir.path().to_path_buf();
        let openssl = |args: &[&str]| run("openssl", args, &d);
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-subj",
            "/CN=sluice test CA",
        ]);
        for (name, ext) in [
            ("server", "subjectAltName=IP:127.0.0.1,DNS:localhost"),
            ("client", "extendedKeyUsage=clientAuth"),
        ] {
            let (key, csr, crt) = (
                format!("{name}.key"),
                format!("{name}.csr"),
                format!("{name}.crt"),
            );
            openssl(&[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                &key,
                "-out",
                &csr,
                "-subj",
                &format!("/CN=sluice test {name}"),
            ]);
            std::fs::write(d.join(format!("{name}.ext")), ext).unwrap();
            openssl(&[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-out",
                &crt,
                "-extfile",
                &format!("{name}.ext"),
            ]);
        }
        let port = crate::free_port();
        let path = |f: &str| d.join(f).to_string_lossy().into_owned();
        let args: Vec<String> = [
            "--port",
            "0",
            "--tls-port",
            &port.to_string(),
            "--tls-cert-file",
            &path("server.crt"),
            "--tls-key-file",
            &path("server.key"),
            "--tls-ca-cert-file",
            &path("ca.crt"),
            "--tls-auth-clients",
            "yes",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let files = TlsFiles {
            ca: d.join("ca.crt"),
            client_cert: d.join("client.crt"),
            client_key: d.join("client.key"),
        };
        let process = spawn_redis("redis-server (TLS)", dir, &args);
        let mut redis = TlsRedis {
            port,
            files,
            process,
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        while redis.cli(&["PING"]).as_deref() != Ok("PONG") {
            assert!(
                Instant::now() < deadline && redis.process.exited().is_none(),
                "the TLS redis-server did not answer PING; its log:\n{}",
                redis.process.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        redis
    }

    /// `rediss://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("rediss://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// `redis-cli` over TLS with the client certificate: its output, trimmed.
    pub fn cli(&self, args: &[&str]) -> Result<String, String> {
        let f = &self.files;
        let mut cli = Command::new("redis-cli");
        cli.args(["--tls", "-h", "127.0.0.1", "-p", &self.port.to_string()])
            .arg("--cacert")
            .arg(&f.ca)
            .arg("--cert")
            .arg(&f.client_cert)
            .arg("--key")
            .arg(&f.client_key)
            .args(args);
        run_cli(cli)
    }

    pub fn log(&self) -> String {
        self.process.log_text()
    }
}

/// Three `redis-server --cluster-enabled yes` masters that own all 16384
/// slots between them (no replicas).
pub struct RedisCluster {
    ports: Vec<u16>,
    nodes: Vec<Process>,
}

impl RedisCluster {
    pub fn start() -> RedisCluster {
        let mut ports = Vec::new();
        let mut nodes = Vec::new();
        for i in 0..3 {
            let port = crate::free_port();
            let bus = crate::free_port();
            let dir = ScratchDir::new(&format!("redis-cluster-{i}"));
            let conf = dir.path().join("nodes.conf").to_string_lossy().into_owned();
            let args: Vec<String> = [
                "--port",
                &port.to_string(),
                "--cluster-enabled",
                "yes",
                "--cluster-port",
                &bus.to_string(),
                "--cluster-config-file",
                &conf,
                "--cluster-node-timeout",
                "2000",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            nodes.push(spawn_redis(
                &format!("redis-server (cluster node {i})"),
                dir,
                &args,
            ));
            ports.push(port);
        }
        let cluster = RedisCluster { ports, nodes };
        let deadline = Instant::now() + READY_TIMEOUT;
        for &port in &cluster.ports {
            while cluster.cli(port, &["PING"]).as_deref() != Ok("PONG") {
                assert!(
                    Instant::now() < deadline,
                    "cluster node {port} does not answer PING"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let addrs: Vec<String> = cluster
            .ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        let mut args = vec!["--cluster", "create"];
        args.extend(addrs.iter().map(String::as_str));
        args.extend(["--cluster-replicas", "0", "--cluster-yes"]);
        let created = Command::new("redis-cli")
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .expect("redis-cli --cluster create");
        assert!(
            created.status.success(),
            "redis-cli --cluster create: {}",
            String::from_utf8_lossy(&created.stdout)
        );
        for &port in &cluster.ports {
            while !cluster
                .cli(port, &["CLUSTER", "INFO"])
                .is_ok_and(|info| info.contains("cluster_state:ok"))
            {
                assert!(
                    Instant::now() < deadline,
                    "node {port}: the cluster is not ok"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        cluster
    }

    /// `redis://127.0.0.1:P1,redis://127.0.0.1:P2,...`: the node list.
    pub fn urls(&self) -> String {
        self.ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn ports(&self) -> &[u16] {
        &self.ports
    }

    /// `redis-cli -c` (following redirections) against node `port`.
    pub fn cli(&self, port: u16, args: &[&str]) -> Result<String, String> {
        let mut cli = Command::new("redis-cli");
        cli.args(["-c", "-h", "127.0.0.1", "-p", &port.to_string()])
            .args(args);
        run_cli(cli)
    }

    /// `CLUSTER KEYSLOT key`.
    pub fn slot(&self, key: &str) -> u16 {
        self.cli(self.ports[0], &["CLUSTER", "KEYSLOT", key])
            .unwrap()
            .parse()
            .unwrap()
    }

    pub fn pids(&self) -> Vec<u32> {
        self.nodes.iter().map(|n| n.pid()).collect()
    }
}

/// Runs a `redis-cli` command: its output, trimmed, or what went wrong
/// (redis-cli exits 0 on an `ERR` reply, so the text is checked too).
fn run_cli(mut cli: Command) -> Result<String, String> {
    let out = cli
        .stdin(Stdio::null())
        .output()
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if out.status.success() && !text.starts_with("ERR") && !text.contains("Could not") {
        Ok(text)
    } else {
        Err(format!("{text}{}", String::from_utf8_lossy(&out.stderr)))
    }
}
