//! Latency histograms (µs) and their exchange between workers and the coordinator as a list of
//! non-empty buckets: exact for histograms built with the same bounds, and plain JSON.

use hdrhistogram::Histogram;

/// Largest latency recorded, µs; slower ones are clamped to it.
pub const MAX_US: u64 = 60_000_000;

pub fn new_hist() -> Histogram<u64> {
    // Constant, valid bounds: 1 µs … 60 s at 3 significant figures.
    match Histogram::new_with_bounds(1, MAX_US, 3) {
        Ok(h) => h,
        Err(e) => panic!("histogram bounds: {e:?}"),
    }
}

/// `[[value, count], …]` for every non-empty bucket.
pub fn to_buckets(h: &Histogram<u64>) -> Vec<(u64, u64)> {
    h.iter_recorded()
        .map(|v| (v.value_iterated_to(), v.count_at_value()))
        .collect()
}

/// Adds buckets made by `to_buckets` into `h`.
pub fn add_buckets(h: &mut Histogram<u64>, buckets: &[(u64, u64)]) {
    for &(v, n) in buckets {
        // Values come from a histogram with the same bounds; clamp anyway.
        let _ = h.record_n(v.clamp(1, MAX_US), n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_through_buckets_is_exact() {
        let mut a = new_hist();
        let mut b = new_hist();
        for v in [1, 50, 999, 1_234, 80_000, 2_500_000] {
            a.saturating_record(v);
            b.saturating_record(v * 3);
        }
        let mut direct = a.clone();
        direct.add(&b).expect("same bounds");

        let mut merged = new_hist();
        add_buckets(&mut merged, &to_buckets(&a));
        let json = serde_json::to_string(&to_buckets(&b)).expect("serialize");
        let back: Vec<(u64, u64)> = serde_json::from_str(&json).expect("deserialize");
        add_buckets(&mut merged, &back);

        assert_eq!(merged.len(), direct.len());
        for q in [0.5, 0.9, 0.99, 0.999, 1.0] {
            assert_eq!(
                merged.value_at_quantile(q),
                direct.value_at_quantile(q),
                "q={q}"
            );
        }
        assert_eq!(merged.max(), direct.max());
    }

    #[test]
    fn slow_values_are_clamped_not_lost() {
        let mut h = new_hist();
        h.saturating_record(MAX_US * 10);
        assert_eq!(h.len(), 1);
    }
}
