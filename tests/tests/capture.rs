//! End to end: pods (network namespaces) captured by a nodeway node, traffic through the kernel.
#![allow(clippy::unwrap_used, clippy::expect_used)]
use std::{fs, net::SocketAddr, time::Duration};

use nodeway_tests::{config_yaml, eventually, exchange_on, metric_value, require_root, Node, PodEntry, TestBed};

const PORT: u16 = 8080;
const WAIT: Duration = Duration::from_secs(5);

fn payload(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8).collect()
}

#[test]
fn captured_to_captured_and_to_uncaptured() {
    if !require_root() {
        return;
    }
    let mut bed = TestBed::new("basic").unwrap();
    let client = bed.add_pod("client", "demo").unwrap();
    let server = bed.add_pod("server", "demo").unwrap();
    let outside = bed.add_pod("outside", "plain").unwrap();
    let cfg = bed.dir().join("node.yaml");
    fs::write(
        &cfg,
        config_yaml(
            "node-a",
            &["demo"],
            &[(&client).into(), (&server).into(), (&outside).into()],
        ),
    )
    .unwrap();
    let node = Node::start(&bed, "a", &cfg, &[]).unwrap();
    let _s1 = server.echo_server(PORT).unwrap();
    let _s2 = outside.echo_server(PORT).unwrap();

    // While a connection is open it shows on /connections, both halves (outbound and inbound).
    let data = payload(100_000);
    let stream = client.connect(server.addr(PORT)).unwrap().unwrap();
    assert!(
        eventually(WAIT, || node
            .connections()
            .iter()
            .filter(|c| c["sourceWorkload"] == "client")
            .count()
            == 2),
        "{:#?}",
        node.connections()
    );
    let conns = node.connections();
    let out = conns
        .iter()
        .find(|c| c["direction"] == "outbound")
        .expect("outbound half");
    assert_eq!(out["destination"], server.addr(PORT).to_string());
    assert_eq!(out["destinationWorkload"], "server");
    assert_eq!(out["sourceNamespace"], "demo");
    let src: std::net::SocketAddr = out["source"].as_str().unwrap().parse().unwrap();
    assert_eq!(
        src.ip(),
        client.ip,
        "the pod's address, not the in-pod loopback listener's"
    );
    let back = exchange_on(stream, &data).unwrap();
    assert_eq!(back, data, "bytes arrive intact through both proxies");

    // Closed: metrics as Istio reports them, from both sides.
    let src = [
        ("reporter", "source"),
        ("source_workload", "client"),
        ("destination_workload", "server"),
    ];
    let dst = [
        ("reporter", "destination"),
        ("source_workload", "client"),
        ("destination_workload", "server"),
    ];
    assert!(eventually(WAIT, || metric_value(
        &node.metrics(),
        "istio_tcp_connections_closed_total",
        &src
    ) == 1.0));
    let m = node.metrics();
    for labels in [&src[..], &dst[..]] {
        assert_eq!(
            metric_value(&m, "istio_tcp_connections_opened_total", labels),
            1.0,
            "{m}"
        );
        assert_eq!(
            metric_value(&m, "istio_tcp_received_bytes_total", labels),
            data.len() as f64,
            "{m}"
        );
        assert_eq!(
            metric_value(&m, "istio_tcp_sent_bytes_total", labels),
            data.len() as f64,
            "{m}"
        );
    }
    // Pod to pod is mutual TLS (HBONE) with each pod's own SPIFFE identity, on both sides.
    let mtls = [
        ("connection_security_policy", "mutual_tls"),
        ("source_principal", "spiffe://cluster.local/ns/demo/sa/default"),
        ("destination_principal", "spiffe://cluster.local/ns/demo/sa/default"),
    ];
    assert_eq!(
        metric_value(&m, "istio_tcp_connections_opened_total", &mtls),
        2.0,
        "{m}"
    );
    assert!(eventually(WAIT, || node.connections().is_empty()));

    // To an uncaptured pod: works, reported by the source side only.
    let back = client.exchange(outside.addr(PORT), b"hello outside").unwrap().unwrap();
    assert_eq!(back, b"hello outside");
    let m = node.metrics();
    let labels = [
        ("reporter", "source"),
        ("destination_workload", "outside"),
        ("destination_workload_namespace", "plain"),
    ];
    assert_eq!(metric_value(&m, "istio_tcp_received_bytes_total", &labels), 13.0, "{m}");
    assert_eq!(
        metric_value(
            &m,
            "istio_tcp_connections_opened_total",
            &[("reporter", "destination"), ("destination_workload", "outside")]
        ),
        0.0
    );

    // The app sees the original peer, not the proxy's listener.
    let s = client.connect(server.addr(PORT)).unwrap().unwrap();
    assert_eq!(s.peer_addr().unwrap(), server.addr(PORT));
    drop(s);

    // The capture is on /captured with its kernel state.
    let c = node.captured_pod("client").unwrap();
    assert_eq!(c["captured"], true);
    assert!(c["netnsCookie"].as_u64().unwrap() > 0);
    assert!(c["attachments"].to_string().contains("sk_lookup"), "{c}");
    assert!(c["mapEntries"].to_string().contains(&client.ip.to_string()), "{c}");
    assert_eq!(node.captured_pod("outside").unwrap()["captured"], false);
}

#[test]
fn uncaptured_namespace_untouched_and_excluded_ports_bypass() {
    if !require_root() {
        return;
    }
    let mut bed = TestBed::new("bypass").unwrap();
    let client = bed.add_pod("client", "demo").unwrap();
    let server = bed.add_pod("server", "demo").unwrap();
    let a = bed.add_pod("a", "plain").unwrap();
    let b = bed.add_pod("b", "plain").unwrap();
    let cfg = bed.dir().join("node.yaml");
    let c = PodEntry {
        exclude_outbound: &[9001],
        ..(&client).into()
    };
    let s = PodEntry {
        exclude_inbound: &[9002],
        ..(&server).into()
    };
    fs::write(
        &cfg,
        config_yaml("node-a", &["demo"], &[c, s, (&a).into(), (&b).into()]),
    )
    .unwrap();
    let node = Node::start(&bed, "a", &cfg, &[]).unwrap();
    let _e = [
        server.echo_server(9001).unwrap(),
        server.echo_server(9002).unwrap(),
        b.echo_server(PORT).unwrap(),
    ];

    // Pods of an uncaptured namespace talk directly: nothing on /connections, no metrics.
    let stream = a.connect(b.addr(PORT)).unwrap().unwrap();
    assert_eq!(stream.peer_addr().unwrap(), b.addr(PORT));
    assert!(node.connections().is_empty());
    assert_eq!(exchange_on(stream, b"plain").unwrap(), b"plain");

    // Excluded outbound port: straight out of the client; the server side still captures inbound.
    let back = client.exchange(server.addr(9001), b"x1").unwrap().unwrap();
    assert_eq!(back, b"x1");
    // Excluded inbound port on the server, from an uncaptured pod: no proxy at all.
    let back = a.exchange(server.addr(9002), b"x2").unwrap().unwrap();
    assert_eq!(back, b"x2");
    let m = node.metrics();
    assert_eq!(
        metric_value(&m, "istio_tcp_connections_opened_total", &[("reporter", "source")]),
        0.0,
        "{m}"
    );
    assert_eq!(
        metric_value(
            &m,
            "istio_tcp_connections_opened_total",
            &[("reporter", "destination"), ("source_workload", "a")]
        ),
        0.0,
        "{m}"
    );
    assert_eq!(
        metric_value(
            &m,
            "istio_tcp_connections_opened_total",
            &[("reporter", "destination"), ("source_workload", "client")]
        ),
        1.0,
        "{m}"
    );
    let stats = node.json("/captured")["stats"].clone();
    assert!(stats["outbound_excluded"].as_u64().unwrap() >= 1, "{stats}");
    assert!(stats["inbound_excluded"].as_u64().unwrap() >= 1, "{stats}");
}

#[test]
fn killed_proxy_fails_closed_and_restart_takes_over() {
    if !require_root() {
        return;
    }
    let mut bed = TestBed::new("restart").unwrap();
    let client = bed.add_pod("client", "demo").unwrap();
    let server = bed.add_pod("server", "demo").unwrap();
    let outside = bed.add_pod("outside", "plain").unwrap();
    let cfg = bed.dir().join("node.yaml");
    fs::write(
        &cfg,
        config_yaml(
            "node-a",
            &["demo"],
            &[(&client).into(), (&server).into(), (&outside).into()],
        ),
    )
    .unwrap();
    let mut node = Node::start(&bed, "a", &cfg, &[]).unwrap();
    let _s = [server.echo_server(PORT).unwrap(), outside.echo_server(PORT).unwrap()];
    assert_eq!(
        client.exchange(outside.addr(PORT), b"before").unwrap().unwrap(),
        b"before"
    );
    // A connection that never touches the proxy (uncaptured pods) lives through everything.
    let direct = outside.connect(outside.addr(PORT)).unwrap().unwrap();

    node.kill();
    // Captured pods are not bypassed: their connects are refused, inbound to them too.
    let e = client
        .exchange(outside.addr(PORT), b"x")
        .unwrap()
        .expect_err("outbound must fail closed");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
    assert!(
        outside.exchange(server.addr(PORT), b"x").unwrap().is_err(),
        "inbound must fail closed"
    );
    assert!(fs::read_dir(&node.pin_dir).is_ok(), "pins stay without --cleanup");

    node.restart().unwrap();
    assert_eq!(client.exchange(server.addr(PORT), b"after").unwrap().unwrap(), b"after");
    assert_eq!(outside.exchange(server.addr(PORT), b"in").unwrap().unwrap(), b"in");
    let progs = node.json("/captured")["programs"].clone();
    assert!(
        progs.as_array().unwrap().iter().all(|p| p["tookOver"] == true),
        "{progs}"
    );
    assert_eq!(node.captured_pod("client").unwrap()["captured"], true);
    assert!(node.json("/captured")["stats"]["inbound_fail_closed"].as_u64().unwrap() >= 1);
    assert_eq!(exchange_on(direct, b"still here").unwrap(), b"still here");
}

#[test]
fn capture_toggles_live_and_bad_edits_keep_the_config() {
    if !require_root() {
        return;
    }
    let mut bed = TestBed::new("toggle").unwrap();
    let client = bed.add_pod("client", "demo").unwrap();
    let server = bed.add_pod("server", "demo").unwrap();
    let cfg = bed.dir().join("node.yaml");
    let pods = [(&client).into(), (&server).into()];
    let captured = config_yaml("node-a", &["demo"], &pods);
    fs::write(&cfg, &captured).unwrap();
    let node = Node::start(&bed, "a", &cfg, &[]).unwrap();
    let _s = server.echo_server(PORT).unwrap();
    let through_proxy = || {
        let s = client.connect(server.addr(PORT)).unwrap().unwrap();
        let proxied = s.local_addr().unwrap().ip().is_loopback();
        exchange_on(s, b"t").unwrap();
        proxied
    };
    assert!(through_proxy());

    // Release: remove the namespace label.
    fs::write(&cfg, config_yaml("node-a", &[], &[(&client).into(), (&server).into()])).unwrap();
    assert!(eventually(WAIT, || node.captured_pod("client").unwrap()["captured"] == false));
    assert!(!through_proxy(), "released pods connect directly");
    let c = node.captured_pod("client").unwrap();
    assert!(c["reason"].as_str().unwrap().contains("not labelled"), "{c}");

    // Capture again.
    fs::write(&cfg, &captured).unwrap();
    assert!(eventually(WAIT, || node.captured_pod("client").unwrap()["captured"] == true));
    assert!(through_proxy());

    // A bad edit: logged with the file and the problem, old config kept, still captured.
    fs::write(
        &cfg,
        captured.replace(&format!("ips: [{}]", client.ip), "ips: [not-an-ip]"),
    )
    .unwrap();
    assert!(eventually(WAIT, || node.json("/config_dump")["lastError"].is_string()));
    let err = node.json("/config_dump")["lastError"].as_str().unwrap().to_string();
    assert!(err.contains("node.yaml") && err.contains("line"), "{err}");
    assert!(node.log_text().contains("keeping the running config"));
    assert!(through_proxy());
    assert_eq!(metric_value(&node.metrics(), "nodeway_config_errors_total", &[]), 1.0);

    // An emptied file (a rewrite in progress, a failed write) does not release every pod.
    fs::write(&cfg, "").unwrap();
    assert!(eventually(WAIT, || {
        metric_value(&node.metrics(), "nodeway_config_errors_total", &[]) == 2.0
    }));
    let err = node.json("/config_dump")["lastError"].as_str().unwrap().to_string();
    assert!(err.contains("node.yaml is empty"), "{err}");
    assert!(through_proxy());
}

#[test]
fn cleanup_leaves_nothing_in_the_kernel() {
    if !require_root() {
        return;
    }
    let mut bed = TestBed::new("cleanup").unwrap();
    let client = bed.add_pod("client", "demo").unwrap();
    let cfg = bed.dir().join("node.yaml");
    fs::write(&cfg, config_yaml("node-a", &["demo"], &[(&client).into()])).unwrap();
    let mut node = Node::start(&bed, "a", &cfg, &["--cleanup"]).unwrap();
    let pin_dir = node.pin_dir.clone();
    assert!(
        node.layout_dir().starts_with(&pin_dir),
        "{}",
        node.layout_dir().display()
    );
    assert!(node.layout_dir().join("links").read_dir().unwrap().count() >= 6);
    let prog_ids = our_program_ids(&node);
    assert!(!prog_ids.is_empty());
    // The node's loopback is every host process's: stopping the data plane needs the token.
    let (code, reply) = post(node.admin, "/quitquitquit", None);
    assert_eq!(code, 401, "{reply}");
    let (code, reply) = post(node.admin, "/quitquitquit", Some("not-the-token"));
    assert_eq!(code, 401, "{reply}");
    assert_eq!(
        node.wait_exit(Duration::from_secs(1)),
        None,
        "a refused quit stopped the agent"
    );
    let token_file = node.run_dir.join("admin-token");
    let mode = std::os::unix::fs::PermissionsExt::mode(&fs::metadata(&token_file).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "only root reads the token");
    let token = fs::read_to_string(&token_file).unwrap();
    let (code, reply) = post(node.admin, "/quitquitquit", Some(token.trim()));
    assert_eq!(code, 200, "{reply}");
    assert_eq!(node.wait_exit(Duration::from_secs(15)), Some(0), "{}", node.log_text());
    assert!(!pin_dir.exists(), "pin directory removed");
    // None of this agent's programs is loaded any more.
    let loaded = std::process::Command::new("bpftool")
        .args(["prog", "show", "-j"])
        .output()
        .unwrap();
    let loaded: serde_json::Value = serde_json::from_slice(&loaded.stdout).unwrap_or_default();
    let ids: Vec<u64> = loaded
        .as_array()
        .map(|a| a.iter().filter_map(|p| p["id"].as_u64()).collect())
        .unwrap_or_default();
    for id in prog_ids {
        assert!(!ids.contains(&id), "program {id} still loaded");
    }
    // Traffic from the released pod is direct again (nothing steers it to a missing proxy).
    let _s = client.echo_server(PORT).unwrap();
    let s = client.connect(SocketAddr::from((client.ip, PORT))).unwrap().unwrap();
    assert_eq!(exchange_on(s, b"ok").unwrap(), b"ok");
}

/// Program ids behind this node's pinned links.
fn our_program_ids(node: &Node) -> Vec<u64> {
    let mut ids = Vec::new();
    for e in node.layout_dir().join("links").read_dir().unwrap() {
        let out = std::process::Command::new("bpftool")
            .args(["link", "show", "pinned"])
            .arg(e.unwrap().path())
            .arg("-j")
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if let Some(id) = v["prog_id"].as_u64() {
            ids.push(id);
        }
    }
    ids
}

fn post(addr: SocketAddr, path: &str, token: Option<&str>) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let code = out.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (code, out)
}

#[test]
fn ipv6_sockets_to_mapped_addresses_are_captured() {
    if !require_root() {
        return;
    }
    let mut bed = TestBed::new("v6").unwrap();
    let client = bed.add_pod("client", "demo").unwrap();
    let server = bed.add_pod("server", "plain").unwrap();
    let cfg = bed.dir().join("node.yaml");
    fs::write(
        &cfg,
        config_yaml("node-a", &["demo"], &[(&client).into(), (&server).into()]),
    )
    .unwrap();
    let node = Node::start(&bed, "a", &cfg, &[]).unwrap();
    let _s = server.echo_server(PORT).unwrap();
    // An AF_INET6 socket (connect6) to ::ffff:198.18.x.y: only test addresses, through the v6 path.
    let mapped: SocketAddr = format!("[::ffff:{}]:{PORT}", server.ip).parse().unwrap();
    let s = client.connect(mapped).unwrap().unwrap();
    assert_eq!(
        s.peer_addr().unwrap(),
        mapped,
        "getpeername6 restores the original peer"
    );
    assert_eq!(exchange_on(s, b"six").unwrap(), b"six");
    let m = node.metrics();
    assert_eq!(
        metric_value(
            &m,
            "istio_tcp_received_bytes_total",
            &[("reporter", "source"), ("destination_workload", "server")]
        ),
        3.0,
        "{m}"
    );
}

#[test]
fn start_up_errors_are_one_clear_line() {
    if !require_root() {
        return;
    }
    let bed = TestBed::new("errors").unwrap();
    let cfg = bed.dir().join("bad.yaml");
    fs::write(&cfg, "pods:\n- name: a\n  namespace: b\n  ips: [1.2.3]\n").unwrap();
    let out = std::process::Command::new(nodeway_tests::nodeway_bin())
        .args(["run", "--config"])
        .arg(&cfg)
        .args([
            "--admin-addr",
            "127.0.0.1:0",
            "--stats-addr",
            "127.0.0.1:0",
            "--readiness-addr",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.starts_with("nodeway: config file") && err.contains("bad.yaml") && err.contains("line 4"),
        "{err}"
    );

    // Without privileges: one line naming the missing capabilities. The binary is copied where an
    // unprivileged user can run it, whatever the permissions of the checkout.
    let good = bed.dir().join("good.yaml");
    fs::write(&good, "node: n\n").unwrap();
    let bin = bed.dir().join("nodeway");
    fs::copy(nodeway_tests::nodeway_bin(), &bin).unwrap();
    use std::os::unix::fs::PermissionsExt;
    for p in [bed.dir(), bin.as_path(), good.as_path()] {
        let mode = if p == bed.dir() || p == bin.as_path() {
            0o755
        } else {
            0o644
        };
        fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
    }
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"])
        .arg(&bin)
        .args(["run", "--config"])
        .arg(&good)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("missing capabilities CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN"),
        "{err}"
    );
}

#[test]
fn rolling_restart_keeps_established_connections() {
    if !require_root() {
        return;
    }
    let mut bed = TestBed::new("rolling").unwrap();
    let client = bed.add_pod("client", "demo").unwrap();
    let outside = bed.add_pod("outside", "plain").unwrap();
    let cfg = bed.dir().join("node.yaml");
    fs::write(
        &cfg,
        config_yaml("node-a", &["demo"], &[(&client).into(), (&outside).into()]),
    )
    .unwrap();
    let mut old = Node::start(&bed, "a", &cfg, &["--drain-timeout", "30"]).unwrap();
    let _s = outside.echo_server(PORT).unwrap();

    // A long-lived connection through the old agent.
    let mut conn = client.connect(outside.addr(PORT)).unwrap().unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let ping = |c: &mut std::net::TcpStream, msg: &[u8]| {
        use std::io::{Read, Write};
        c.write_all(msg).unwrap();
        let mut buf = vec![0; msg.len()];
        c.read_exact(&mut buf).unwrap();
        assert_eq!(buf, msg);
    };
    ping(&mut conn, b"one");
    assert_eq!(old.connections().len(), 1);

    // The new agent takes over the pinned state while the old one still runs, then the old one
    // is told to stop: it drains instead of cutting the connection.
    let new = Node::start(&bed, "a", &cfg, &[]).unwrap();
    let progs = new.json("/captured")["programs"].clone();
    assert!(
        progs.as_array().unwrap().iter().all(|p| p["tookOver"] == true),
        "{progs}"
    );
    let pid = old.pid().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    ping(&mut conn, b"two: still through the draining agent");
    // New connections go to the new agent.
    assert_eq!(client.exchange(outside.addr(PORT), b"new").unwrap().unwrap(), b"new");
    assert!(eventually(WAIT, || new.connections().is_empty()));
    let m = new.metrics();
    assert_eq!(
        metric_value(&m, "istio_tcp_connections_closed_total", &[("reporter", "source")]),
        1.0,
        "{m}"
    );
    drop(conn);
    // With its last connection gone, the old agent exits by itself.
    assert_eq!(old.wait_exit(Duration::from_secs(10)), Some(0), "{}", old.log_text());
    assert!(old.log_text().contains("draining connections"));
    assert_eq!(
        client.exchange(outside.addr(PORT), b"after").unwrap().unwrap(),
        b"after"
    );
}

/// Inbound to a captured pod reaches its app only through the proxy: not on an address nobody
/// listed for the pod (a secondary address here; IPv6 link-local is the same case), and not
/// through a socket the app binds with SO_REUSEPORT next to the proxy's in-pod listener.
#[test]
fn inbound_around_the_proxy_is_impossible() {
    if !require_root() {
        return;
    }
    let mut bed = TestBed::new("unlisted").unwrap();
    let server = bed.add_pod("server", "demo").unwrap();
    let outside = bed.add_pod("outside", "plain").unwrap();
    let o = server.ip.octets();
    let secondary = std::net::Ipv4Addr::new(o[0], o[1], o[2], 250);
    let status = std::process::Command::new("ip")
        .args([
            "-n",
            &server.netns,
            "addr",
            "add",
            &format!("{secondary}/24"),
            "dev",
            "eth0",
        ])
        .status()
        .unwrap();
    assert!(status.success());
    let cfg = bed.dir().join("node.yaml");
    fs::write(
        &cfg,
        config_yaml("node-a", &["demo"], &[(&server).into(), (&outside).into()]),
    )
    .unwrap();
    let node = Node::start(&bed, "a", &cfg, &[]).unwrap();
    let app = server.echo_server(PORT).unwrap();
    assert_eq!(
        outside.exchange(server.addr(PORT), b"listed").unwrap().unwrap(),
        b"listed"
    );
    let through_proxy = app.accepted();
    assert_eq!(through_proxy, 1);

    // The unlisted address: the lookup finds no socket (the client gets a reset), the app never
    // sees the connection.
    let e = outside
        .connect(SocketAddr::from((secondary, PORT)))
        .unwrap()
        .expect_err("an unlisted address of a captured pod must not reach its app");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
    assert_eq!(app.accepted(), through_proxy);
    let stats = node.json("/captured")["stats"].clone();
    assert!(stats["inbound_unlisted_dropped"].as_u64().unwrap() >= 1, "{stats}");

    // An app socket in the proxy's reuseport group on the in-pod inbound listener (127.0.0.1:15006)
    // gets nothing.
    let rogue = server
        .run(|| -> std::io::Result<std::net::TcpListener> {
            let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
            s.set_reuse_address(true)?;
            s.set_reuse_port(true)?;
            s.bind(&SocketAddr::from(([127, 0, 0, 1], 15006)).into())?;
            s.listen(128)?;
            s.set_nonblocking(true)?;
            Ok(s.into())
        })
        .unwrap()
        .expect("the app joins the listener's reuseport group (same user)");
    for i in 0..20u8 {
        assert_eq!(outside.exchange(server.addr(PORT), &[i]).unwrap().unwrap(), [i]);
    }
    let stolen = std::iter::from_fn(|| rogue.accept().ok()).count();
    assert_eq!(stolen, 0, "the app's reuseport socket took inbound connections");
    assert_eq!(app.accepted(), through_proxy + 20);
}

/// A capture that fails (here: the app already holds the proxy's loopback port 127.0.0.1:15001)
/// leaves the pod held closed, also across an agent restart: its connects never leave the pod
/// and nothing reaches its app from outside, while `/captured` says so.
#[test]
fn a_failed_capture_holds_the_pod_closed() {
    if !require_root() {
        return;
    }
    let mut bed = TestBed::new("held").unwrap();
    let client = bed.add_pod("client", "demo").unwrap();
    let outside = bed.add_pod("outside", "plain").unwrap();
    let squatter = client
        .run(|| std::net::TcpListener::bind(("127.0.0.1", 15001)))
        .unwrap()
        .expect("the app takes the proxy's port first");
    let app = client.echo_server(PORT).unwrap();
    let remote = outside.echo_server(PORT).unwrap();
    let cfg = bed.dir().join("node.yaml");
    fs::write(
        &cfg,
        config_yaml("node-a", &["demo"], &[(&client).into(), (&outside).into()]),
    )
    .unwrap();
    // Never ready: one of its pods is not captured.
    let mut node = Node::spawn(&bed, "a", &cfg, &[]).unwrap();
    let check = |node: &Node, when: &str| {
        let held = || node.captured_pod("client").is_some_and(|p| p["heldClosed"] == true);
        assert!(eventually(WAIT, held), "{when}: {}", node.get("/captured"));
        let shown = node.captured_pod("client").unwrap();
        assert_eq!(shown["captured"], false, "{when}: {shown}");
        assert_eq!(shown["heldClosed"], true, "{when}: {shown}");
        assert!(
            shown["reason"].as_str().unwrap().contains("fails closed"),
            "{when}: {shown}"
        );
        // Outbound: redirected to the pod's own loopback port (the squatter), never out.
        let _ = client.exchange(outside.addr(PORT), b"out").unwrap();
        assert_eq!(remote.accepted(), 0, "{when}: the held pod reached the network");
        // Inbound: no address of the pod is served.
        assert!(outside.exchange(client.addr(PORT), b"in").unwrap().is_err(), "{when}");
        assert_eq!(app.accepted(), 0, "{when}: the held pod's app was reached");
    };
    check(&node, "after the failed capture");
    node.relaunch().unwrap();
    check(&node, "after a restart");
    drop(squatter);
}

/// One pod's exclusion list cannot fill the node's shared port map: over its budget the pod is
/// held closed with the reason, and every other pod is captured as before.
#[test]
fn a_pod_over_its_map_budget_is_held_closed_and_the_others_are_captured() {
    if !require_root() {
        return;
    }
    let mut bed = TestBed::new("budget").unwrap();
    let greedy = bed.add_pod("greedy", "demo").unwrap();
    let server = bed.add_pod("server", "demo").unwrap();
    let outside = bed.add_pod("outside", "plain").unwrap();
    let many: Vec<u16> = (20000..20017).collect();
    let g = PodEntry {
        exclude_outbound: &many,
        ..(&greedy).into()
    };
    let cfg = bed.dir().join("node.yaml");
    fs::write(
        &cfg,
        config_yaml("node-a", &["demo"], &[g, (&server).into(), (&outside).into()]),
    )
    .unwrap();
    let node = Node::spawn(&bed, "a", &cfg, &[]).unwrap();
    let _app = server.echo_server(PORT).unwrap();
    let remote = outside.echo_server(20001).unwrap();
    let held = || node.captured_pod("greedy").is_some_and(|p| p["heldClosed"] == true);
    let captured = || node.captured_pod("server").is_some_and(|p| p["captured"] == true);
    assert!(eventually(WAIT, || held() && captured()), "{}", node.get("/captured"));
    let why = node.captured_pod("greedy").unwrap()["reason"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(why.contains("excludes 17 ports") && why.contains("at most 16"), "{why}");
    // Its "excluded" port is not a way out either.
    let _ = greedy.exchange(outside.addr(20001), b"x").unwrap();
    assert_eq!(remote.accepted(), 0, "the held pod reached the network");
    let s = outside.connect(server.addr(PORT)).unwrap().unwrap();
    assert_eq!(exchange_on(s, b"fine").unwrap(), b"fine");
}

/// Kubelet probes come from the node's own addresses and carry no mesh identity: as Istio
/// ambient does, they reach a STRICT pod's app directly, while plaintext from a pod is refused.
#[test]
fn probes_from_the_node_reach_a_strict_pod_and_pods_do_not() {
    if !require_root() {
        return;
    }
    let mut bed = TestBed::new("probes").unwrap();
    let server = bed.add_pod("server", "demo").unwrap();
    let outside = bed.add_pod("outside", "plain").unwrap();
    let host = bed.link_host().unwrap();
    let strict = PodEntry {
        mtls: Some("STRICT"),
        ..(&server).into()
    };
    let cfg = bed.dir().join("node.yaml");
    fs::write(&cfg, config_yaml("node-a", &["demo"], &[strict, (&outside).into()])).unwrap();
    let node = Node::start(&bed, "a", &cfg, &[]).unwrap();
    let app = server.echo_server(PORT).unwrap();
    let probe = || -> std::io::Result<Vec<u8>> {
        let s = std::net::TcpStream::connect_timeout(&server.addr(PORT), Duration::from_secs(3))?;
        assert_eq!(s.local_addr()?.ip(), std::net::IpAddr::V4(host));
        exchange_on(s, b"probe")
    };
    // The agent learns the node's addresses within a few seconds of a new interface.
    assert!(
        eventually(Duration::from_secs(15), || probe().is_ok_and(|r| r == b"probe")),
        "{}",
        node.get("/captured")
    );
    let exempt = node.json("/captured")["stats"]["inbound_host_exempt"].as_u64().unwrap();
    assert!(exempt >= 1);
    let before = app.accepted();
    let plain = outside.exchange(server.addr(PORT), b"plaintext").unwrap();
    assert!(
        plain.map_or(true, |r| r.is_empty()),
        "STRICT still refuses plaintext from pods"
    );
    assert_eq!(app.accepted(), before, "the pod's plaintext reached the app");
}

/// A respec of a captured pod (new exclusions) is applied over its running capture: same slot,
/// an open connection carries on, and connects made meanwhile all go through the proxy.
#[test]
fn a_respec_is_applied_in_place_without_a_window() {
    if !require_root() {
        return;
    }
    let mut bed = TestBed::new("respec").unwrap();
    let client = bed.add_pod("client", "demo").unwrap();
    let outside = bed.add_pod("outside", "plain").unwrap();
    let cfg = bed.dir().join("node.yaml");
    let write = |exclude: &[u16]| {
        let c = PodEntry {
            exclude_outbound: exclude,
            ..(&client).into()
        };
        fs::write(&cfg, config_yaml("node-a", &["demo"], &[c, (&outside).into()])).unwrap();
    };
    write(&[]);
    let node = Node::start(&bed, "a", &cfg, &[]).unwrap();
    let _echo = [outside.echo_server(PORT).unwrap(), outside.echo_server(9001).unwrap()];
    let slot = node.captured_pod("client").unwrap()["slot"].clone();
    let live = client.connect(outside.addr(PORT)).unwrap().unwrap();
    assert!(live.local_addr().unwrap().ip().is_loopback());

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let prober = {
        let (client, to, stop) = (client.clone(), outside.addr(PORT), stop.clone());
        std::thread::spawn(move || {
            let (mut proxied, mut other) = (0u32, Vec::new());
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && std::time::Instant::now() < deadline {
                match client.connect(to).unwrap() {
                    Ok(s) if s.local_addr().unwrap().ip().is_loopback() => proxied += 1,
                    Ok(s) => other.push(format!("bypass from {}", s.local_addr().unwrap())),
                    // A reset while the old listener closes is not a bypass.
                    Err(e) => assert_ne!(e.kind(), std::io::ErrorKind::TimedOut, "{e}"),
                }
            }
            (proxied, other)
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    write(&[9001]);
    let applied = || node.captured_pod("client").unwrap()["excludeOutboundPorts"] == serde_json::json!([9001]);
    assert!(eventually(WAIT, applied), "{}", node.get("/captured"));
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (proxied, bypasses) = prober.join().unwrap();
    assert!(bypasses.is_empty(), "{bypasses:?}");
    assert!(proxied > 0);
    let shown = node.captured_pod("client").unwrap();
    assert_eq!(shown["captured"], true, "{shown}");
    assert_eq!(shown["slot"], slot, "{shown}");
    // The new exclusion is in force; the open connection still works.
    let direct = client.connect(outside.addr(9001)).unwrap().unwrap();
    assert!(!direct.local_addr().unwrap().ip().is_loopback(), "9001 is excluded now");
    assert_eq!(exchange_on(live, b"still").unwrap(), b"still");
}

/// A node holds certificates (and their keys) only for the pods it captures: when a pod leaves,
/// its identity's certificate goes too.
#[test]
fn certificates_of_removed_pods_are_dropped() {
    if !require_root() {
        return;
    }
    let mut bed = TestBed::new("certgone").unwrap();
    let stays = bed.add_pod("stays", "demo").unwrap();
    let leaves = bed.add_pod("leaves", "demo").unwrap();
    let entry = |p, sa| PodEntry {
        service_account: Some(sa),
        ..PodEntry::from(p)
    };
    let cfg = bed.dir().join("node.yaml");
    fs::write(
        &cfg,
        config_yaml("node-a", &["demo"], &[entry(&stays, "stays"), entry(&leaves, "leaves")]),
    )
    .unwrap();
    let node = Node::start(&bed, "a", &cfg, &[]).unwrap();
    let identities = || -> Vec<String> {
        let mut ids: Vec<String> = node.json("/certs")["certificates"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["identity"].as_str().unwrap().to_string())
            .collect();
        ids.sort();
        ids
    };
    let both = [
        "spiffe://cluster.local/ns/demo/sa/leaves".to_string(),
        "spiffe://cluster.local/ns/demo/sa/stays".to_string(),
    ];
    assert!(eventually(WAIT, || identities() == both), "{:?}", identities());
    fs::write(&cfg, config_yaml("node-a", &["demo"], &[entry(&stays, "stays")])).unwrap();
    assert!(eventually(WAIT, || identities() == both[1..]), "{:?}", identities());
}

/// An agent whose maps are laid out differently (another layout version, another capacity)
/// pinned its state: the new agent migrates it instead of reusing maps that do not fit. The
/// connections the old agent carries live on (it drains), new ones are captured and proxied by
/// the new agent in both directions, and nothing of the old layout stays pinned.
#[test]
fn an_upgrade_over_another_pin_layout_keeps_established_connections() {
    if !require_root() {
        return;
    }
    let mut bed = TestBed::new("layout").unwrap();
    let client = bed.add_pod("client", "demo").unwrap();
    let server = bed.add_pod("server", "demo").unwrap();
    let outside = bed.add_pod("outside", "plain").unwrap();
    let cfg = bed.dir().join("node.yaml");
    fs::write(
        &cfg,
        config_yaml(
            "node-a",
            &["demo"],
            &[(&client).into(), (&server).into(), (&outside).into()],
        ),
    )
    .unwrap();
    let other_layout = [
        ("NODEWAY_TEST_ONLY_PIN_LAYOUT_VERSION", "0"),
        ("NODEWAY_TEST_ONLY_HOST_ADDRS_MAX_ENTRIES", "65"),
    ];
    let mut old = Node::start_with_env(&bed, "a", &cfg, &["--drain-timeout", "30"], &other_layout).unwrap();
    let _s = [server.echo_server(PORT).unwrap(), outside.echo_server(PORT).unwrap()];
    let old_dir = old.layout_dir();
    assert!(
        old_dir.join("maps").join("HOST_ADDRS").exists(),
        "{}",
        old_dir.display()
    );

    let ping = |c: &mut std::net::TcpStream, msg: &[u8]| {
        use std::io::{Read, Write};
        c.write_all(msg).unwrap();
        let mut buf = vec![0; msg.len()];
        c.read_exact(&mut buf).unwrap();
        assert_eq!(buf, msg);
    };
    // Established through the old agent: outbound from a captured pod, inbound to one.
    let mut outbound = client.connect(outside.addr(PORT)).unwrap().unwrap();
    let mut inbound = outside.connect(server.addr(PORT)).unwrap().unwrap();
    for c in [&mut outbound, &mut inbound] {
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        ping(c, b"before the upgrade");
    }
    assert!(
        eventually(WAIT, || old.connections().len() == 2),
        "{:#?}",
        old.connections()
    );

    let new = Node::start(&bed, "a", &cfg, &[]).unwrap();
    let new_dir = new.layout_dir();
    assert_ne!(new_dir, old_dir);
    assert!(
        new.log_text().contains("another map layout: migrating"),
        "{}",
        new.log_text()
    );
    assert!(!old_dir.exists(), "the old layout's pins are removed");
    let pinned: Vec<_> = fs::read_dir(&new.pin_dir).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(pinned, vec![new_dir.clone()]);
    for pod in ["client", "server"] {
        assert_eq!(new.captured_pod(pod).unwrap()["captured"], true, "{pod}");
    }

    let pid = old.pid().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    ping(&mut outbound, b"after the upgrade, through the draining agent");
    ping(&mut inbound, b"after the upgrade, inbound too");

    // New connections go through the new agent, both ways.
    assert_eq!(
        client.exchange(outside.addr(PORT), b"new out").unwrap().unwrap(),
        b"new out"
    );
    assert_eq!(
        outside.exchange(server.addr(PORT), b"new in").unwrap().unwrap(),
        b"new in"
    );
    let closed = |reporter: &str| {
        metric_value(
            &new.metrics(),
            "istio_tcp_connections_closed_total",
            &[("reporter", reporter)],
        )
    };
    assert!(eventually(WAIT, || closed("source") == 1.0), "{}", new.metrics());
    assert!(eventually(WAIT, || closed("destination") == 1.0), "{}", new.metrics());
    // The new agent's own maps steer: its kernel counters moved.
    let stats = new.json("/captured")["stats"].clone();
    assert!(stats["outbound_redirected"].as_u64().unwrap() >= 1, "{stats}");
    assert!(stats["inbound_redirected"].as_u64().unwrap() >= 1, "{stats}");

    drop((outbound, inbound));
    assert_eq!(old.wait_exit(Duration::from_secs(10)), Some(0), "{}", old.log_text());
    let pinned: Vec<_> = fs::read_dir(&new.pin_dir).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(pinned, vec![new_dir], "the old agent's exit pinned nothing again");
}

/// State pinned before layouts were versioned (`<pin dir>/maps`, `<pin dir>/links`, where an
/// agent of an earlier release put it) is taken over: its cgroup links are replaced without a
/// gap, its entries carried into the new layout's maps, and it is removed.
#[test]
fn state_pinned_before_layouts_were_versioned_is_migrated() {
    if !require_root() {
        return;
    }
    let mut bed = TestBed::new("unversioned").unwrap();
    let client = bed.add_pod("client", "demo").unwrap();
    let server = bed.add_pod("server", "demo").unwrap();
    let cfg = bed.dir().join("node.yaml");
    fs::write(
        &cfg,
        config_yaml("node-a", &["demo"], &[(&client).into(), (&server).into()]),
    )
    .unwrap();
    let mut node = Node::start(&bed, "a", &cfg, &[]).unwrap();
    let _s = server.echo_server(PORT).unwrap();
    assert_eq!(
        client.exchange(server.addr(PORT), b"before").unwrap().unwrap(),
        b"before"
    );
    let layout = node.layout_dir();
    node.kill();
    // Where the unversioned agent pinned: the same objects, one directory up (bpffs renames).
    for sub in ["maps", "links"] {
        fs::rename(layout.join(sub), node.pin_dir.join(sub)).unwrap();
    }
    fs::remove_dir(&layout).unwrap();

    node.restart().unwrap();
    assert_eq!(node.layout_dir(), layout);
    assert!(
        node.log_text().contains("another map layout: migrating"),
        "{}",
        node.log_text()
    );
    let progs = node.json("/captured")["programs"].clone();
    assert!(
        progs.as_array().unwrap().iter().all(|p| p["tookOver"] == true),
        "{progs}"
    );
    assert!(!node.pin_dir.join("maps").exists() && !node.pin_dir.join("links").exists());
    let pinned: Vec<_> = fs::read_dir(&node.pin_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(pinned, vec![layout]);
    assert_eq!(client.exchange(server.addr(PORT), b"after").unwrap().unwrap(), b"after");
    assert_eq!(node.captured_pod("server").unwrap()["captured"], true);
}
