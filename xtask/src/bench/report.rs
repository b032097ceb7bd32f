//! Results of `bench redirect`: per-run figures, medians, ratios, Markdown and JSON.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;

/// The ways traffic goes from the client pod to the server pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// No capture: client straight to server.
    Direct,
    /// eBPF capture (cgroup connect4 + sk_lookup) into nodeway.
    Ebpf,
    /// iptables REDIRECT in the pod namespaces into the same nodeway.
    Iptables,
    /// Both pods captured (eBPF) with workload certificates; nodeway hands the client's connection
    /// to the server's inbound pipeline in-process (`--same-node in-process`).
    SameNode,
    /// Both pods captured as in `SameNode`, but over HBONE through the node's own tunnel socket
    /// (`--same-node hbone`): the baseline the fast path is measured against.
    HboneLocal,
}

impl Mode {
    pub const ALL: [Mode; 5] = [
        Mode::Direct,
        Mode::Ebpf,
        Mode::Iptables,
        Mode::SameNode,
        Mode::HboneLocal,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::Ebpf => "ebpf",
            Mode::Iptables => "iptables",
            Mode::SameNode => "same-node",
            Mode::HboneLocal => "hbone-local",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Mode::Direct => "(a) direct, no capture",
            Mode::Ebpf => "(b) eBPF capture -> nodeway",
            Mode::Iptables => "(c) iptables REDIRECT -> nodeway",
            Mode::SameNode => "(d) both captured, same-node fast path",
            Mode::HboneLocal => "(e) both captured, HBONE on one node",
        }
    }

    /// Both pods are captured (and the server's side of nodeway answers too).
    pub fn captures_server(self) -> bool {
        matches!(self, Mode::SameNode | Mode::HboneLocal)
    }
}

/// One run of one mode.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Run {
    pub round: u32,
    pub mode: Mode,
    pub connects: u64,
    pub connects_per_sec: f64,
    pub requests: u64,
    pub late_sends: u64,
    pub p50_us: f64,
    pub p99_us: f64,
    /// iperf3, one stream, client -> server.
    pub gbit_per_sec: f64,
    /// utime + stime of nodeway during the iperf3 run (none in direct mode).
    pub proxy_cpu_seconds: Option<f64>,
    /// GB (1e9 bytes) moved per nodeway CPU second.
    pub gb_per_cpu_second: Option<f64>,
}

/// Medians over the runs of one mode.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    pub mode: Mode,
    pub runs: usize,
    pub connects_per_sec: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub gbit_per_sec: f64,
    pub gb_per_cpu_second: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Ratios {
    /// `a / b` for connects/s: above 1 means `a` sets up more connections per second.
    pub connects_per_sec: Option<f64>,
    /// `a / b` for latency: above 1 means `a` is slower.
    pub p50: Option<f64>,
    pub p99: Option<f64>,
    /// `a / b` for throughput and for GB per proxy CPU second: above 1 favours `a`.
    pub gbit_per_sec: Option<f64>,
    pub gb_per_cpu_second: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub benchmark: &'static str,
    pub kernel: String,
    pub nodeway: String,
    pub parameters: serde_json::Value,
    pub runs: Vec<Run>,
    pub summary: Vec<Summary>,
    /// `<mode>_vs_direct`, `ebpf_vs_iptables` and the same-node comparisons (see `COMPARISONS`).
    pub ratios: std::collections::BTreeMap<String, Ratios>,
}

/// The modes named on the command line (`--modes a,b`), in order, without repeats.
pub fn select_modes<M: Copy + PartialEq>(
    names: &[String],
    all: &[M],
    name: impl Fn(M) -> &'static str,
) -> Result<Vec<M>> {
    let mut modes = Vec::new();
    for n in names {
        let mode = all.iter().copied().find(|m| name(*m) == n.trim()).with_context(|| {
            let known: Vec<&str> = all.iter().map(|m| name(*m)).collect();
            format!("unknown mode {n:?} ({})", known.join(", "))
        })?;
        if !modes.contains(&mode) {
            modes.push(mode);
        }
    }
    if modes.is_empty() {
        anyhow::bail!("no mode selected");
    }
    Ok(modes)
}

/// The ratios every report carries (when both modes ran): name, `a`, `b`.
pub const COMPARISONS: [(&str, Mode, Mode); 7] = [
    ("ebpf_vs_direct", Mode::Ebpf, Mode::Direct),
    ("iptables_vs_direct", Mode::Iptables, Mode::Direct),
    ("ebpf_vs_iptables", Mode::Ebpf, Mode::Iptables),
    ("same_node_vs_direct", Mode::SameNode, Mode::Direct),
    ("same_node_vs_iptables", Mode::SameNode, Mode::Iptables),
    ("same_node_vs_hbone_local", Mode::SameNode, Mode::HboneLocal),
    ("hbone_local_vs_direct", Mode::HboneLocal, Mode::Direct),
];

pub fn median(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

pub fn ratio(a: f64, b: f64) -> Option<f64> {
    (a.is_finite() && b.is_finite() && b > 0.0).then(|| a / b)
}

impl Report {
    pub fn new(kernel: String, nodeway: String, parameters: serde_json::Value, runs: Vec<Run>) -> Self {
        let summary: Vec<Summary> = Mode::ALL
            .iter()
            .filter_map(|&mode| {
                let of: Vec<&Run> = runs.iter().filter(|r| r.mode == mode).collect();
                if of.is_empty() {
                    return None;
                }
                let mut cps: Vec<f64> = of.iter().map(|r| r.connects_per_sec).collect();
                let mut p50: Vec<f64> = of.iter().map(|r| r.p50_us).collect();
                let mut p99: Vec<f64> = of.iter().map(|r| r.p99_us).collect();
                let mut gbps: Vec<f64> = of.iter().map(|r| r.gbit_per_sec).collect();
                let mut per_cpu: Vec<f64> = of.iter().filter_map(|r| r.gb_per_cpu_second).collect();
                Some(Summary {
                    mode,
                    runs: of.len(),
                    connects_per_sec: median(&mut cps),
                    p50_us: median(&mut p50),
                    p99_us: median(&mut p99),
                    gbit_per_sec: median(&mut gbps),
                    gb_per_cpu_second: (!per_cpu.is_empty()).then(|| median(&mut per_cpu)),
                })
            })
            .collect();
        let get = |m: Mode| summary.iter().find(|s| s.mode == m);
        let mut ratios = std::collections::BTreeMap::new();
        let mut add = |name: &str, a: Option<&Summary>, b: Option<&Summary>| {
            if let (Some(a), Some(b)) = (a, b) {
                ratios.insert(
                    name.to_owned(),
                    Ratios {
                        connects_per_sec: ratio(a.connects_per_sec, b.connects_per_sec),
                        p50: ratio(a.p50_us, b.p50_us),
                        p99: ratio(a.p99_us, b.p99_us),
                        gbit_per_sec: ratio(a.gbit_per_sec, b.gbit_per_sec),
                        gb_per_cpu_second: a
                            .gb_per_cpu_second
                            .zip(b.gb_per_cpu_second)
                            .and_then(|(a, b)| ratio(a, b)),
                    },
                );
            }
        };
        for (name, a, b) in COMPARISONS {
            add(name, get(a), get(b));
        }
        Self {
            benchmark: "redirect",
            kernel,
            nodeway,
            parameters,
            runs,
            summary,
            ratios,
        }
    }

    pub fn markdown(&self) -> String {
        let fmt_ratio = |r: Option<f64>| r.map_or("–".to_owned(), |r| format!("{r:.2}x"));
        let direct = self.summary.iter().find(|s| s.mode == Mode::Direct);
        let mut md = String::new();
        let _ = writeln!(md, "# bench redirect\n");
        let _ = writeln!(
            md,
            "Client pod -> server pod (TCP echo; iperf3 for throughput), one nodeway node. Medians of {} runs per \
             mode, modes interleaved. kernel {}, {}.\n",
            self.summary.iter().map(|s| s.runs).max().unwrap_or(0),
            self.kernel,
            self.nodeway
        );
        let _ = writeln!(
            md,
            "| mode | connects/s | vs direct | p50 latency (µs) | vs direct | p99 latency (µs) | vs direct \
             | Gbit/s | vs direct | GB per nodeway CPU-s |"
        );
        let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for s in &self.summary {
            let vs = |a: f64, b: Option<f64>| fmt_ratio(b.and_then(|b| ratio(a, b)));
            let _ = writeln!(
                md,
                "| {} | {:.0} | {} | {:.1} | {} | {:.1} | {} | {:.2} | {} | {} |",
                s.mode.describe(),
                s.connects_per_sec,
                vs(s.connects_per_sec, direct.map(|d| d.connects_per_sec)),
                s.p50_us,
                vs(s.p50_us, direct.map(|d| d.p50_us)),
                s.p99_us,
                vs(s.p99_us, direct.map(|d| d.p99_us)),
                s.gbit_per_sec,
                vs(s.gbit_per_sec, direct.map(|d| d.gbit_per_sec)),
                s.gb_per_cpu_second.map_or("–".to_owned(), |g| format!("{g:.3}")),
            );
        }
        for (name, a, b) in &COMPARISONS[2..] {
            let Some(r) = self.ratios.get(*name) else { continue };
            if *b == Mode::Direct {
                continue;
            }
            let _ = writeln!(
                md,
                "\n{} vs {}: connects/s {}, p50 {}, p99 {}, Gbit/s {}, GB per CPU-s {} \
                 (above 1x favours {} except for latency, where below 1x does).",
                a.describe(),
                b.describe(),
                fmt_ratio(r.connects_per_sec),
                fmt_ratio(r.p50),
                fmt_ratio(r.p99),
                fmt_ratio(r.gbit_per_sec),
                fmt_ratio(r.gb_per_cpu_second),
                a.name()
            );
        }
        let _ = writeln!(md, "\nParameters: `{}`", self.parameters);
        md
    }

    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let json = dir.join("redirect.json");
        let md = dir.join("redirect.md");
        let text = serde_json::to_string_pretty(self).context("serialising the report")?;
        std::fs::write(&json, text + "\n").with_context(|| format!("cannot write {}", json.display()))?;
        std::fs::write(&md, self.markdown()).with_context(|| format!("cannot write {}", md.display()))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(round: u32, mode: Mode, cps: f64, p50: f64) -> Run {
        Run {
            round,
            mode,
            connects: 100,
            connects_per_sec: cps,
            requests: 100,
            late_sends: 0,
            p50_us: p50,
            p99_us: p50 * 2.0,
            gbit_per_sec: cps / 100.0,
            proxy_cpu_seconds: (mode != Mode::Direct).then_some(1.0),
            gb_per_cpu_second: (mode != Mode::Direct).then_some(cps / 1000.0),
        }
    }

    #[test]
    fn medians_and_ratios() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), 2.5);
        let r = Report::new(
            "k".into(),
            "n".into(),
            serde_json::json!({}),
            vec![
                run(1, Mode::Direct, 1000.0, 10.0),
                run(1, Mode::Ebpf, 500.0, 20.0),
                run(1, Mode::Iptables, 400.0, 25.0),
                run(2, Mode::Direct, 3000.0, 30.0),
            ],
        );
        let direct = &r.summary[0];
        assert_eq!(direct.connects_per_sec, 2000.0);
        let e = &r.ratios["ebpf_vs_direct"];
        assert_eq!(e.connects_per_sec, Some(0.25));
        assert_eq!(r.ratios["ebpf_vs_iptables"].connects_per_sec, Some(1.25));
        assert_eq!(r.ratios["ebpf_vs_iptables"].p50, Some(0.8));
        let md = r.markdown();
        assert!(md.contains("| (a) direct, no capture | 2000 | 1.00x |"), "{md}");
        assert!(
            md.contains("(b) eBPF capture -> nodeway vs (c) iptables REDIRECT -> nodeway: connects/s 1.25x"),
            "{md}"
        );
        assert!(!md.contains("same-node fast path vs"), "{md}");
    }

    #[test]
    fn same_node_ratios() {
        let r = Report::new(
            "k".into(),
            "n".into(),
            serde_json::json!({}),
            vec![
                run(1, Mode::Iptables, 400.0, 25.0),
                run(1, Mode::SameNode, 520.0, 20.0),
                run(1, Mode::HboneLocal, 200.0, 40.0),
            ],
        );
        let s = &r.ratios["same_node_vs_hbone_local"];
        assert_eq!(s.gbit_per_sec, Some(2.6));
        assert_eq!(s.gb_per_cpu_second, Some(2.6));
        assert_eq!(r.ratios["same_node_vs_iptables"].connects_per_sec, Some(1.3));
        assert!(!r.ratios.contains_key("same_node_vs_direct"));
        let md = r.markdown();
        assert!(
            md.contains(
                "(d) both captured, same-node fast path vs (e) both captured, HBONE on one node: connects/s 2.60x"
            ),
            "{md}"
        );
    }
}
