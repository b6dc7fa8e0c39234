//! Clients that hold one HTTP/1.1 keep-alive connection each and send
//! requests on it back to back, the way a long-lived client does. Envoy
//! keeps serving such a connection with the filter chain (and wasm VMs) it
//! was accepted with until its drain ends, which is what a listener update
//! test needs.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

pub struct KeepAliveClients {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<io::Result<Vec<u16>>>>,
}

impl KeepAliveClients {
    /// `n` connections to `addr`, each sending `GET path` in a loop.
    pub fn start(addr: SocketAddr, path: &str, n: usize) -> KeepAliveClients {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..n)
            .map(|_| {
                let (stop, path) = (Arc::clone(&stop), path.to_string());
                std::thread::spawn(move || run(addr, &path, &stop))
            })
            .collect();
        KeepAliveClients { stop, threads }
    }

    /// Stops after each connection's current request; the statuses of all
    /// requests, per connection (0: reconnected). Panics if one failed.
    pub fn stop(self) -> Vec<Vec<u16>> {
        self.stop.store(true, Ordering::SeqCst);
        self.threads
            .into_iter()
            .map(|t| {
                t.join()
                    .expect("client thread")
                    .expect("keep-alive connection")
            })
            .collect()
    }
}

fn connect(addr: SocketAddr) -> io::Result<(TcpStream, BufReader<TcpStream>)> {
    let stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    Ok((stream.try_clone()?, BufReader::new(stream)))
}

/// Envoy's gradual drain may close an old connection (`connection: close`)
/// after a listener update; the client then opens a new one, as real
/// clients do, and a 0 in the statuses marks the reconnect.
fn run(addr: SocketAddr, path: &str, stop: &AtomicBool) -> io::Result<Vec<u16>> {
    let (mut writer, mut reader) = connect(addr)?;
    let mut statuses = Vec::new();
    let request = format!("GET {path} HTTP/1.1\r\nhost: sluice\r\n\r\n");
    while !stop.load(Ordering::SeqCst) {
        writer.write_all(request.as_bytes())?;
        let (status, closing) = read_response(&mut reader)?;
        statuses.push(status);
        if closing {
            statuses.push(0);
            (writer, reader) = connect(addr)?;
        }
    }
    Ok(statuses)
}

/// The status, and whether the server closes the connection after it.
fn read_response(reader: &mut BufReader<TcpStream>) -> io::Result<(u16, bool)> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed",
        ));
    }
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, line.clone()))?;
    let mut length = 0usize;
    let mut closing = false;
    loop {
        line.clear();
        reader.read_line(&mut line)?;
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().unwrap_or(0);
            }
            if name.eq_ignore_ascii_case("connection") && value.trim() == "close" {
                closing = true;
            }
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    Ok((status, closing))
}
