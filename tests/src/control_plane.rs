//! The real control plane in the test bed: etcd, kube-apiserver and istiod, built by
//! `cargo xtask setup` from their own Go modules (tests/controlplane) and started per test.
//!
//! All three run in a network namespace of their own (`<prefix>-cp`) with fixed ports, so no port
//! is ever chosen and released (no race with other tests). A veth pair joins it to the host: the
//! control plane is `198.19.<k>.1`, the host side `198.19.<k>.2`, with `<k>` unique per test.
//! The nodeway agents (host network namespace) reach the API server on `:6443` and istiod on
//! `:15012`; etcd listens on the namespace's loopback only.
//!
//! The API server issues service-account tokens (TokenRequest, TokenReview work), has Istio's CRDs
//! from the istio module applied, and authorizes everything (`AlwaysAllow`: RBAC is checked by the
//! manifests' tests, not here). istiod runs out of cluster with a kubeconfig, ambient enabled, its
//! CA plugged with a test root and intermediate (`ROOT_CA_DIR`) and nodeway's service account
//! (`nodeway-system/nodeway`) in `CA_TRUSTED_NODE_ACCOUNTS`, as a chart install would set for ztunnel.
use std::{
    fs,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use k8s_openapi::api::{
    authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec},
    core::v1::ServiceAccount,
};
use kube::{
    api::{Api, DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
    discovery::{self, Scope},
};
use rcgen::{BasicConstraints, Certificate, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose, SanType};
use serde_json::{json, Value};

use crate::{sh, tools_dir, Container, FakeProc, Node, Pod, TestBed};

/// A program `cargo xtask setup` builds into `<tools>/bin` from its wrapper module.
pub struct Program {
    /// The wrapper module: `tests/controlplane/<dir>`.
    pub dir: &'static str,
    pub package: &'static str,
    pub binary: &'static str,
    /// `-X` settings: the version a release build stamps in (clients and istiod read it).
    pub ldflags: &'static str,
}

pub const PROGRAMS: &[Program] = &[
    Program {
        dir: "etcd",
        package: ".",
        binary: "etcd",
        ldflags: "",
    },
    Program {
        dir: "kube-apiserver",
        package: "k8s.io/kubernetes/cmd/kube-apiserver",
        binary: "kube-apiserver",
        ldflags: "-X k8s.io/component-base/version.gitVersion=v1.36.3 \
                  -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=36",
    },
    Program {
        dir: "istiod",
        package: "istio.io/istio/pilot/cmd/pilot-discovery",
        binary: "pilot-discovery",
        ldflags: "",
    },
];

/// Istio's CRDs as the istio module ships them (copied there by `cargo xtask setup`).
pub fn crds_file(tools: &Path) -> PathBuf {
    tools.join("share/istio-crds.yaml")
}

/// The namespace and service account istiod trusts to ask for other identities' certificates.
pub const NODEWAY_NAMESPACE: &str = "nodeway-system";
pub const NODEWAY_SERVICE_ACCOUNT: &str = "nodeway";
/// The audience of the tokens istiod's CA and xDS server accept.
pub const ISTIO_CA_AUDIENCE: &str = "istio-ca";
/// The name in istiod's serving certificate (issued by its own CA).
pub const ISTIOD_SERVER_NAME: &str = "istiod.istio-system.svc";
/// ClusterIP range of the API server: inside 198.18.0.0/15, apart from pods and control-plane links.
pub const SERVICE_CIDR: &str = "198.19.240.0/20";

const ADMIN_TOKEN: &str = "nodeway-test-admin-token";
const START_LIMIT: Duration = Duration::from_secs(90);

static PLANES: AtomicU32 = AtomicU32::new(0);

/// Which binary of the control plane: `<tools>/bin/<name>`, or a clear error naming the fix.
fn program(name: &str) -> Result<PathBuf> {
    let tools = tools_dir().context("neither NODEWAY_TOOLS_DIR nor HOME is set")?;
    let path = tools.join("bin").join(name);
    if !path.exists() {
        bail!(
            "{} missing: run `cargo xtask setup` (it builds etcd, kube-apiserver and istiod from their Go modules)",
            path.display()
        );
    }
    Ok(path)
}

/// True when the control-plane binaries are built; otherwise skips with a message, or fails
/// under `CI=true`.
pub fn require_control_plane() -> bool {
    let missing: Vec<String> = PROGRAMS
        .iter()
        .filter_map(|p| program(p.binary).err().map(|e| e.to_string()))
        .collect();
    if missing.is_empty() {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!(
            "CI=true and the real control plane is not built: {}",
            missing.join("; ")
        );
    }
    eprintln!("skipping: {}", missing.join("; "));
    false
}

/// One child process of the control plane, killed by PID when dropped.
struct Process {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Process {
    fn spawn(name: &'static str, netns: &str, cmd: &mut Command, log: PathBuf) -> Result<Process> {
        let out = fs::File::create(&log)?;
        // `ip netns exec` enters the namespace, then execs the program under the same PID.
        let mut exec = Command::new("ip");
        exec.args(["netns", "exec", netns])
            .arg(cmd.get_program())
            .args(cmd.get_args());
        for (k, v) in cmd.get_envs() {
            match v {
                Some(v) => exec.env(k, v),
                None => exec.env_remove(k),
            };
        }
        let child = exec
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Process { name, child, log })
    }

    /// Fails with the log's tail if the process has exited.
    fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited ({status}):\n{}", self.name, tail(&self.log, 40));
        }
        Ok(())
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The last `n` lines of a log file.
pub fn tail(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Certificates and keys the control plane is started with, as PEM files under `dir`.
struct Pki {
    /// Signs the API server's serving certificate; clients trust it.
    kube_ca: PathBuf,
    kube_cert: PathBuf,
    kube_key: PathBuf,
    /// Signs service-account tokens (ES256); the API server checks them with the public half.
    sa_key: PathBuf,
    sa_pub: PathBuf,
    /// istiod's plugged-in CA (`ROOT_CA_DIR`): root, and an intermediate that signs.
    istio_ca_dir: PathBuf,
}

fn ca_params(name: &str) -> Result<CertificateParams> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, name);
    p.distinguished_name.push(DnType::OrganizationName, "nodeway test bed");
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(p)
}

fn write(path: &Path, text: &str) -> Result<()> {
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

impl Pki {
    fn create(dir: &Path, ip: Ipv4Addr) -> Result<Pki> {
        fs::create_dir_all(dir)?;
        let ca_key = KeyPair::generate()?;
        let ca = ca_params("nodeway test-bed kubernetes CA")?.self_signed(&ca_key)?;
        let mut serving = CertificateParams::new(vec![
            "kubernetes".to_string(),
            "kubernetes.default.svc".to_string(),
            "localhost".to_string(),
        ])?;
        serving.distinguished_name.push(DnType::CommonName, "kube-apiserver");
        serving.subject_alt_names.extend([
            SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            SanType::IpAddress(IpAddr::V4(ip)),
        ]);
        let serving_key = KeyPair::generate()?;
        let serving = serving.signed_by(&serving_key, &ca, &ca_key)?;
        let pki = Pki {
            kube_ca: dir.join("kube-ca.pem"),
            kube_cert: dir.join("apiserver.pem"),
            kube_key: dir.join("apiserver-key.pem"),
            sa_key: dir.join("sa-key.pem"),
            sa_pub: dir.join("sa-pub.pem"),
            istio_ca_dir: dir.join("cacerts"),
        };
        write(&pki.kube_ca, &ca.pem())?;
        write(&pki.kube_cert, &serving.pem())?;
        write(&pki.kube_key, &serving_key.serialize_pem())?;
        let sa = KeyPair::generate()?;
        write(&pki.sa_key, &sa.serialize_pem())?;
        write(&pki.sa_pub, &sa.public_key_pem())?;
        pki.write_istio_ca()?;
        Ok(pki)
    }

    /// `root-cert.pem`, `ca-cert.pem` + `ca-key.pem` (the intermediate istiod signs with) and
    /// `cert-chain.pem` (intermediate, root): the layout of Istio's plugged-in CA certificates.
    fn write_istio_ca(&self) -> Result<()> {
        fs::create_dir_all(&self.istio_ca_dir)?;
        let root_key = KeyPair::generate()?;
        let root = ca_params("nodeway test-bed mesh root")?.self_signed(&root_key)?;
        let inter_key = KeyPair::generate()?;
        let inter: Certificate =
            ca_params("nodeway test-bed istiod intermediate")?.signed_by(&inter_key, &root, &root_key)?;
        let d = &self.istio_ca_dir;
        write(&d.join("root-cert.pem"), &root.pem())?;
        write(&d.join("ca-cert.pem"), &inter.pem())?;
        write(&d.join("ca-key.pem"), &inter_key.serialize_pem())?;
        write(&d.join("cert-chain.pem"), &format!("{}{}", inter.pem(), root.pem()))?;
        Ok(())
    }
}

/// A kubeconfig for `server` with the admin token.
fn kubeconfig(server: &str, ca: &Path) -> Result<String> {
    let ca_pem = fs::read(ca)?;
    let ca_b64 = base64_encode(&ca_pem);
    Ok(format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {server}\n    certificate-authority-data: {ca_b64}\n\
         users:\n- name: admin\n  user:\n    token: {ADMIN_TOKEN}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: admin\n\
         current-context: test\n"
    ))
}

fn base64_encode(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// etcd, kube-apiserver and istiod in their own network namespace, until dropped.
pub struct ControlPlane {
    netns: String,
    host_if: String,
    /// The control plane's address, as the host (and the agents) reach it.
    pub ip: Ipv4Addr,
    dir: PathBuf,
    /// Dropped in reverse start order: istiod, then the API server, then etcd.
    processes: Vec<Process>,
    /// The kubeconfig the agents and the tests use (`https://<ip>:6443`, admin token).
    pub kubeconfig: PathBuf,
    /// The mesh root istiod's CA chains to: agents check istiod and peers against it.
    pub root_cert: PathBuf,
    kube: Kube,
    istiod_args: Option<(Command, PathBuf)>,
}

impl ControlPlane {
    /// Starts the control plane for a test whose files go under `dir`; returns once the API
    /// server answers, Istio's CRDs are established and istiod is ready.
    pub fn start(dir: &Path) -> Result<ControlPlane> {
        let n = PLANES.fetch_add(1, Ordering::SeqCst);
        let slot = (std::process::id() * 8 + n) % 16_000;
        // 198.19.0.0/18 in /30 links: 198.19.<a>.<b*4+1>, apart from the service range.
        let (a, b) = ((slot / 64) as u8, (slot % 64) as u8);
        let ip = Ipv4Addr::new(198, 19, a % 60, b * 4 + 1);
        let host_ip = Ipv4Addr::new(198, 19, a % 60, b * 4 + 2);
        let tag = format!("nwcp{}-{n}", std::process::id() % 100_000);
        let dir = dir.join("control-plane");
        fs::create_dir_all(&dir)?;
        let mut cp = ControlPlane {
            netns: format!("{tag}-ns"),
            host_if: format!("{tag}h"),
            ip,
            kubeconfig: dir.join("kubeconfig"),
            root_cert: dir.join("pki/cacerts/root-cert.pem"),
            dir: dir.clone(),
            processes: Vec::new(),
            kube: Kube::placeholder(),
            istiod_args: None,
        };
        cp.network(host_ip)?;
        let pki = Pki::create(&dir.join("pki"), ip)?;
        write(
            &cp.kubeconfig,
            &kubeconfig(&format!("https://{ip}:6443"), &pki.kube_ca)?,
        )?;
        let inner = dir.join("kubeconfig.inner");
        write(&inner, &kubeconfig("https://127.0.0.1:6443", &pki.kube_ca)?)?;
        cp.start_etcd()?;
        cp.start_apiserver(&pki)?;
        cp.kube = Kube::connect(&cp.kubeconfig)?;
        cp.wait_for("the API server", |cp| Ok(cp.kube.ready()))?;
        cp.prepare_cluster()?;
        cp.start_istiod(&pki, &inner)?;
        Ok(cp)
    }

    fn network(&self, host_ip: Ipv4Addr) -> Result<()> {
        sh(&["ip", "netns", "add", &self.netns])?;
        sh(&[
            "ip",
            "link",
            "add",
            &self.host_if,
            "type",
            "veth",
            "peer",
            "name",
            "cp0",
            "netns",
            &self.netns,
        ])?;
        sh(&["ip", "addr", "add", &format!("{host_ip}/30"), "dev", &self.host_if])?;
        sh(&["ip", "link", "set", &self.host_if, "up"])?;
        sh(&[
            "ip",
            "-n",
            &self.netns,
            "addr",
            "add",
            &format!("{}/30", self.ip),
            "dev",
            "cp0",
        ])?;
        sh(&["ip", "-n", &self.netns, "link", "set", "cp0", "up"])?;
        sh(&["ip", "-n", &self.netns, "link", "set", "lo", "up"])
    }

    fn start_etcd(&mut self) -> Result<()> {
        let mut cmd = Command::new(program("etcd")?);
        cmd.args(["--name", "default", "--data-dir"])
            .arg(self.dir.join("etcd"))
            .args([
                "--listen-client-urls=http://127.0.0.1:2379",
                "--advertise-client-urls=http://127.0.0.1:2379",
                "--listen-peer-urls=http://127.0.0.1:2380",
                "--initial-advertise-peer-urls=http://127.0.0.1:2380",
                "--initial-cluster=default=http://127.0.0.1:2380",
                "--unsafe-no-fsync",
                "--log-level=warn",
            ]);
        let p = Process::spawn("etcd", &self.netns, &mut cmd, self.dir.join("etcd.log"))?;
        self.processes.push(p);
        Ok(())
    }

    fn start_apiserver(&mut self, pki: &Pki) -> Result<()> {
        let tokens = self.dir.join("tokens.csv");
        write(&tokens, &format!("{ADMIN_TOKEN},admin,admin-uid,\"system:masters\"\n"))?;
        let path = |p: &Path| p.display().to_string();
        let mut cmd = Command::new(program("kube-apiserver")?);
        cmd.args([
            "--etcd-servers=http://127.0.0.1:2379".to_string(),
            "--bind-address=0.0.0.0".to_string(),
            "--secure-port=6443".to_string(),
            format!("--advertise-address={}", self.ip),
            format!("--tls-cert-file={}", path(&pki.kube_cert)),
            format!("--tls-private-key-file={}", path(&pki.kube_key)),
            format!("--token-auth-file={}", path(&tokens)),
            "--authorization-mode=AlwaysAllow".to_string(),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local".to_string(),
            format!("--service-account-key-file={}", path(&pki.sa_pub)),
            format!("--service-account-signing-key-file={}", path(&pki.sa_key)),
            format!("--api-audiences=https://kubernetes.default.svc.cluster.local,{ISTIO_CA_AUDIENCE}"),
            format!("--service-cluster-ip-range={SERVICE_CIDR}"),
            format!("--cert-dir={}", path(&self.dir.join("apiserver-certs"))),
            // No controller manager runs: pods name their service account, and nothing waits
            // for a `default` one to be created.
            "--disable-admission-plugins=ServiceAccount".to_string(),
            "--enable-priority-and-fairness=false".to_string(),
            "--profiling=false".to_string(),
            "-v=1".to_string(),
        ]);
        let p = Process::spawn(
            "kube-apiserver",
            &self.netns,
            &mut cmd,
            self.dir.join("kube-apiserver.log"),
        )?;
        self.processes.push(p);
        Ok(())
    }

    /// Namespaces istiod and nodeway live in, and Istio's CRDs, established.
    fn prepare_cluster(&mut self) -> Result<()> {
        for ns in ["istio-system", NODEWAY_NAMESPACE] {
            self.kube
                .apply(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}))?;
        }
        self.kube.apply(json!({
            "apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": NODEWAY_SERVICE_ACCOUNT, "namespace": NODEWAY_NAMESPACE}
        }))?;
        let tools = tools_dir().context("no tools directory")?;
        let file = crds_file(&tools);
        let text = fs::read_to_string(&file).with_context(|| format!("{}: run `cargo xtask setup`", file.display()))?;
        let mut names = Vec::new();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let crd: Value = serde::Deserialize::deserialize(doc).context("parsing Istio's CRDs")?;
            if crd.is_null() {
                continue;
            }
            names.push(crd["metadata"]["name"].as_str().unwrap_or_default().to_string());
            self.kube.apply(crd)?;
        }
        self.wait_for("Istio's CRDs to be established", |cp| cp.kube.crds_established(&names))
    }

    fn start_istiod(&mut self, pki: &Pki, kubeconfig: &Path) -> Result<()> {
        let mesh = self.dir.join("mesh.yaml");
        write(
            &mesh,
            "trustDomain: cluster.local\nrootNamespace: istio-system\n\
             defaultConfig:\n  discoveryAddress: istiod.istio-system.svc:15012\n",
        )?;
        let mut cmd = Command::new(program("pilot-discovery")?);
        cmd.args(["discovery", "--kubeconfig"])
            .arg(kubeconfig)
            .arg("--meshConfig")
            .arg(&mesh)
            .args([
                "--domain=cluster.local",
                "--httpAddr=:8080",
                "--httpsAddr=:15017",
                "--grpcAddr=:15010",
                "--secureGRPCAddr=:15012",
                "--monitoringAddr=:15014",
                "--log_output_level=default:info,ads:debug",
            ])
            .env("KUBECONFIG", kubeconfig)
            .env("POD_NAMESPACE", "istio-system")
            .env("POD_NAME", "istiod-test")
            .env("REVISION", "default")
            .env("CLUSTER_ID", "Kubernetes")
            .env("PILOT_ENABLE_AMBIENT", "true")
            .env(
                "CA_TRUSTED_NODE_ACCOUNTS",
                format!("{NODEWAY_NAMESPACE}/{NODEWAY_SERVICE_ACCOUNT}"),
            )
            .env("ROOT_CA_DIR", &pki.istio_ca_dir)
            .env("PILOT_ENABLE_GATEWAY_API", "false")
            .env("VALIDATION_WEBHOOK_CONFIG_NAME", "")
            .env("INJECTION_WEBHOOK_CONFIG_NAME", "")
            .env("PILOT_ENABLE_XDS_CACHE", "true")
            .current_dir(&self.dir);
        let log = self.dir.join("istiod.log");
        self.istiod_args = Some((cmd, log));
        self.start_istiod_again()
    }

    /// (Re)starts istiod with the arguments of the first start and waits until it is ready.
    pub fn start_istiod_again(&mut self) -> Result<()> {
        let (cmd, log) = self.istiod_args.as_mut().context("istiod was never configured")?;
        let (log, netns) = (log.clone(), self.netns.clone());
        let p = Process::spawn("istiod", &netns, cmd, log)?;
        self.processes.push(p);
        let ready = format!("{}:8080", self.ip).parse::<SocketAddr>()?;
        self.wait_for("istiod to be ready", move |_| {
            Ok(matches!(crate::http_get(ready, "/ready"), Ok((200, _))))
        })
    }

    /// Stops istiod (the other processes keep running).
    pub fn stop_istiod(&mut self) {
        if let Some(i) = self.processes.iter().position(|p| p.name == "istiod") {
            let mut p = self.processes.remove(i);
            p.stop();
        }
    }

    fn wait_for(&mut self, what: &str, mut f: impl FnMut(&Self) -> Result<bool>) -> Result<()> {
        let deadline = Instant::now() + START_LIMIT;
        let mut last = None;
        while Instant::now() < deadline {
            for p in &mut self.processes {
                p.check_alive()?;
            }
            match f(self) {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => last = Some(e),
            }
            thread::sleep(Duration::from_millis(200));
        }
        let logs: Vec<String> = self
            .processes
            .iter()
            .map(|p| format!("---- {} ----\n{}", p.name, tail(&p.log, 30)))
            .collect();
        bail!(
            "waited {START_LIMIT:?} for {what} (last error: {last:?})\n{}",
            logs.join("\n")
        )
    }

    /// The API client (admin).
    pub fn kube(&self) -> &Kube {
        &self.kube
    }

    /// istiod's xDS and CA address, as an agent is given it.
    pub fn istiod_url(&self) -> String {
        format!("https://{}:15012", self.ip)
    }

    /// istiod's debug endpoint `path` (e.g. `/debug/connections`), plaintext on :8080, asked from
    /// inside the control plane's namespace: istiod serves its debug endpoints unauthenticated
    /// only to localhost (from the host's address it answers 401).
    pub fn istiod_debug(&self, path: &str) -> Result<String> {
        let ns = format!("/run/netns/{}", self.netns);
        let file = fs::File::open(&ns).with_context(|| format!("opening {ns}"))?;
        let path_owned = path.to_string();
        let got = thread::spawn(move || -> Result<(u16, String)> {
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).context("setns")?;
            crate::http_get(SocketAddr::from((Ipv4Addr::LOCALHOST, 8080)), &path_owned)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("istiod debug request thread panicked"))??;
        match got {
            (200, body) => Ok(body),
            (code, body) => bail!("istiod {path}: {code} {body}"),
        }
    }

    /// istiod's PID while it runs (`ip netns exec` execs it under the PID it was spawned with),
    /// so benches can read its memory from `/proc`.
    pub fn istiod_pid(&self) -> Option<u32> {
        self.processes.iter().find(|p| p.name == "istiod").map(|p| p.child.id())
    }

    pub fn istiod_log(&self) -> String {
        fs::read_to_string(self.dir.join("istiod.log")).unwrap_or_default()
    }

    /// The Pod object of a nodeway agent on `node` (service account `nodeway-system/nodeway`), and a
    /// token bound to it with audience `istio-ca`, written to a file: what the DaemonSet's projected
    /// volume gives the agent. Returns (pod name, token file).
    pub fn node_proxy(&self, node: &str, host_ip: Ipv4Addr) -> Result<(String, PathBuf)> {
        let name = format!("nodeway-{node}");
        let pod = self.kube.apply(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": NODEWAY_NAMESPACE, "labels": {"app": "nodeway"}},
            "spec": {
                "nodeName": node,
                "serviceAccountName": NODEWAY_SERVICE_ACCOUNT,
                "hostNetwork": true,
                "containers": [{"name": "nodeway", "image": "nodeway:test"}]
            }
        }))?;
        self.kube
            .set_pod_running(NODEWAY_NAMESPACE, &name, &[host_ip], host_ip)?;
        let uid = pod["metadata"]["uid"].as_str().context("pod without uid")?.to_string();
        let token = self.kube.token(
            NODEWAY_NAMESPACE,
            NODEWAY_SERVICE_ACCOUNT,
            ISTIO_CA_AUDIENCE,
            &name,
            &uid,
        )?;
        let file = self.dir.join(format!("{name}.token"));
        write(&file, &token)?;
        Ok((name, file))
    }

    /// The `nodeway run` arguments that make an agent talk to this istiod as a node proxy.
    pub fn agent_args(&self, token: &Path) -> Vec<String> {
        vec![
            "--ca".into(),
            "istio".into(),
            "--ca-address".into(),
            self.istiod_url(),
            "--ca-root-cert".into(),
            self.root_cert.display().to_string(),
            "--ca-token-file".into(),
            token.display().to_string(),
            "--ca-tls-server-name".into(),
            ISTIOD_SERVER_NAME.into(),
            "--xds-address".into(),
            self.istiod_url(),
            "--xds-tls-server-name".into(),
            ISTIOD_SERVER_NAME.into(),
        ]
    }

    /// The agent's environment: its pod (downward API) and the kubeconfig.
    pub fn agent_env(&self, node: &str, pod_name: &str, host_ip: Ipv4Addr) -> Vec<(String, String)> {
        vec![
            ("KUBECONFIG".into(), self.kubeconfig.display().to_string()),
            ("NODE_NAME".into(), node.into()),
            ("POD_NAME".into(), pod_name.into()),
            ("POD_NAMESPACE".into(), NODEWAY_NAMESPACE.into()),
            ("INSTANCE_IP".into(), host_ip.to_string()),
        ]
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        if thread::panicking() {
            for p in &self.processes {
                eprintln!("---- {} log (tail) ----\n{}", p.name, tail(&p.log, 60));
            }
        }
        while let Some(mut p) = self.processes.pop() {
            p.stop();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .stderr(Stdio::null())
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .stderr(Stdio::null())
            .status();
        let _ = fs::remove_dir_all(self.dir.join("etcd"));
    }
}

/// A blocking Kubernetes API client for the tests (kube-rs on a runtime of its own).
pub struct Kube {
    rt: Option<tokio::runtime::Runtime>,
    client: Option<kube::Client>,
}

impl Kube {
    fn placeholder() -> Kube {
        Kube { rt: None, client: None }
    }

    fn connect(kubeconfig: &Path) -> Result<Kube> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let kc = Kubeconfig::read_from(kubeconfig)?;
        let client = rt.block_on(async {
            let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
            anyhow::Ok(kube::Client::try_from(config)?)
        })?;
        Ok(Kube {
            rt: Some(rt),
            client: Some(client),
        })
    }

    fn parts(&self) -> Result<(&tokio::runtime::Runtime, kube::Client)> {
        match (&self.rt, &self.client) {
            (Some(rt), Some(c)) => Ok((rt, c.clone())),
            _ => bail!("the API client is not connected yet"),
        }
    }

    fn ready(&self) -> bool {
        let Ok((rt, client)) = self.parts() else {
            return false;
        };
        rt.block_on(async {
            let req = http::Request::get("/readyz").body(Vec::new()).ok()?;
            client.request_text(req).await.ok()
        })
        .is_some_and(|t| t.trim() == "ok")
    }

    /// The API and the namespace (if namespaced) of an object.
    async fn api_for(client: &kube::Client, obj: &Value) -> Result<Api<DynamicObject>> {
        let api_version = obj["apiVersion"].as_str().context("object without apiVersion")?;
        let kind = obj["kind"].as_str().context("object without kind")?;
        let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
        let gvk = GroupVersionKind::gvk(group, version, kind);
        let (resource, caps) = discovery::pinned_kind(client, &gvk)
            .await
            .with_context(|| format!("discovering {api_version} {kind}"))?;
        Ok(match (caps.scope, obj["metadata"]["namespace"].as_str()) {
            (Scope::Namespaced, Some(ns)) => Api::namespaced_with(client.clone(), ns, &resource),
            (Scope::Namespaced, None) => bail!("{kind} needs metadata.namespace"),
            (Scope::Cluster, _) => Api::all_with(client.clone(), &resource),
        })
    }

    /// Server-side apply of any object (`apiVersion`, `kind`, `metadata.name`, ...); the object
    /// as stored.
    pub fn apply(&self, obj: Value) -> Result<Value> {
        let (rt, client) = self.parts()?;
        rt.block_on(async {
            let api = Self::api_for(&client, &obj).await?;
            let name = obj["metadata"]["name"]
                .as_str()
                .context("object without name")?
                .to_string();
            let params = PatchParams::apply("nodeway-tests").force();
            let stored = api
                .patch(&name, &params, &Patch::Apply(&obj))
                .await
                .with_context(|| format!("applying {} {name}", obj["kind"]))?;
            Ok(serde_json::to_value(stored)?)
        })
    }

    /// A JSON merge patch of the object `like` names (apiVersion, kind, metadata name/namespace).
    pub fn merge(&self, like: &Value, patch: Value) -> Result<Value> {
        let (rt, client) = self.parts()?;
        rt.block_on(async {
            let api = Self::api_for(&client, like).await?;
            let name = like["metadata"]["name"].as_str().context("object without name")?;
            let stored = api.patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await?;
            Ok(serde_json::to_value(stored)?)
        })
    }

    /// The object `like` names, if it exists.
    pub fn get(&self, like: &Value) -> Result<Option<Value>> {
        let (rt, client) = self.parts()?;
        rt.block_on(async {
            let api = Self::api_for(&client, like).await?;
            let name = like["metadata"]["name"].as_str().context("object without name")?;
            Ok(api.get_opt(name).await?.map(serde_json::to_value).transpose()?)
        })
    }

    pub fn delete(&self, like: &Value) -> Result<()> {
        let (rt, client) = self.parts()?;
        rt.block_on(async {
            let api = Self::api_for(&client, like).await?;
            let name = like["metadata"]["name"].as_str().context("object without name")?;
            let params = DeleteParams {
                grace_period_seconds: Some(0),
                ..DeleteParams::default()
            };
            api.delete(name, &params).await?;
            Ok(())
        })
    }

    /// Sets a pod's status as a kubelet would once its containers run: Running, Ready, its IPs.
    pub fn set_pod_running(&self, namespace: &str, name: &str, ips: &[Ipv4Addr], host_ip: Ipv4Addr) -> Result<()> {
        let (rt, client) = self.parts()?;
        let now = crate::rfc3339_now();
        let status = json!({"status": {
            "phase": "Running",
            "hostIP": host_ip.to_string(),
            "hostIPs": [{"ip": host_ip.to_string()}],
            "podIP": ips.first().map(|i| i.to_string()),
            "podIPs": ips.iter().map(|i| json!({"ip": i.to_string()})).collect::<Vec<_>>(),
            "startTime": now,
            "conditions": [
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
                {"type": "Initialized", "status": "True", "lastTransitionTime": now},
                {"type": "ContainersReady", "status": "True", "lastTransitionTime": now},
                {"type": "Ready", "status": "True", "lastTransitionTime": now},
            ],
        }});
        rt.block_on(async {
            let api: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client, namespace);
            api.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
                .await
                .with_context(|| format!("setting the status of pod {namespace}/{name}"))?;
            Ok(())
        })
    }

    /// A token of service account `namespace/sa` for `audience`, bound to pod `pod` (`uid`).
    pub fn token(&self, namespace: &str, sa: &str, audience: &str, pod: &str, uid: &str) -> Result<String> {
        let (rt, client) = self.parts()?;
        rt.block_on(async {
            let api: Api<ServiceAccount> = Api::namespaced(client, namespace);
            let req = TokenRequest {
                spec: TokenRequestSpec {
                    audiences: vec![audience.to_string()],
                    bound_object_ref: Some(BoundObjectReference {
                        api_version: Some("v1".into()),
                        kind: Some("Pod".into()),
                        name: Some(pod.into()),
                        uid: Some(uid.into()),
                    }),
                    expiration_seconds: Some(3600),
                },
                ..TokenRequest::default()
            };
            let resp = api
                .create_token_request(sa, &PostParams::default(), &req)
                .await
                .with_context(|| format!("TokenRequest for {namespace}/{sa} bound to pod {pod}"))?;
            resp.status
                .map(|s| s.token)
                .context("TokenRequest answered without a token")
        })
    }

    fn crds_established(&self, names: &[String]) -> Result<bool> {
        for name in names {
            let like = json!({
                "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
                "metadata": {"name": name}
            });
            let Some(crd) = self.get(&like)? else {
                return Ok(false);
            };
            let established = crd["status"]["conditions"]
                .as_array()
                .is_some_and(|c| c.iter().any(|c| c["type"] == "Established" && c["status"] == "True"));
            if !established {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

/// The annotation nodeway writes on the pods it captures (as istio-cni does for ztunnel).
pub const REDIRECTION_ANNOTATION: &str = "ambient.istio.io/redirection";
/// The port the mesh's pods declare (where the tests' echo servers listen).
pub const APP_PORT: u16 = 8080;

/// A pod in the API server with a "container" process in its network namespace.
pub struct KubePod {
    pub pod: Pod,
    /// None for a pod whose process nodeway must not find (its netns only from the annotation).
    _container: Option<Container>,
}

/// The control plane, the bed's pods as Kubernetes pods, and nodeway agents as node proxies.
pub struct Mesh {
    pub cp: ControlPlane,
    proc_root: FakeProc,
    // Dropped last: the namespaces go after the processes in them.
    bed: TestBed,
}

fn pod_like(namespace: &str, name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": namespace}})
}

impl Mesh {
    pub fn new(name: &str) -> Result<Mesh> {
        let bed = TestBed::new(name)?;
        let cp = ControlPlane::start(bed.dir())?;
        let proc_root = FakeProc::new(&bed)?;
        Ok(Mesh { cp, proc_root, bed })
    }

    /// The host's end of the control-plane link: the nodes' (host-network) address.
    pub fn host_ip(&self) -> Ipv4Addr {
        let o = self.cp.ip.octets();
        Ipv4Addr::new(o[0], o[1], o[2], o[3] + 1)
    }

    /// A namespace, in the ambient mesh (`istio.io/dataplane-mode=ambient`) or not.
    pub fn namespace(&self, name: &str, ambient: bool) -> Result<()> {
        let labels = if ambient {
            json!({"istio.io/dataplane-mode": "ambient"})
        } else {
            json!({})
        };
        self.cp
            .kube()
            .apply(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}))?;
        Ok(())
    }

    pub fn service_account(&self, namespace: &str, name: &str) -> Result<()> {
        self.cp.kube().apply(
            json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": namespace}}),
        )?;
        Ok(())
    }

    /// A Running pod on `node` with service account `sa` and label `app: <name>`.
    pub fn pod(&mut self, node: &str, name: &str, namespace: &str, sa: &str) -> Result<KubePod> {
        let p = self.prepare_pod(node, name, namespace, sa)?;
        self.set_running(&p)?;
        Ok(p)
    }

    /// A pod scheduled on `node`, its network namespace and process ready, not Running yet.
    pub fn prepare_pod(&mut self, node: &str, name: &str, namespace: &str, sa: &str) -> Result<KubePod> {
        let pod = self.bed.add_pod(name, namespace)?;
        let container = Container::start(&pod)?;
        let stored = self.cp.kube().apply(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "labels": {"app": name}},
            "spec": {
                "nodeName": node,
                "serviceAccountName": sa,
                "containers": [{"name": "app", "image": "app:test", "ports": [{"name": "http", "containerPort": APP_PORT}]}]
            }
        }))?;
        let uid = stored["metadata"]["uid"].as_str().context("pod without uid")?;
        self.proc_root.add(container.pid(), uid)?;
        Ok(KubePod {
            pod,
            _container: Some(container),
        })
    }

    /// A Running pod on `node` with a network namespace of its own but no process nodeway can
    /// find: only its `nodeway.io/netns` annotation says where its namespace is: `netns` as a
    /// tenant might write it, or (None) the pod's own namespace name, as a CNI writes it.
    pub fn pod_with_netns_annotation(
        &mut self,
        node: &str,
        name: &str,
        namespace: &str,
        sa: &str,
        netns: Option<&str>,
    ) -> Result<KubePod> {
        let pod = self.bed.add_pod(name, namespace)?;
        let netns = netns.unwrap_or(&pod.netns);
        self.cp.kube().apply(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "labels": {"app": name},
                         "annotations": {"nodeway.io/netns": netns}},
            "spec": {
                "nodeName": node,
                "serviceAccountName": sa,
                "containers": [{"name": "app", "image": "app:test"}]
            }
        }))?;
        let p = KubePod { pod, _container: None };
        self.set_running(&p)?;
        Ok(p)
    }

    /// What the kubelet reports once the pod's containers run: Running, Ready, its IP.
    pub fn set_running(&self, p: &KubePod) -> Result<()> {
        self.cp
            .kube()
            .set_pod_running(&p.pod.namespace, &p.pod.name, &[p.pod.ip], self.host_ip())
    }

    /// Starts `nodeway run` as node `node`'s agent (its Pod object and token first) without
    /// waiting for readiness.
    pub fn spawn_node(&self, name: &str, node: &str) -> Result<Node> {
        let (pod_name, token) = self.cp.node_proxy(node, self.host_ip())?;
        let mut source: Vec<String> = ["--source", "kubernetes", "--debounce-ms", "50", "--proc-root"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        source.push(self.proc_root.path().display().to_string());
        source.extend(self.cp.agent_args(&token));
        let env = self.cp.agent_env(node, &pod_name, self.host_ip());
        Node::spawn_with(&self.bed, name, &source, &[], &env)
    }

    /// [`Mesh::spawn_node`], then ready (which needs istiod's first Address and Authorization).
    pub fn node(&self, name: &str, node: &str) -> Result<Node> {
        let mut n = self.spawn_node(name, node)?;
        n.wait_ready(Duration::from_secs(60))?;
        Ok(n)
    }

    /// The pod's `ambient.istio.io/redirection` annotation.
    pub fn annotation(&self, namespace: &str, name: &str) -> Result<Option<String>> {
        let p = self.cp.kube().get(&pod_like(namespace, name))?;
        Ok(p.and_then(|p| {
            p["metadata"]["annotations"][REDIRECTION_ANNOTATION]
                .as_str()
                .map(str::to_owned)
        }))
    }
}
