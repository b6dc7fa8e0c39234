use clap::Parser;
use sluice_backend::route::RouteSpec;
use std::net::SocketAddr;

/// A backend of known capacity for Sluice's tests, demo and benchmarks.
#[derive(Parser)]
#[command(name = "sluice-backend", version)]
struct Args {
    /// Address to listen on; prints `listening on ADDR` when ready.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// PATH[:capacity=K,service_ms=F,service_dist=fixed|exponential,seed=N,
    /// overload=queue|reject|error200,on_disconnect=cancel|finish,
    /// slow_every=N,slow_ms=F,tokens=N], repeatable. `service_dist=exponential`
    /// draws each request's service time around the mean service_ms, from
    /// `seed` (default 1): the same seed, the same times.
    /// Paths without a route are answered at once with 200.
    #[arg(long = "route", value_name = "SPEC", value_parser = clap::value_parser!(RouteSpec))]
    routes: Vec<RouteSpec>,
    /// Runtime worker threads.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    threads: u16,
    /// Workers shared by every routed path, first come first served: a
    /// request holds one while it is served (after its path's slot).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    workers: Option<u16>,
    /// Keep each routed request's x-request-id and wall-clock arrival,
    /// departure and start of service, served at GET /__backend/trace.
    #[arg(long)]
    trace: bool,
    /// Echoed in an `x-backend-name` header on every response, to tell
    /// instances apart behind a load balancer.
    #[arg(long)]
    name: Option<String>,
}

fn main() {
    let args = Args::parse();
    let result = sluice_backend::run(sluice_backend::Options {
        listen: args.listen,
        routes: args.routes,
        threads: args.threads.into(),
        workers: args.workers.map(usize::from),
        trace: args.trace,
        name: args.name,
    });
    if let Err(e) = result {
        // One line with the causes, not anyhow's backtrace dump.
        eprintln!("sluice-backend: {e:#}");
        std::process::exit(1);
    }
}
