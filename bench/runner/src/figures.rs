//! Small summaries of samples, and the markdown table they end up in.

use serde_json::Value;
use sluice_backend::handover::GapSummary;

/// p50 / p99 / max of some samples (milliseconds), and how many.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Percentiles {
    pub n: usize,
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

impl Percentiles {
    /// Nearest-rank percentiles; all zero for no samples.
    pub fn of(mut samples: Vec<f64>) -> Percentiles {
        if samples.is_empty() {
            return Percentiles::default();
        }
        samples.sort_by(f64::total_cmp);
        let n = samples.len();
        let at = |q: f64| samples[((n as f64 * q).ceil() as usize).clamp(1, n) - 1];
        Percentiles {
            n,
            p50: at(0.50),
            p99: at(0.99),
            max: samples[n - 1],
        }
    }
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The `handover_gap` object of the backend's stats for one path.
pub fn gap_from_backend(path_stats: &Value) -> GapSummary {
    let g = &path_stats["handover_gap"];
    let f = |k: &str| g[k].as_f64().unwrap_or(0.0);
    GapSummary {
        count: g["count"].as_u64().unwrap_or(0),
        open: g["open"].as_u64().unwrap_or(0),
        p50_ms: f("p50_ms"),
        p99_ms: f("p99_ms"),
        max_ms: f("max_ms"),
        mean_ms: f("mean_ms"),
    }
}

/// The backend's `latency` of one path, in [`Percentiles`].
pub fn latency_from_backend(path_stats: &Value) -> Percentiles {
    let l = &path_stats["latency"];
    let f = |k: &str| l[k].as_f64().unwrap_or(0.0);
    Percentiles {
        n: l["count"].as_u64().unwrap_or(0) as usize,
        p50: f("p50_ms"),
        p99: f("p99_ms"),
        max: f("max_ms"),
    }
}

/// Rows of a markdown table under a fixed header.
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Table {
        Table {
            header: header.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        assert_eq!(cells.len(), self.header.len(), "{cells:?}");
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let line = |cells: &[String]| format!("| {} |\n", cells.join(" | "));
        let mut out = line(&self.header);
        out.push_str(&format!("|{}\n", "---|".repeat(self.header.len())));
        for r in &self.rows {
            out.push_str(&line(r));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let p = Percentiles::of((1..=100).map(f64::from).rev().collect());
        assert_eq!((p.n, p.p50, p.p99, p.max), (100, 50.0, 99.0, 100.0));
        assert_eq!(Percentiles::of(vec![]), Percentiles::default());
        assert_eq!(Percentiles::of(vec![3.0]).p99, 3.0);
    }

    #[test]
    fn table_renders_markdown() {
        let mut t = Table::new(&["a", "b"]);
        t.row(vec!["1".into(), "2".into()]);
        assert_eq!(t.render(), "| a | b |\n|---|---|\n| 1 | 2 |\n");
    }
}
