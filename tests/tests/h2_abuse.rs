//! HTTP/2 abuse against every HTTP/2 server of a node: a rapid reset (CVE-2023-44487: HEADERS
//! then RST_STREAM, over and over) and a CONTINUATION flood (CVE-2024-27316 style: a header
//! block that never ends) against the h2c L7 listener (a captured client dialling a service
//! port with a route table) and against a pod's HBONE server (port 15008, mTLS with a dev-CA
//! client certificate). The frames come from the test's own writer
//! ([`nodeway_tests::h2raw`]), since `h2` will not send them.
//!
//! Each flood must end early, with GOAWAY `ENHANCE_YOUR_CALM` (or the connection closed) before
//! the test's bounded flood (in frames and time) is through, which also bounds the CPU it costs;
//! the agent's RSS stays within 64 MiB of its figure before the floods, and once a flood is cut
//! off the agent is idle again (CPU time is reported, not asserted, during the flood); a sibling connection
//! still gets 200 through the same L7 listener and HBONE server, during and after each flood.
//! With the guards turned off (`--http2-max-pending-resets 1000000`,
//! `--http2-max-header-list-size 4000000000`) the floods run whole and this test fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]
use std::{fs, net::SocketAddr, sync::Arc, time::Duration};

use nodeway_proxy::{
    hbone::tls::client_config,
    identity::{dev_ca::DevCa, Identity},
};
use nodeway_tests::{
    cpu_seconds,
    h2raw::{self, Ending},
    http::{HttpBackend, HttpRequest},
    require_root, rss_kib, Node, Pod, PodEntry, TestBed,
};
use rustls::pki_types::ServerName;

const PORT: u16 = 8080;
const VIP: &str = "198.19.0.10";
const HOST: &str = "web.demo.svc.cluster.local";
/// How much the agent's RSS may grow over the floods.
const RSS_BUDGET_KIB: u64 = 64 * 1024;
/// After a flood is cut off the agent is idle: it may use this much CPU time in [`IDLE_CHECK`]
/// (a loop left spinning on the flood's streams would use all of it).
const IDLE_CPU_BUDGET: f64 = 0.25;
const IDLE_CHECK: Duration = Duration::from_secs(1);
/// Every flood stops after this long (or its batch count) whatever the server does.
const FLOOD_TIME: Duration = Duration::from_secs(10);

fn vip() -> SocketAddr {
    SocketAddr::new(VIP.parse().unwrap(), PORT)
}

/// The node's config: `client`, `api` (the backend) in `demo`, `outsider` in `plain`; port
/// 8080 of the service routes to `api`.
fn node_config(pods: &[PodEntry<'_>], api: &Pod) -> String {
    nodeway_tests::routed_service_yaml(pods, api, HOST, VIP, PORT)
}

/// Where a flood goes.
#[derive(Clone, Copy, Debug)]
enum Target {
    /// The outbound h2c L7 listener, from the captured client.
    H2c,
    /// The api pod's HBONE server, from the outsider with a dev-CA certificate.
    Hbone,
}

#[derive(Clone, Copy, Debug)]
enum Attack {
    RapidReset,
    Continuation,
}

struct Bed {
    bed: TestBed,
    node: Node,
    client: Pod,
    api: Pod,
    outsider: Pod,
    _backend: HttpBackend,
}

impl Bed {
    fn start(name: &str, args: &[&str]) -> Bed {
        let mut bed = TestBed::new(name).unwrap();
        let client = bed.add_pod("client", "demo").unwrap();
        let api = bed.add_pod("api", "demo").unwrap();
        let outsider = bed.add_pod("outsider", "plain").unwrap();
        let cfg = bed.dir().join("node.yaml");
        let pods = [(&client).into(), (&api).into(), (&outsider).into()];
        fs::write(&cfg, node_config(&pods, &api)).unwrap();
        let node = Node::start(&bed, "a", &cfg, args).unwrap();
        let backend = HttpBackend::start(&api, PORT, "api").unwrap();
        Bed {
            bed,
            node,
            client,
            api,
            outsider,
            _backend: backend,
        }
    }

    /// A normal h2c request on a connection of its own: client → L7 listener → HBONE → api.
    fn sibling_status(&self) -> u16 {
        let req = HttpRequest::get("/sibling")
            .authority(format!("{HOST}:{PORT}"))
            .http2()
            .timeout(Duration::from_secs(10));
        self.client.http_request(vip(), req).map(|r| r.status).unwrap_or(0)
    }

    fn rss(&self) -> u64 {
        rss_kib(self.node.pid().unwrap()).unwrap()
    }

    fn cpu(&self) -> f64 {
        cpu_seconds(self.node.pid().unwrap()).unwrap()
    }

    /// Runs one flood (bounded in batches and [`FLOOD_TIME`]) and returns how it ended and
    /// how many batches went out of `max`.
    fn flood(&self, target: Target, attack: Attack) -> (Ending, u64, u64) {
        let (pod, to) = match target {
            Target::H2c => (&self.client, vip()),
            Target::Hbone => (&self.outsider, self.api.addr(15008)),
        };
        let block = match target {
            Target::H2c => h2raw::request_block("GET", &format!("{HOST}:{PORT}"), Some("/flood")),
            Target::Hbone => h2raw::request_block("CONNECT", &self.api.addr(PORT).to_string(), None),
        };
        let end_stream = matches!(target, Target::H2c);
        let max = match attack {
            Attack::RapidReset => 2_000,    // 100 streams each: 200 000 streams
            Attack::Continuation => 10_000, // 16 KiB each: 160 MiB of header block
        };
        let batch = move |i: u64| match attack {
            Attack::RapidReset => h2raw::rapid_reset_batch(&block, 1 + 200 * i as u32, 100, end_stream),
            Attack::Continuation => h2raw::continuation_batch(&block, i, 16, 1024),
        };
        let tls = match target {
            Target::H2c => None,
            Target::Hbone => {
                let ca = DevCa::load_or_create(&self.bed.dir().join("ca"), "cluster.local", Duration::from_secs(3600))
                    .unwrap();
                let cert = ca.issue(&Identity::new("cluster.local", "plain", "outsider")).unwrap();
                Some(client_config(&cert, Identity::new("cluster.local", "demo", "default")).unwrap())
            }
        };
        let tcp = pod.connect(to).unwrap().unwrap();
        let (ending, sent) = pod
            .run(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    tcp.set_nonblocking(true).unwrap();
                    let tcp = tokio::net::TcpStream::from_std(tcp).unwrap();
                    match tls {
                        None => h2raw::flood(tcp, batch, max, FLOOD_TIME).await,
                        Some(cfg) => {
                            let tls = tokio_rustls::TlsConnector::from(Arc::clone(&cfg))
                                .connect(ServerName::IpAddress(to.ip().into()), tcp)
                                .await
                                .unwrap();
                            h2raw::flood(tls, batch, max, FLOOD_TIME).await
                        }
                    }
                })
            })
            .unwrap();
        (ending, sent, max)
    }
}

#[test]
fn rapid_reset_and_continuation_floods_are_cut_off_while_siblings_are_served() {
    if !require_root() {
        return;
    }
    let b = Bed::start("h2abuse", &[]);
    // Warm up: the route, the HBONE pool and the backend connection exist before the baseline.
    for _ in 0..3 {
        assert_eq!(b.sibling_status(), 200);
    }
    let start = b.rss();
    let b = Arc::new(b);
    for target in [Target::H2c, Target::Hbone] {
        for attack in [Attack::RapidReset, Attack::Continuation] {
            let cpu_before = b.cpu();
            let flooder = {
                let b = b.clone();
                std::thread::spawn(move || b.flood(target, attack))
            };
            // A sibling connection is served while the flood runs (or right after it ended).
            assert_eq!(
                b.sibling_status(),
                200,
                "{target:?} {attack:?}: sibling during the flood"
            );
            let (ending, sent, max) = flooder.join().unwrap();
            let flood_cpu = b.cpu() - cpu_before;
            assert!(
                matches!(ending, Ending::GoAway(h2raw::ENHANCE_YOUR_CALM) | Ending::Closed),
                "{target:?} {attack:?}: the flood must be cut off, got {ending:?} after {sent}/{max} batches"
            );
            assert!(
                sent < max,
                "{target:?} {attack:?}: the whole flood was taken ({sent} batches)"
            );
            let rss = b.rss();
            assert!(
                rss < start + RSS_BUDGET_KIB,
                "{target:?} {attack:?}: RSS {rss} KiB, started at {start} KiB"
            );
            assert_eq!(
                b.sibling_status(),
                200,
                "{target:?} {attack:?}: sibling after the flood"
            );
            // Once cut off, the flood leaves no work behind: the agent is idle again.
            let idle_from = b.cpu();
            std::thread::sleep(IDLE_CHECK);
            let after = b.cpu() - idle_from;
            assert!(
                after < IDLE_CPU_BUDGET,
                "{target:?} {attack:?}: the agent used {after:.2} CPU-s in the {IDLE_CHECK:?} after the flood"
            );
            eprintln!(
                "{target:?} {attack:?}: {ending:?} after {sent}/{max} batches; agent CPU {flood_cpu:.2} s during the \
                 flood, {after:.2} s in the {IDLE_CHECK:?} after; RSS {start} -> {rss} KiB"
            );
        }
    }
    let log = b.node.log_text();
    assert!(!log.contains("panicked"), "{log}");
}
