//! Advisory figures drawn from throughput against concurrency: the knee and a
//! Universal Scalability Law fit. They sit beside the threshold-based capacity
//! and never replace it: they say how the service scales, not what is safe.

use serde::Serialize;

/// Throughput `rps` measured at `concurrency`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    pub concurrency: f64,
    pub rps: f64,
}

/// The knee: where a line through the origin meets a flat line, fitted to the
/// measured throughputs. Below it throughput grows with concurrency, above it
/// it does not. Returns the measured concurrency that fits best.
pub fn knee(points: &[Point]) -> Option<Point> {
    let pts: Vec<Point> = points
        .iter()
        .copied()
        .filter(|p| p.concurrency > 0.0 && p.rps.is_finite())
        .collect();
    if pts.len() < 2 {
        return None;
    }
    let mut best: Option<(f64, Point)> = None;
    for c in &pts {
        // Model: rps = r * min(n, c). Least squares for r in closed form,
        // residuals relative to each measurement so fast levels don't dominate.
        let (mut num, mut den) = (0.0, 0.0);
        for p in &pts {
            let m = p.concurrency.min(c.concurrency) / p.rps.max(1e-9);
            num += m;
            den += m * m;
        }
        if den == 0.0 {
            continue;
        }
        let r = num / den;
        let sse: f64 = pts
            .iter()
            .map(|p| {
                let e = (r * p.concurrency.min(c.concurrency) - p.rps) / p.rps.max(1e-9);
                e * e
            })
            .sum();
        // On a tie, prefer the lower knee.
        let better = match best {
            None => true,
            Some((b, bp)) => {
                sse < b - 1e-12 || (sse <= b + 1e-12 && c.concurrency < bp.concurrency)
            }
        };
        if better {
            best = Some((sse, *c));
        }
    }
    best.map(|(_, p)| p)
}

/// Universal Scalability Law: X(N) = λN / (1 + σ(N−1) + κN(N−1)).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, schemars::JsonSchema)]
#[schemars(deny_unknown_fields)]
pub struct UslFit {
    /// Throughput of one request at a time, requests per second.
    pub lambda: f64,
    /// Contention (serialised fraction), ≥ 0.
    pub sigma: f64,
    /// Coherency (crosstalk) cost, ≥ 0.
    pub kappa: f64,
    /// Concurrency of peak throughput, √((1−σ)/κ); absent when κ = 0 or σ ≥ 1
    /// (throughput then only levels off).
    pub n_star: Option<f64>,
    /// Throughput the fit predicts at `n_star`.
    pub peak_rps: Option<f64>,
    /// Coefficient of determination of the fit on throughput.
    pub r_squared: f64,
}

impl UslFit {
    pub fn predict(&self, n: f64) -> f64 {
        self.lambda * n / (1.0 + self.sigma * (n - 1.0) + self.kappa * n * (n - 1.0))
    }
}

/// Fits σ, κ ≥ 0 and λ > 0 to the points (at least three concurrencies).
///
/// For a given λ the model is linear in σ and κ
/// (λN/X − 1 = σ(N−1) + κN(N−1)), solved as a two-variable non-negative
/// least squares; λ itself is found by a scan and golden-section search that
/// minimise the relative error in throughput.
pub fn fit_usl(points: &[Point]) -> Option<UslFit> {
    let pts: Vec<Point> = points
        .iter()
        .copied()
        .filter(|p| p.concurrency >= 1.0 && p.rps > 0.0 && p.rps.is_finite())
        .collect();
    let mut distinct: Vec<f64> = pts.iter().map(|p| p.concurrency).collect();
    distinct.sort_by(f64::total_cmp);
    distinct.dedup();
    if distinct.len() < 3 {
        return None;
    }
    let per_request = pts
        .iter()
        .map(|p| p.rps / p.concurrency)
        .fold(0.0, f64::max);
    let cost = |lambda: f64| {
        let (s, k) = coefficients(&pts, lambda);
        relative_sse(&pts, lambda, s, k)
    };
    // Coarse scan, then refine around the best cell.
    let (lo, hi) = (per_request * 0.5, per_request * 3.0);
    let steps = 200;
    let step = (hi - lo) / steps as f64;
    let mut best = lo;
    let mut best_cost = f64::INFINITY;
    for i in 0..=steps {
        let l = lo + step * i as f64;
        let c = cost(l);
        if c < best_cost {
            best_cost = c;
            best = l;
        }
    }
    let (mut a, mut b) = ((best - step).max(lo), (best + step).min(hi));
    let g = (5f64.sqrt() - 1.0) / 2.0;
    for _ in 0..60 {
        let x1 = b - g * (b - a);
        let x2 = a + g * (b - a);
        if cost(x1) <= cost(x2) {
            b = x2;
        } else {
            a = x1;
        }
    }
    let lambda = (a + b) / 2.0;
    let (sigma, kappa) = coefficients(&pts, lambda);
    let mut fit = UslFit {
        lambda,
        sigma,
        kappa,
        n_star: None,
        peak_rps: None,
        r_squared: 0.0,
    };
    if kappa > 0.0 && sigma < 1.0 {
        let n = ((1.0 - sigma) / kappa).sqrt();
        fit.n_star = Some(n);
        fit.peak_rps = Some(fit.predict(n));
    }
    let mean = pts.iter().map(|p| p.rps).sum::<f64>() / pts.len() as f64;
    let ss_tot: f64 = pts.iter().map(|p| (p.rps - mean).powi(2)).sum();
    let ss_res: f64 = pts
        .iter()
        .map(|p| (p.rps - fit.predict(p.concurrency)).powi(2))
        .sum();
    fit.r_squared = if ss_tot > 0.0 {
        1.0 - ss_res / ss_tot
    } else {
        1.0
    };
    Some(fit)
}

fn relative_sse(pts: &[Point], lambda: f64, sigma: f64, kappa: f64) -> f64 {
    pts.iter()
        .map(|p| {
            let n = p.concurrency;
            let x = lambda * n / (1.0 + sigma * (n - 1.0) + kappa * n * (n - 1.0));
            ((x - p.rps) / p.rps).powi(2)
        })
        .sum()
}

/// Non-negative least squares for σ, κ at a fixed λ, weighted so each point
/// counts by its relative error.
fn coefficients(pts: &[Point], lambda: f64) -> (f64, f64) {
    // y = σ a + κ b with y = λN/X − 1, a = N − 1, b = N(N − 1).
    let rows: Vec<(f64, f64, f64)> = pts
        .iter()
        .map(|p| {
            let n = p.concurrency;
            (n - 1.0, n * (n - 1.0), lambda * n / p.rps - 1.0)
        })
        .collect();
    let (mut aa, mut ab, mut bb, mut ay, mut by) = (0.0, 0.0, 0.0, 0.0, 0.0);
    for &(a, b, y) in &rows {
        // Weight 1/(1+σa+κb)² ≈ 1/(λN/X)², i.e. relative error in X.
        let w = 1.0 / (y + 1.0).powi(2).max(1e-12);
        aa += w * a * a;
        ab += w * a * b;
        bb += w * b * b;
        ay += w * a * y;
        by += w * b * y;
    }
    let sse = |s: f64, k: f64| -> f64 {
        rows.iter()
            .map(|&(a, b, y)| {
                let w = 1.0 / (y + 1.0).powi(2).max(1e-12);
                w * (y - s * a - k * b).powi(2)
            })
            .sum()
    };
    let mut candidates = vec![(0.0, 0.0)];
    if aa > 0.0 {
        candidates.push(((ay / aa).max(0.0), 0.0));
    }
    if bb > 0.0 {
        candidates.push((0.0, (by / bb).max(0.0)));
    }
    let det = aa * bb - ab * ab;
    if det.abs() > 1e-12 * (aa * bb).max(1e-300) {
        let s = (ay * bb - by * ab) / det;
        let k = (aa * by - ab * ay) / det;
        if s >= 0.0 && k >= 0.0 {
            candidates.push((s, k));
        }
    }
    candidates
        .into_iter()
        .min_by(|x, y| sse(x.0, x.1).total_cmp(&sse(y.0, y.1)))
        .expect("at least the zero candidate")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pts(f: impl Fn(f64) -> f64, ns: &[f64]) -> Vec<Point> {
        ns.iter()
            .map(|&n| Point {
                concurrency: n,
                rps: f(n),
            })
            .collect()
    }

    #[test]
    fn recovers_usl_parameters() {
        let (l, s, k) = (100.0, 0.05, 0.002);
        let data = pts(
            |n| l * n / (1.0 + s * (n - 1.0) + k * n * (n - 1.0)),
            &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0],
        );
        let fit = fit_usl(&data).unwrap();
        assert!((fit.lambda - l).abs() / l < 0.01, "{fit:?}");
        assert!((fit.sigma - s).abs() < 0.005, "{fit:?}");
        assert!((fit.kappa - k).abs() < 0.0005, "{fit:?}");
        let n_star = ((1.0 - s) / k).sqrt();
        assert!((fit.n_star.unwrap() - n_star).abs() < 1.0, "{fit:?}");
        assert!(fit.r_squared > 0.999);
    }

    #[test]
    fn coefficients_never_go_negative() {
        // Super-linear scaling (cache warming) would want σ < 0.
        let data = pts(|n| 10.0 * n.powf(1.2), &[1.0, 2.0, 4.0, 8.0]);
        let fit = fit_usl(&data).unwrap();
        assert!(fit.sigma >= 0.0 && fit.kappa >= 0.0, "{fit:?}");
        // A hard capacity: linear then flat.
        let data = pts(
            |n| 50.0 * n.min(16.0),
            &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0],
        );
        let fit = fit_usl(&data).unwrap();
        assert!(fit.sigma >= 0.0 && fit.kappa >= 0.0, "{fit:?}");
    }

    #[test]
    fn too_few_points_no_fit() {
        assert!(fit_usl(&pts(|n| n, &[1.0, 2.0])).is_none());
        assert!(fit_usl(&pts(|n| n, &[1.0, 1.0, 2.0])).is_none());
    }

    #[test]
    fn knee_of_a_hard_capacity() {
        for k in [1.0, 4.0, 7.0, 16.0, 37.0] {
            let ns = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, k, k + 1.0];
            let data = pts(|n| 50.0 * n.min(k), &ns);
            assert_eq!(knee(&data).unwrap().concurrency, k);
        }
    }

    #[test]
    fn knee_tolerates_noise() {
        let noise = [1.01, 0.99, 1.02, 0.98, 1.0, 1.01, 0.99];
        let ns = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0];
        let data: Vec<Point> = ns
            .iter()
            .zip(noise)
            .map(|(&n, e)| Point {
                concurrency: n,
                rps: 50.0 * n.min(16.0) * e,
            })
            .collect();
        assert_eq!(knee(&data).unwrap().concurrency, 16.0);
    }
}
