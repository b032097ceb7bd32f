//! HTTP authorization on normalized paths, end to end: a DENY `/admin` policy on the
//! destination pod holds against every spelling of `/admin` a client can send (percent-encoded
//! letters, doubled slashes, dot segments, `;` parameters), over plaintext HTTP/1.1 and h2c and
//! over HBONE from a captured client; the app receives the normalized path; a path Envoy refuses
//! to normalize is a 400 that never reaches the app.
#![allow(clippy::unwrap_used, clippy::expect_used)]
use std::fs;

use nodeway_tests::{
    config_yaml,
    http::{HttpBackend, HttpRequest},
    metric_value, require_root, Node, TestBed,
};

const PORT: u16 = 8080;

/// Each is `/admin` (or under it) once normalized; the DENY policy refuses them all.
const BYPASS_ATTEMPTS: &[&str] = &[
    "/admin",
    "/admin/",
    "/admin?x=1",
    "/%61dmin",
    "/%61%64%6D%69%6e",
    "/adm%69n/x",
    "//admin",
    "///admin//x",
    "/public/../admin",
    "/public/%2e%2e/admin",
    "/public/%2E./admin/x",
    "/./admin",
    "/../admin",
    "/admin/./x",
    "/admin/x/../../admin",
    "/admin;x=y",
    "/admin;jsessionid=1/x",
    "/public/..;/admin",
];

#[test]
fn deny_policies_match_normalized_paths_over_http1_h2c_and_hbone() {
    if !require_root() {
        return;
    }
    let mut bed = TestBed::new("paths").unwrap();
    let client = bed.add_pod("client", "demo").unwrap();
    let server = bed.add_pod("api", "demo").unwrap();
    let outsider = bed.add_pod("outsider", "plain").unwrap();
    let policies = r#"policies:
- name: no-admin
  namespace: demo
  scope: NAMESPACE
  action: DENY
  rules: [{clauses: [{matches: [{paths: [{exact: /admin}, {prefix: /admin/}]}]}]}]
"#;
    let cfg = bed.dir().join("node.yaml");
    let pods = [(&client).into(), (&server).into(), (&outsider).into()];
    fs::write(&cfg, format!("{}{policies}", config_yaml("node-a", &["demo"], &pods))).unwrap();
    let node = Node::start(&bed, "a", &cfg, &[]).unwrap();
    let backend = HttpBackend::start(&server, PORT, "api").unwrap();
    let to = server.addr(PORT);
    let ways = [
        ("plaintext HTTP/1.1", &outsider, false),
        ("plaintext h2c", &outsider, true),
        ("HBONE HTTP/1.1", &client, false),
        ("HBONE h2c", &client, true),
    ];
    for (way, pod, h2) in ways {
        let send = |path: &str| {
            let req = HttpRequest::get(path);
            let req = if h2 { req.http2() } else { req };
            pod.http_request(to, req).unwrap()
        };
        backend.clear();
        for path in BYPASS_ATTEMPTS {
            let r = send(path);
            assert_eq!(
                (r.status, r.text().as_str()),
                (403, "RBAC: access denied"),
                "{way}: {path}"
            );
        }
        for path in ["/admin%00", "/public/a%zz", "/public/%"] {
            assert_eq!(send(path).status, 400, "{way}: {path}");
        }
        assert_eq!(backend.requests(), 0, "{way}: a refused request reached the app");
        let r = send("/public//./a/../b%2dc;v=1/%41dmin?next=/../admin//x");
        assert_eq!((r.status, r.backend()), (200, Some("api")), "{way}: {}", r.text());
        let seen = backend.received();
        let paths: Vec<&str> = seen.iter().map(|s| s.path.as_str()).collect();
        assert_eq!(
            paths,
            ["/public/b-c;v=1/Admin?next=/../admin//x"],
            "{way}: the app receives the normalized path, query and case as sent"
        );
    }
    let requests = |code, flags| {
        metric_value(
            &node.metrics(),
            "istio_requests_total",
            &[
                ("reporter", "destination"),
                ("destination_workload", "api"),
                ("response_code", code),
                ("response_flags", flags),
            ],
        )
    };
    let denied = (BYPASS_ATTEMPTS.len() * ways.len()) as f64;
    assert_eq!(requests("403", "RBAC"), denied, "{}", node.metrics());
    assert_eq!(requests("400", "DPE"), (3 * ways.len()) as f64, "{}", node.metrics());
}
