//! Same-node handoff: a connection from one captured pod to another captured pod of this node
//! is handed to the destination's inbound pipeline inside the process, instead of being
//! encrypted, sent through the TCP stack to the proxy's own HBONE socket and decrypted again.
//!
//! Why this keeps HBONE's guarantees: the proxy terminates both pods' mTLS, so it holds both
//! identities already. The source identity is the one the capture established (the connection
//! left the source pod's namespace), which is exactly what the HBONE client would present with
//! that pod's certificate. The destination authorizes it once, with that identity, as it would a
//! tunnel; the metrics and `/connections` record both principals as for HBONE. Bytes never
//! leave the node, so there is no wire to encrypt.
use std::{
    collections::HashMap,
    future::Future,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{Arc, RwLock, Weak},
};

use tokio::{io::DuplexStream, net::TcpStream};

use crate::{connections::Counted, identity::Identity};

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A connection arriving by handoff, as an HBONE CONNECT would describe it.
#[derive(Clone, Debug)]
pub struct LocalArrival {
    /// The source pod's address (and the app's port) as the destination sees it.
    pub peer: SocketAddr,
    /// The source pod's SPIFFE identity.
    pub peer_identity: Identity,
    /// The destination pod's address and the app's port.
    pub dst: SocketAddr,
}

/// The destination refused the connection; the reason was logged and counted there.
#[derive(Debug, thiserror::Error)]
#[error("refused by the destination pod: {reason}")]
pub struct LocalRefused {
    pub reason: &'static str,
}

/// A captured pod that takes connections from pods of the same node.
pub trait LocalPeer: Send + Sync {
    /// The identity the pod would present on its HBONE socket.
    fn identity(&self) -> &Identity;

    /// Every check an HBONE CONNECT gets (target, connection cap, sync, policy), then the
    /// connection to the app; `Err` refuses.
    fn admit(
        self: Arc<Self>,
        arrival: LocalArrival,
    ) -> BoxFuture<'static, Result<Box<dyn LocalAdmitted>, LocalRefused>>;
}

/// An admitted handoff, ready to carry the source pod's connection to the app.
pub trait LocalAdmitted: Send {
    /// Serves `client` (counted by the source side) until the connection ends.
    fn serve(self: Box<Self>, client: Counted<TcpStream>) -> BoxFuture<'static, ()>;

    /// Serves the far end of an in-memory pipe: what the source's L7 router writes to an
    /// upstream connection, where HBONE would carry it in a tunnel stream.
    fn serve_pipe(self: Box<Self>, pipe: DuplexStream) -> BoxFuture<'static, ()>;
}

/// Bytes in flight each way on an L7 handoff's pipe: an HTTP/2 tunnel stream's window, so a
/// handed-over upstream connection costs no more memory than a tunnel stream would.
pub const PIPE_BUFFER: usize = 64 * 1024;

/// The node's captured pods that take handoffs, by address.
#[derive(Default)]
pub struct LocalPeers {
    by_ip: RwLock<HashMap<IpAddr, Weak<dyn LocalPeer>>>,
}

impl LocalPeers {
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    /// Makes `peer` reachable at `ips` until the registration is dropped.
    pub fn register(self: &Arc<Self>, ips: &[IpAddr], peer: &Arc<dyn LocalPeer>) -> Registration {
        let ips: Vec<IpAddr> = ips.iter().map(|ip| ip.to_canonical()).collect();
        let mut map = self.by_ip.write().unwrap_or_else(|p| p.into_inner());
        for ip in &ips {
            map.insert(*ip, Arc::downgrade(peer));
        }
        Registration {
            peers: self.clone(),
            ips,
            peer: Arc::downgrade(peer),
        }
    }

    /// The pod served at `ip`, if this node serves one there.
    pub fn get(&self, ip: IpAddr) -> Option<Arc<dyn LocalPeer>> {
        let map = self.by_ip.read().unwrap_or_else(|p| p.into_inner());
        map.get(&ip.to_canonical())?.upgrade()
    }
}

/// A pod's place in [`LocalPeers`]; dropped when the pod is released.
pub struct Registration {
    peers: Arc<LocalPeers>,
    ips: Vec<IpAddr>,
    peer: Weak<dyn LocalPeer>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut map = self.peers.by_ip.write().unwrap_or_else(|p| p.into_inner());
        for ip in &self.ips {
            // A pod that took over the address since (a restarted pod) keeps it.
            if map.get(ip).is_some_and(|w| Weak::ptr_eq(w, &self.peer)) {
                map.remove(ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Pod(Identity);

    impl LocalPeer for Pod {
        fn identity(&self) -> &Identity {
            &self.0
        }
        fn admit(self: Arc<Self>, _: LocalArrival) -> BoxFuture<'static, Result<Box<dyn LocalAdmitted>, LocalRefused>> {
            Box::pin(async { Err(LocalRefused { reason: "test" }) })
        }
    }

    fn pod(sa: &str) -> Arc<dyn LocalPeer> {
        Arc::new(Pod(Identity::new("cluster.local", "demo", sa)))
    }

    #[test]
    fn a_released_pod_is_no_longer_reachable_but_its_successor_stays() {
        let peers = LocalPeers::new();
        let ip: IpAddr = "198.18.0.5".parse().unwrap();
        let old = pod("old");
        let reg_old = peers.register(&[ip], &old);
        assert_eq!(peers.get(ip).unwrap().identity(), old.identity());
        // The address is reused by a new pod before the old one's release is processed.
        let new = pod("new");
        let reg_new = peers.register(&[ip], &new);
        drop(reg_old);
        assert_eq!(
            peers.get(ip).unwrap().identity(),
            new.identity(),
            "the successor keeps the address"
        );
        drop(reg_new);
        assert!(peers.get(ip).is_none());
    }

    #[test]
    fn a_dropped_pod_is_not_reachable_even_if_still_registered() {
        let peers = LocalPeers::new();
        let ip: IpAddr = "::ffff:198.18.0.6".parse().unwrap();
        let p = pod("p");
        let _reg = peers.register(&[ip], &p);
        assert!(
            peers.get("198.18.0.6".parse().unwrap()).is_some(),
            "IPv4-mapped and IPv4 are one address"
        );
        drop(p);
        assert!(peers.get(ip).is_none());
    }
}
