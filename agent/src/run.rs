//! `nodeway run`: start-up checks, capture, the proxy, the admin servers, the config watch, exit.
use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    sync::{atomic::AtomicBool, atomic::Ordering, Arc, Mutex},
    time::{Duration, SystemTime},
};

use anyhow::{Context, Result};
use nodeway_proxy::{
    admin::{self, AdminState, AdminToken},
    connections::Connections,
    identity::{
        dev_ca::DevCa,
        istio_ca::{IstioCa, IstioCaConfig},
        manager::CertManager,
        CertificateProvider,
    },
    metrics::Metrics,
    xds::{class_stream::ClassStreamConfig, NodeInfo, XdsClient, XdsConfig},
    Config as ProxyConfig, Http2Guards, Mtls, Proxy, SameNodePath,
};
use rustls::pki_types::CertificateDer;
use serde_json::json;
use tokio::{
    net::TcpListener,
    signal::unix::{signal, SignalKind},
    sync::mpsc,
};
use tracing::{error, info, warn};

use crate::{
    addresses::{self, AddressFile, BoundAddresses},
    capture::{Backend, Capture},
    classes::{ClassSettings, SidecarClasses},
    config::Config,
    iptables::IptablesOriginalDst,
    kubernetes,
    logging::LogControl,
    preflight,
    redirect::Redirector,
    CaMode, CaptureMode, L7Xds, RunArgs, SourceKind,
};

pub async fn run(args: RunArgs, log: LogControl) -> Result<()> {
    let ebpf = args.capture == CaptureMode::Ebpf;
    preflight::check(ebpf).map_err(startup)?;
    // The file is read now; the Kubernetes source delivers its first config once both lists are in.
    let (config, source) = read_source(&args).await?;
    let trust_domain = config
        .as_ref()
        .map_or_else(|| args.trust_domain.clone(), |c| c.trust_domain.clone());
    let cgroup = match &args.cgroup {
        Some(c) => c.clone(),
        None => preflight::cgroup2_root().map_err(startup)?,
    };
    // Bind the admin ports before touching the kernel: a port clash should not leave state behind.
    let admin_l = bind(&args.admin_addr, "--admin-addr").await?;
    let stats_l = bind(&listen_addr(args.stats_addr.as_deref(), 15020), "--stats-addr").await?;
    let ready_l = bind(&listen_addr(args.readiness_addr.as_deref(), 15021), "--readiness-addr").await?;
    // Held until `run` returns: the report goes away with the agent (also on a start-up failure).
    let _address_file = report_addresses(&args.run_dir, &admin_l, &stats_l, &ready_l)?;
    let admin_token = addresses::TokenFile::create(&args.run_dir).map_err(|e| {
        startup(format!(
            "--run-dir {}: cannot write {}: {e}",
            args.run_dir.display(),
            addresses::TOKEN_FILE
        ))
    })?;
    info!(file = %admin_token.path().display(), "admin mutations (POST /logging, /quitquitquit) need the token in this file");

    let metrics = Arc::new(Metrics::new());
    let connections = Arc::new(Connections::new(metrics.clone()));
    let (backend, original_dst) = capture_backend(&args, ebpf, &cgroup)?;
    let mtls = certificate_provider(&args, &trust_domain)?.map(|(provider, roots)| Mtls {
        certs: CertManager::new(provider),
        roots,
        trust_domain: trust_domain.clone(),
    });
    let proxy = Proxy::new(proxy_config(&args), connections.clone(), original_dst, mtls);
    let xds = xds_client(&args, &config.clone().unwrap_or_default(), &proxy)?;
    let mut capture = Capture::new(backend, proxy.clone(), metrics.clone());
    capture.mesh_from_xds = xds.is_some();
    capture.classes = sidecar_classes(&args, &trust_domain, &proxy, &metrics)?;
    let capture = Arc::new(Mutex::new(capture));
    if let Some(config) = &config {
        lock(&capture).apply(config);
    }
    // The Kubernetes source: started before the admin API so `/captured` can show its status.
    let (captured_tx, captured_rx) = tokio::sync::watch::channel(BTreeSet::new());
    let (k8s_updates, source_status) = start_source(source, captured_rx, &metrics);
    let agent = Arc::new(Agent {
        metrics,
        proxy,
        capture,
        config_state: Arc::new(Mutex::new(ConfigState {
            current: config.unwrap_or_default(),
            last_error: None,
            path: args.config.clone(),
        })),
        xds,
        source_status,
        ready: Arc::new(AtomicBool::new(false)),
    });
    agent.refresh_ready();
    let shutdown = Arc::new(tokio::sync::Notify::new());
    // Before anything can report ready: a SIGTERM from then on is a graceful shutdown, never
    // the default action (exit without draining).
    let signals = Signals {
        term: signal(SignalKind::terminate())?,
        int: signal(SignalKind::interrupt())?,
        quit: shutdown.clone(),
    };
    tokio::spawn(admin::serve_admin(
        admin_l,
        agent.admin_state(
            connections.clone(),
            &log,
            shutdown,
            AdminToken::new(admin_token.token()),
        ),
    ));
    if let Some(x) = &agent.xds {
        info!(address = %x.address(), "taking workloads, services, policies, routes, clusters and endpoints from xDS");
        tokio::spawn(x.clone().run());
    }
    tokio::spawn(admin::serve_stats(stats_l, agent.metrics.clone()));
    tokio::spawn(admin::serve_readiness(ready_l, agent.ready.clone()));
    info!("nodeway running");
    spawn_kernel_stats(agent.clone());
    spawn_host_addresses(agent.clone());

    let (tx, file_changes) = mpsc::channel::<()>(4);
    let _watcher = match &args.config {
        Some(path) if args.source == SourceKind::File => Some(watch(path, tx).context("watching the config file")?),
        _ => None,
    };
    let events = Events {
        file_changes,
        k8s_updates,
        captured: captured_tx,
    };
    agent.serve(&args, events, signals).await;
    shut_down(&args, &agent.capture, &connections, &agent.ready).await
}

/// The config file, or the Kubernetes client and settings (`--source kubernetes`), checked
/// before anything touches the kernel.
async fn read_source(args: &RunArgs) -> Result<(Option<Config>, Option<(kube::Client, kubernetes::Settings)>)> {
    Ok(match args.source {
        SourceKind::File => {
            let path = args
                .config
                .clone()
                .ok_or_else(|| startup("--source file needs --config FILE (or NODEWAY_CONFIG)"))?;
            let config = Config::load(&path).map_err(|e| startup(e.to_string()))?;
            (Some(config), None)
        }
        SourceKind::Kubernetes => {
            let node = args.node_name.clone().filter(|n| !n.is_empty()).ok_or_else(|| {
                startup("--source kubernetes needs --node-name or NODE_NAME (the DaemonSet sets it from spec.nodeName)")
            })?;
            if !args.proc_root.join("self").exists() {
                return Err(startup(format!(
                    "--proc-root {}: not a proc filesystem",
                    args.proc_root.display()
                )));
            }
            // Before anything touches the kernel: a bad kubeconfig should leave nothing behind.
            let client = kubernetes::client().await.map_err(|e| startup(e.to_string()))?;
            (
                None,
                Some((
                    client,
                    kubernetes::Settings {
                        node,
                        trust_domain: args.trust_domain.clone(),
                        proc_root: args.proc_root.clone(),
                        netns_dir: args.netns_dir.clone(),
                        debounce: Duration::from_millis(args.debounce_ms),
                        retry_unresolved: Duration::from_secs(2),
                        cluster_pods: args.cluster_pods,
                    },
                )),
            )
        }
    })
}

/// eBPF capture (pinned under `--pin-dir`), or iptables REDIRECT rules, and how the proxy learns
/// a redirected connection's original destination.
fn capture_backend(
    args: &RunArgs,
    ebpf: bool,
    cgroup: &Path,
) -> Result<(Backend, Arc<dyn nodeway_proxy::OriginalDst>)> {
    if !ebpf {
        return Ok((Backend::Iptables, Arc::new(IptablesOriginalDst)));
    }
    let r = Redirector::start(&args.pin_dir, cgroup, args.ebpf_log).map_err(|e| startup(format!("{e:#}")))?;
    let od = r.original_dst();
    Ok((Backend::Ebpf(Box::new(r)), od))
}

type KubeUpdates = tokio::sync::watch::Receiver<Option<Config>>;
type SourceState = Arc<Mutex<kubernetes::SourceStatus>>;

/// Starts the Kubernetes source, and with it the redirection annotations (which pods are
/// captured goes back to the API server as istio-cni reports it).
fn start_source(
    source: Option<(kube::Client, kubernetes::Settings)>,
    captured: tokio::sync::watch::Receiver<BTreeSet<(String, String)>>,
    metrics: &Arc<Metrics>,
) -> (Option<KubeUpdates>, Option<SourceState>) {
    let Some((client, settings)) = source else {
        return (None, None);
    };
    let s = kubernetes::start(client.clone(), settings, metrics.clone());
    kubernetes::annotate::spawn(client, s.pods, captured, metrics.clone());
    (Some(s.updates), Some(s.status))
}

/// What the running agent's admin views and its event loop share.
struct Agent {
    metrics: Arc<Metrics>,
    proxy: Arc<Proxy>,
    capture: Arc<Mutex<Capture>>,
    config_state: Arc<Mutex<ConfigState>>,
    xds: Option<Arc<XdsClient>>,
    source_status: Option<SourceState>,
    ready: Arc<AtomicBool>,
}

/// What the event loop reacts to besides signals.
struct Events {
    file_changes: mpsc::Receiver<()>,
    k8s_updates: Option<KubeUpdates>,
    /// The pods captured now, for the redirection annotations.
    captured: tokio::sync::watch::Sender<BTreeSet<(String, String)>>,
}

/// What ends the event loop: SIGTERM, SIGINT, `/quitquitquit`.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    quit: Arc<tokio::sync::Notify>,
}

impl Agent {
    /// Ready: every configured pod captured and, with xDS, workloads and policies received once,
    /// and each sidecar class's first config (until then its pods' outbound traffic is refused).
    fn is_ready(&self, c: &Capture) -> bool {
        c.all_captured() && self.proxy.state().synced() && c.classes_synced()
    }

    fn refresh_ready(&self) {
        let c = lock(&self.capture);
        self.ready.store(self.is_ready(&c), Ordering::Relaxed);
    }

    /// Applies config changes (file edits, Kubernetes updates) until a signal says stop.
    async fn serve(&self, args: &RunArgs, mut ev: Events, mut sig: Signals) {
        let synced = {
            let state = self.proxy.state().clone();
            async move { state.wait_synced().await }
        };
        tokio::pin!(synced);
        let mut synced_seen = false;
        // Sidecar classes get their configs on their own streams: readiness follows them.
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tokio::select! {
                _ = tick.tick() => self.refresh_ready(),
                Some(()) = ev.file_changes.recv() => {
                    if let Some(path) = &args.config {
                        // Editors write in several steps, `cat > file` truncates first: let it settle.
                        let text = settled_text(path).await;
                        while ev.file_changes.try_recv().is_ok() {}
                        reload(path, text, &self.capture, &self.config_state, &self.metrics);
                    }
                    self.refresh_ready();
                }
                Some(cfg) = next_update(&mut ev.k8s_updates) => self.apply_kubernetes(cfg, &ev.captured),
                () = &mut synced, if !synced_seen => {
                    synced_seen = true;
                    info!("xDS workloads and policies received: serving captured pods");
                    self.refresh_ready();
                }
                _ = sig.quit.notified() => { info!("shutting down (quitquitquit)"); return; }
                _ = sig.term.recv() => { info!("shutting down (SIGTERM)"); return; }
                _ = sig.int.recv() => { info!("shutting down (SIGINT)"); return; }
            }
        }
    }

    fn apply_kubernetes(&self, cfg: Config, captured_tx: &tokio::sync::watch::Sender<BTreeSet<(String, String)>>) {
        info!(
            pods = cfg.pods.len(),
            namespaces = cfg.namespaces.len(),
            "Kubernetes state changed, applying"
        );
        let captured = {
            let mut c = lock(&self.capture);
            c.apply(&cfg);
            c.captured_pods()
        };
        captured_tx.send_if_modified(|cur| {
            let changed = *cur != captured;
            *cur = captured;
            changed
        });
        lock(&self.config_state).current = cfg;
        self.refresh_ready();
    }

    /// `/captured`: the capture, the source's health, and whether the mesh view is in.
    fn captured_view(&self) -> Arc<dyn Fn() -> serde_json::Value + Send + Sync> {
        let c = self.capture.clone();
        let source = self.source_status.clone();
        let mesh = self.proxy.state().clone();
        Arc::new(move || {
            let mut v = lock(&c).status_json();
            if let Some(s) = &source {
                v["source"] = serde_json::to_value(&*lock(s)).unwrap_or_default();
            }
            // Captured pods' traffic is refused (`config_not_synced`) until the mesh view
            // has arrived once: say so next to the pods it affects.
            v["meshConfig"] = mesh_sync_json(mesh.synced(), &mesh.awaiting());
            v
        })
    }

    /// `/config_dump`: the config in force, where it came from, xDS state and the L7 model.
    fn config_dump_view(&self) -> Arc<dyn Fn() -> serde_json::Value + Send + Sync> {
        let cs = self.config_state.clone();
        let proxy = self.proxy.clone();
        let source = self.source_status.clone();
        let xds = self.xds.clone();
        let capture = self.capture.clone();
        Arc::new(move || {
            let cs = lock(&cs);
            let mut dump = match &source {
                Some(s) => {
                    json!({"source": serde_json::to_value(&*lock(s)).unwrap_or_default(), "config": cs.current.to_json()})
                }
                None => json!({
                    "configFile": cs.path.as_ref().map(|p| p.display().to_string()),
                    "config": cs.current.to_json(),
                    "lastError": cs.last_error,
                }),
            };
            if let Some(x) = &xds {
                dump["xds"] = x.dump();
            }
            // The L7 model in force, whichever source it came from.
            dump["l7"] = proxy.state().l7().to_json();
            if let Some(c) = &lock(&capture).classes {
                dump["sidecarClasses"] = c.dump();
            }
            dump
        })
    }

    /// The admin API's views of the agent and its proxy.
    fn admin_state(
        &self,
        connections: Arc<Connections>,
        log: &LogControl,
        shutdown: Arc<tokio::sync::Notify>,
        admin_token: AdminToken,
    ) -> Arc<AdminState> {
        let (metrics, proxy, xds, ready) = (&self.metrics, &self.proxy, &self.xds, &self.ready);
        Arc::new(AdminState {
            metrics: metrics.clone(),
            connections,
            captured: self.captured_view(),
            config_dump: self.config_dump_view(),
            certs: {
                let hbone = proxy.hbone().cloned();
                Arc::new(move || {
                    let certs = hbone.as_ref().map(|h| h.certs.snapshot()).unwrap_or_default();
                    json!({"certificates": certs})
                })
            },
            policies: {
                let proxy = proxy.clone();
                Arc::new(move || proxy.state().policies())
            },
            workloads: {
                let proxy = proxy.clone();
                Arc::new(move || proxy.state().workloads())
            },
            services: {
                let proxy = proxy.clone();
                Arc::new(move || proxy.state().services())
            },
            xds: {
                let xds = xds.clone();
                Arc::new(move || xds.as_ref().map_or(serde_json::Value::Null, |x| x.dump()))
            },
            l7: {
                let proxy = proxy.clone();
                Arc::new(move || proxy.state().l7())
            },
            outlier: {
                let proxy = proxy.clone();
                Arc::new(move |cluster, addr| proxy.upstreams().ejected(cluster, addr))
            },
            cluster_runtime: {
                let proxy = proxy.clone();
                Arc::new(move |cluster| {
                    proxy
                        .upstreams()
                        .cluster_status(cluster)
                        .and_then(|s| serde_json::to_value(s).ok())
                })
            },
            set_log_level: {
                let log = log.clone();
                Arc::new(move |spec: &str| log.set(spec))
            },
            current_log_level: {
                let log = log.clone();
                Arc::new(move || log.current())
            },
            ready: ready.clone(),
            shutdown,
            admin_token: Some(admin_token),
        })
    }
}

/// `/captured`'s `meshConfig`: whether the control plane's workloads and policies are in.
fn mesh_sync_json(synced: bool, awaiting: &[String]) -> serde_json::Value {
    if synced {
        return json!({"synced": true});
    }
    json!({
        "synced": false,
        "awaiting": awaiting,
        "effect": "captured pods' connections are refused (config_not_synced) until every awaited type has been received once",
    })
}

/// Kernel counters into the metrics, and readiness, kept fresh every 2 s.
fn spawn_kernel_stats(agent: Arc<Agent>) {
    tokio::spawn(async move {
        loop {
            {
                let c = lock(&agent.capture);
                for (k, v) in c.kernel_stats() {
                    agent.metrics.set_ebpf_redirects(k, v);
                }
                agent.ready.store(agent.is_ready(&c), Ordering::Relaxed);
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    });
}

/// Keeps the kernel's list of the node's addresses current (interfaces come and go): the kubelet
/// probes captured pods from one of them, and Istio ambient exempts those probes from the mesh.
fn spawn_host_addresses(agent: Arc<Agent>) {
    tokio::spawn(async move {
        let mut last = Vec::new();
        loop {
            let mut ips = kubernetes::netns::interface_addresses().unwrap_or_default();
            ips.sort();
            ips.dedup();
            if ips != last {
                info!(addresses = ?ips, "the node's addresses (kubelet probes from them reach pods directly)");
                lock(&agent.capture).set_host_addresses(&ips);
                last = ips;
            }
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
    });
}

/// Not ready, stop accepting, drain (HTTP gracefully), then clean up or leave the capture pinned.
async fn shut_down(
    args: &RunArgs,
    capture: &Mutex<Capture>,
    connections: &Connections,
    ready: &AtomicBool,
) -> Result<()> {
    ready.store(false, Ordering::Relaxed);
    lock(capture).stop_accepting();
    connections.start_drain();
    drain(connections, Duration::from_secs(args.drain_timeout)).await;
    let mut c = lock(capture);
    if args.cleanup {
        c.cleanup().context("cleaning up pinned eBPF state")?;
        info!("cleaned up: no nodeway state left in the kernel");
    } else {
        info!("exiting without --cleanup: capture stays pinned, captured pods fail closed until an agent returns");
    }
    Ok(())
}

/// Lets live connections finish (a restarted agent already serves new ones), up to `limit`.
async fn drain(connections: &Connections, limit: Duration) {
    let deadline = tokio::time::Instant::now() + limit;
    let mut live = connections.snapshot().len();
    if live > 0 {
        info!(live, "draining connections");
    }
    while live > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        live = connections.snapshot().len();
    }
    if live > 0 {
        warn!(live, "drain timeout, closing the remaining connections");
    }
}

struct ConfigState {
    current: Config,
    last_error: Option<String>,
    path: Option<PathBuf>,
}

/// The next config the Kubernetes source publishes; never resolves in file mode (or once the
/// source has stopped).
async fn next_update(rx: &mut Option<tokio::sync::watch::Receiver<Option<Config>>>) -> Option<Config> {
    let Some(r) = rx else {
        return std::future::pending().await;
    };
    loop {
        if r.changed().await.is_err() {
            *rx = None;
            return std::future::pending().await;
        }
        if let Some(cfg) = r.borrow_and_update().clone() {
            return Some(cfg);
        }
    }
}

/// Reads the file until two reads 100 ms apart agree (for at most 2 s), so that a file rewritten
/// in place is not applied half-written.
async fn settled_text(path: &Path) -> std::io::Result<String> {
    let mut last = tokio::fs::read_to_string(path).await?;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = tokio::fs::read_to_string(path).await?;
        if now == last {
            break;
        }
        last = now;
    }
    Ok(last)
}

fn reload(
    path: &Path,
    text: std::io::Result<String>,
    capture: &Arc<Mutex<Capture>>,
    cs: &Arc<Mutex<ConfigState>>,
    metrics: &Metrics,
) {
    let p = path.display().to_string();
    let loaded = match text {
        // An empty file is what a rewrite in progress or a failed write leaves; it would remove
        // every pod's capture. Clearing the config takes an explicit `{}`.
        Ok(t) if t.trim().is_empty() => Err(format!(
            "config file {p} is empty; keeping the running config (write `{{}}` to clear it)"
        )),
        Ok(t) => Config::parse(&t, &p).map_err(|e| e.to_string()),
        Err(e) => Err(format!("reading config file {p}: {e}")),
    };
    match loaded {
        Ok(cfg) => {
            if lock(cs).current == cfg {
                return;
            }
            info!(file = %path.display(), "config changed, applying");
            lock(capture).apply(&cfg);
            let mut cs = lock(cs);
            cs.current = cfg;
            cs.last_error = None;
        }
        Err(e) => {
            error!(error = %e, "bad config file, keeping the running config");
            metrics.inc_config_errors();
            lock(cs).last_error = Some(e);
        }
    }
}

/// Watches the file's directory (editors replace files by rename).
fn watch(path: &Path, tx: mpsc::Sender<()>) -> Result<notify::RecommendedWatcher> {
    use notify::Watcher;
    let file = path
        .canonicalize()
        .with_context(|| format!("resolving {}", path.display()))?;
    let dir = file
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("/"));
    let name = file.file_name().map(|n| n.to_os_string());
    let mut w = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        if let Ok(ev) = ev {
            if ev.paths.iter().any(|p| p.file_name().map(|n| n.to_os_string()) == name) {
                let _ = tx.try_send(());
            }
        }
    })?;
    w.watch(&dir, notify::RecursiveMode::NonRecursive)?;
    Ok(w)
}

async fn bind(addr: &str, flag: &str) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| startup(format!("{flag} {addr}: {e}")))
}

/// The flag's address, else `port` on `$INSTANCE_IP` (the downward API's pod IP: what the kubelet
/// probes and Prometheus scrapes), else on loopback.
fn listen_addr(flag: Option<&str>, port: u16) -> String {
    if let Some(a) = flag {
        return a.to_string();
    }
    let ip = std::env::var("INSTANCE_IP")
        .ok()
        .and_then(|ip| ip.trim().parse::<std::net::IpAddr>().ok())
        .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));
    std::net::SocketAddr::new(ip, port).to_string()
}

/// Reports where the listeners are bound (the real ports when the flags say port 0): a line on
/// stdout and `addresses.json` in the run directory, before anything can report ready.
fn report_addresses(
    run_dir: &Path,
    admin: &TcpListener,
    stats: &TcpListener,
    readiness: &TcpListener,
) -> Result<AddressFile> {
    let local = |l: &TcpListener, flag: &str| l.local_addr().map_err(|e| startup(format!("{flag}: {e}")));
    let addrs = BoundAddresses {
        pid: std::process::id(),
        admin: local(admin, "--admin-addr")?,
        stats: local(stats, "--stats-addr")?,
        readiness: local(readiness, "--readiness-addr")?,
    };
    let file = AddressFile::write(run_dir, &addrs).map_err(|e| {
        startup(format!(
            "--run-dir {}: cannot write {}: {e}",
            run_dir.display(),
            addresses::FILE_NAME
        ))
    })?;
    println!("{}", addrs.line());
    info!(admin = %addrs.admin, stats = %addrs.stats, readiness = %addrs.readiness, file = %run_dir.join(addresses::FILE_NAME).display(), "listening");
    Ok(file)
}

fn startup(msg: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(StartupError(msg.into()))
}

/// A failure before the agent is up: `main` prints it as one line and exits with code 2.
#[derive(Debug)]
pub struct StartupError(pub String);
impl std::fmt::Display for StartupError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for StartupError {}

pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The xDS client, when `--xds-address` is given (not connected yet: `run` connects and retries).
/// The data path's settings from the command line.
fn proxy_config(args: &RunArgs) -> ProxyConfig {
    let mut config = ProxyConfig {
        access_log: args.access_log,
        ..ProxyConfig::default()
    };
    config.hbone.idle_timeout = Duration::from_secs(args.hbone_idle_timeout);
    config.hbone.connect_timeout = Duration::from_secs(args.hbone_connect_timeout);
    config.hbone.keepalive_interval = Duration::from_secs(args.http2_keepalive_interval);
    config.hbone.keepalive_timeout = Duration::from_secs(args.http2_keepalive_timeout);
    config.header_read_timeout = Duration::from_secs(args.header_read_timeout);
    config.http_idle_timeout = Duration::from_secs(args.http_idle_timeout);
    config.http_max_concurrent_streams = args.http_max_concurrent_streams;
    config.http2_guards = Http2Guards {
        max_header_list_size: args.http2_max_header_list_size,
        max_pending_accept_reset_streams: args.http2_max_pending_resets,
        max_local_error_reset_streams: args.http2_max_local_error_resets,
    };
    config.upstream_idle_timeout = Duration::from_secs(args.upstream_idle_timeout);
    config.same_node = match args.same_node {
        crate::SameNode::InProcess => SameNodePath::InProcess,
        crate::SameNode::Hbone => SameNodePath::Hbone,
    };
    config.buffer_budget = args.buffer_budget;
    config.retry_buffer_limit = args.retry_buffer_limit;
    config.max_connections_per_pod = args.max_connections_per_pod;
    config.access_log_queue = args.access_log_queue;
    config
}

fn xds_client(args: &RunArgs, config: &Config, proxy: &Proxy) -> Result<Option<Arc<XdsClient>>> {
    let Some(address) = &args.xds_address else {
        return Ok(None);
    };
    let root_cert = Some(args.xds_root_cert.clone().unwrap_or_else(|| args.ca_root_cert.clone()));
    let cfg = XdsConfig {
        address: address.clone(),
        root_cert,
        token_file: args.xds_token_file.clone().or_else(|| args.ca_token_file.clone()),
        tls_server_name: args.xds_tls_server_name.clone(),
        node: NodeInfo {
            ip: args.instance_ip.clone(),
            pod_name: args.pod_name.clone(),
            pod_namespace: args.pod_namespace.clone(),
            node_name: args.node_name.clone().unwrap_or_else(|| config.node.clone()),
            cluster_id: args.cluster_id.clone(),
            metadata: Default::default(),
        },
        backoff_initial: Duration::from_millis(args.xds_backoff_ms.max(1)),
        backoff_max: Duration::from_secs(30),
    };
    XdsClient::new(cfg, proxy.state().clone(), proxy.connections().metrics().clone())
        .map(Some)
        .map_err(|e| startup(e.to_string()))
}

/// The per-class sidecar streams, with `--xds-address`, `--l7-xds per-class` and workload
/// certificates; otherwise the L7 model is the node's (file or node stream).
fn sidecar_classes(
    args: &RunArgs,
    trust_domain: &str,
    proxy: &Arc<Proxy>,
    metrics: &Arc<Metrics>,
) -> Result<Option<SidecarClasses>> {
    let (Some(address), Some(hbone)) = (&args.xds_address, proxy.hbone()) else {
        return Ok(None);
    };
    if args.l7_xds != L7Xds::PerClass {
        return Ok(None);
    }
    let root = args.xds_root_cert.clone().unwrap_or_else(|| args.ca_root_cert.clone());
    let root_pem =
        std::fs::read_to_string(&root).map_err(|e| startup(format!("--xds-root-cert {}: {e}", root.display())))?;
    if !address.starts_with("https://") {
        return Err(startup(format!(
            "--xds-address {address:?}: per-class sidecar streams authenticate with workload certificates and need https:// (or --l7-xds node)"
        )));
    }
    let settings = ClassSettings {
        stream: Arc::new(ClassStreamConfig {
            address: address.clone(),
            root_pem,
            tls_server_name: args.xds_tls_server_name.clone(),
            backoff_initial: Duration::from_millis(args.xds_backoff_ms.max(1)),
            backoff_max: Duration::from_secs(30),
        }),
        certs: hbone.certs.clone(),
        trust_domain: trust_domain.to_string(),
        cluster_id: args.cluster_id.clone(),
    };
    info!(%address, "L7 config from per-class sidecar streams");
    Ok(Some(SidecarClasses::new(settings, proxy.clone(), metrics.clone())))
}

type Provider = (Arc<dyn CertificateProvider>, Vec<CertificateDer<'static>>);

/// The CA that issues workload certificates, and the roots peers are checked against; none with
/// `--ca none`.
fn certificate_provider(args: &RunArgs, trust_domain: &str) -> Result<Option<Provider>> {
    let ttl = Duration::from_secs(args.cert_ttl);
    match args.ca {
        CaMode::None => Ok(None),
        CaMode::Dev => {
            let lifetime = Duration::from_secs(args.ca_root_lifetime);
            let ca = DevCa::load_or_create_with(&args.ca_dir, trust_domain, ttl, lifetime, Arc::new(SystemTime::now))
                .map_err(|e| startup(format!("--ca dev: {e}")))?;
            info!(root = %args.ca_dir.join("root-cert.pem").display(), %trust_domain, "built-in CA ready");
            let roots = ca.trust_bundle();
            Ok(Some((Arc::new(ca), roots)))
        }
        CaMode::Istio => {
            let ca = IstioCa::new(IstioCaConfig {
                address: args.ca_address.clone(),
                root_cert: args.ca_root_cert.clone(),
                token_file: args.ca_token_file.clone(),
                cluster_id: args.cluster_id.clone(),
                tls_server_name: args.ca_tls_server_name.clone(),
                ttl,
            })
            .map_err(|e| startup(format!("--ca istio: {e}")))?;
            info!(address = %args.ca_address, root = %args.ca_root_cert.display(), "Istio CA client ready");
            let roots = ca.roots();
            Ok(Some((Arc::new(ca), roots)))
        }
    }
}
