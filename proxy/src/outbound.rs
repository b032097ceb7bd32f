//! Outbound: the app's connects, redirected by `connect4/6` to the pod's loopback listener, go to
//! their original destination from inside the pod.
use std::{net::SocketAddr, sync::Arc};

use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};

use crate::{
    connections::{ConnectionInfo, Direction},
    pod::{forward, reset, tcp_labels, PodProxy},
    workload::Protocol,
};

/// Accepts on one of the pod's outbound listeners until the task is aborted (pod released).
pub async fn serve(listener: TcpListener, pod: Arc<PodProxy>) {
    let local = listener.local_addr().ok();
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let pod = pod.clone();
                tokio::spawn(async move { handle(stream, peer, local, pod).await });
            }
            Err(e) => {
                warn!(pod = %pod.name(), error = %e, "outbound accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

async fn handle(client: TcpStream, peer: SocketAddr, listener: Option<SocketAddr>, pod: Arc<PodProxy>) {
    let state = &pod.state;
    let Some(dst) = state.original_dst.original_dst(pod.netns.cookie(), peer, &client) else {
        // Not redirected by us (someone dialled the listener directly): refuse, never guess.
        warn!(pod = %pod.name(), %peer, "outbound connection without a recorded original destination, refused");
        reset(client);
        return;
    };
    if Some(dst) == listener || dst.port() == 0 {
        warn!(pod = %pod.name(), %peer, %dst, "outbound connection to the proxy itself, refused");
        reset(client);
        return;
    }
    let _ = client.set_nodelay(true);
    let workloads = state.workloads();
    let dst_workload = workloads.by_ip(dst.ip()).cloned();
    let mut labels = tcp_labels("source", Some(&pod.workload), dst_workload.as_deref());
    // connect4 sent the app to the pod's loopback listener, so its socket is on 127.0.0.1: show the
    // pod's own address (what the destination sees), with the app's port.
    let source = match pod.workload.ips.iter().find(|ip| ip.is_ipv4() == dst.ip().is_ipv4()) {
        Some(ip) if peer.ip().is_loopback() => SocketAddr::new(*ip, peer.port()),
        _ => peer,
    };
    // A port with a route table carries HTTP (Istio names outbound route tables after the port,
    // and only makes them for HTTP ports). Bytes that cannot be HTTP keep the connection L4; a
    // client that has sent nothing yet (a pooled connection) is served as HTTP, as Istio does
    // for a declared HTTP port.
    if state.l7().routes_for_port(dst.port()).is_some()
        && crate::http::sniff::sniff(&client).await != crate::http::sniff::Sniffed::Other
    {
        crate::http::serve_outbound(client, pod.clone(), dst, source).await;
        return;
    }
    let failed = |reason| state.connections.metrics().inc_outbound_failed(&pod.name(), reason);
    let info = |labels| ConnectionInfo {
        direction: Direction::Outbound,
        pod: pod.name(),
        source,
        destination: dst,
        labels,
    };
    // Mesh workloads are reached over HBONE (mTLS), the rest as they are.
    if let (Some(hbone), Some(w)) = (&state.hbone, &dst_workload) {
        if w.protocol == Protocol::Hbone {
            let dst_id = w.identity(&hbone.trust_domain);
            match hbone.connect(&pod, &dst_id, dst).await {
                Ok(tunnel) => {
                    labels.source_principal = pod.identity.to_string();
                    labels.destination_principal = dst_id.to_string();
                    labels.connection_security_policy = "mutual_tls".into();
                    forward(client, tunnel, info(labels), state).await;
                }
                Err(e) => {
                    warn!(pod = %pod.name(), %dst, identity = %dst_id, error = %e, "HBONE connection failed");
                    failed("hbone");
                    reset(client);
                }
            }
            return;
        }
    }
    let upstream = match pod.connect(dst).await {
        Ok(s) => s,
        Err(e) => {
            debug!(pod = %pod.name(), %dst, error = %e, "outbound connect failed");
            failed("connect");
            reset(client);
            return;
        }
    };
    forward(client, upstream, info(labels), state).await;
}
