//! A Prometheus histogram with fixed buckets and lock-free atomics, for the few series
//! the relay exports (request latency by route family, flush latency and batch size).
//! Hand-written: the `prometheus` crate would bring a registry, protobuf support and a
//! global default for four histograms that the text format makes trivial.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Observations counted into cumulative buckets (`le`), with their sum and count.
pub struct Histogram {
    bounds: &'static [f64],
    /// Per bucket, not cumulative; the last one is `+Inf`.
    buckets: Vec<AtomicU64>,
    /// Sum of observations, in millionths.
    sum_micros: AtomicU64,
    count: AtomicU64,
}

/// Seconds, from 1 ms to a full long poll.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Seconds a cluster hint takes between nodes: from 100 µs (loopback) to a second.
pub const HINT_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];

/// Commits answered by one flush.
pub const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, value: f64) {
        let index = self
            .bounds
            .iter()
            .position(|bound| value <= *bound)
            .unwrap_or(self.bounds.len());
        self.buckets[index].fetch_add(1, Relaxed);
        self.sum_micros
            .fetch_add((value.max(0.0) * 1e6) as u64, Relaxed);
        self.count.fetch_add(1, Relaxed);
    }

    /// The bucket bounds (seconds, or commits), without the last, `+Inf`.
    pub fn bounds(&self) -> &'static [f64] {
        self.bounds
    }

    /// Cumulative counts per bucket (the last is `+Inf`, the count of all), and the sum of
    /// observations.
    pub fn snapshot(&self) -> (Vec<u64>, f64) {
        let mut cumulative = 0;
        let counts = self
            .buckets
            .iter()
            .map(|bucket| {
                cumulative += bucket.load(Relaxed);
                cumulative
            })
            .collect();
        (counts, self.sum_micros.load(Relaxed) as f64 / 1e6)
    }

    /// Appends the series `name{labels,le=…}`, `name_sum`, `name_count` (no `# TYPE`).
    pub fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (i, bucket) in self.buckets.iter().enumerate() {
            cumulative += bucket.load(Relaxed);
            let le = self
                .bounds
                .get(i)
                .map_or("+Inf".to_owned(), |b| b.to_string());
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {cumulative}"
            );
        }
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let sum = self.sum_micros.load(Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum{braces} {sum}");
        let _ = writeln!(out, "{name}_count{braces} {}", self.count.load(Relaxed));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative() {
        let histogram = Histogram::new(&[0.1, 1.0]);
        for value in [0.05, 0.5, 0.5, 7.0] {
            histogram.observe(value);
        }
        let mut out = String::new();
        histogram.render(&mut out, "x", "family=\"sync\"");
        assert_eq!(
            out,
            "x_bucket{family=\"sync\",le=\"0.1\"} 1\n\
             x_bucket{family=\"sync\",le=\"1\"} 3\n\
             x_bucket{family=\"sync\",le=\"+Inf\"} 4\n\
             x_sum{family=\"sync\"} 8.05\n\
             x_count{family=\"sync\"} 4\n"
        );
    }
}
