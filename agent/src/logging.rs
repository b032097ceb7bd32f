//! Logging with a filter that `/logging` can change while the agent runs.
use std::sync::{Arc, Mutex};

use tracing_subscriber::{layer::SubscriberExt, reload, util::SubscriberInitExt, EnvFilter, Registry};

#[derive(Clone)]
pub struct LogControl {
    handle: reload::Handle<EnvFilter, Registry>,
    current: Arc<Mutex<String>>,
}

impl LogControl {
    /// `spec` is an EnvFilter directive: `debug`, `info,nodeway_proxy=trace`, ...
    pub fn init(spec: &str) -> Self {
        let filter = EnvFilter::try_new(spec).unwrap_or_else(|_| EnvFilter::new("info"));
        let (layer, handle) = reload::Layer::new(filter);
        let _ = tracing_subscriber::registry()
            .with(layer)
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_target(false),
            )
            .try_init();
        LogControl {
            handle,
            current: Arc::new(Mutex::new(spec.to_string())),
        }
    }

    pub fn set(&self, spec: &str) -> Result<String, String> {
        let filter = EnvFilter::try_new(spec).map_err(|e| format!("bad log level {spec:?}: {e}"))?;
        self.handle.reload(filter).map_err(|e| e.to_string())?;
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = spec.to_string();
        Ok(spec.to_string())
    }

    pub fn current(&self) -> String {
        self.current.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}
