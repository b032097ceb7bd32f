//! The benchmark's pods and nodeway node, built with the tests/ harness.
//!
//! In the eBPF and iptables modes only the client's namespace (`bench`) is captured and the
//! server's (`bench-server`) is not, so both pay for exactly one proxy hop on the client side and
//! the two captures are compared on the same work. The same-node modes capture both namespaces
//! (a second config file), so the server's side of nodeway (authorization, identities) runs too.
use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use std::time::Duration;

use anyhow::bail;
use nodeway_tests::{config_yaml, eventually, metric_value, Node, Pod, PodEntry, TestBed};

use super::report::Mode;

pub struct BenchBed {
    bed: TestBed,
    client: Pod,
    server: Pod,
    /// Only the client's namespace captured.
    config: PathBuf,
    /// Both namespaces captured.
    config_both: PathBuf,
    starts: u32,
}

pub struct BenchNode {
    node: Node,
}

impl BenchBed {
    /// `nodeway` is the binary the nodes run (a release build unless `--debug`).
    pub fn create(nodeway: &Path) -> Result<Self> {
        // The harness starts the binary named by NODEWAY_BIN.
        std::env::set_var("NODEWAY_BIN", nodeway);
        let mut bed = TestBed::new("bench")?;
        let client = bed.add_pod("client", "bench")?;
        let server = bed.add_pod("server", "bench-server")?;
        let pods = [
            PodEntry {
                service_account: Some("client"),
                ..PodEntry::from(&client)
            },
            PodEntry {
                service_account: Some("server"),
                ..PodEntry::from(&server)
            },
        ];
        let config = bed.dir().join("node.yaml");
        let config_both = bed.dir().join("node-both.yaml");
        for (path, captured) in [
            (&config, &["bench"][..]),
            (&config_both, &["bench", "bench-server"][..]),
        ] {
            fs::write(path, config_yaml("bench-node", captured, &pods))
                .with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(BenchBed {
            bed,
            client,
            server,
            config,
            config_both,
            starts: 0,
        })
    }

    pub fn client(&self) -> &Pod {
        &self.client
    }

    pub fn server(&self) -> &Pod {
        &self.server
    }

    pub fn client_netns(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.client.netns)
    }

    pub fn server_netns(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.server.netns)
    }

    /// A nodeway node capturing as `mode` says; stopped and cleaned up when dropped. In the
    /// same-node modes it returns once both pods hold their workload certificates.
    pub fn start_node(&mut self, mode: Mode) -> Result<BenchNode> {
        self.starts += 1;
        let name = format!("n{}", self.starts);
        let (config, capture, same_node) = match mode {
            Mode::Iptables => (&self.config, "iptables", "in-process"),
            Mode::SameNode => (&self.config_both, "ebpf", "in-process"),
            Mode::HboneLocal => (&self.config_both, "ebpf", "hbone"),
            Mode::Direct | Mode::Ebpf => (&self.config, "ebpf", "in-process"),
        };
        let args = [
            "--capture",
            capture,
            "--same-node",
            same_node,
            "--log-level",
            "warn",
            "--cleanup",
        ];
        let node = BenchNode {
            node: Node::start(&self.bed, &name, config, &args)?,
        };
        if mode.captures_server() {
            let issued = || {
                node.node.json("/certs")["certificates"]
                    .as_array()
                    .is_some_and(|c| c.len() == 2)
            };
            if !eventually(Duration::from_secs(10), issued) {
                bail!("{}: the pods' certificates were not issued within 10 s", mode.name());
            }
        }
        Ok(node)
    }
}

/// Stopped gracefully with `--cleanup`, so the next mode starts from a clean pod: a killed
/// iptables node would leave its REDIRECT rules behind (only eBPF pins are cleaned after a crash).
impl Drop for BenchNode {
    fn drop(&mut self) {
        self.node.stop();
    }
}

impl BenchNode {
    /// Connections nodeway proxied for the client so far.
    pub fn opened_connections(&self) -> Result<u64> {
        let m = self.node.metrics();
        Ok(metric_value(&m, "istio_tcp_connections_opened_total", &[("reporter", "source")]) as u64)
    }

    /// Connections the destination side of nodeway accepted for the server so far.
    pub fn accepted_connections(&self) -> u64 {
        let m = self.node.metrics();
        metric_value(&m, "istio_tcp_connections_opened_total", &[("reporter", "destination")]) as u64
    }

    /// Connections handed to a local pod's inbound side in-process so far.
    pub fn same_node_connections(&self) -> u64 {
        metric_value(&self.node.metrics(), "nodeway_same_node_connections_total", &[]) as u64
    }

    /// SYNs the capture steered into nodeway's inbound and HBONE sockets so far.
    pub fn inbound_redirected(&self) -> u64 {
        self.node.json("/captured")["stats"]["inbound_redirected"]
            .as_u64()
            .unwrap_or(0)
    }

    pub fn pid(&self) -> Result<u32> {
        self.node.pid().context("the nodeway process has no pid (exited?)")
    }
}
