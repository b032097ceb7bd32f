//! The benchmark's pods and nodeway node, built with the tests/ harness.
//!
//! Only the client's namespace (`bench`) is captured and the server's (`bench-server`) is not, so
//! every mode pays for exactly one proxy hop on the client side: the eBPF and the iptables capture
//! are compared on the same work.
use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use nodeway_tests::{config_yaml, metric_value, Node, Pod, TestBed};

use super::report::Mode;

pub struct BenchBed {
    bed: TestBed,
    client: Pod,
    server: Pod,
    config: PathBuf,
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
        let config = bed.dir().join("node.yaml");
        fs::write(
            &config,
            config_yaml("bench-node", &["bench"], &[(&client).into(), (&server).into()]),
        )
        .with_context(|| format!("writing {}", config.display()))?;
        Ok(BenchBed {
            bed,
            client,
            server,
            config,
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

    /// A nodeway node capturing the client in `mode` (eBPF or iptables); stopped and cleaned up
    /// when dropped.
    pub fn start_node(&mut self, mode: Mode) -> Result<BenchNode> {
        self.starts += 1;
        let name = format!("n{}", self.starts);
        let capture = match mode {
            Mode::Iptables => "iptables",
            _ => "ebpf",
        };
        let node = Node::start(
            &self.bed,
            &name,
            &self.config,
            &["--capture", capture, "--log-level", "warn", "--cleanup"],
        )?;
        Ok(BenchNode { node })
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
}
