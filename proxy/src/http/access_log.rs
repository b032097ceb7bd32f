//! Where access log lines go: a bounded queue to one writer thread of its own, so a slow or
//! blocked stdout (a full pipe, a stalled log collector) never blocks a runtime worker. When the
//! queue is full the line is dropped and counted (`nodeway_access_log_dropped_total`).
use std::{
    io::Write,
    sync::mpsc::{self, Receiver, SyncSender, TrySendError},
};

use prometheus_client::metrics::counter::Counter;

/// The sending end of the access log; cheap to clone.
#[derive(Clone, Debug)]
pub struct AccessLogSink {
    tx: SyncSender<Vec<u8>>,
    dropped: Counter,
}

impl AccessLogSink {
    /// Lines to stdout, at most `capacity` waiting.
    pub fn stdout(capacity: usize, dropped: Counter) -> std::io::Result<Self> {
        Self::with_writer(capacity, dropped, std::io::stdout())
    }

    /// Lines to `w` from a thread of their own; the thread ends when every sink is dropped.
    pub fn with_writer(capacity: usize, dropped: Counter, w: impl Write + Send + 'static) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::sync_channel(capacity.max(1));
        std::thread::Builder::new()
            .name("nodeway-access-log".into())
            .spawn(move || write_lines(&rx, w))?;
        Ok(AccessLogSink { tx, dropped })
    }

    /// Queues one line (with its newline); never waits.
    pub fn send(&self, line: Vec<u8>) {
        match self.tx.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.dropped.inc();
            }
        }
    }
}

/// Writes lines as they come, flushing once the queue is empty.
fn write_lines(rx: &Receiver<Vec<u8>>, mut w: impl Write) {
    while let Ok(line) = rx.recv() {
        let _ = w.write_all(&line);
        while let Ok(more) = rx.try_recv() {
            let _ = w.write_all(&more);
        }
        let _ = w.flush();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use std::sync::{Arc, Condvar, Mutex};

    use super::*;

    /// What the stalled writer has seen: a write arrived, it may proceed, what it wrote.
    #[derive(Default)]
    struct Writes {
        entered: bool,
        open: bool,
        bytes: Vec<u8>,
    }

    /// A writer that blocks until opened, and says when the first write arrived.
    #[derive(Clone, Default)]
    struct Stalled {
        state: Arc<(Mutex<Writes>, Condvar)>,
    }

    impl Write for Stalled {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let (m, cv) = &*self.state;
            let mut s = m.lock().unwrap();
            s.entered = true;
            cv.notify_all();
            while !s.open {
                s = cv.wait(s).unwrap();
            }
            s.bytes.extend_from_slice(buf);
            cv.notify_all();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stalled_writer_drops_and_counts_instead_of_blocking() {
        let w = Stalled::default();
        let dropped = Counter::default();
        let sink = AccessLogSink::with_writer(2, dropped.clone(), w.clone()).unwrap();
        sink.send(b"first\n".to_vec());
        let (m, cv) = &*w.state;
        drop(cv.wait_while(m.lock().unwrap(), |s| !s.entered).unwrap());
        // The writer holds the first line; two wait; seven find the queue full.
        for i in 0..9 {
            sink.send(format!("line {i}\n").into_bytes());
        }
        assert_eq!(dropped.get(), 7);
        m.lock().unwrap().open = true;
        cv.notify_all();
        drop(sink);
        let written = cv
            .wait_timeout_while(m.lock().unwrap(), std::time::Duration::from_secs(10), |s| {
                s.bytes.iter().filter(|b| **b == b'\n').count() < 3
            })
            .unwrap()
            .0
            .bytes
            .clone();
        assert_eq!(String::from_utf8(written).unwrap(), "first\nline 0\nline 1\n");
    }
}
