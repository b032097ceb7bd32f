//! End to end: the L7 config (routes, clusters, endpoints) from the local config file, applied at
//! start-up and on change, shown on `/routes`, `/clusters`, `/endpoints` and `/config_dump`; a bad
//! edit names the resource and the field and keeps the running config.
#![allow(clippy::unwrap_used, clippy::expect_used)]
use std::{fs, time::Duration};

use nodeway_tests::{config_yaml, eventually, require_root, Node, TestBed};

/// Generous: under a loaded CI machine a reload can take a while.
const WAIT: Duration = Duration::from_secs(15);

fn l7_yaml(server_ip: &str, extra_route: &str) -> String {
    format!(
        r#"services:
- {{name: server, namespace: demo, hostname: server.demo.svc.cluster.local, addresses: [{{address: 198.19.7.1}}], ports: [{{servicePort: 8080, targetPort: 8080}}]}}
routes:
- name: "8080"
  virtualHosts:
  - name: server.demo.svc.cluster.local:8080
    domains: [server.demo.svc.cluster.local, "server.demo.svc.cluster.local:8080", server]
    routes:
    - match: {{prefix: /, headers: [{{name: x-version, stringMatch: {{exact: v2}}}}]}}
      route: {{cluster: outbound|8080|v2|server.demo.svc.cluster.local{extra_route}}}
    - match: {{prefix: /}}
      route: {{cluster: outbound|8080|v1|server.demo.svc.cluster.local}}
clusters:
- {{name: outbound|8080|v1|server.demo.svc.cluster.local, type: EDS, edsClusterConfig: {{serviceName: outbound|8080|v1|server.demo.svc.cluster.local}}}}
endpoints:
- clusterName: outbound|8080|v1|server.demo.svc.cluster.local
  endpoints: [{{lbEndpoints: [{{endpoint: {{address: {{socketAddress: {{address: {server_ip}, portValue: 8080}}}}}}}}]}}]
"#
    )
}

#[test]
fn l7_config_from_the_file_live_and_bad_edits_keep_it() {
    if !require_root() {
        return;
    }
    let mut bed = TestBed::new("l7file").unwrap();
    let client = bed.add_pod("client", "demo").unwrap();
    let server = bed.add_pod("server", "demo").unwrap();
    let cfg = bed.dir().join("node.yaml");
    let pods = config_yaml("node-a", &["demo"], &[(&client).into(), (&server).into()]);
    let good = format!("{pods}{}", l7_yaml(&server.ip.to_string(), ""));
    fs::write(&cfg, &good).unwrap();
    let node = Node::start(&bed, "a", &cfg, &[]).unwrap();

    // At start-up.
    let routes = node.get("/routes?format=table");
    let lines: Vec<&str> = routes.lines().collect();
    assert!(lines[0].starts_with("NAME") && lines[0].contains("DOMAINS"), "{routes}");
    assert_eq!(lines.len(), 3, "{routes}");
    assert!(
        lines[1].starts_with("8080") && lines[1].contains("server.demo.svc.cluster.local, server"),
        "{routes}"
    );
    let clusters = node.get("/clusters?format=table");
    let cells: Vec<&str> = clusters.lines().nth(1).unwrap_or_default().split_whitespace().collect();
    assert_eq!(
        cells,
        ["server.demo.svc.cluster.local", "8080", "v1", "outbound", "EDS", "-"],
        "{clusters}"
    );
    let endpoints = node.get("/endpoints?format=table");
    assert!(
        endpoints.contains(&format!("{}:8080", server.ip)) && endpoints.contains("HEALTHY"),
        "{endpoints}"
    );
    let services = node.get("/services?format=table");
    assert!(services.contains("198.19.7.1"), "{services}");
    let dump = node.json("/config_dump");
    assert_eq!(dump["l7"]["routes"][0]["name"], "8080", "{dump}");

    // A bad edit: the error names the file, the resource and the field; the old routes stay.
    write_atomically(
        &cfg,
        &format!(
            "{pods}{}",
            l7_yaml(&server.ip.to_string(), ", hedgePolicy: {hedgeOnPerTryTimeout: true}")
        ),
    );
    assert!(eventually(WAIT, || node.json("/config_dump")["lastError"].is_string()));
    let err = node.json("/config_dump")["lastError"].as_str().unwrap().to_string();
    assert!(
        err.contains("node.yaml")
            && err.contains(
                r#"routes[0] ("8080"): virtualHosts[0].routes[0].route.hedgePolicy: not supported by nodeway"#
            ),
        "{err}"
    );
    assert_eq!(node.get("/routes?format=table"), routes);

    // A good edit without the L7 keys: they go.
    write_atomically(&cfg, &pods);
    assert!(eventually(WAIT, || node.get("/routes?format=table").lines().count() == 1));
    assert_eq!(node.get("/endpoints?format=table").lines().count(), 1);
}

/// Replaces the file by rename, as editors and ConfigMap updates do: the watcher never reads a
/// half-written file.
fn write_atomically(path: &std::path::Path, text: &str) {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, text).unwrap();
    fs::rename(&tmp, path).unwrap();
}
