//! HTTP/2 PING keepalive of HBONE connections, both sides (h2 leaves it to its user).
use std::time::Duration;

/// Pings every `interval`, also while the connection is idle; resolves when the peer has not
/// answered within `timeout` (or the connection is gone), so the caller closes the connection.
/// 10 s and 20 s by default, ztunnel's values.
pub async fn until_dead(mut ping: h2::PingPong, interval: Duration, timeout: Duration) {
    loop {
        tokio::time::sleep(interval).await;
        match tokio::time::timeout(timeout, ping.ping(h2::Ping::opaque())).await {
            Ok(Ok(_pong)) => {}
            Ok(Err(_)) | Err(_) => return,
        }
    }
}
