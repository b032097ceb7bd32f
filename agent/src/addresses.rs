//! The addresses the admin, stats and readiness listeners are bound to, reported once they are
//! bound: a line on stdout and `addresses.json` in the run directory. With port 0 in
//! `--admin-addr` and friends the kernel picks the ports, and this report is how scripts (and the
//! test harness) learn them without racing other processes for "free" ports.
use std::{
    fs,
    io::{self, Read, Write},
    net::SocketAddr,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

/// The name of the report in the run directory.
pub const FILE_NAME: &str = "addresses.json";

/// What `addresses.json` holds; `pid` tells a reader whether the file is from the process it
/// started (a killed agent leaves its file behind).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BoundAddresses {
    pub pid: u32,
    pub admin: SocketAddr,
    pub stats: SocketAddr,
    pub readiness: SocketAddr,
}

impl BoundAddresses {
    /// The stdout line: `nodeway: listening admin=A stats=S readiness=R` (stable: scripts parse it).
    pub fn line(&self) -> String {
        format!(
            "nodeway: listening admin={} stats={} readiness={}",
            self.admin, self.stats, self.readiness
        )
    }
}

/// `addresses.json` written by this process; removed on drop unless another process has replaced
/// it meanwhile (a new agent started with the same run directory).
#[derive(Debug)]
pub struct AddressFile {
    path: PathBuf,
    text: String,
}

impl AddressFile {
    /// Writes `dir/addresses.json` atomically (a temporary file in `dir`, then rename), so a
    /// reader sees the whole report or none. Creates `dir` if needed.
    pub fn write(dir: &Path, addrs: &BoundAddresses) -> io::Result<AddressFile> {
        fs::create_dir_all(dir)?;
        let text = serde_json::to_string(addrs).map_err(io::Error::other)? + "\n";
        let path = dir.join(FILE_NAME);
        let tmp = dir.join(format!(".{FILE_NAME}.{}.tmp", addrs.pid));
        fs::write(&tmp, &text)?;
        if let Err(e) = fs::rename(&tmp, &path) {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        Ok(AddressFile { path, text })
    }
}

impl Drop for AddressFile {
    fn drop(&mut self) {
        if fs::read_to_string(&self.path).is_ok_and(|t| t == self.text) {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// The admin API's mutation token in the run directory.
pub const TOKEN_FILE: &str = "admin-token";

/// `admin-token`: a fresh random token per start, mode 0600 (root on the node reads it, no other
/// host process or hostNetwork pod does); removed on drop unless another agent replaced it.
#[derive(Debug)]
pub struct TokenFile {
    path: PathBuf,
    token: String,
}

impl TokenFile {
    pub fn create(dir: &Path) -> io::Result<TokenFile> {
        fs::create_dir_all(dir)?;
        let mut raw = [0u8; 32];
        fs::File::open("/dev/urandom")?.read_exact(&mut raw)?;
        let token: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        let path = dir.join(TOKEN_FILE);
        let tmp = dir.join(format!(".{TOKEN_FILE}.{}.tmp", std::process::id()));
        let _ = fs::remove_file(&tmp);
        let written = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .and_then(|mut f| f.write_all(format!("{token}\n").as_bytes()))
            .and_then(|()| fs::rename(&tmp, &path));
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        Ok(TokenFile { path, token })
    }

    pub fn token(&self) -> &str {
        &self.token
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TokenFile {
    fn drop(&mut self) {
        if fs::read_to_string(&self.path).is_ok_and(|t| t.trim() == self.token) {
            let _ = fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(pid: u32) -> BoundAddresses {
        BoundAddresses {
            pid,
            admin: "127.0.0.1:41234".parse().expect("addr"),
            stats: "0.0.0.0:15020".parse().expect("addr"),
            readiness: "[::1]:15021".parse().expect("addr"),
        }
    }

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("nodeway-addresses-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn the_line_names_every_listener() {
        assert_eq!(
            addrs(7).line(),
            "nodeway: listening admin=127.0.0.1:41234 stats=0.0.0.0:15020 readiness=[::1]:15021"
        );
    }

    #[test]
    fn the_file_reads_back_and_leaves_no_temporary_file() {
        let dir = scratch("roundtrip").join("run");
        let f = AddressFile::write(&dir, &addrs(7)).expect("write");
        let text = fs::read_to_string(dir.join(FILE_NAME)).expect("read");
        let back: BoundAddresses = serde_json::from_str(&text).expect("json");
        assert_eq!(back, addrs(7));
        let names: Vec<_> = fs::read_dir(&dir)
            .expect("dir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, [FILE_NAME]);
        drop(f);
        assert!(!dir.join(FILE_NAME).exists(), "removed when the agent exits");
        let _ = fs::remove_dir_all(scratch("roundtrip"));
    }

    #[test]
    fn a_newer_agents_file_is_left_alone() {
        let dir = scratch("newer");
        let old = AddressFile::write(&dir, &addrs(7)).expect("write");
        let _new = AddressFile::write(&dir, &addrs(8)).expect("write");
        drop(old);
        let text = fs::read_to_string(dir.join(FILE_NAME)).expect("still there");
        assert_eq!(serde_json::from_str::<BoundAddresses>(&text).expect("json").pid, 8);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_token_is_fresh_private_and_removed() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("nodeway-token-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let a = TokenFile::create(&dir).expect("token");
        let mode = fs::metadata(a.path()).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(a.token().len(), 64);
        let text = fs::read_to_string(a.path()).expect("read");
        assert_eq!(text.trim(), a.token());
        drop(a);
        let b = TokenFile::create(&dir).expect("token");
        let c = TokenFile::create(&dir).expect("token");
        assert_ne!(b.token(), c.token(), "fresh per start");
        drop(b); // replaced by c: c's file stays
        assert_eq!(fs::read_to_string(c.path()).expect("read").trim(), c.token());
        let path = c.path().to_path_buf();
        drop(c);
        assert!(!path.exists());
        let _ = fs::remove_dir_all(&dir);
    }
}
