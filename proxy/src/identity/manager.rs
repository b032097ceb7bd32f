//! Certificates of the identities this node serves: fetched when a pod is captured (not on its
//! first connection), renewed at half-life, retried with backoff, dropped when no pod needs them.
use std::{
    collections::HashMap,
    sync::{Arc, Mutex, RwLock},
    time::{Duration, SystemTime},
};

use tokio::{sync::Notify, task::JoinHandle};
use tracing::{info, warn};

use super::{CertInfo, CertificateProvider, Identity, IdentityError, WorkloadCert};

pub struct CertManager {
    provider: Arc<dyn CertificateProvider>,
    certs: RwLock<HashMap<Identity, Arc<WorkloadCert>>>,
    refreshers: Mutex<HashMap<Identity, JoinHandle<()>>>,
    changed: Notify,
}

impl CertManager {
    pub fn new(provider: Arc<dyn CertificateProvider>) -> Arc<Self> {
        Arc::new(CertManager {
            provider,
            certs: RwLock::new(HashMap::new()),
            refreshers: Mutex::new(HashMap::new()),
            changed: Notify::new(),
        })
    }

    /// The current certificate, fetching it now if this identity has none yet.
    pub async fn get(self: &Arc<Self>, id: &Identity) -> Result<Arc<WorkloadCert>, IdentityError> {
        if let Some(c) = self.cached(id) {
            return Ok(c);
        }
        let c = Arc::new(self.provider.fetch(id).await?);
        self.store(c.clone());
        Ok(c)
    }

    /// The certificate once this identity has one (its fetch runs elsewhere: [`Self::track`]);
    /// the caller bounds the wait.
    pub async fn issued(&self, id: &Identity) -> Arc<WorkloadCert> {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            // Registered before the lookup, so a store between the two is not missed.
            changed.as_mut().enable();
            if let Some(c) = self.cached(id) {
                return c;
            }
            changed.await;
        }
    }

    pub fn cached(&self, id: &Identity) -> Option<Arc<WorkloadCert>> {
        self.certs.read().unwrap_or_else(|p| p.into_inner()).get(id).cloned()
    }

    fn store(&self, c: Arc<WorkloadCert>) {
        self.certs
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(c.identity.clone(), c);
        self.changed.notify_waiters();
    }

    /// Keeps `id`'s certificate fetched and fresh until [`CertManager::forget`].
    pub fn track(self: &Arc<Self>, id: Identity) {
        let mut r = self.refreshers.lock().unwrap_or_else(|p| p.into_inner());
        if r.contains_key(&id) {
            return;
        }
        let me = self.clone();
        let key = id.clone();
        r.insert(key, tokio::spawn(async move { me.refresh_loop(id).await }));
    }

    pub fn forget(&self, id: &Identity) {
        if let Some(h) = self.refreshers.lock().unwrap_or_else(|p| p.into_inner()).remove(id) {
            h.abort();
        }
        self.certs.write().unwrap_or_else(|p| p.into_inner()).remove(id);
    }

    /// Forgets every identity `keep` refuses: the certificates (and key) of pods that left the
    /// node are not kept, renewed or shown.
    pub fn retain(&self, keep: impl Fn(&Identity) -> bool) {
        let gone: Vec<Identity> = {
            let certs = self.certs.read().unwrap_or_else(|p| p.into_inner());
            let refreshers = self.refreshers.lock().unwrap_or_else(|p| p.into_inner());
            certs
                .keys()
                .chain(refreshers.keys())
                .filter(|id| !keep(id))
                .cloned()
                .collect()
        };
        for id in gone {
            self.forget(&id);
        }
    }

    async fn refresh_loop(self: Arc<Self>, id: Identity) {
        let mut backoff = Duration::from_millis(200);
        loop {
            match self.provider.fetch(&id).await {
                Ok(c) => {
                    let at = c.refresh_at();
                    info!(identity = %id, serial = %c.info.serial, not_after = %c.info.not_after, "certificate issued");
                    self.store(Arc::new(c));
                    backoff = Duration::from_millis(200);
                    let wait = at.duration_since(SystemTime::now()).unwrap_or(Duration::from_secs(1));
                    tokio::time::sleep(wait.max(Duration::from_secs(1))).await;
                }
                Err(e) => {
                    warn!(identity = %id, error = %e, retry_in = ?backoff, "fetching certificate failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
    }

    /// Every certificate held, for `/certs`.
    pub fn snapshot(&self) -> Vec<CertInfo> {
        let mut v: Vec<CertInfo> = self
            .certs
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|c| c.info.clone())
            .collect();
        v.sort_by(|a, b| a.identity.cmp(&b.identity));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::dev_ca::DevCa;

    #[tokio::test]
    async fn tracks_and_renews_at_half_life() {
        let ca = Arc::new(DevCa::new("td", Duration::from_secs(4)).unwrap());
        let m = CertManager::new(ca);
        let id = Identity::new("td", "ns", "sa");
        m.track(id.clone());
        tokio::time::timeout(Duration::from_secs(2), async {
            while m.cached(&id).is_none() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .unwrap();
        let first = m.cached(&id).unwrap().info.serial.clone();
        // Valid 10 s back + 4 s ahead: renewed at half-life, 2 s after issue.
        tokio::time::sleep(Duration::from_millis(3000)).await;
        assert_ne!(m.cached(&id).unwrap().info.serial, first);
        assert_eq!(m.snapshot().len(), 1);
        m.forget(&id);
        assert!(m.snapshot().is_empty());
    }
}
