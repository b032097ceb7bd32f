//! `nodeway`: the node agent. One process per node captures the node's pods with eBPF and proxies
//! their traffic.
use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand, ValueEnum};

mod addresses;
mod capture;
mod classes;
mod config;
mod delivery;
mod inspect;
mod iptables;
mod kubernetes;
mod logging;
mod pin_layout;
mod preflight;
mod redirect;
mod run;

#[derive(Parser)]
#[command(name = "nodeway", version, about = "eBPF-accelerated node-level service-mesh proxy")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the agent: capture this node's pods and proxy their traffic.
    Run(Box<RunArgs>),
    /// Show what a running agent sees (over its admin API).
    Inspect(inspect::InspectArgs),
    /// Remove pinned state left by an agent that exited without --cleanup.
    Cleanup {
        #[arg(long, default_value = "/sys/fs/bpf/nodeway")]
        pin_dir: PathBuf,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum CaptureMode {
    /// In-pod eBPF: cgroup connect4/6 + sock_ops for outbound, sk_lookup for inbound.
    Ebpf,
    /// iptables REDIRECT of outbound TCP in each pod (baseline for benchmarks).
    Iptables,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SourceKind {
    /// The local config file given with --config (watched; edits apply live).
    File,
    /// The Kubernetes API: namespaces and this node's pods (in-cluster service account or
    /// KUBECONFIG; the node from --node-name / NODE_NAME).
    Kubernetes,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum CaMode {
    /// Built-in CA: generates (or loads from --ca-dir) a root and issues workload certificates.
    Dev,
    /// Istio's CA (istiod :15012, `IstioCertificateService`), as ztunnel uses it: see --ca-address.
    Istio,
    /// No certificates: mesh traffic stays plaintext TCP (no HBONE).
    None,
}

/// Where the L7 model (listeners, routes, clusters, endpoints) comes from with `--xds-address`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum L7Xds {
    /// One sidecar stream per class of captured pods istiod configures alike (namespace, labels,
    /// service account), authenticated with that service account's certificate: what a real
    /// istiod generates L7 config for. Each pod routes by its class's config.
    PerClass,
    /// The node's own stream (CDS/EDS/RDS beside workloads), for control planes that send L7
    /// config to a node proxy (istiod does not).
    Node,
}

/// How a connection between two captured pods of this node travels when it would be HBONE.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SameNode {
    /// Handed to the destination pod's inbound side inside nodeway: policy checked once with the
    /// source's identity, both principals recorded, no TLS for bytes that never leave the node.
    InProcess,
    /// HBONE through the node's TCP stack, with TLS, as between nodes.
    Hbone,
}

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Where pods and namespaces come from.
    #[arg(long, value_enum, env = "NODEWAY_SOURCE", default_value = "file")]
    source: SourceKind,
    /// `--source file`: the config file with pods and namespaces (watched; edits apply live).
    #[arg(long, env = "NODEWAY_CONFIG")]
    config: Option<PathBuf>,
    /// `--source kubernetes`: this node's name (the DaemonSet sets it from spec.nodeName).
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// `--source kubernetes`: the mesh's SPIFFE trust domain (a config file names its own).
    #[arg(long, env = "TRUST_DOMAIN", default_value = "cluster.local")]
    trust_domain: String,
    /// `--source kubernetes`: the host's /proc, where pods' container processes are found.
    #[arg(long, env = "NODEWAY_PROC_ROOT", default_value = "/proc")]
    proc_root: PathBuf,
    /// `--source kubernetes`: the CNI's named network namespaces (for the nodeway.io/netns
    /// pod annotation).
    #[arg(long, env = "NODEWAY_NETNS_DIR", default_value = "/var/run/netns")]
    netns_dir: PathBuf,
    /// `--source kubernetes`: also watch other nodes' pods (trimmed), so traffic to captured pods
    /// there is HBONE with mutual TLS; without it, it is plain TCP.
    #[arg(long, env = "NODEWAY_CLUSTER_PODS", default_value_t = true, action = clap::ArgAction::Set)]
    cluster_pods: bool,
    /// `--source kubernetes`: milliseconds to gather API changes before applying them together.
    #[arg(long, env = "NODEWAY_DEBOUNCE_MS", default_value_t = 100)]
    debounce_ms: u64,
    /// On exit, remove every map, link and pin (otherwise a restarted agent takes them over).
    #[arg(long)]
    cleanup: bool,
    #[arg(long, value_enum, env = "NODEWAY_CAPTURE", default_value = "ebpf")]
    capture: CaptureMode,
    /// Admin API (`/captured`, `/connections`, `/config_dump`, ...). Port 0: the kernel picks
    /// one; the bound addresses are reported (see --run-dir).
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin_addr: String,
    /// Prometheus metrics (`/stats/prometheus`). Port 0: the kernel picks one. Default:
    /// `$INSTANCE_IP:15020` (the pod IP, where Prometheus scrapes; the node's with
    /// hostNetwork), else 127.0.0.1:15020; never every interface unless asked.
    #[arg(long)]
    stats_addr: Option<String>,
    /// Readiness (`/healthz/ready`). Port 0: the kernel picks one. Default:
    /// `$INSTANCE_IP:15021` (where the kubelet probes), else 127.0.0.1:15021.
    #[arg(long)]
    readiness_addr: Option<String>,
    /// Run directory: once the admin, stats and readiness listeners are bound (before readiness),
    /// their addresses are written to `addresses.json` here (atomically; removed on exit) and
    /// printed on stdout as `nodeway: listening admin=A stats=S readiness=R`.
    #[arg(long, env = "NODEWAY_RUN_DIR", default_value = "/run/nodeway")]
    run_dir: PathBuf,
    /// bpffs directory for pinned maps and links (a bpffs is mounted at /sys/fs/bpf if needed).
    #[arg(long, default_value = "/sys/fs/bpf/nodeway")]
    pin_dir: PathBuf,
    /// cgroup-v2 directory to attach connect4/6 and sock_ops to (default: the hierarchy's root).
    #[arg(long, env = "NODEWAY_CGROUP")]
    cgroup: Option<PathBuf>,
    /// On shutdown, seconds to let live connections finish after the listeners close.
    #[arg(long, env = "NODEWAY_DRAIN_TIMEOUT", default_value_t = 10)]
    drain_timeout: u64,
    /// Where workload certificates come from.
    #[arg(long, value_enum, env = "NODEWAY_CA", default_value = "dev")]
    ca: CaMode,
    /// Directory of the built-in CA's root (created if empty; share it between nodes).
    #[arg(long, env = "NODEWAY_CA_DIR", default_value = "/var/lib/nodeway/ca")]
    ca_dir: PathBuf,
    /// `--ca dev`: lifetime of a new root, seconds. It is renewed at 2/3 of it (the next root is
    /// published then, and signs one certificate lifetime later); the old root stays trusted
    /// until it expires.
    #[arg(long, value_parser = clap::value_parser!(u64).range(60..), default_value_t = 365 * 24 * 3600)]
    ca_root_lifetime: u64,
    /// `--ca istio`: the CA's gRPC address.
    #[arg(long, env = "CA_ADDRESS", default_value = "https://istiod.istio-system.svc:15012")]
    ca_address: String,
    /// `--ca istio`: the mesh root (PEM, may hold several roots): checks the CA's serving
    /// certificate and peers' certificates; re-read for every certificate request.
    #[arg(
        long,
        env = "NODEWAY_CA_ROOT_CERT",
        default_value = "/var/run/secrets/istio/root-cert.pem"
    )]
    ca_root_cert: PathBuf,
    /// `--ca istio`: file with the bearer token sent to the CA (re-read for every request): a
    /// projected service-account token with audience `istio-ca`, bound to the agent's pod.
    #[arg(long, env = "NODEWAY_CA_TOKEN_FILE")]
    ca_token_file: Option<PathBuf>,
    /// `--ca istio`: the name to expect in the CA's serving certificate, if not the address's host.
    #[arg(long)]
    ca_tls_server_name: Option<String>,
    /// `--ca istio`: sent to the CA as the `ClusterID` header.
    #[arg(long, env = "CLUSTER_ID", default_value = "Kubernetes")]
    cluster_id: String,
    /// Lifetime of issued workload certificates, seconds (renewed at half-life).
    #[arg(long, default_value_t = 86400)]
    cert_ttl: u64,
    /// Seconds an HBONE connection with no streams stays pooled before it is closed.
    #[arg(long, default_value_t = 60)]
    hbone_idle_timeout: u64,
    /// Seconds an HBONE CONNECT may wait for its answer before it fails (Istio's connectTimeout).
    #[arg(long, env = "NODEWAY_HBONE_CONNECT_TIMEOUT", value_parser = clap::value_parser!(u64).range(1..), default_value_t = 10)]
    hbone_connect_timeout: u64,
    /// Seconds between HTTP/2 PINGs on HBONE and h2c connections (ztunnel's 10 s).
    #[arg(long, env = "NODEWAY_HTTP2_KEEPALIVE_INTERVAL", value_parser = clap::value_parser!(u64).range(1..), default_value_t = 10)]
    http2_keepalive_interval: u64,
    /// Seconds a PING may go unanswered before its connection is closed (ztunnel's 20 s).
    #[arg(long, env = "NODEWAY_HTTP2_KEEPALIVE_TIMEOUT", value_parser = clap::value_parser!(u64).range(1..), default_value_t = 20)]
    http2_keepalive_timeout: u64,
    /// Seconds a client has to send a request's headers whole (and its first request) before
    /// its connection is closed, on every HTTP server nodeway runs (hyper's 30 s).
    #[arg(long, env = "NODEWAY_HEADER_READ_TIMEOUT", value_parser = clap::value_parser!(u64).range(1..), default_value_t = 30)]
    header_read_timeout: u64,
    /// Seconds an HTTP connection may have no request in flight before it is closed (Envoy's
    /// idle_timeout, 1 h).
    #[arg(long, env = "NODEWAY_HTTP_IDLE_TIMEOUT", value_parser = clap::value_parser!(u64).range(1..), default_value_t = 3600)]
    http_idle_timeout: u64,
    /// Concurrent HTTP/2 streams per downstream HTTP connection; more get REFUSED_STREAM.
    #[arg(long, env = "NODEWAY_HTTP_MAX_CONCURRENT_STREAMS", value_parser = clap::value_parser!(u32).range(1..), default_value_t = 1024)]
    http_max_concurrent_streams: u32,
    /// Largest HTTP/2 header list (decoded HEADERS + CONTINUATION) every HTTP/2 server accepts,
    /// bytes; a CONTINUATION flood past it gets GOAWAY ENHANCE_YOUR_CALM.
    #[arg(long, env = "NODEWAY_HTTP2_MAX_HEADER_LIST_SIZE", value_parser = clap::value_parser!(u32).range(1024..), default_value_t = 16 * 1024)]
    http2_max_header_list_size: u32,
    /// HTTP/2 streams a peer may open and reset before they are served (rapid reset,
    /// CVE-2023-44487), per connection; past it GOAWAY ENHANCE_YOUR_CALM (h2's 20).
    #[arg(long, env = "NODEWAY_HTTP2_MAX_PENDING_RESETS", default_value_t = 20)]
    http2_max_pending_resets: usize,
    /// HTTP/2 streams the server may reset for a peer's protocol errors, per connection; past
    /// it GOAWAY ENHANCE_YOUR_CALM (hyper's 1024).
    #[arg(long, env = "NODEWAY_HTTP2_MAX_LOCAL_ERROR_RESETS", default_value_t = 1024)]
    http2_max_local_error_resets: usize,
    /// Seconds a pooled upstream HTTP connection may stay unused before it is closed (Envoy's
    /// cluster common_http_protocol_options.idle_timeout).
    #[arg(long, env = "NODEWAY_UPSTREAM_IDLE_TIMEOUT", value_parser = clap::value_parser!(u64).range(1..), default_value_t = 60)]
    upstream_idle_timeout: u64,
    /// How HBONE between two captured pods of this node travels.
    #[arg(long, value_enum, env = "NODEWAY_SAME_NODE", default_value = "in-process")]
    same_node: SameNode,
    /// Bytes of request bodies the whole node buffers for retries and mirrors at once; a body
    /// that finds it spent is sent without retries or mirrors.
    #[arg(long, env = "NODEWAY_BUFFER_BUDGET", default_value_t = 64 << 20)]
    buffer_budget: usize,
    /// Largest request body buffered for retries and mirrors (Envoy's per-request 1 MiB).
    #[arg(long, env = "NODEWAY_RETRY_BUFFER_LIMIT", default_value_t = 1 << 20)]
    retry_buffer_limit: usize,
    /// Connections one pod may have open at once, per direction; more are refused.
    #[arg(long, env = "NODEWAY_MAX_CONNECTIONS_PER_POD", default_value_t = 16384)]
    max_connections_per_pod: usize,
    /// Access log lines queued for the writer thread at most; more are dropped and counted.
    #[arg(long, env = "NODEWAY_ACCESS_LOG_QUEUE", default_value_t = 8192)]
    access_log_queue: usize,
    /// Forward the eBPF programs' aya-log debug messages to the log.
    #[arg(long)]
    ebpf_log: bool,
    /// istiod-compatible control plane (delta ADS), e.g. `https://istiod.istio-system.svc:15012`.
    /// With it, workloads, services and authorization policies come from xDS and replace the
    /// file's; the file still says which local pods and namespaces are captured.
    #[arg(long, env = "XDS_ADDRESS")]
    xds_address: Option<String>,
    /// PEM root that checks the control plane's certificate (default: --ca-root-cert).
    #[arg(long)]
    xds_root_cert: Option<PathBuf>,
    /// File with the bearer token sent to the control plane (default: --ca-token-file).
    #[arg(long)]
    xds_token_file: Option<PathBuf>,
    /// The name to expect in the control plane's certificate, if not the address's host.
    #[arg(long)]
    xds_tls_server_name: Option<String>,
    /// This agent's pod IP, name and namespace, as sent in the xDS node id
    /// (`ztunnel~IP~POD.NS~NS.svc.cluster.local`) and metadata.
    #[arg(long, env = "INSTANCE_IP", default_value = "127.0.0.1")]
    instance_ip: String,
    #[arg(long, env = "POD_NAME", default_value = "nodeway")]
    pod_name: String,
    #[arg(long, env = "POD_NAMESPACE", default_value = "istio-system")]
    pod_namespace: String,
    /// First xDS reconnect delay in milliseconds (doubles up to 30 s, with jitter).
    #[arg(long, default_value_t = 500)]
    xds_backoff_ms: u64,
    /// Where the L7 model comes from with --xds-address (per-class needs workload certificates:
    /// without --ca, the node stream's).
    #[arg(long, value_enum, env = "NODEWAY_L7_XDS", default_value = "per-class")]
    l7_xds: L7Xds,
    /// Log filter (EnvFilter syntax); changeable live at /logging.
    #[arg(long, env = "NODEWAY_LOG", default_value = "info")]
    log_level: String,
    /// One JSON access log line per HTTP request on stdout (as Istio's
    /// `accessLogFile: /dev/stdout`); `--access-log false` turns it off.
    #[arg(long, env = "NODEWAY_ACCESS_LOG", default_value_t = true, action = clap::ArgAction::Set)]
    access_log: bool,
}

/// glibc gives threads that contend on malloc arenas of their own, up to 8 per core, and each
/// arena keeps its own freed memory. One arena per runtime worker is enough for a proxy whose
/// threads are those workers: on 2 cores `bench memory` measured 9-17% less RSS per idle
/// connection (HBONE stream either end, L4), throughput within the bench's noise. `MALLOC_ARENA_MAX` in
/// the environment still decides, as glibc documents.
fn cap_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
        let arenas = libc::c_int::try_from(workers).unwrap_or(libc::c_int::MAX);
        // SAFETY: sets one allocator parameter; no other thread exists yet.
        unsafe { libc::mallopt(libc::M_ARENA_MAX, arenas) };
    }
}

fn main() -> ExitCode {
    cap_malloc_arenas();
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Run(args) => {
            let log = logging::LogControl::init(&args.log_level);
            let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("nodeway: cannot start the runtime: {e}");
                    return ExitCode::from(1);
                }
            };
            match rt.block_on(run::run(*args, log)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => match e.downcast_ref::<run::StartupError>() {
                    Some(s) => {
                        eprintln!("nodeway: {s}");
                        ExitCode::from(2)
                    }
                    None => {
                        eprintln!("nodeway: {e:#}");
                        ExitCode::from(1)
                    }
                },
            }
        }
        Cmd::Inspect(args) => report(inspect::run(&args)),
        Cmd::Cleanup { pin_dir } => {
            report(redirect::remove_pins(&pin_dir).map(|()| println!("removed {}", pin_dir.display())))
        }
    }
}

fn report(r: anyhow::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nodeway: {e:#}");
            ExitCode::from(1)
        }
    }
}
