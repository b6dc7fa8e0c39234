//! `make bench-instances`: one Envoy in front of several instances, each of
//! its own capacity, with service times that vary (exponential around the
//! mean, as inference calls do). Side by side in one run, on the same
//! backends' seeds and load:
//!
//! - Sluice picking the instance (`instances.hosts`, per-instance
//!   `capacity` / `instance_capacity`, Envoy's `override_host` policy);
//! - HAProxy with one `server … maxconn K` line per instance, the
//!   reference;
//! - the old way: Sluice with `capacity` = the sum for the whole service and
//!   Envoy's least-request balancer spreading the admitted requests.
//!
//! Every figure is read off the backends: each instance's own maximum in
//! flight (`max_in_flight` of `GET /__backend/stats`) and the time its slots
//! were busy (`GET /__backend/trace`: each request from taking a slot to
//! leaving), on the backend's clock. Not the client's.

use crate::figures::Table;
use crate::haproxy::{Haproxy, Server};
use crate::machine;
use crate::readme;
use crate::wrk::wrk;
use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use serde_json::{json, Map, Value};
use sluice_harness::{wait_until, Backend, Envoy, FrontProxy, OVERRIDE_HOST_YAML};
use std::time::Duration;

#[derive(Args, Debug, Clone)]
pub struct Opts {
    /// Seconds of load per proxy and scenario; the first and last second
    /// are left out of the figures (at least 3).
    #[arg(long, default_value_t = 10)]
    pub seconds: u32,
    /// Closed-loop clients (wrk connections).
    #[arg(long, default_value_t = 48)]
    pub clients: u32,
    /// Mean service time of the instances, exponential around it.
    #[arg(long, default_value_t = 60.0)]
    pub service_ms: f64,
    /// Envoy worker threads (and HAProxy's nbthread).
    #[arg(long, default_value_t = 2)]
    pub concurrency: u32,
    /// Only these set-ups (the table then has only the rows they make).
    #[arg(long, value_delimiter = ',', value_enum,
          default_values_t = [Setup::SluicePicks, Setup::HaproxyMaxconn, Setup::SluiceSummed])]
    pub only: Vec<Setup>,
}

/// The instances' capacities, one scenario each.
const SCENARIOS: [&[u32]; 2] = [&[4, 4, 4], &[2, 4, 8]];

/// The endpoint under load; the measured requests carry a query string the
/// warm-up's lack (the backend and Sluice ignore it).
const PATH: &str = "/work";
const MEASURED: &str = "/work?measured";

/// The header the filter sets and Envoy's `override_host` policy reads.
const HOST_HEADER: &str = "x-sluice-host";

pub fn run(o: &Opts) -> anyhow::Result<()> {
    machine::require("wrk")?;
    machine::require("haproxy")?;
    if o.seconds < 3 {
        bail!("--seconds must be at least 3: the first and last second are left out");
    }
    let mut t = Table::new(&["measure", "value", "goal", "detail"]);
    for capacities in SCENARIOS {
        scenario_rows(o, capacities, &mut t)?;
    }
    let setups: Vec<&str> = o.only.iter().map(|s| s.name()).collect();
    let out = format!(
        "{}; set-ups: {}; {} clients, service times exponential around {} ms, Envoy --concurrency {} \
         (HAProxy nbthread the same), {} s per proxy and scenario, the first and last second \
         left out; figures from the backends (their stats and traces)\n\n{}",
        machine::header("make bench-instances"),
        setups.join(", "),
        o.clients,
        o.service_ms,
        o.concurrency,
        o.seconds,
        t.render()
    );
    readme::publish("instances", &out)
}

/// What one proxy got out of the instances.
struct Run {
    /// Per instance: the most requests inside it at once.
    max_in_flight: Vec<u64>,
    /// Per instance: the share of its slot time that was busy.
    utilisation: Vec<f64>,
    /// Of all the instances' slots together.
    total_utilisation: f64,
    /// Requests finished per second, all instances.
    rps: f64,
}

fn scenario_rows(o: &Opts, capacities: &[u32], t: &mut Table) -> anyhow::Result<()> {
    let label = format!(
        "{} instances of capacity {}",
        capacities.len(),
        list(capacities)
    );
    eprintln!("{label} ...");
    let sum: u32 = capacities.iter().sum();
    let run = |setup| -> anyhow::Result<Option<Run>> {
        match o.only.contains(&setup) {
            true => measure(o, capacities, setup).map(Some),
            false => Ok(None),
        }
    };
    let (sluice, haproxy, old) = (
        run(Setup::SluicePicks)?,
        run(Setup::HaproxyMaxconn)?,
        run(Setup::SluiceSummed)?,
    );
    let ideal = f64::from(sum) * 1000.0 / o.service_ms;
    let (Some(sluice), Some(haproxy), Some(old)) = (&sluice, &haproxy, &old) else {
        // Some set-ups only (--only): their own figures, nothing to compare.
        for (setup, run) in [
            (Setup::SluicePicks, &sluice),
            (Setup::HaproxyMaxconn, &haproxy),
            (Setup::SluiceSummed, &old),
        ] {
            let Some(r) = run else { continue };
            let name = setup.name();
            t.row(vec![
                format!("{label}: {name}: each instance's max in flight; utilisation"),
                format!("{}; {:.3}", list(&r.max_in_flight), r.total_utilisation),
                "—".into(),
                format!(
                    "{:.1} req/s (ideal {ideal:.0}); utilisation per instance {}",
                    r.rps,
                    shares(&r.utilisation)
                ),
            ]);
        }
        return Ok(());
    };
    t.row(vec![
        format!("{label}: utilisation Sluice / HAProxy (slot time busy)"),
        format!(
            "{:.3}",
            sluice.total_utilisation / haproxy.total_utilisation
        ),
        "≥ 1.00".into(),
        format!(
            "Sluice {:.3} of its {sum} slots ({:.1} req/s), HAProxy {:.3} ({:.1} req/s); \
             ideal {ideal:.0} req/s; per instance Sluice {}, HAProxy {}",
            sluice.total_utilisation,
            sluice.rps,
            haproxy.total_utilisation,
            haproxy.rps,
            shares(&sluice.utilisation),
            shares(&haproxy.utilisation),
        ),
    ]);
    t.row(vec![
        format!("{label}: each instance's max in flight, Sluice / HAProxy (its own record)"),
        format!(
            "{} / {}",
            list(&sluice.max_in_flight),
            list(&haproxy.max_in_flight)
        ),
        format!("= {}", list(capacities)),
        format!("HAProxy: one `server … maxconn K` line per instance, balance leastconn"),
    ]);
    t.row(vec![
        format!(
            "{label}: the old way, Sluice capacity {sum} for the service and Envoy's \
             least-request balancer: each instance's max in flight"
        ),
        list(&old.max_in_flight),
        "— (what it costs)".into(),
        format!(
            "utilisation {:.3} ({:.1} req/s), {:.3} of HAProxy's; per instance {}",
            old.total_utilisation,
            old.rps,
            old.total_utilisation / haproxy.total_utilisation,
            shares(&old.utilisation),
        ),
    ]);
    Ok(())
}

fn list<T: std::fmt::Display>(items: &[T]) -> String {
    items
        .iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join("/")
}

fn shares(items: &[f64]) -> String {
    items
        .iter()
        .map(|u| format!("{u:.2}"))
        .collect::<Vec<_>>()
        .join("/")
}

impl Setup {
    fn name(self) -> &'static str {
        match self {
            Setup::SluicePicks => "Sluice picking the instance",
            Setup::HaproxyMaxconn => "HAProxy maxconn per server",
            Setup::SluiceSummed => "the old way (summed capacity, least request)",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Setup {
    /// Sluice picks the instance (the filter's `instances`).
    SluicePicks,
    /// One `server … maxconn K` line per instance.
    HaproxyMaxconn,
    /// The old way: Sluice's capacity summed over the instances, Envoy's
    /// least-request balancer.
    SluiceSummed,
}

/// Fresh instances (seeded alike for every proxy: instance i draws the same
/// service times in the same order), one proxy in front, the load.
fn measure(o: &Opts, capacities: &[u32], setup: Setup) -> anyhow::Result<Run> {
    let backends: Vec<Backend> = capacities
        .iter()
        .enumerate()
        .map(|(i, k)| {
            let route = format!(
                "{PATH}:capacity={k},service_ms={},service_dist=exponential,seed={}",
                o.service_ms,
                i + 1
            );
            Backend::start_with_args(&["--trace", "--threads", "1", "--route", &route])
        })
        .collect();
    let ports: Vec<u16> = backends.iter().map(Backend::port).collect();
    let sum: u32 = capacities.iter().sum();
    match setup {
        Setup::HaproxyMaxconn => {
            let servers: Vec<Server> = ports
                .iter()
                .zip(capacities)
                .map(|(&port, &maxconn)| Server { port, maxconn })
                .collect();
            let haproxy = Haproxy::start_servers(
                &servers,
                o.concurrency,
                Duration::from_secs(30),
                "leastconn",
            )?;
            load(o, haproxy.port, &backends, capacities)
        }
        Setup::SluicePicks | Setup::SluiceSummed => {
            let (config, policy) = if setup == Setup::SluicePicks {
                (sluice_config(&ports, capacities), LbPolicy::OverrideHost)
            } else {
                let config = json!({"service": "bench", "abandon_hold": 0,
                    "endpoints": {PATH: {"capacity": sum, "queue_timeout": 30}}});
                (config, LbPolicy::LeastRequest)
            };
            let mut proxy = FrontProxy::new(ports[0], config.to_string());
            proxy.instances = backends.iter().map(Backend::addr).collect();
            let mut opts = proxy.envoy_options(o.concurrency);
            opts.bootstrap_yaml = with_policy(&opts.bootstrap_yaml, policy);
            let envoy = Envoy::start_with(opts);
            let run = load(o, envoy.listener_port(), &backends, capacities)?;
            if std::env::var_os("SLUICE_BENCH_DEBUG").is_some() {
                eprintln!("{}", envoy.get("/balancer/stats").unwrap_or_default());
                eprintln!(
                    "{}",
                    envoy
                        .admin_get("/clusters")
                        .map(|r| r.text())
                        .unwrap_or_default()
                );
            }
            if setup == Setup::SluicePicks {
                report_missed_picks(&envoy);
            }
            Ok(run)
        }
    }
}

/// Sluice picking among `ports`: the most common capacity (the smallest of
/// equals, as the prober sets it) as the endpoint's, the others as
/// `instance_capacity`.
fn sluice_config(ports: &[u16], capacities: &[u32]) -> Value {
    let hosts: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let count = |k: &u32| capacities.iter().filter(|c| *c == k).count();
    let default = *capacities
        .iter()
        .min_by_key(|k| (std::cmp::Reverse(count(k)), **k))
        .expect("a scenario has instances");
    let overrides: Map<String, Value> = hosts
        .iter()
        .zip(capacities)
        .filter(|(_, &k)| k != default)
        .map(|(h, &k)| (h.clone(), json!(k)))
        .collect();
    let mut endpoint = json!({"capacity": default, "queue_timeout": 30});
    if !overrides.is_empty() {
        endpoint["instance_capacity"] = Value::Object(overrides);
    }
    // `abandon_hold: 0`: the instances stop working on a request whose
    // client left (the warm-up's, when wrk closes its connections), so its
    // slot is free at once, as HAProxy's is.
    json!({"service": "bench", "abandon_hold": 0,
        "instances": {"hosts": hosts, "header": HOST_HEADER},
        "endpoints": {PATH: endpoint}})
}

/// What the filter says of picks Envoy did not honour: there should be
/// none, the instances being all in Envoy's cluster.
fn report_missed_picks(envoy: &Envoy) {
    let Ok(text) = envoy.get("/balancer/stats") else {
        return;
    };
    let Ok(stats) = serde_json::from_str::<Value>(&text) else {
        return;
    };
    let missed: u64 = stats["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|e| e["instances"].as_array().into_iter().flatten())
        .filter_map(|i| i["picks_missed"].as_u64())
        .sum();
    if missed > 0 {
        eprintln!("  Sluice: {missed} picks Envoy did not honour");
    }
}

#[derive(Debug, Clone, Copy)]
enum LbPolicy {
    /// To the host in [`HOST_HEADER`], round robin without one: the
    /// harness's cluster of `instances` as it renders it.
    OverrideHost,
    /// Envoy's least-request balancer, every host checked.
    LeastRequest,
}

/// Envoy's least-request policy, at the indentation of a cluster's keys.
const LEAST_REQUEST_YAML: &str = r#"    load_balancing_policy:
      policies:
      - typed_extension_config:
          name: envoy.load_balancing_policies.least_request
          typed_config:
            "@type": type.googleapis.com/envoy.extensions.load_balancing_policies.least_request.v3.LeastRequest
            selection_method: FULL_SCAN
"#;

/// The harness's bootstrap for a proxy with `instances` (its `override_host`
/// cluster), with the cluster's policy swapped for `policy`. Panics if the
/// policy is not where the harness puts it, rather than measure another.
fn with_policy(bootstrap: &str, policy: LbPolicy) -> String {
    assert_eq!(
        bootstrap.matches(OVERRIDE_HOST_YAML).count(),
        1,
        "the harness's instances cluster changed shape:\n{bootstrap}"
    );
    match policy {
        LbPolicy::OverrideHost => bootstrap.to_string(),
        LbPolicy::LeastRequest => bootstrap.replacen(OVERRIDE_HOST_YAML, LEAST_REQUEST_YAML, 1),
    }
}

/// Warm-up, then `o.seconds` of closed-loop load through `port`; the
/// figures from the backends.
fn load(o: &Opts, port: u16, backends: &[Backend], capacities: &[u32]) -> anyhow::Result<Run> {
    wrk(port, PATH, o.clients, 1)?;
    // Requests of the warm-up whose clients wrk closed may still be inside
    // the backends; let them go before the maxima restart.
    wait_until(Duration::from_secs(10), "the backends to be idle", || {
        backends
            .iter()
            .all(|b| b.path_stats(PATH)["in_flight"] == 0)
            .then_some(())
    });
    for b in backends {
        b.reset();
    }
    wrk(port, MEASURED, o.clients, o.seconds)?;
    let mut traces = Vec::new();
    let mut max_in_flight = Vec::new();
    for b in backends {
        max_in_flight.push(b.path_stats(PATH)["max_in_flight"].as_u64().unwrap_or(0));
        traces.push(slot_times(b)?);
    }
    let start = traces
        .iter()
        .flatten()
        .map(|s| s.arrived_us)
        .min()
        .context("no request reached the backends")?;
    let window = (
        start + 1_000_000,
        start + u64::from(o.seconds) * 1_000_000 - 1_000_000,
    );
    let busy: Vec<u64> = traces.iter().map(|t| busy_us(t, window)).collect();
    let span = (window.1 - window.0) as f64;
    let utilisation: Vec<f64> = busy
        .iter()
        .zip(capacities)
        .map(|(&b, &k)| b as f64 / (span * f64::from(k)))
        .collect();
    let slots: u32 = capacities.iter().sum();
    let total_utilisation = busy.iter().sum::<u64>() as f64 / (span * f64::from(slots));
    let done = traces
        .iter()
        .flatten()
        .filter(|s| s.served_us > 0 && (window.0..window.1).contains(&s.departed_us))
        .count();
    eprintln!(
        "  max in flight {}, utilisation {total_utilisation:.3} ({})",
        list(&max_in_flight),
        shares(&utilisation)
    );
    Ok(Run {
        max_in_flight,
        utilisation,
        total_utilisation,
        rps: done as f64 * 1e6 / span,
    })
}

/// One request as a backend's trace has it, wall clock, microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SlotTime {
    arrived_us: u64,
    /// 0: it left before it had a slot.
    served_us: u64,
    departed_us: u64,
}

/// `GET /__backend/trace`: rows `[id, arrived, departed, served]`.
fn slot_times(backend: &Backend) -> anyhow::Result<Vec<SlotTime>> {
    let response = sluice_harness::http::get(backend.addr(), "/__backend/trace")?;
    let rows = response.json()["paths"][PATH]
        .as_array()
        .cloned()
        .unwrap_or_default();
    rows.iter()
        .map(|r| {
            Some(SlotTime {
                arrived_us: r[1].as_u64()?,
                departed_us: r[2].as_u64()?,
                served_us: r[3].as_u64()?,
            })
        })
        .collect::<Option<Vec<_>>>()
        .context("a malformed row in the backend's trace (a backend older than its served_us?)")
}

/// Microseconds of slot time busy within `window`: each served request
/// holds one slot from taking it to leaving.
fn busy_us(trace: &[SlotTime], window: (u64, u64)) -> u64 {
    trace
        .iter()
        .filter(|s| s.served_us > 0)
        .map(|s| {
            let from = s.served_us.max(window.0);
            let to = s.departed_us.min(window.1);
            to.saturating_sub(from)
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_time_is_cut_to_the_window() {
        let s = |served_us, departed_us| SlotTime {
            arrived_us: 0,
            served_us,
            departed_us,
        };
        let trace = [s(0, 50), s(5, 15), s(12, 30), s(25, 40), s(8, 9)];
        // [10, 15) + [12, 30) + [25, 30); the unserved one and [8, 9) count nothing.
        assert_eq!(busy_us(&trace, (10, 30)), 5 + 18 + 5);
    }

    #[test]
    fn sluice_gets_the_common_capacity_and_the_others_as_overrides() {
        let c = sluice_config(&[1, 2, 3], &[2, 4, 8]);
        let ep = &c["endpoints"][PATH];
        assert_eq!(
            c["instances"]["hosts"],
            json!(["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"])
        );
        assert_eq!(ep["capacity"], 2);
        assert_eq!(
            ep["instance_capacity"],
            json!({"127.0.0.1:2": 4, "127.0.0.1:3": 8})
        );
        let c = sluice_config(&[1, 2, 3], &[4, 4, 4]);
        assert_eq!(c["endpoints"][PATH]["capacity"], 4);
        assert!(c["endpoints"][PATH].get("instance_capacity").is_none());
    }

    #[test]
    fn the_backend_cluster_gets_every_instance_and_the_policy() {
        let mut proxy = FrontProxy::without_wasm(4001);
        proxy.instances = [4001, 4002, 4003]
            .map(|p| std::net::SocketAddr::from(([127, 0, 0, 1], p)))
            .to_vec();
        for (policy, name) in [
            (LbPolicy::OverrideHost, "override_host"),
            (LbPolicy::LeastRequest, "least_request"),
        ] {
            let parsed = yaml_parse(&with_policy(&proxy.render(), policy));
            let cluster = &parsed["static_resources"]["clusters"][0];
            assert_eq!(cluster["name"], "backend");
            assert_eq!(
                cluster["load_balancing_policy"]["policies"][0]["typed_extension_config"]["name"],
                format!("envoy.load_balancing_policies.{name}")
            );
            let hosts = &cluster["load_assignment"]["endpoints"][0]["lb_endpoints"];
            assert_eq!(hosts.as_array().map(Vec::len), Some(3));
        }
    }

    fn yaml_parse(yaml: &str) -> Value {
        yaml_serde::from_str(yaml).unwrap()
    }
}
