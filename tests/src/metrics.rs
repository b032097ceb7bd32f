//! Reading Prometheus text the way a user's query would.

/// Sum of the samples of `name` whose labels include every `(key, value)` of `labels`.
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, rest) = match series.split_once('{') {
                Some((m, r)) => (m, r.trim_end_matches('}')),
                None => (series, ""),
            };
            if metric != name {
                return None;
            }
            let ok = labels.iter().all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
            ok.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// `istio_tcp_received_bytes_total` and `istio_tcp_sent_bytes_total` of the series matching
/// `labels`, as `(received, sent)`: what an echo test compares with the bytes it moved.
pub fn tcp_bytes(text: &str, labels: &[(&str, &str)]) -> (f64, f64) {
    (
        metric_value(text, "istio_tcp_received_bytes_total", labels),
        metric_value(text, "istio_tcp_sent_bytes_total", labels),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_matching_series() {
        let t = "# TYPE x counter\nx_total{a=\"1\",b=\"2\"} 3\nx_total{a=\"1\",b=\"3\"} 4\ny 1\n";
        assert_eq!(metric_value(t, "x_total", &[("a", "1")]), 7.0);
        assert_eq!(metric_value(t, "x_total", &[("b", "3")]), 4.0);
        assert_eq!(metric_value(t, "x_total", &[("b", "9")]), 0.0);
        assert_eq!(metric_value(t, "y", &[]), 1.0);
    }
}
