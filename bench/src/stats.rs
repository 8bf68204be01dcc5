//! Small statistics helpers: quantiles and medians.

/// The `q` quantile (0..=1, nearest rank) of sorted values; 0 when empty.
pub fn quantile_sorted_u32(sorted: &[u32], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q * (sorted.len() - 1) as f64).round() as usize;
    f64::from(sorted[rank.min(sorted.len() - 1)])
}

/// The `q` quantile (0..=1, nearest rank) of `values`; `None` when empty.
pub fn quantile(values: &[f64], q: f64) -> Option<f64> {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    if sorted.is_empty() {
        return None;
    }
    sorted.sort_by(f64::total_cmp);
    let rank = (q * (sorted.len() - 1) as f64).round() as usize;
    Some(sorted[rank.min(sorted.len() - 1)])
}

/// The median of `values`; 0 when empty.
pub fn median(values: &[f64]) -> f64 {
    quantile(values, 0.5).unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_by_nearest_rank() {
        assert_eq!(quantile(&[3.0, 1.0, 2.0], 0.5), Some(2.0));
        assert_eq!(quantile(&[], 0.5), None);
        let sorted: Vec<u32> = (1..=100).collect();
        assert_eq!(quantile_sorted_u32(&sorted, 0.99), 99.0);
        assert_eq!(median(&[1.0, 5.0, 2.0, 4.0, 3.0]), 3.0);
    }
}
