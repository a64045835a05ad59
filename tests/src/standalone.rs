//! `berth standalone` in tests: one process, one data folder, `berthctl
//! --data DIR`, and the CSI socket at DIR/csi.sock.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::meta::wait_for;
use crate::server::binary;

#[derive(Debug)]
pub struct Standalone {
    pub dir: PathBuf,
    /// The JSON "ready" line.
    pub ready: Value,
    child: Child,
}

impl Standalone {
    /// A socket the ready line names (`csi_socket`, `metadata_socket`...).
    pub fn socket(&self, key: &str) -> PathBuf {
        PathBuf::from(
            self.ready[key]
                .as_str()
                .unwrap_or_else(|| panic!("no {key} in the ready line {}", self.ready)),
        )
    }

    /// Starts on `dir` with a pool of `pool_size`, no TCP ports but an
    /// ephemeral NBD one, and waits until its node is up in the catalog.
    pub fn start(dir: &Path, pool_size: &str) -> Standalone {
        let mut child = Command::new(binary("berth"))
            .args(["standalone", "--data"])
            .arg(dir)
            .args(["--pool-size", pool_size, "--listen", "none"])
            .args(["--nbd-listen", "127.0.0.1:0", "--metrics-listen", "none"])
            .args(["--node-name", "node-1", "--heartbeat-ms", "200"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn berth standalone");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("ready line");
        let ready = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("berth standalone did not start ({e}): {line:?}"));
        let s = Standalone {
            dir: dir.to_path_buf(),
            ready,
            child,
        };
        wait_for("the node up", Duration::from_secs(10), || {
            s.ctl(&["nodes"])
                .as_array()
                .is_some_and(|n| n.len() == 1 && n[0]["state"] == "up")
        });
        s
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `berthctl --data DIR -o json ARGS`, which must succeed.
    pub fn ctl(&self, args: &[&str]) -> Value {
        let out = Command::new(binary("berthctl"))
            .arg("--data")
            .arg(&self.dir)
            .args(["-o", "json"])
            .args(args)
            .output()
            .expect("berthctl");
        assert!(
            out.status.success(),
            "berthctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("json")
    }

    /// The pool's used bytes, asked of the volume server itself.
    pub fn pool_used(&self) -> u64 {
        self.ctl(&["server", "stats"])["pool"]["used_bytes"]
            .as_u64()
            .expect("used_bytes")
    }

    /// SIGTERM; the exit status of a clean shutdown.
    pub fn stop(mut self) -> std::process::ExitStatus {
        // SAFETY: signalling our own child has no memory effects.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.child.wait().expect("wait")
    }

    /// kill -9, as a crash.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Standalone {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
