//! A real `dnsmasq` on a loopback port, for sync's DNS discovery: its
//! records come from a hosts file the test rewrites, re-read on SIGHUP, as
//! a compose or Kubernetes DNS changes when instances come and go.

use crate::process::{Process, ScratchDir};
use std::fs::File;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const READY_TIMEOUT: Duration = Duration::from_secs(10);
const PORT_ATTEMPTS: usize = 3;

pub struct Dnsmasq {
    port: u16,
    hosts_file: PathBuf,
    process: Process,
}

impl Dnsmasq {
    /// `dnsmasq` answering for `records` (`(name, ip)`, A or AAAA by the
    /// address) on 127.0.0.1, UDP and TCP, a free port; nothing forwarded,
    /// nothing cached.
    pub fn start(records: &[(&str, &str)]) -> Dnsmasq {
        let mut last_log = String::new();
        for _ in 0..PORT_ATTEMPTS {
            let mut dns = Dnsmasq::spawn(crate::free_port(), records);
            let deadline = Instant::now() + READY_TIMEOUT;
            while Instant::now() < deadline && dns.process.exited().is_none() {
                if crate::port_accepts(dns.port) {
                    return dns;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            last_log = dns.process.log_text();
            if dns.process.exited().is_none() {
                break;
            }
        }
        panic!("dnsmasq did not start; its log:\n{last_log}");
    }

    fn spawn(port: u16, records: &[(&str, &str)]) -> Dnsmasq {
        let dir = ScratchDir::new("dnsmasq");
        let hosts_file = dir.path().join("hosts");
        std::fs::write(&hosts_file, hosts_text(records)).expect("dnsmasq hosts file");
        let log_path = dir.path().join("dnsmasq.log");
        let log = File::create(&log_path).expect("dnsmasq log file");
        let child = Command::new("dnsmasq")
            .args(["--no-daemon", "--conf-file=/dev/null", "--pid-file"])
            .arg(format!("--port={port}"))
            .args(["--listen-address=127.0.0.1", "--bind-interfaces"])
            .args(["--no-resolv", "--no-hosts", "--cache-size=0"])
            // Every name is local: a type a name has no record of (AAAA of
            // an IPv4-only name) gets NODATA, as a real zone answers, not
            // REFUSED (which dnsmasq gives when it has nowhere to forward).
            .arg("--local=/#/")
            // Root keeps root: the scratch dir need not be readable by nobody.
            .args(["--user=root", "--log-queries", "--log-facility=-"])
            .arg(format!("--addn-hosts={}", hosts_file.display()))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dnsmasq log file"))
            .stderr(log)
            .spawn()
            .expect("cannot run dnsmasq (apt-get install dnsmasq-base)");
        Dnsmasq {
            port,
            hosts_file,
            process: Process {
                name: "dnsmasq".to_string(),
                child,
                logs: vec![log_path],
                dir,
            },
        }
    }

    /// Replaces every record and has dnsmasq re-read them (SIGHUP); the new
    /// answers are served a moment later.
    pub fn set_records(&self, records: &[(&str, &str)]) {
        // Write then rename: dnsmasq never reads half a file.
        let next = self.hosts_file.with_extension("next");
        std::fs::write(&next, hosts_text(records)).expect("dnsmasq hosts file");
        std::fs::rename(&next, &self.hosts_file).expect("dnsmasq hosts file");
        // SAFETY: kill(2) on the pid of our child, not yet reaped.
        unsafe {
            libc::kill(self.process.pid() as libc::pid_t, libc::SIGHUP);
        }
    }

    /// Stops answering (SIGKILL), so lookups time out or are refused.
    pub fn kill(&mut self) {
        let _ = self.process.child.kill();
        let _ = self.process.child.wait();
    }

    /// `127.0.0.1:PORT`, for `--dns-server`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    pub fn log(&self) -> String {
        self.process.log_text()
    }
}

fn hosts_text(records: &[(&str, &str)]) -> String {
    records
        .iter()
        .map(|(name, ip)| format!("{ip} {name}\n"))
        .collect()
}
