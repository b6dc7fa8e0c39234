//! A throwaway `redis-server` per test, and just enough of RESP to talk to it.

use crate::process::{Process, ScratchDir};
use std::fs::File;
use std::io::{self, BufRead, BufReader, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts with a new port when the one we picked was taken meanwhile.
const PORT_ATTEMPTS: usize = 3;

pub struct Redis {
    port: u16,
    process: Process,
}

impl Redis {
    /// `redis-server` on a free loopback port, no persistence, ready once it
    /// answers PING.
    pub fn start() -> Redis {
        let mut last_log = String::new();
        for _ in 0..PORT_ATTEMPTS {
            let mut redis = Redis::spawn(crate::free_port());
            if redis.wait_ready() {
                return redis;
            }
            last_log = redis.process.log_text();
            if redis.process.exited().is_none() {
                break; // Running but not answering: a new port will not help.
            }
        }
        panic!("redis-server did not answer PING; its log:\n{last_log}");
    }

    /// Kills redis-server (SIGKILL, as a crash would) and waits until it is
    /// gone: its clients see their connections drop.
    pub fn kill(&mut self) {
        let _ = self.process.child.kill();
        let _ = self.process.child.wait();
    }

    /// A new, empty redis-server on the same port (after [`Redis::kill`]).
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            *self = Redis::spawn(self.port);
            if self.wait_ready() {
                return;
            }
            // The port can be held for a moment by the dying process.
            assert!(
                Instant::now() < deadline,
                "redis-server did not restart on port {}; its log:\n{}",
                self.port,
                self.process.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn spawn(port: u16) -> Redis {
        let dir = ScratchDir::new("redis");
        let log_path = dir.path().join("redis.log");
        let log = File::create(&log_path).expect("redis log file");
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("redis log file"))
            .stderr(log)
            .spawn()
            .expect("cannot run redis-server (apt-get install redis-server)");
        Redis {
            port,
            process: Process {
                name: "redis-server".to_string(),
                child,
                logs: vec![log_path],
                dir,
            },
        }
    }

    /// Whether it answers PING within the ready timeout (`false` at once if
    /// it exits).
    fn wait_ready(&mut self) -> bool {
        let deadline = Instant::now() + READY_TIMEOUT;
        while Instant::now() < deadline && self.process.exited().is_none() {
            if let Ok(RespValue::Simple(pong)) = self.try_command(&["PING"]) {
                if pong == "PONG" {
                    return true;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Runs one command on a new connection, e.g. `["GET", "key"]`; panics
    /// on a connection error (a Redis error reply is `RespValue::Error`).
    pub fn command(&self, args: &[&str]) -> RespValue {
        self.try_command(args)
            .unwrap_or_else(|e| panic!("redis {args:?}: {e}"))
    }

    pub fn try_command(&self, args: &[&str]) -> io::Result<RespValue> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut request = format!("*{}\r\n", args.len()).into_bytes();
        for arg in args {
            request.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
            request.extend_from_slice(arg.as_bytes());
            request.extend_from_slice(b"\r\n");
        }
        stream.write_all(&request)?;
        read_value(&mut BufReader::new(stream))
    }

    pub fn log(&self) -> String {
        self.process.log_text()
    }
}

/// A Redis reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RespValue {
    Simple(String),
    Error(String),
    Integer(i64),
    /// `None` is the null bulk string (a missing key).
    Bulk(Option<Vec<u8>>),
    /// `None` is the null array.
    Array(Option<Vec<RespValue>>),
}

impl RespValue {
    /// A simple or bulk string as text; `None` for anything else.
    pub fn as_str(&self) -> Option<String> {
        match self {
            RespValue::Simple(s) => Some(s.clone()),
            RespValue::Bulk(Some(b)) => Some(String::from_utf8_lossy(b).into_owned()),
            _ => None,
        }
    }
}

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("bad RESP: {what}"))
}

fn read_value(reader: &mut impl BufRead) -> io::Result<RespValue> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "redis closed the connection",
        ));
    }
    let line = line.trim_end_matches("\r\n");
    let (kind, rest) = line.split_at(line.len().min(1));
    let number = || rest.parse::<i64>().map_err(|_| bad(line));
    Ok(match kind {
        "+" => RespValue::Simple(rest.to_string()),
        "-" => RespValue::Error(rest.to_string()),
        ":" => RespValue::Integer(number()?),
        "$" => match number()? {
            n if n < 0 => RespValue::Bulk(None),
            n => {
                let mut data = vec![0; n as usize + 2];
                reader.read_exact(&mut data)?;
                data.truncate(n as usize);
                RespValue::Bulk(Some(data))
            }
        },
        "*" => match number()? {
            n if n < 0 => RespValue::Array(None),
            n => RespValue::Array(Some(
                (0..n)
                    .map(|_| read_value(reader))
                    .collect::<io::Result<_>>()?,
            )),
        },
        _ => return Err(bad(line)),
    })
}
