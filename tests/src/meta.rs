//! Running the real `berth metadata` beside real volume servers in tests.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::server::{binary, ServerProc};

/// Heartbeats every 200 ms, a node is down after 1.5 s of silence, every up
/// node is reconciled every 2 s: the timings the tests rely on.
pub const NODE_TIMEOUT: Duration = Duration::from_millis(1500);

/// What berthctl printed and how it exited.
#[derive(Debug)]
pub struct CtlOut {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// A `berth metadata` child process.
#[derive(Debug)]
pub struct MetaProc {
    pub dir: PathBuf,
    /// http://127.0.0.1:PORT (https:// with TLS), the same across restarts.
    pub endpoint: String,
    /// Given to every berthctl call before its own (--tls-dir DIR with TLS).
    pub ctl_args: Vec<String>,
    listen: String,
    /// The service's certificates, if it serves TLS.
    tls_dir: Option<PathBuf>,
    /// More flags for `berth metadata`, kept across restarts.
    extra: Vec<String>,
    /// Where its log goes (else the test's stderr), kept across restarts.
    pub log: Option<PathBuf>,
    child: Option<Child>,
}

impl MetaProc {
    pub fn start(dir: &Path) -> MetaProc {
        Self::spawn(dir, "127.0.0.1:0", None, None, &[], None)
    }

    /// With `extra` flags for `berth metadata`, kept across restarts.
    pub fn start_with(dir: &Path, extra: &[&str]) -> MetaProc {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        Self::spawn(dir, "127.0.0.1:0", None, None, &extra, None)
    }

    /// Listening on `listen` (a fixed port: a service of several over etcd
    /// advertises it), with `extra` flags; its log (stderr) goes to `log`.
    pub fn start_at(dir: &Path, listen: &str, extra: &[&str], log: &Path) -> MetaProc {
        Self::try_start_at(dir, listen, extra, log).unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`start_at`](Self::start_at), or why the service did not start (the
    /// port was taken, say).
    pub fn try_start_at(
        dir: &Path,
        listen: &str,
        extra: &[&str],
        log: &Path,
    ) -> Result<MetaProc, String> {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let mut m = Self::try_spawn(dir, listen, None, None, &extra, Some(log))?;
        m.log = Some(log.to_path_buf());
        Ok(m)
    }

    /// Serving mutual TLS on TCP with the certificates in `tls_dir`, and
    /// `extra` flags; its berthctl calls present `client_tls`'s.
    pub fn start_tls(dir: &Path, tls_dir: &Path, client_tls: &Path, extra: &[&str]) -> MetaProc {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let mut m = Self::spawn(dir, "127.0.0.1:0", None, Some(tls_dir), &extra, None);
        m.ctl_args = vec!["--tls-dir".into(), client_tls.display().to_string()];
        m
    }

    /// Starts the service; panics if it does not start.
    fn spawn(
        dir: &Path,
        listen: &str,
        crash_at: Option<&str>,
        tls: Option<&Path>,
        extra: &[String],
        log: Option<&Path>,
    ) -> MetaProc {
        Self::try_spawn(dir, listen, crash_at, tls, extra, log).unwrap_or_else(|e| panic!("{e}"))
    }

    fn try_spawn(
        dir: &Path,
        listen: &str,
        crash_at: Option<&str>,
        tls: Option<&Path>,
        extra: &[String],
        log: Option<&Path>,
    ) -> Result<MetaProc, String> {
        let mut cmd = Command::new(binary("berth"));
        cmd.args(["metadata", "--data"])
            .arg(dir)
            .args(["--listen", listen])
            .args(["--heartbeat-ms", "200", "--node-timeout-ms"])
            .arg(NODE_TIMEOUT.as_millis().to_string())
            .args(["--reconcile-seconds", "2"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(match log {
                Some(p) => Stdio::from(
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(p)
                        .expect("log file"),
                ),
                None => Stdio::inherit(),
            });
        if let Some(p) = crash_at {
            cmd.env("BERTH_FAULT_CRASH", p);
        }
        match tls {
            Some(t) => cmd.arg("--tls-dir").arg(t),
            // A test cluster on loopback: plain TCP, asked for by name.
            None => cmd.arg("--insecure-plaintext-tcp"),
        };
        cmd.args(extra);
        let mut child = cmd.spawn().expect("spawn berth metadata");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("read ready line");
        let v: serde_json::Value = match serde_json::from_str(&line) {
            Ok(v) => v,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("metadata service did not start ({e}): {line:?}"));
            }
        };
        let tcp = v["tcp"].as_str().expect("tcp address").to_string();
        Ok(MetaProc {
            dir: dir.to_path_buf(),
            endpoint: format!("{}://{tcp}", if tls.is_some() { "https" } else { "http" }),
            ctl_args: Vec::new(),
            listen: tcp,
            tls_dir: tls.map(Path::to_path_buf),
            extra: extra.to_vec(),
            log: log.map(Path::to_path_buf),
            child: Some(child),
        })
    }

    /// kill -9 (if running) and start again on the same port, optionally set
    /// to crash at a fault point.
    pub fn restart(&mut self, crash_at: Option<&str>) {
        self.kill9();
        let dir = self.dir.clone();
        let listen = self.listen.clone();
        let (tls, ctl_args, extra, log) = (
            self.tls_dir.clone(),
            self.ctl_args.clone(),
            self.extra.clone(),
            self.log.clone(),
        );
        // The port was just released; retry briefly if the kernel still holds it.
        for _ in 0..50 {
            let probe = std::net::TcpListener::bind(&listen);
            if probe.is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        *self = Self::spawn(
            &dir,
            &listen,
            crash_at,
            tls.as_deref(),
            &extra,
            log.as_deref(),
        );
        self.ctl_args = ctl_args;
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGTERM and wait.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: signalling our own child has no memory effects.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
        }
    }

    /// Waits for the process to exit on its own (a crash point); true if it did.
    pub fn exited_within(&mut self, t: Duration) -> bool {
        let Some(c) = self.child.as_mut() else {
            return true;
        };
        let end = Instant::now() + t;
        while Instant::now() < end {
            if c.try_wait().ok().flatten().is_some() {
                self.child = None;
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    pub fn ctl(&self, args: &[&str]) -> CtlOut {
        let all: Vec<&str> = self
            .ctl_args
            .iter()
            .map(String::as_str)
            .chain(args.iter().copied())
            .collect();
        ctl_at(&self.endpoint, &all)
    }

    /// berthctl's table output, which must succeed, trimmed.
    pub fn ctl_text(&self, args: &[&str]) -> String {
        let out = Command::new(binary("berthctl"))
            .args(["--endpoint", &self.endpoint])
            .args(&self.ctl_args)
            .args(args)
            .output()
            .expect("run berthctl");
        assert!(
            out.status.success(),
            "berthctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// berthctl that must succeed, parsed as JSON.
    pub fn ctl_json(&self, args: &[&str]) -> serde_json::Value {
        let o = self.ctl(args);
        assert_eq!(o.code, 0, "berthctl {args:?} failed: {}", o.stderr);
        serde_json::from_str(&o.stdout)
            .unwrap_or_else(|e| panic!("berthctl {args:?}: {e}: {}", o.stdout))
    }

    /// berthctl that must fail with `code`; returns its message.
    pub fn ctl_err(&self, code: i32, args: &[&str]) -> String {
        let o = self.ctl(args);
        assert_eq!(
            o.code, code,
            "berthctl {args:?}: stdout {} stderr {}",
            o.stdout, o.stderr
        );
        o.stderr
    }

    /// The state ("up"/"down") of each node by name.
    pub fn node_states(&self) -> Vec<(String, String)> {
        let v = self.ctl_json(&["nodes"]);
        v.as_array()
            .expect("array")
            .iter()
            .map(|n| {
                (
                    n["name"].as_str().unwrap_or_default().to_string(),
                    n["state"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect()
    }

    pub fn wait_node(&self, name: &str, state: &str) {
        wait_for(
            &format!("node {name} {state}"),
            Duration::from_secs(20),
            || {
                self.node_states()
                    .iter()
                    .any(|(n, s)| n == name && s == state)
            },
        );
    }
}

impl Drop for MetaProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// berthctl with JSON output against `endpoint` (`A` or `A,B,C`).
pub fn ctl_at(endpoint: &str, args: &[&str]) -> CtlOut {
    let out = Command::new(binary("berthctl"))
        .args(["--endpoint", endpoint, "--output", "json"])
        .args(args)
        .output()
        .expect("run berthctl");
    CtlOut {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).to_string(),
        stderr: String::from_utf8_lossy(&out.stderr).to_string(),
    }
}

/// Polls `f` until it holds; panics naming `what` after `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out after {timeout:?} waiting for {what}");
}

/// One node of a test cluster: name, pool size, labels.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    pub name: &'static str,
    pub pool_size: &'static str,
    pub labels: Vec<(&'static str, &'static str)>,
}

/// A metadata service and volume servers, each in its own data folder under
/// `root`, all on loopback with ports the kernel picks.
#[derive(Debug)]
pub struct Cluster {
    pub meta: MetaProc,
    pub nodes: Vec<(String, ServerProc)>,
}

impl Cluster {
    pub fn start(root: &Path, specs: &[NodeSpec]) -> Cluster {
        Self::start_with(root, specs, &[])
    }

    /// With `meta_extra` flags for the metadata service.
    pub fn start_with(root: &Path, specs: &[NodeSpec], meta_extra: &[&str]) -> Cluster {
        let meta = MetaProc::start_with(&root.join("meta"), meta_extra);
        let mut nodes = Vec::new();
        for s in specs {
            let mut extra: Vec<String> = [
                "--control-listen",
                "127.0.0.1:0",
                "--insecure-plaintext-tcp",
                "--metadata",
                &meta.endpoint,
                "--node-name",
                s.name,
            ]
            .iter()
            .map(|x| x.to_string())
            .collect();
            for (k, v) in &s.labels {
                extra.push("--label".into());
                extra.push(format!("{k}={v}"));
            }
            let p = ServerProc::start_with(&root.join(s.name), s.pool_size, &extra);
            nodes.push((s.name.to_string(), p));
        }
        for s in specs {
            meta.wait_node(s.name, "up");
        }
        Cluster { meta, nodes }
    }

    pub fn node(&mut self, name: &str) -> &mut ServerProc {
        &mut self
            .nodes
            .iter_mut()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no node {name}"))
            .1
    }

    /// The names of the volumes a node's volume server has (its own view).
    pub fn server_volumes(&mut self, node: &str) -> Vec<String> {
        names(&self.node(node).ctl_json(&["volume", "list"]), "name")
    }
}

/// The `key` field of every object in a JSON array.
pub fn names(v: &serde_json::Value, key: &str) -> Vec<String> {
    let mut out: Vec<String> = v
        .as_array()
        .expect("array")
        .iter()
        .map(|x| x[key].as_str().unwrap_or_default().to_string())
        .collect();
    out.sort();
    out
}
