//! What the demo expects to see, as checks over what it observed (`/connections` entries, the
//! Prometheus text, the access log). Pure functions, so a broken expectation is unit-tested
//! without a network namespace.
use std::net::{IpAddr, SocketAddr};

use anyhow::{bail, Result};
use nodeway_tests::metric_value;
use serde_json::Value;

/// The identities the example config gives the client and both server versions.
pub const CLIENT_ID: &str = "spiffe://cluster.local/ns/demo/sa/client";
pub const SERVER_ID: &str = "spiffe://cluster.local/ns/demo/sa/server";
/// The service the route table "8080" routes.
pub const HOST: &str = "server.demo.svc.cluster.local";

/// The checks run so far and the ones that failed, each failure one line.
#[derive(Debug, Default)]
pub struct Checks {
    total: usize,
    failed: Vec<String>,
}

impl Checks {
    /// Prints `ok: what`, or `FAILED: what (got ...)` and remembers it.
    pub fn expect(&mut self, ok: bool, what: &str, got: impl FnOnce() -> String) {
        self.total += 1;
        if ok {
            println!("  \x1b[32mok\x1b[0m: {what}");
        } else {
            let line = format!("{what} (got {})", got());
            println!("  \x1b[31mFAILED\x1b[0m: {line}");
            self.failed.push(line);
        }
    }

    #[cfg(test)]
    pub fn failed(&self) -> &[String] {
        &self.failed
    }

    /// Ok when every check passed; else an error, after one line per failed check on stderr.
    pub fn verdict(&self) -> Result<()> {
        if self.failed.is_empty() {
            println!("\nall {} checks passed", self.total);
            return Ok(());
        }
        eprintln!("\ndemo: {} of {} checks failed:", self.failed.len(), self.total);
        for line in &self.failed {
            eprintln!("  FAILED: {line}");
        }
        bail!("{} of {} demo checks failed", self.failed.len(), self.total)
    }
}

/// A sample value as Prometheus would print it (an empty sum is `-0.0` in Rust).
fn num(x: f64) -> String {
    (x + 0.0).to_string()
}

/// One connection half on `/connections`: its direction and where it goes.
pub fn half<'a>(conns: &'a [Value], direction: &str, to: SocketAddr) -> Option<&'a Value> {
    conns
        .iter()
        .find(|c| c["direction"] == direction && c["destination"] == to.to_string())
}

fn source_ip(conn: &Value) -> Option<IpAddr> {
    let addr: SocketAddr = conn["source"].as_str()?.parse().ok()?;
    Some(addr.ip())
}

fn brief(conns: &[Value]) -> String {
    let halves: Vec<String> = conns
        .iter()
        .map(|c| format!("{} {} -> {}", c["direction"], c["source"], c["destination"]))
        .collect();
    format!("[{}]", halves.join(", "))
}

/// The TCP labels of the client's mutual-TLS connection to `server-v1`, seen by `reporter`.
pub fn mtls_labels(reporter: &str) -> [(&str, &str); 5] {
    [
        ("reporter", reporter),
        ("destination_workload", "server-v1"),
        ("source_principal", CLIENT_ID),
        ("destination_principal", SERVER_ID),
        ("connection_security_policy", "mutual_tls"),
    ]
}

/// (a) While client -> `server` (a TCP port without a route table) is open: both halves on
/// `/connections`, and counted opened (not closed) with both principals by both proxies.
pub fn l4_open(c: &mut Checks, conns: &[Value], metrics: &str, client: IpAddr, server: SocketAddr) {
    let out = half(conns, "outbound", server);
    c.expect(
        out.is_some_and(|o| {
            o["sourceWorkload"] == "client" && o["destinationWorkload"] == "server-v1" && source_ip(o) == Some(client)
        }),
        &format!("/connections: the client's proxy holds the outbound half client -> {server}"),
        || brief(conns),
    );
    c.expect(
        half(conns, "inbound", server).is_some_and(|i| i["sourceWorkload"] == "client"),
        &format!("/connections: server-v1's proxy holds the inbound half (handed over from the client's) to {server}"),
        || brief(conns),
    );
    for reporter in ["source", "destination"] {
        let labels = mtls_labels(reporter);
        let opened = metric_value(metrics, "istio_tcp_connections_opened_total", &labels);
        let closed = metric_value(metrics, "istio_tcp_connections_closed_total", &labels);
        c.expect(
            opened == 1.0 && closed == 0.0,
            &format!(
                "istio_tcp_connections_opened_total{{reporter=\"{reporter}\"}} 1, closed 0: connection_security_policy=\"mutual_tls\", {CLIENT_ID} -> {SERVER_ID}"
            ),
            || format!("opened {}, closed {}", num(opened), num(closed)),
        );
    }
}

/// (a) After the exchange: the bytes came back, and the source proxy counted them and the close.
pub fn l4_closed(c: &mut Checks, sent: &[u8], back: &[u8], metrics: &str) {
    c.expect(
        back == sent,
        "the echo came back byte for byte through both proxies",
        || format!("{:?}", String::from_utf8_lossy(back)),
    );
    let labels = mtls_labels("source");
    let closed = metric_value(metrics, "istio_tcp_connections_closed_total", &labels);
    let received = metric_value(metrics, "istio_tcp_received_bytes_total", &labels);
    c.expect(
        closed == 1.0 && received == sent.len() as f64,
        &format!(
            "istio_tcp_connections_closed_total 1 and istio_tcp_received_bytes_total {} (reporter=\"source\", mutual_tls)",
            sent.len()
        ),
        || format!("closed {}, received bytes {}", num(closed), num(received)),
    );
    let handed = metric_value(metrics, "nodeway_same_node_connections_total", &[]);
    c.expect(
        handed == 1.0,
        "nodeway_same_node_connections_total 1: the connection never left the node's memory for TLS",
        || format!("{} hand-overs", num(handed)),
    );
}

/// One HTTP request the demo sent to the service and who answered it.
pub struct Answer {
    /// What was sent, e.g. `GET /hello  x-version: v2`.
    pub request: String,
    pub expected: &'static str,
    pub status: Option<u16>,
    pub backend: Option<String>,
}

/// (b) Each request answered 200 by the version the route table sends it to.
pub fn http_answers(c: &mut Checks, answers: &[Answer]) {
    for a in answers {
        c.expect(
            a.status == Some(200) && a.backend.as_deref() == Some(a.expected),
            &format!("{} -> 200 from {}", a.request, a.expected),
            || format!("{:?} from {:?}", a.status, a.backend),
        );
    }
}

/// The source proxy's `istio_requests_total` labels of 200s to `workload` of the service.
pub fn request_labels(workload: &str) -> [(&str, &str); 5] {
    [
        ("reporter", "source"),
        ("response_code", "200"),
        ("destination_service", HOST),
        ("destination_workload", workload),
        ("connection_security_policy", "mutual_tls"),
    ]
}

/// (b) `istio_requests_total` counted each version's requests on the source side.
pub fn http_metrics(c: &mut Checks, metrics: &str, v1: usize, v2: usize) {
    for (workload, n) in [("server-v1", v1), ("server-v2", v2)] {
        let got = metric_value(metrics, "istio_requests_total", &request_labels(workload));
        c.expect(
            got == n as f64,
            &format!(
                "istio_requests_total{{reporter=\"source\",response_code=\"200\",destination_service=\"{HOST}\",destination_workload=\"{workload}\"}} {n}"
            ),
            || num(got),
        );
    }
}

/// The access log's JSON lines (nodeway's stdout) that name `route`.
pub fn access_log_lines(log: &str, route: &str) -> Vec<Value> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["route_name"] == route)
        .collect()
}

/// (b) One access log line per routed request, naming the route and the subset cluster.
pub fn http_access_log(c: &mut Checks, log: &str, v1: usize, v2: usize) {
    for (route, subset, n) in [("default", "v1", v1), ("v2-by-header", "v2", v2)] {
        let cluster = format!("outbound|8080|{subset}|{HOST}");
        let lines = access_log_lines(log, route);
        let matching = lines
            .iter()
            .filter(|l| l["response_code"] == 200 && l["upstream_cluster"] == cluster.as_str())
            .count();
        c.expect(
            matching == n && lines.len() == n,
            &format!("access log: {n} line(s) with route_name \"{route}\", response_code 200, upstream_cluster \"{cluster}\""),
            || format!("{} line(s) for the route, {matching} matching", lines.len()),
        );
    }
}

/// (c) `/captured` captures the `demo` pods and leaves `web` alone.
pub fn captured(c: &mut Checks, captured: &Value) {
    let pods = captured["pods"].as_array().cloned().unwrap_or_default();
    let state = |name: &str| pods.iter().find(|p| p["name"] == name).map(|p| p["captured"].clone());
    for (name, want) in [
        ("client", true),
        ("server-v1", true),
        ("server-v2", true),
        ("web", false),
    ] {
        c.expect(
            state(name) == Some(Value::Bool(want)),
            &format!("/captured: {name} captured={want}"),
            || format!("{:?}", state(name)),
        );
    }
}

/// (c) While client -> `web` is open: the client's proxy holds the outbound half; `web` has no
/// proxy, so there is no inbound half.
pub fn to_uncaptured_open(c: &mut Checks, conns: &[Value], web: SocketAddr) {
    c.expect(
        half(conns, "outbound", web).is_some_and(|o| o["sourceWorkload"] == "client"),
        &format!("/connections: the client's proxy holds client -> {web} (plain TCP out)"),
        || brief(conns),
    );
    c.expect(
        half(conns, "inbound", web).is_none(),
        &format!("/connections: no inbound half to {web} (web has no proxy)"),
        || brief(conns),
    );
}

/// (c) What `web`'s app saw: the client pod's own address and the bytes as the client sent them
/// (plain TCP; HBONE would be TLS).
pub fn uncaptured_saw(c: &mut Checks, seen: Option<(IpAddr, Vec<u8>)>, client: IpAddr, sent: &[u8]) {
    let (peer, bytes) = match &seen {
        Some((p, b)) => (Some(*p), Some(b.as_slice())),
        None => (None, None),
    };
    c.expect(
        peer == Some(client),
        &format!("web's app saw the connection come from the client pod's address {client}"),
        || format!("{peer:?}"),
    );
    c.expect(
        bytes == Some(sent),
        "web's app got the client's bytes as sent (plain TCP, no TLS)",
        || format!("{:?}", bytes.map(String::from_utf8_lossy)),
    );
}

/// (c) While web -> `server` is open: no proxy holds an outbound half from `web`; server-v1's
/// proxy holds the inbound half (PERMISSIVE), labelled `none`, and no source proxy reported it.
pub fn from_uncaptured_open(c: &mut Checks, conns: &[Value], metrics: &str, web: IpAddr, server: SocketAddr) {
    c.expect(
        !conns
            .iter()
            .any(|x| x["direction"] == "outbound" && source_ip(x) == Some(web)),
        &format!("/connections: no outbound half from web {web} (its traffic is not proxied)"),
        || brief(conns),
    );
    c.expect(
        conns.iter().any(|i| {
            i["direction"] == "inbound" && i["destination"] == server.to_string() && source_ip(i) == Some(web)
        }),
        &format!("/connections: server-v1's proxy holds the inbound half from web to {server}"),
        || brief(conns),
    );
    let from_web = |reporter| {
        metric_value(
            metrics,
            "istio_tcp_connections_opened_total",
            &[("reporter", reporter), ("source_workload", "web")],
        )
    };
    let plain = metric_value(
        metrics,
        "istio_tcp_connections_opened_total",
        &[
            ("reporter", "destination"),
            ("source_workload", "web"),
            ("connection_security_policy", "none"),
        ],
    );
    c.expect(
        from_web("source") == 0.0 && plain == 1.0,
        "istio_tcp_connections_opened_total from web: reporter=\"destination\" with connection_security_policy=\"none\" 1, reporter=\"source\" 0",
        || format!("destination/none {}, source {}", num(plain), num(from_web("source"))),
    );
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const CLIENT: &str = "198.18.7.2";

    fn server() -> SocketAddr {
        "198.18.7.3:9000".parse().expect("addr")
    }

    fn conn(direction: &str, source: &str, to: SocketAddr) -> Value {
        json!({"direction": direction, "source": source, "destination": to.to_string(),
               "sourceWorkload": "client", "destinationWorkload": "server-v1"})
    }

    fn tcp_metrics(opened: u32, closed: u32, policy: &str) -> String {
        let mut text = String::new();
        for reporter in ["source", "destination"] {
            let labels = format!(
                "reporter=\"{reporter}\",destination_workload=\"server-v1\",source_principal=\"{CLIENT_ID}\",destination_principal=\"{SERVER_ID}\",connection_security_policy=\"{policy}\""
            );
            text += &format!("istio_tcp_connections_opened_total{{{labels}}} {opened}\n");
            text += &format!("istio_tcp_connections_closed_total{{{labels}}} {closed}\n");
        }
        text
    }

    fn l4(conns: &[Value], metrics: &str) -> Checks {
        let mut c = Checks::default();
        l4_open(&mut c, conns, metrics, CLIENT.parse().expect("ip"), server());
        c
    }

    #[test]
    fn an_open_mtls_connection_passes() {
        let conns = [
            conn("outbound", "198.18.7.2:40000", server()),
            conn("inbound", "198.18.7.2:40000", server()),
        ];
        let c = l4(&conns, &tcp_metrics(1, 0, "mutual_tls"));
        assert!(c.failed().is_empty(), "{:?}", c.failed());
        assert!(c.verdict().is_ok());
    }

    #[test]
    fn a_missing_connection_or_plain_tcp_fails_each_check_by_name() {
        let c = l4(&[], &tcp_metrics(1, 0, "none"));
        assert_eq!(c.failed().len(), 4, "{:?}", c.failed());
        assert!(c.failed()[0].contains("outbound half") && c.failed()[0].contains("(got [])"));
        assert!(c.failed()[2].contains("mutual_tls") && c.failed()[2].contains("got opened 0"));
        let err = c.verdict().expect_err("fails");
        assert_eq!(err.to_string(), "4 of 4 demo checks failed");
        // Open in the table but already counted closed: not "while it is open".
        let conns = [
            conn("outbound", "198.18.7.2:40000", server()),
            conn("inbound", "198.18.7.2:40000", server()),
        ];
        assert_eq!(l4(&conns, &tcp_metrics(1, 1, "mutual_tls")).failed().len(), 2);
    }

    #[test]
    fn routing_to_the_wrong_version_fails() {
        let mut c = Checks::default();
        let answer = |expected, backend: &str| Answer {
            request: "GET /hello".into(),
            expected,
            status: Some(200),
            backend: Some(backend.into()),
        };
        http_answers(
            &mut c,
            &[answer("server-v2", "server-v2"), answer("server-v1", "server-v2")],
        );
        assert_eq!(
            c.failed(),
            ["GET /hello -> 200 from server-v1 (got Some(200) from Some(\"server-v2\"))"]
        );
    }

    #[test]
    fn request_counts_and_access_log_lines_are_checked() {
        let metrics = format!(
            "istio_requests_total{{reporter=\"source\",response_code=\"200\",destination_service=\"{HOST}\",destination_workload=\"server-v1\",connection_security_policy=\"mutual_tls\"}} 2\n"
        );
        let line = |route: &str, subset: &str| {
            json!({"route_name": route, "response_code": 200, "upstream_cluster": format!("outbound|8080|{subset}|{HOST}")})
                .to_string()
        };
        let log = format!("starting\n{}\n{}\n", line("default", "v1"), line("default", "v1"));
        let mut c = Checks::default();
        http_metrics(&mut c, &metrics, 2, 1);
        http_access_log(&mut c, &log, 2, 1);
        assert_eq!(c.failed().len(), 2, "{:?}", c.failed());
        assert!(c.failed()[0].contains("server-v2") && c.failed()[0].ends_with("(got 0)"));
        assert!(c.failed()[1].contains("v2-by-header"));
    }

    #[test]
    fn a_proxied_uncaptured_pod_fails() {
        let web: SocketAddr = "198.18.7.5:9000".parse().expect("addr");
        let conns = [
            conn("outbound", "198.18.7.2:40000", web),
            conn("inbound", "198.18.7.2:40000", web),
        ];
        let mut c = Checks::default();
        to_uncaptured_open(&mut c, &conns, web);
        uncaptured_saw(
            &mut c,
            Some(("127.0.0.1".parse().expect("ip"), b"x".to_vec())),
            CLIENT.parse().expect("ip"),
            b"x",
        );
        assert_eq!(c.failed().len(), 2, "{:?}", c.failed());
        assert!(c.failed()[0].contains("no inbound half"));
        assert!(c.failed()[1].contains("client pod's address"));
    }
}
