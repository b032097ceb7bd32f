//! A TLS gRPC server on 127.0.0.1 for in-test control-plane peers (the Istio CA, the xDS server),
//! on its own runtime thread so blocking end-to-end tests can use it too.
use std::net::SocketAddr;

use anyhow::Result;
use tonic::transport::{server::Router, Identity, Server, ServerTlsConfig};

pub struct TlsGrpcServer {
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TlsGrpcServer {
    /// Serves what `routes` adds, with the PEM certificate and key, on an ephemeral port.
    pub fn start<F>(name: &'static str, cert_pem: String, key_pem: String, routes: F) -> Result<Self>
    where
        F: FnOnce(&mut Server) -> Router + Send + 'static,
    {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => return eprintln!("{name}: no runtime: {e}"),
            };
            rt.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(std_listener) {
                    Ok(l) => l,
                    Err(e) => return eprintln!("{name}: {e}"),
                };
                let tls = ServerTlsConfig::new().identity(Identity::from_pem(cert_pem, key_pem));
                let mut server = match Server::builder().tls_config(tls) {
                    Ok(s) => s,
                    Err(e) => return eprintln!("{name}: TLS: {e}"),
                };
                let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
                let serve = routes(&mut server).serve_with_incoming(incoming);
                // Not a graceful shutdown: clients may still hold connections, and waiting for
                // them could deadlock the test. Leaving the block drops every connection task.
                tokio::select! {
                    r = serve => if let Err(e) = r { eprintln!("{name}: {e}") },
                    _ = stopped => {}
                }
            });
        });
        Ok(TlsGrpcServer {
            addr,
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for TlsGrpcServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
