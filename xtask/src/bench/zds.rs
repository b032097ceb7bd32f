//! A stand-in for Istio's CNI node agent, so ztunnel runs in its shared (node) mode for the
//! benchmarks: one ztunnel serving every pod of node a, as it does in a mesh.
//!
//! ztunnel's side of the protocol (ZDS, Istio's `zds.proto`): it connects to a unix SEQPACKET
//! socket (`INPOD_UDS`) and says hello (`ZdsHello { version: V1 }`); the agent sends each pod as a
//! `WorkloadRequest { add: AddWorkload { uid, workload_info } }` with the pod's network namespace
//! as an `SCM_RIGHTS` descriptor, one message per packet, and waits for each
//! `WorkloadResponse { ack }` (a non-empty `error` is a refusal); `snapshot_sent` ends the snapshot.
//! The connection stays open for as long as ztunnel serves the pods (it is not ready without it).
//! Three small messages, so they are encoded here directly in protobuf's wire format.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{
    accept, bind, listen, recv, sendmsg, socket, AddressFamily, Backlog, ControlMessage, MsgFlags, SockFlag, SockType,
    UnixAddr,
};
use nodeway_tests::Pod;

/// The socket ztunnel connects to; removed when dropped.
pub struct NodeAgent {
    listener: OwnedFd,
    path: PathBuf,
}

/// An accepted ztunnel that has taken its snapshot; the connection closes when dropped.
pub struct Session {
    _conn: OwnedFd,
}

impl NodeAgent {
    pub fn listen(path: &Path) -> Result<Self> {
        let _ = std::fs::remove_file(path);
        let fd = socket(AddressFamily::Unix, SockType::SeqPacket, SockFlag::SOCK_CLOEXEC, None)
            .context("creating the node agent's SEQPACKET socket")?;
        let addr = UnixAddr::new(path).with_context(|| format!("unix address {}", path.display()))?;
        bind(fd.as_raw_fd(), &addr).with_context(|| format!("binding {}", path.display()))?;
        listen(&fd, Backlog::new(4)?).context("listening on the node agent's socket")?;
        Ok(NodeAgent {
            listener: fd,
            path: path.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Accepts ztunnel's connection, checks its hello and hands it `pods` (each acked), then
    /// the end of the snapshot.
    pub fn snapshot(&self, pods: &[&Pod], limit: Duration) -> Result<Session> {
        let deadline = Instant::now() + limit;
        wait_readable(&self.listener, deadline, "ztunnel's connection to the node agent")?;
        let raw = accept(self.listener.as_raw_fd()).context("accepting ztunnel's connection")?;
        // SAFETY: accept returned a new descriptor that nothing else owns.
        let conn = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) };
        let hello = read_packet(&conn, deadline, "ztunnel's hello")?;
        if hello != [0x08, 0x01] {
            bail!("ztunnel's hello is not ZdsHello {{ version: V1 }}: {hello:02x?}");
        }
        for pod in pods {
            let netns = File::open(Path::new("/var/run/netns").join(&pod.netns))
                .with_context(|| format!("opening the network namespace of {}", pod.name))?;
            send(&conn, &add_workload(pod), Some(netns.as_fd()))?;
            expect_ack(&conn, deadline, &format!("AddWorkload {}", pod.name))?;
        }
        send(&conn, &snapshot_sent(), None)?;
        expect_ack(&conn, deadline, "SnapshotSent")?;
        Ok(Session { _conn: conn })
    }
}

impl Drop for NodeAgent {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The pod's uid as the bench's ztunnel xDS file names it.
pub fn uid(pod: &Pod) -> String {
    format!("bench//v1/Pod/{}/{}", pod.namespace, pod.name)
}

/// `WorkloadRequest { add (1): AddWorkload { uid (1), workload_info (2): WorkloadInfo { name (1),
/// namespace (2), service_account (3) } } }`.
fn add_workload(pod: &Pod) -> Vec<u8> {
    let mut info = Vec::new();
    field(&mut info, 1, pod.name.as_bytes());
    field(&mut info, 2, pod.namespace.as_bytes());
    field(&mut info, 3, b"default");
    let mut add = Vec::new();
    field(&mut add, 1, uid(pod).as_bytes());
    field(&mut add, 2, &info);
    let mut req = Vec::new();
    field(&mut req, 1, &add);
    req
}

/// `WorkloadRequest { snapshot_sent (3): SnapshotSent {} }`.
fn snapshot_sent() -> Vec<u8> {
    let mut req = Vec::new();
    field(&mut req, 3, &[]);
    req
}

/// A length-delimited field (strings and messages).
fn field(out: &mut Vec<u8>, number: u32, bytes: &[u8]) {
    varint(out, u64::from(number << 3 | 2));
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A length-delimited field's bytes at the start of `b` with the given number, if it is one.
fn read_field(b: &[u8], number: u32) -> Option<&[u8]> {
    let (&tag, rest) = b.split_first()?;
    if u32::from(tag) != (number << 3 | 2) {
        return None;
    }
    let (mut len, mut used) = (0usize, 0usize);
    for (i, byte) in rest.iter().enumerate().take(4) {
        len |= usize::from(byte & 0x7f) << (7 * i);
        used = i + 1;
        if byte & 0x80 == 0 {
            break;
        }
    }
    rest.get(used..used + len)
}

/// `WorkloadResponse { ack (1): Ack { error (1) } }`: the error, empty for an ack.
fn ack_error(packet: &[u8]) -> Option<String> {
    let ack = read_field(packet, 1)?;
    Some(read_field(ack, 1).map_or_else(String::new, |e| String::from_utf8_lossy(e).into_owned()))
}

fn expect_ack(conn: &OwnedFd, deadline: Instant, what: &str) -> Result<()> {
    let packet = read_packet(conn, deadline, what)?;
    match ack_error(&packet) {
        Some(e) if e.is_empty() => Ok(()),
        Some(e) => bail!("ztunnel refused {what}: {e}"),
        None => bail!("ztunnel answered {what} with no ack: {packet:02x?}"),
    }
}

fn send(conn: &OwnedFd, packet: &[u8], fd: Option<std::os::fd::BorrowedFd<'_>>) -> Result<()> {
    let iov = [std::io::IoSlice::new(packet)];
    let fds = fd.map(|f| [f.as_raw_fd()]);
    let cmsgs: Vec<ControlMessage<'_>> = fds.as_ref().map(|f| ControlMessage::ScmRights(f)).into_iter().collect();
    sendmsg::<()>(conn.as_raw_fd(), &iov, &cmsgs, MsgFlags::empty(), None).context("sending to ztunnel")?;
    Ok(())
}

fn read_packet(conn: &OwnedFd, deadline: Instant, what: &str) -> Result<Vec<u8>> {
    wait_readable(conn, deadline, what)?;
    let mut buf = vec![0u8; 1024];
    let n = recv(conn.as_raw_fd(), &mut buf, MsgFlags::empty()).with_context(|| format!("reading {what}"))?;
    if n == 0 {
        bail!("ztunnel closed the node agent's connection before {what}");
    }
    buf.truncate(n);
    Ok(buf)
}

fn wait_readable(fd: &OwnedFd, deadline: Instant, what: &str) -> Result<()> {
    let left = deadline.saturating_duration_since(Instant::now());
    let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
    let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
    if poll(&mut fds, PollTimeout::from(ms)).context("poll")? == 0 {
        bail!("no {what} within the time limit");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_workload_is_the_protobuf_ztunnel_decodes() {
        let pod = Pod {
            name: "c".into(),
            namespace: "ns".into(),
            netns: "x-c".into(),
            ip: [198, 18, 0, 2].into(),
        };
        let uid = b"bench//v1/Pod/ns/c";
        let mut want = vec![0x0a, (2 + uid.len() + 2 + 16) as u8, 0x0a, uid.len() as u8];
        want.extend_from_slice(uid);
        want.extend_from_slice(&[0x12, 16, 0x0a, 1, b'c', 0x12, 2, b'n', b's', 0x1a, 7]);
        want.extend_from_slice(b"default");
        assert_eq!(add_workload(&pod), want);
        assert_eq!(snapshot_sent(), [0x1a, 0x00]);
    }

    #[test]
    fn acks_and_refusals_are_told_apart() {
        assert_eq!(ack_error(&[0x0a, 0x00]).as_deref(), Some(""));
        assert_eq!(ack_error(&[0x0a, 0x04, 0x0a, 0x02, b'n', b'o']).as_deref(), Some("no"));
        assert_eq!(ack_error(&[0x08, 0x01]), None);
    }
}
