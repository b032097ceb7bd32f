//! The L7 figures of `cargo xtask bench istiod` (issue 14): how fast a VirtualService change
//! reaches a pod's routing over its class stream, and what the per-class sidecar streams save
//! against one stream per pod (streams, istiod's connected sidecars, memory).
//!
//! Kept apart from [`super::istiod`]'s L4 figures because these need HTTP pods, a Service with
//! its EndpointSlice and DestinationRule subsets, and (for the classes) meshes of their own.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nodeway_tests::{
    control_plane::{KubePod, Mesh},
    http::{HttpBackend, HttpRequest},
    http_get, rss_kib, Node, Pod,
};
use serde::Serialize;
use serde_json::{json, Value};

use crate::interrupt;

/// The namespace of the VirtualService figures (the L4 figures' namespace: the client is there).
const NS: &str = "bench";
const PORT: u16 = 9080;
const HOST: &str = "reviews.bench.svc.cluster.local";
/// The namespace of the class figures (a mesh of its own per layout).
const CLASS_NS: &str = "classes";
/// How often a VirtualService round asks which subset answers: short against the figure
/// (tens of milliseconds), long enough that the requests do not load the two cores much.
const POLL: Duration = Duration::from_millis(5);

/// The VirtualService figure: per round, the API server's write and the time after it until
/// the client's first request answered by the new subset.
#[derive(Serialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct VsFigures {
    pub vs_write_ms: Vec<f64>,
    pub vs_routed_ms: Vec<f64>,
}

/// reviews v1 and v2 on node b, their Service and subsets; kept until the rounds end.
pub struct Reviews {
    vip: SocketAddr,
    _pods: Vec<(KubePod, HttpBackend)>,
}

fn istio(kind: &str, name: &str, namespace: &str, spec: Value) -> Value {
    json!({"apiVersion": "networking.istio.io/v1", "kind": kind,
           "metadata": {"name": name, "namespace": namespace}, "spec": spec})
}

fn set_labels(m: &Mesh, namespace: &str, name: &str, labels: Value) -> Result<()> {
    let like = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": namespace}});
    m.cp.kube().merge(&like, json!({"metadata": {"labels": labels}}))?;
    Ok(())
}

/// A pod on `node` with `labels` before it is Running: nodeway captures it (and opens its
/// class) only once it has an IP, so it never sees the harness's default `app: <name>`.
fn labelled_pod(m: &mut Mesh, node: &str, name: &str, ns: &str, sa: &str, labels: Value) -> Result<KubePod> {
    let p = m.prepare_pod(node, name, ns, sa)?;
    set_labels(m, ns, name, labels)?;
    m.set_running(&p)?;
    Ok(p)
}

/// The `reviews` Service, its EndpointSlice (the test bed runs no controller manager: written
/// as the endpoint-slice controller would) and a DestinationRule with subsets by `version`.
pub fn reviews(m: &mut Mesh) -> Result<Reviews> {
    m.service_account(NS, "reviews")?;
    let mut pods = Vec::new();
    for v in ["v1", "v2"] {
        let name = format!("reviews-{v}");
        let labels = json!({"app": "reviews", "version": v});
        let p = labelled_pod(m, "node-b", &name, NS, "reviews", labels)?;
        let backend = p.pod.http_backend(PORT, v)?;
        pods.push((p, backend));
    }
    let kube = m.cp.kube();
    let svc = kube.apply(json!({
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "reviews", "namespace": NS},
        "spec": {"selector": {"app": "reviews"}, "ports": [{"name": "http", "port": PORT, "targetPort": PORT}]}
    }))?;
    let endpoints: Vec<Value> = pods
        .iter()
        .map(|(p, _)| {
            json!({"addresses": [p.pod.ip.to_string()], "conditions": {"ready": true, "serving": true, "terminating": false},
                   "nodeName": "node-b", "targetRef": {"kind": "Pod", "name": p.pod.name, "namespace": NS}})
        })
        .collect();
    kube.apply(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "reviews-1", "namespace": NS,
                     "labels": {"kubernetes.io/service-name": "reviews", "endpointslice.kubernetes.io/managed-by": "nodeway-bench"}},
        "addressType": "IPv4", "ports": [{"name": "http", "port": PORT, "protocol": "TCP"}], "endpoints": endpoints
    }))?;
    kube.apply(istio(
        "DestinationRule",
        "reviews",
        NS,
        json!({"host": HOST, "subsets": [{"name": "v1", "labels": {"version": "v1"}}, {"name": "v2", "labels": {"version": "v2"}}]}),
    ))?;
    let vip: std::net::Ipv4Addr = svc["spec"]["clusterIP"]
        .as_str()
        .context("Service without clusterIP")?
        .parse()?;
    Ok(Reviews {
        vip: SocketAddr::from((vip, PORT)),
        _pods: pods,
    })
}

/// Which subset answered one request from `client` (None: an error or a local reply).
fn answered_by(client: &Pod, vip: SocketAddr) -> Option<String> {
    let req = HttpRequest::get("/").authority(HOST).timeout(Duration::from_secs(2));
    let r = client.http_request(vip, req).ok()?;
    r.backend().map(str::to_string)
}

/// Polls every [`POLL`] until `client`'s request is answered by `subset`; the time it took.
fn until_answered(client: &Pod, vip: SocketAddr, subset: &str, limit: Duration) -> Result<f64> {
    let start = Instant::now();
    while start.elapsed() < limit {
        interrupt::check()?;
        if answered_by(client, vip).as_deref() == Some(subset) {
            return Ok(start.elapsed().as_secs_f64() * 1000.0);
        }
        std::thread::sleep(POLL);
    }
    bail!("requests not answered by subset {subset} within {limit:?} of the VirtualService write")
}

fn all_to(subset: &str) -> Value {
    istio(
        "VirtualService",
        "reviews",
        NS,
        json!({"hosts": [HOST], "http": [{"route": [{"destination": {"host": HOST, "subset": subset}}]}]}),
    )
}

/// `rounds` flips of the VirtualService between all-to-v1 and all-to-v2 (header-free), each
/// timed from its write returning to the first request the new subset answers.
pub fn vs_changes(m: &Mesh, client: &Pod, reviews: &Reviews, rounds: u32, limit: Duration) -> Result<VsFigures> {
    let kube = m.cp.kube();
    kube.apply(all_to("v1"))?;
    // The first route (and the class's first RDS/EDS for reviews) is not a change: wait it out.
    until_answered(client, reviews.vip, "v1", limit).context("the first VirtualService")?;
    let mut f = VsFigures::default();
    for round in 0..rounds {
        let subset = if round % 2 == 0 { "v2" } else { "v1" };
        let start = Instant::now();
        kube.apply(all_to(subset))?;
        f.vs_write_ms.push(start.elapsed().as_secs_f64() * 1000.0);
        f.vs_routed_ms.push(until_answered(client, reviews.vip, subset, limit)?);
    }
    kube.delete(&all_to("v1"))?;
    Ok(f)
}

/// One layout of captured pods on one node: how many classes it made and what they cost.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ClassRun {
    pub pods: u32,
    /// Distinct label sets among the pods (what the layout asks for).
    pub label_sets: u32,
    /// Entries of `/config_dump` `sidecarClasses`.
    pub class_streams: usize,
    /// Of those, the streams connected now.
    pub connected_streams: usize,
    /// Sidecar proxies connected to istiod (its `/debug/syncz`).
    pub istiod_sidecars: usize,
    /// From the agent's start (pods already Running) until every class is synced.
    pub synced_ms: f64,
    pub agent_rss_kib: u64,
    pub istiod_rss_kib: Option<u64>,
}

/// The classes on the node now: (classes, synced ones, connected ones, members over all).
fn class_counts(node: &Node) -> Option<(usize, usize, usize, usize)> {
    let (code, body) = http_get(node.admin, "/config_dump").ok()?;
    if code != 200 {
        return None;
    }
    let dump: Value = serde_json::from_str(&body).ok()?;
    let classes = dump["sidecarClasses"].as_array()?;
    let synced = classes.iter().filter(|c| c["synced"] == true).count();
    let connected = classes.iter().filter(|c| c["stream"]["connected"] == true).count();
    let members = classes
        .iter()
        .filter_map(|c| c["members"].as_array())
        .map(Vec::len)
        .sum();
    Some((classes.len(), synced, connected, members))
}

/// The sidecar proxies connected to istiod, from `/debug/syncz`: one entry per connected
/// proxy with its `proxy_type` (`/debug/connections` names connections by pod only, so the
/// node's own ztunnel-type stream could not be told apart there).
pub fn istiod_sidecars(m: &Mesh) -> Result<usize> {
    let body = m.cp.istiod_debug("/debug/syncz")?;
    let v: Value = serde_json::from_str(&body).context("istiod /debug/syncz: not JSON")?;
    let proxies = v.as_array().context("istiod /debug/syncz: not an array")?;
    Ok(proxies.iter().filter(|p| p["proxy_type"] == "sidecar").count())
}

/// The pods of a layout: pod `i` in label set `i % label_sets`, with service account
/// `i % accounts`. The accounts are the same in every layout, so the certificates are too and
/// only the streams differ.
fn class_pods(m: &mut Mesh, pods: u32, label_sets: u32, accounts: u32) -> Result<Vec<KubePod>> {
    for s in 0..accounts {
        m.service_account(CLASS_NS, &format!("sa-{s}"))?;
    }
    let mut out = Vec::new();
    for i in 0..pods {
        interrupt::check()?;
        let (set, sa) = (i % label_sets, format!("sa-{}", i % accounts));
        let labels = json!({"app": format!("app-{set}")});
        out.push(labelled_pod(m, "node-a", &format!("pod-{i}"), CLASS_NS, &sa, labels)?);
    }
    Ok(out)
}

/// A fresh mesh with `pods` captured pods in `label_sets` label sets on one node: the node's
/// class streams, istiod's sidecars and both processes' RSS once every class is synced.
pub fn class_layout(pods: u32, label_sets: u32, accounts: u32, limit: Duration) -> Result<ClassRun> {
    let mut m = Mesh::new(&format!("bench-classes-{label_sets}")).context("starting the control plane")?;
    m.namespace(CLASS_NS, true)?;
    let _pods = class_pods(&mut m, pods, label_sets, accounts)?;
    let start = Instant::now();
    let node = m.spawn_node("a", "node-a")?;
    let want = label_sets.min(pods) as usize;
    let mut last = None;
    let synced_ms = loop {
        interrupt::check()?;
        last = class_counts(&node).or(last);
        if let Some((n, synced, _, members)) = last {
            if n == want && synced == n && members == pods as usize {
                break start.elapsed().as_secs_f64() * 1000.0;
            }
        }
        if start.elapsed() > limit {
            bail!(
                "{pods} pods in {label_sets} classes: not all synced within {limit:?} (classes, synced, connected, members: {last:?})\n{}",
                tail(&node.log_text(), 40)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    // Let the first pushes' buffers go before reading memory (as an idle node would be).
    std::thread::sleep(Duration::from_secs(2));
    let (classes, _, connected, _) = class_counts(&node).context("/config_dump")?;
    Ok(ClassRun {
        pods,
        label_sets,
        class_streams: classes,
        connected_streams: connected,
        istiod_sidecars: istiod_sidecars(&m)?,
        synced_ms,
        agent_rss_kib: node.pid().and_then(rss_kib).unwrap_or(0),
        istiod_rss_kib: m.cp.istiod_pid().and_then(rss_kib),
    })
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
