//! Inbound plaintext: SYNs for the pod's address arrive, steered by `sk_lookup`, on the pod's
//! inbound socket; the proxy delivers them to the app over `lo` inside the same namespace, which
//! the capture programs do not touch.
use std::{net::SocketAddr, sync::Arc};

use nodeway_ebpf_common::HBONE_PORT;
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};

use crate::{
    connections::{ConnectionInfo, Direction},
    pod::{forward, reset, tcp_labels, PodProxy},
    workload::MtlsMode,
};

pub async fn serve(listener: TcpListener, pod: Arc<PodProxy>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let pod = pod.clone();
                tokio::spawn(async move { handle(stream, peer, pod).await });
            }
            Err(e) => {
                warn!(pod = %pod.name(), error = %e, "inbound accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

async fn handle(client: TcpStream, peer: SocketAddr, pod: Arc<PodProxy>) {
    // sk_lookup keeps the original destination as the accepted socket's local address.
    let dst = match client.local_addr() {
        Ok(a) => a,
        Err(e) => {
            debug!(pod = %pod.name(), %peer, error = %e, "inbound socket gone");
            return;
        }
    };
    if dst.port() == HBONE_PORT || !pod.workload.ips.iter().any(|ip| same_ip(*ip, dst.ip())) {
        warn!(pod = %pod.name(), %peer, %dst, "inbound connection not for this pod's application, refused");
        reset(client);
        return;
    }
    if pod.workload.mtls_mode == MtlsMode::Strict {
        pod.refuse(
            peer,
            "strict_plaintext",
            &format!("plaintext to {dst} refused: mTLS mode STRICT"),
        );
        reset(client);
        return;
    }
    if !pod.authorize(peer, None, dst) {
        reset(client);
        return;
    }
    let _ = client.set_nodelay(true);
    let upstream = match pod.connect(dst).await {
        Ok(s) => s,
        Err(e) => {
            debug!(pod = %pod.name(), %dst, error = %e, "delivery to the application failed");
            reset(client);
            return;
        }
    };
    let state = &pod.state;
    let workloads = state.workloads();
    let labels = tcp_labels(
        "destination",
        workloads.by_ip(peer.ip()).map(|w| &**w),
        Some(&pod.workload),
    );
    let info = ConnectionInfo {
        direction: Direction::Inbound,
        pod: pod.name(),
        source: peer,
        destination: dst,
        labels,
    };
    if pod.inbound_http(dst.port()) {
        use crate::http::sniff::{sniff, Sniffed};
        if sniff(&client).await != Sniffed::Other {
            crate::http::serve_inbound(client, upstream, pod.clone(), None, info).await;
            return;
        }
        if pod.needs_http_authz() && !pod.authorize_tcp(peer, None, dst) {
            reset(client);
            return;
        }
    }
    forward(client, upstream, info, state).await;
}

fn same_ip(a: std::net::IpAddr, b: std::net::IpAddr) -> bool {
    a == b || a.to_canonical() == b.to_canonical()
}
