//! `cargo xtask bench xds` runs this (release build): how fast and how small the xDS state is.
//!
//! In one process, through the real client path (`XdsClient::handle`: decode, check, store, rebuild
//! and swap the proxy's snapshots), with no network in between:
//! - a full snapshot of N services + M workloads (one response), median over runs, against the
//!   baseline of only decoding the same resources with prost;
//! - single-workload updates on top of that snapshot, against the same update on an empty store;
//! - resident memory before and after the snapshot;
//! - the authorization check per connection with P policies, against no policy.
//!
//! Every loop is bounded in count. Writes `xds.json` and `xds.md` to the directory given.
use std::{
    fmt::Write as _,
    hint::black_box,
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use envoy_types::pb::{
    envoy::service::discovery::v3::{DeltaDiscoveryResponse, Resource},
    google::protobuf::Any,
};
use nodeway_proxy::{
    authz::{Connection, PolicyStore},
    metrics::Metrics,
    proto::istio::workload as wpb,
    state::ProxyState,
    xds::{NodeInfo, XdsClient, XdsConfig, ADDRESS_TYPE, AUTHORIZATION_TYPE},
};
use nodeway_tests::xds::{deny_from_namespace, service, workload};
use prost::Message;
use serde_json::json;

struct Opts {
    services: u32,
    workloads: u32,
    policies: u32,
    runs: u32,
    updates: u32,
    checks: u32,
    out: PathBuf,
}

fn parse() -> Result<Opts> {
    let mut o = Opts {
        services: 10_000,
        workloads: 50_000,
        policies: 10_000,
        runs: 5,
        updates: 500,
        checks: 200_000,
        out: PathBuf::from("target/bench"),
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut v = || args.next().with_context(|| format!("{a} needs a value"));
        let n = |s: String| s.parse::<u32>().with_context(|| format!("{a}: {s:?} is not a count"));
        match a.as_str() {
            "--services" => o.services = n(v()?)?.min(100_000),
            "--workloads" => o.workloads = n(v()?)?.min(500_000),
            "--policies" => o.policies = n(v()?)?.min(100_000),
            "--runs" => o.runs = n(v()?)?.clamp(1, 50),
            "--updates" => o.updates = n(v()?)?.clamp(1, 100_000),
            "--checks" => o.checks = n(v()?)?.clamp(1, 10_000_000),
            "--out" => o.out = PathBuf::from(v()?),
            other => bail!("unknown option {other}"),
        }
    }
    Ok(o)
}

fn client() -> Result<(Arc<XdsClient>, Arc<ProxyState>)> {
    let proxy = Arc::new(ProxyState::new());
    let xds_metrics = Arc::new(Metrics::new());
    let x = XdsClient::new(
        XdsConfig {
            // Never connected: the bench feeds responses to `handle` directly.
            address: "http://127.0.0.1:9".into(),
            root_cert: None,
            token_file: None,
            tls_server_name: None,
            node: NodeInfo::default(),
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(1),
        },
        proxy.clone(),
        xds_metrics,
    )?;
    Ok((x, proxy))
}

fn pod_ip(i: u32) -> [u8; 4] {
    // 198.18.0.0/15 holds 131k addresses; pods use the lower /16 plus the upper one's top half.
    let n = i + 1;
    [198, 18 + (n >> 16) as u8, (n >> 8) as u8, n as u8]
}

fn response(type_url: &str, items: Vec<(String, Vec<u8>)>, version: &str) -> DeltaDiscoveryResponse {
    DeltaDiscoveryResponse {
        system_version_info: version.to_string(),
        type_url: type_url.to_string(),
        nonce: version.to_string(),
        resources: items
            .into_iter()
            .map(|(name, body)| Resource {
                name,
                version: version.to_string(),
                resource: Some(Any {
                    type_url: type_url.to_string(),
                    value: body,
                }),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

fn snapshot(o: &Opts) -> DeltaDiscoveryResponse {
    let mut items = Vec::with_capacity((o.services + o.workloads) as usize);
    for i in 0..o.services {
        let vip = [198, 19, (128 + (i >> 8) % 128) as u8, i as u8];
        items.push(service(&format!("ns{}", i % 1000), &format!("svc{i}"), vip, 8080));
    }
    for i in 0..o.workloads {
        items.push(workload(
            &format!("ns{}", i % 1000),
            &format!("pod{i}"),
            &pod_ip(i),
            "node-a",
        ));
    }
    response(ADDRESS_TYPE, items, "v1")
}

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(((v.len() as f64 - 1.0) * p).round() as usize)
        .copied()
        .unwrap_or(f64::NAN)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Median and p99 (ms) of `updates` single-workload updates applied through `client`.
fn updates(client: &XdsClient, o: &Opts) -> (f64, f64) {
    let mut times = Vec::with_capacity(o.updates as usize);
    for u in 0..o.updates {
        let i = u % o.workloads.max(1);
        // The same workload moves to another address: a new version of one resource.
        let r = response(
            ADDRESS_TYPE,
            vec![workload(
                &format!("ns{}", i % 1000),
                &format!("pod{i}"),
                &pod_ip(o.workloads + u),
                "node-a",
            )],
            &format!("u{u}"),
        );
        let t = Instant::now();
        let ack = client.handle(r);
        times.push(ms(t.elapsed()));
        assert!(ack.error_detail.is_none(), "update NACKed: {ack:?}");
    }
    let p99 = pct(&mut times.clone(), 0.99);
    (median(&mut times), p99)
}

/// Median ns per check of one connection to a workload of `ns0`, over `o.checks` checks.
fn check_cost(store: &PolicyStore, o: &Opts) -> f64 {
    let w = nodeway_proxy::workload::Workload {
        name: "pod0".into(),
        namespace: "ns0".into(),
        service_account: "default".into(),
        ..Default::default()
    };
    let c = Connection {
        request: None,
        source: "198.18.0.9:40000"
            .parse()
            .unwrap_or_else(|_| SocketAddr::from(([198, 18, 0, 9], 40000))),
        source_identity: Some(nodeway_proxy::identity::Identity::new(
            "cluster.local",
            "client",
            "default",
        )),
        destination: SocketAddr::from(([198, 18, 0, 1], 8080)),
    };
    let chunks = 10u32;
    let per = (o.checks / chunks).max(1);
    let mut v = Vec::new();
    for _ in 0..chunks {
        let t = Instant::now();
        for _ in 0..per {
            black_box(store.check(black_box(&w), black_box(&c), |_, _| {}));
        }
        v.push(t.elapsed().as_secs_f64() * 1e9 / f64::from(per));
    }
    median(&mut v)
}

fn main() -> Result<()> {
    let o = parse()?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let _guard = rt.enter();

    // Baseline: decoding the snapshot's resources with prost, nothing else.
    let mut decode = Vec::new();
    let mut apply = Vec::new();
    let mut rss_empty = 0;
    let mut rss_full = 0;
    for run in 0..o.runs {
        let snap = snapshot(&o);
        let t = Instant::now();
        for r in &snap.resources {
            let body = r.resource.as_ref().map(|a| a.value.as_slice()).unwrap_or_default();
            black_box(wpb::Address::decode(body)?);
        }
        decode.push(ms(t.elapsed()));

        let (c, proxy) = client()?;
        let before = rss_bytes();
        let t = Instant::now();
        let ack = c.handle(snap);
        apply.push(ms(t.elapsed()));
        if ack.error_detail.is_some() {
            bail!("snapshot NACKed: {ack:?}");
        }
        if proxy.workloads().len() != o.workloads as usize || proxy.services().len() != o.services as usize {
            bail!("snapshot not applied whole");
        }
        if run == 0 {
            rss_empty = before;
            rss_full = rss_bytes();
        }
    }

    // Single-workload updates: on the full snapshot, and (baseline) on an empty store.
    let (full, _) = client()?;
    full.handle(snapshot(&o));
    let (update_med, update_p99) = updates(&full, &o);
    let (empty, _) = client()?;
    let (base_med, base_p99) = updates(
        &empty,
        &Opts {
            workloads: 1,
            ..parse()?
        },
    );

    // Authorization: P namespace-scoped DENY policies over 1000 namespaces (the checked
    // workload's namespace holds P/1000 of them), against an empty store.
    let (pc, proxy) = client()?;
    let policies: Vec<_> = (0..o.policies)
        .map(|i| {
            deny_from_namespace(
                &format!("ns{}", i % 1000),
                &format!("deny{i}"),
                &format!("src{i}"),
                Some(9000 + i % 1000),
            )
        })
        .collect();
    let t = Instant::now();
    let ack = pc.handle(response(AUTHORIZATION_TYPE, policies, "p1"));
    let policies_apply = ms(t.elapsed());
    if ack.error_detail.is_some() {
        bail!("policies NACKed: {ack:?}");
    }
    let store = proxy.policies();
    let check_ns = check_cost(&store, &o);
    let check_base = check_cost(&PolicyStore::default(), &o);

    let decode_med = median(&mut decode);
    let apply_med = median(&mut apply);
    let mb = |b: u64| b as f64 / (1 << 20) as f64;
    let report = json!({
        "benchmark": "xds",
        "parameters": {"services": o.services, "workloads": o.workloads, "policies": o.policies,
                       "runs": o.runs, "updates": o.updates, "checks": o.checks},
        "snapshot": {"applyMsMedian": apply_med, "applyMsRuns": apply, "decodeOnlyMsMedian": decode_med,
                     "ratioToDecode": apply_med / decode_med, "targetMs": 1000.0},
        "memory": {"rssBeforeMiB": mb(rss_empty), "rssAfterMiB": mb(rss_full),
                   "stateMiB": mb(rss_full.saturating_sub(rss_empty)), "targetMiB": 150.0},
        "update": {"medianMs": update_med, "p99Ms": update_p99, "emptyStoreMedianMs": base_med,
                   "emptyStoreP99Ms": base_p99, "targetMedianMs": 1.0},
        "authorization": {"policiesApplyMs": policies_apply, "checkNsWithPolicies": check_ns,
                          "checkNsNoPolicy": check_base, "policiesInCheckedNamespace": o.policies / 1000},
    });
    let mut md = String::new();
    let _ = writeln!(md, "# bench xds\n");
    let _ = writeln!(
        md,
        "{} services + {} workloads, {} policies; medians of {} runs.\n",
        o.services, o.workloads, o.policies, o.runs
    );
    let _ = writeln!(md, "| figure | nodeway | baseline | ratio | target |");
    let _ = writeln!(md, "|---|---:|---:|---:|---:|");
    let _ = writeln!(
        md,
        "| full snapshot apply (ms) | {apply_med:.1} | {decode_med:.1} (prost decode only) | {:.2}x | < 1000 |",
        apply_med / decode_med
    );
    let _ = writeln!(
        md,
        "| resident memory after snapshot (MiB) | {:.1} | {:.1} (before) | +{:.1} MiB | < 150 |",
        mb(rss_full),
        mb(rss_empty),
        mb(rss_full.saturating_sub(rss_empty))
    );
    let _ = writeln!(
        md,
        "| one workload update, median (ms) | {update_med:.3} | {base_med:.3} (empty store) | {:.1}x | < 1 |",
        update_med / base_med
    );
    let _ = writeln!(
        md,
        "| one workload update, p99 (ms) | {update_p99:.3} | {base_p99:.3} (empty store) | {:.1}x | |",
        update_p99 / base_p99
    );
    let _ = writeln!(
        md,
        "| authorization check per connection (ns) | {check_ns:.0} | {check_base:.0} (no policy) | {:.1}x | |",
        check_ns / check_base
    );
    let _ = writeln!(md, "| apply {} policies (ms) | {policies_apply:.1} | | | |", o.policies);
    std::fs::create_dir_all(&o.out).with_context(|| format!("cannot create {}", o.out.display()))?;
    let json_path = o.out.join("xds.json");
    std::fs::write(&json_path, serde_json::to_string_pretty(&report)? + "\n")
        .with_context(|| format!("cannot write {}", json_path.display()))?;
    std::fs::write(o.out.join("xds.md"), &md).with_context(|| format!("cannot write {}/xds.md", o.out.display()))?;
    print!("{md}");
    println!("\nwritten: {} and xds.md", json_path.display());
    Ok(())
}
