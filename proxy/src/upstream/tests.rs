use std::{collections::HashMap, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{Request, Version};
use http_body_util::{BodyExt, Empty, Full};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

use super::{lb, Body, BoxIo, ClusterState, Connect, Connecting, Outcome, UpstreamError, Upstreams};
use crate::cluster::{Cluster, Discovery, Endpoint, Health, LbPolicy, Limits, OutlierDetection, UpstreamProtocol};

fn addr(i: u32) -> SocketAddr {
    SocketAddr::from(([10, 0, (i / 250) as u8, (i % 250) as u8 + 1], 8080))
}

fn ep(i: u32, weight: u32, priority: u32, health: Health) -> Endpoint {
    Endpoint {
        address: addr(i),
        weight,
        priority,
        health,
    }
}

fn healthy(n: u32) -> Vec<Endpoint> {
    (0..n).map(|i| ep(i, 1, 0, Health::Healthy)).collect()
}

fn cluster(lb_policy: LbPolicy) -> Cluster {
    Cluster {
        name: "outbound|80||test".into(),
        discovery: Discovery::Static,
        lb_policy,
        connect_timeout: Duration::from_secs(1),
        limits: Limits::default(),
        outlier_detection: None,
        load_assignment: None,
        upstream_protocol: UpstreamProtocol::Http1,
        istio_config: None,
    }
}

fn od(consecutive_5xx: u32, base: Duration, max_percent: u32) -> OutlierDetection {
    OutlierDetection {
        consecutive_5xx,
        consecutive_gateway_failure: 0,
        interval: Duration::from_secs(10),
        base_ejection_time: base,
        max_ejection_time: base * 10,
        max_ejection_percent: max_percent,
        enforcing_consecutive_5xx: 100,
        enforcing_consecutive_gateway_failure: 0,
    }
}

fn state(c: Cluster, endpoints: &[Endpoint]) -> (Upstreams, Arc<ClusterState>) {
    let u = Upstreams::new();
    let s = u.cluster(&Arc::new(c), endpoints);
    (u, s)
}

fn counts(s: &ClusterState, n: usize, hash: impl Fn(usize) -> Option<u64>) -> HashMap<SocketAddr, usize> {
    let mut m = HashMap::new();
    for i in 0..n {
        *m.entry(s.pick(hash(i), &[], 1).expect("a host")).or_default() += 1;
    }
    m
}

#[test]
fn xxhash64_known_vectors() {
    assert_eq!(lb::xxhash64(b"", 0), 0xEF46_DB37_51D8_E999);
    assert_eq!(lb::xxhash64(b"abc", 0), 0x44BC_2CF5_AD77_0999);
}

#[test]
fn round_robin_follows_weights_smoothly() {
    let eps = vec![
        ep(0, 1, 0, Health::Healthy),
        ep(1, 2, 0, Health::Healthy),
        ep(2, 3, 0, Health::Healthy),
    ];
    let (_u, s) = state(cluster(LbPolicy::RoundRobin), &eps);
    let c = counts(&s, 1200, |_| None);
    assert_eq!(c[&addr(0)], 200);
    assert_eq!(c[&addr(1)], 400);
    assert_eq!(c[&addr(2)], 600);
    // Smooth: the heavy host never gets 3 in a row out of a 6-pick cycle.
    let seq: Vec<SocketAddr> = (0..6).filter_map(|_| s.pick(None, &[], 1)).collect();
    assert!(seq.windows(3).all(|w| !(w[0] == w[1] && w[1] == w[2])), "{seq:?}");
}

#[test]
fn random_follows_weights() {
    let eps = vec![ep(0, 1, 0, Health::Healthy), ep(1, 3, 0, Health::Healthy)];
    let (_u, s) = state(cluster(LbPolicy::Random), &eps);
    let c = counts(&s, 4000, |_| None);
    let share = c[&addr(1)] as f64 / 4000.0;
    assert!((0.70..0.80).contains(&share), "{share}");
}

#[test]
fn least_request_prefers_idle_hosts() {
    let (_u, s) = state(cluster(LbPolicy::LeastRequest { choice_count: 2 }), &healthy(2));
    let busy = s.host_stats(addr(0)).expect("host");
    busy.active.store(10, std::sync::atomic::Ordering::Relaxed);
    let c = counts(&s, 1000, |_| None);
    // P2C picks the busy host only when both samples land on it (~25%).
    let idle = c.get(&addr(1)).copied().unwrap_or(0);
    assert!(idle > 650, "{c:?}");
    // With choice_count large enough, the idle host wins essentially always.
    let (_u, s) = state(cluster(LbPolicy::LeastRequest { choice_count: 20 }), &healthy(2));
    s.host_stats(addr(0))
        .expect("host")
        .active
        .store(10, std::sync::atomic::Ordering::Relaxed);
    let c = counts(&s, 200, |_| None);
    assert!(c.get(&addr(1)).copied().unwrap_or(0) >= 199, "{c:?}");
}

#[test]
fn ring_hash_is_stable_and_minimally_disruptive() {
    let policy = LbPolicy::RingHash {
        minimum_ring_size: 1024,
        maximum_ring_size: 8 * 1024 * 1024,
    };
    let (u, s) = state(cluster(policy), &healthy(5));
    let keys: Vec<u64> = (0..2000u64).map(|k| lb::xxhash64(&k.to_le_bytes(), 0)).collect();
    let before: Vec<SocketAddr> = keys.iter().filter_map(|&h| s.pick(Some(h), &[], 1)).collect();
    let again: Vec<SocketAddr> = keys.iter().filter_map(|&h| s.pick(Some(h), &[], 1)).collect();
    assert_eq!(before, again);
    // Every host gets a fair share.
    for i in 0..5 {
        let n = before.iter().filter(|a| **a == addr(i)).count();
        assert!((250..550).contains(&n), "host {i}: {n}");
    }
    // Remove host 2: its keys move; as in Envoy the others get ceil(min/n) points each, a few
    // more than before, so some of their keys move too, but few.
    let fewer: Vec<Endpoint> = healthy(5).into_iter().filter(|e| e.address != addr(2)).collect();
    let s2 = u.cluster(&Arc::new(cluster(policy)), &fewer);
    let mut moved = 0;
    for (h, old) in keys.iter().zip(&before) {
        let new = s2.pick(Some(*h), &[], 1).expect("host");
        if *old == addr(2) {
            assert_ne!(new, addr(2));
        } else if new != *old {
            moved += 1;
        }
    }
    assert!(moved < keys.len() / 4, "{moved} keys of remaining hosts moved");
    // A retry excluding the first choice lands on another host.
    let first = s2.pick(Some(keys[0]), &[], 1).expect("host");
    let second = s2.pick(Some(keys[0]), &[first], 3).expect("host");
    assert_ne!(first, second);
}

#[test]
fn ring_hash_respects_weights() {
    let eps = vec![ep(0, 1, 0, Health::Healthy), ep(1, 3, 0, Health::Healthy)];
    let (_u, s) = state(
        cluster(LbPolicy::RingHash {
            minimum_ring_size: 4096,
            maximum_ring_size: 1 << 20,
        }),
        &eps,
    );
    let c = counts(&s, 8000, |i| Some(lb::xxhash64(&(i as u64).to_le_bytes(), 7)));
    let share = c[&addr(1)] as f64 / 8000.0;
    assert!((0.68..0.82).contains(&share), "{share}");
}

#[test]
fn maglev_is_consistent() {
    let policy = LbPolicy::Maglev { table_size: 65537 };
    let (u, s) = state(cluster(policy), &healthy(5));
    let keys: Vec<u64> = (0..3000u64).map(|k| lb::xxhash64(&k.to_le_bytes(), 3)).collect();
    let before: Vec<SocketAddr> = keys.iter().filter_map(|&h| s.pick(Some(h), &[], 1)).collect();
    for i in 0..5 {
        let n = before.iter().filter(|a| **a == addr(i)).count();
        assert!((450..750).contains(&n), "host {i}: {n}");
    }
    // Endpoint order does not matter.
    let mut reversed = healthy(5);
    reversed.reverse();
    let s_rev = u.cluster(&Arc::new(cluster(policy)), &reversed);
    for (h, old) in keys.iter().zip(&before) {
        assert_eq!(s_rev.pick(Some(*h), &[], 1), Some(*old));
    }
    // Removing a host moves its keys and only a few others (Maglev's bound, not ring-perfect).
    let fewer: Vec<Endpoint> = healthy(5).into_iter().filter(|e| e.address != addr(4)).collect();
    let s2 = u.cluster(&Arc::new(cluster(policy)), &fewer);
    let moved = keys
        .iter()
        .zip(&before)
        .filter(|(h, old)| **old != addr(4) && s2.pick(Some(**h), &[], 1) != Some(**old))
        .count();
    assert!(moved < 150, "{moved} keys of remaining hosts moved");
    // A non-prime table size still works.
    let (_u, s3) = state(cluster(LbPolicy::Maglev { table_size: 1000 }), &healthy(3));
    assert!(s3.pick(Some(42), &[], 1).is_some());
}

#[test]
fn priority_degraded_and_panic() {
    let eps = vec![
        ep(0, 1, 0, Health::Unhealthy),
        ep(1, 1, 0, Health::Degraded),
        ep(2, 1, 1, Health::Healthy),
        ep(3, 1, 1, Health::Degraded),
    ];
    let (u, s) = state(cluster(LbPolicy::RoundRobin), &eps);
    // Priority 0 has no healthy host: priority 1's healthy one.
    assert_eq!(
        counts(&s, 10, |_| None).keys().copied().collect::<Vec<_>>(),
        vec![addr(2)]
    );
    // No healthy anywhere: degraded, lowest priority first.
    let eps2 = vec![
        ep(0, 1, 0, Health::Unhealthy),
        ep(1, 1, 0, Health::Degraded),
        ep(3, 1, 1, Health::Degraded),
    ];
    let s = u.cluster(&Arc::new(cluster(LbPolicy::RoundRobin)), &eps2);
    assert_eq!(
        counts(&s, 10, |_| None).keys().copied().collect::<Vec<_>>(),
        vec![addr(1)]
    );
    // Healthy in priority 0 wins over everything.
    let eps3 = vec![
        ep(0, 1, 0, Health::Healthy),
        ep(1, 1, 0, Health::Degraded),
        ep(2, 1, 1, Health::Healthy),
    ];
    let s = u.cluster(&Arc::new(cluster(LbPolicy::RoundRobin)), &eps3);
    assert_eq!(
        counts(&s, 10, |_| None).keys().copied().collect::<Vec<_>>(),
        vec![addr(0)]
    );
    // All unhealthy: panic mode, every host of the lowest priority.
    let eps4 = vec![
        ep(0, 1, 0, Health::Unhealthy),
        ep(1, 1, 0, Health::Unhealthy),
        ep(2, 1, 1, Health::Unhealthy),
    ];
    let s = u.cluster(&Arc::new(cluster(LbPolicy::RoundRobin)), &eps4);
    let c = counts(&s, 10, |_| None);
    assert_eq!(c.len(), 2);
    assert_eq!(c[&addr(0)], 5);
    // No endpoints: None.
    let s = u.cluster(&Arc::new(cluster(LbPolicy::RoundRobin)), &[]);
    assert_eq!(s.pick(None, &[], 1), None);
}

#[test]
fn exclude_avoids_tried_hosts() {
    let (_u, s) = state(cluster(LbPolicy::Random), &healthy(3));
    for _ in 0..50 {
        let a = s.pick(None, &[addr(0), addr(1)], 1);
        assert_eq!(a, Some(addr(2)));
    }
    // Everything excluded: still a host (best effort).
    assert!(s.pick(None, &[addr(0), addr(1), addr(2)], 1).is_some());
}

#[test]
fn outlier_ejects_after_consecutive_5xx_and_returns() {
    let mut c = cluster(LbPolicy::RoundRobin);
    c.outlier_detection = Some(od(3, Duration::from_millis(80), 100));
    let (_u, s) = state(c, &healthy(3));
    s.report(addr(0), Outcome::Status(503));
    s.report(addr(0), Outcome::Status(500));
    s.report(addr(0), Outcome::Status(200)); // a success resets the streak
    s.report(addr(0), Outcome::Status(502));
    s.report(addr(0), Outcome::ConnectFailure);
    // The cluster's own breaker overflowing says nothing of the endpoint: not counted, and
    // the streak is neither reset nor advanced.
    for _ in 0..5 {
        s.report(addr(0), Outcome::Overflow);
    }
    assert_eq!(s.counters().outlier_detection_ejections_enforced_total, 0);
    s.report(addr(0), Outcome::Reset);
    let k = s.counters();
    assert_eq!(k.outlier_detection_ejections_enforced_total, 1);
    assert_eq!(k.outlier_detection_ejections_active, 1);
    assert!(!counts(&s, 30, |_| None).contains_key(&addr(0)));
    std::thread::sleep(Duration::from_millis(100));
    assert!(counts(&s, 30, |_| None).contains_key(&addr(0)));
    assert_eq!(s.counters().outlier_detection_ejections_active, 0);
    // Second ejection lasts twice as long (base × times ejected).
    for _ in 0..3 {
        s.report(addr(0), Outcome::Status(500));
    }
    let st = super::Upstreams::status(&_u);
    let e = st[0].endpoints.iter().find(|e| e.address == addr(0)).expect("endpoint");
    assert!(e.ejected && e.times_ejected == 2);
    assert!(e.ejected_for_ms.is_some_and(|ms| ms > 100), "{e:?}");
}

#[test]
fn ejection_multiplier_decays_with_healthy_intervals() {
    let mut c = cluster(LbPolicy::RoundRobin);
    let mut d = od(1, Duration::from_millis(20), 100);
    d.interval = Duration::from_millis(20);
    c.outlier_detection = Some(d);
    let (u, s) = state(c, &healthy(2));
    s.report(addr(0), Outcome::Status(500));
    std::thread::sleep(Duration::from_millis(100)); // ejection over, then ~4 healthy intervals
    assert!(s.pick(None, &[addr(1)], 1).is_some());
    s.report(addr(0), Outcome::Status(500));
    let st = u.status();
    let e = st[0].endpoints.iter().find(|e| e.address == addr(0)).expect("endpoint");
    assert_eq!(e.times_ejected, 1, "{e:?}");
}

#[test]
fn outlier_gateway_failures() {
    let mut c = cluster(LbPolicy::RoundRobin);
    let mut d = od(0, Duration::from_secs(30), 100);
    d.consecutive_gateway_failure = 2;
    d.enforcing_consecutive_gateway_failure = 100;
    c.outlier_detection = Some(d);
    let (_u, s) = state(c, &healthy(2));
    s.report(addr(1), Outcome::Status(500)); // not a gateway failure
    s.report(addr(1), Outcome::Status(503));
    assert_eq!(s.counters().outlier_detection_ejections_enforced_total, 0);
    s.report(addr(1), Outcome::Timeout);
    assert_eq!(s.counters().outlier_detection_ejections_enforced_total, 1);
    assert_eq!(
        s.counters()
            .outlier_detection_ejections_detected_consecutive_gateway_failure,
        1
    );
}

#[test]
fn outlier_respects_max_ejection_percent_and_panics() {
    let mut c = cluster(LbPolicy::RoundRobin);
    c.outlier_detection = Some(od(1, Duration::from_secs(30), 50));
    let (u, s) = state(c, &healthy(4));
    for i in 0..4 {
        s.report(addr(i), Outcome::Status(500));
    }
    let k = s.counters();
    assert_eq!(k.outlier_detection_ejections_active, 2);
    assert_eq!(k.outlier_detection_ejections_overflow, 2);
    // Ejections survive a config refresh for addresses that remain.
    let mut c2 = cluster(LbPolicy::RoundRobin);
    c2.outlier_detection = Some(od(1, Duration::from_secs(30), 50));
    let s = u.cluster(&Arc::new(c2), &healthy(5));
    assert_eq!(s.counters().outlier_detection_ejections_active, 2);
    assert!(!counts(&s, 20, |_| None).contains_key(&addr(0)));

    // A low percentage still allows one ejection (Envoy docs); with 1 of 1 ejected: panic.
    let mut c = cluster(LbPolicy::RoundRobin);
    c.outlier_detection = Some(od(1, Duration::from_secs(30), 10));
    let (_u, s) = state(c, &healthy(1));
    s.report(addr(0), Outcome::Status(500));
    assert_eq!(s.counters().outlier_detection_ejections_active, 1);
    assert_eq!(s.pick(None, &[], 1), Some(addr(0)));
}

#[test]
fn circuit_breakers_admit_and_overflow() {
    let mut c = cluster(LbPolicy::RoundRobin);
    c.limits.max_requests = 2;
    c.limits.max_retries = 1;
    let (_u, s) = state(c, &healthy(1));
    let a = s.admit_request().expect("first");
    let _b = s.admit_request().expect("second");
    assert!(s.admit_request().is_err());
    drop(a);
    let _c = s.admit_request().expect("freed");
    let r = s.admit_retry().expect("retry");
    assert!(s.admit_retry().is_err());
    drop(r);
    assert!(s.admit_retry().is_ok());
    let k = s.counters();
    assert_eq!(k.upstream_rq_pending_overflow, 1);
    assert_eq!(k.upstream_rq_retry, 2);
    assert_eq!(k.upstream_rq_retry_overflow, 1);
    assert_eq!(k.upstream_rq_active, 2);
}

/// A minimal HTTP/1.1 server: answers each request after `delay`, keeping connections alive;
/// counts accepted connections.
async fn slow_server(delay: Duration) -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let a = l.local_addr().expect("addr");
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let acc = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            acc.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                loop {
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    buf.clear();
                    tokio::time::sleep(delay).await;
                    let resp = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                    if s.write_all(resp).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (a, accepted)
}

fn get() -> Request<Body> {
    Request::get("http://example.com/x")
        .body(Empty::<Bytes>::new().map_err(|e| match e {}).boxed())
        .expect("request")
}

/// Plain TCP to the endpoint, as source "pod".
struct Tcp;

impl Connect for Tcp {
    fn source(&self) -> &str {
        "pod"
    }

    fn connect(&self, endpoint: SocketAddr) -> Connecting<'_> {
        Box::pin(async move { Ok(Box::new(TcpStream::connect(endpoint).await?) as BoxIo) })
    }
}

#[tokio::test]
async fn pool_reuses_http1_connections() {
    let (a, accepted) = slow_server(Duration::ZERO).await;
    let mut c = cluster(LbPolicy::RoundRobin);
    c.load_assignment = None;
    let (_u, s) = state(c, &[ep(0, 1, 0, Health::Healthy)]);
    for _ in 0..5 {
        let resp = s.send(&Tcp, a, Version::HTTP_11, get()).await.expect("send");
        assert_eq!(resp.status(), 200);
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(&body[..], b"ok");
        tokio::time::sleep(Duration::from_millis(10)).await; // the connection goes back to the pool
    }
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
    let k = s.counters();
    assert_eq!(k.upstream_cx_total, 1);
    assert_eq!(k.upstream_rq_total, 5);
}

#[tokio::test]
async fn pool_honours_max_requests_per_connection() {
    let (a, accepted) = slow_server(Duration::ZERO).await;
    let mut c = cluster(LbPolicy::RoundRobin);
    c.limits.max_requests_per_connection = 2;
    let (_u, s) = state(c, &[]);
    for _ in 0..4 {
        let resp = s.send(&Tcp, a, Version::HTTP_11, get()).await.expect("send");
        resp.into_body().collect().await.expect("body");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 2);
}

#[tokio::test]
async fn pool_pending_overflow() {
    let (a, accepted) = slow_server(Duration::from_millis(200)).await;
    let mut c = cluster(LbPolicy::RoundRobin);
    c.limits.max_connections = 1;
    c.limits.max_pending_requests = 1;
    let (_u, s) = state(c, &[]);
    let one = || {
        let s = s.clone();
        async move {
            let resp = s.send(&Tcp, a, Version::HTTP_11, get()).await?;
            let _ = resp.into_body().collect().await;
            Ok::<_, UpstreamError>(())
        }
    };
    let (r1, r2, r3) = tokio::join!(
        one(),
        async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            one().await
        },
        async {
            tokio::time::sleep(Duration::from_millis(40)).await;
            one().await
        }
    );
    let results = [r1, r2, r3];
    let overflows = results
        .iter()
        .filter(|r| matches!(r, Err(UpstreamError::Overflow)))
        .count();
    assert_eq!(overflows, 1, "{results:?}");
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 2);
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
    let k = s.counters();
    assert_eq!(k.upstream_rq_pending_overflow, 1);
    assert_eq!(k.upstream_rq_pending_total, 1);
    assert_eq!(k.upstream_rq_pending_active, 0);
}

#[tokio::test]
async fn connect_failure_is_reported() {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let a = l.local_addr().expect("addr");
    drop(l);
    let (_u, s) = state(cluster(LbPolicy::RoundRobin), &[]);
    let r = s.send(&Tcp, a, Version::HTTP_11, get()).await;
    assert!(matches!(r, Err(UpstreamError::ConnectFailure(_))), "{r:?}");
    let k = s.counters();
    assert_eq!(k.upstream_cx_connect_fail, 1);
    assert_eq!(k.upstream_cx_active, 0);
}

#[tokio::test]
async fn http2_multiplexes_on_one_connection() {
    use hyper::{server::conn::http2 as server, service::service_fn};
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let a = l.local_addr().expect("addr");
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let acc = accepted.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            acc.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let svc = service_fn(|req: Request<hyper::body::Incoming>| async move {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    let host = req.uri().authority().map(|a| a.to_string()).unwrap_or_default();
                    Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::from(host))))
                });
                let _ = server::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    let mut c = cluster(LbPolicy::RoundRobin);
    c.limits.max_connections = 1;
    c.limits.max_pending_requests = 0;
    let (_u, s) = state(c, &[]);
    // The first opens the connection; the rest multiplex on it without pending.
    let first = s.send(&Tcp, a, Version::HTTP_2, get()).await.expect("send");
    let body = first.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(&body[..], b"example.com");
    let tasks: Vec<_> = (0..5)
        .map(|_| {
            let s = s.clone();
            tokio::spawn(async move { s.send(&Tcp, a, Version::HTTP_2, get()).await.map(|r| r.status()) })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.expect("task").expect("send"), 200);
    }
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(s.counters().upstream_cx_total, 1);
}
