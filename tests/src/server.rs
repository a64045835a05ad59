//! Running the real `berth volume-server` and `berthctl` binaries in tests.
//!
//! The binaries are found beside the test executable (`target/<profile>/`);
//! if they are not built yet (`cargo test -p berth-tests` alone), they are
//! built once with the same cargo and profile.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;

/// Where a started server listens (its "ready" line).
#[derive(Debug, Clone)]
pub struct Ready {
    pub nbd_socket: PathBuf,
    pub nbd_tcp: String,
    pub control_socket: PathBuf,
    /// host:port of the control API over TCP, if it listens there.
    pub control_tcp: String,
    pub metrics: String,
    pub pid: u32,
}

fn profile_dir() -> PathBuf {
    // target/<profile>/deps/<test-binary>
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent()
        .and_then(Path::parent)
        .expect("target/<profile>")
        .to_path_buf()
}

/// The path of a workspace binary, built on first use if missing.
pub fn binary(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    let p = profile_dir().join(name);
    if !p.exists() {
        BUILT.get_or_init(|| {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let profile = profile_dir();
            let mut cmd = Command::new(cargo);
            cmd.args(["build", "-p", "berth-cli", "--bins"]);
            if profile.file_name().is_some_and(|n| n == "release") {
                cmd.arg("--release");
            }
            let st = cmd.status().expect("run cargo build");
            assert!(st.success(), "cargo build -p berth-cli failed");
        });
    }
    assert!(p.exists(), "{} is missing", p.display());
    p
}

/// A `berth volume-server` child process on a data dir.
#[derive(Debug)]
pub struct ServerProc {
    pub dir: PathBuf,
    pub ready: Ready,
    child: Option<Child>,
    pool_size: String,
    extra: Vec<String>,
    /// A command the server runs under (setpriv, prlimit, ...), kept for restarts.
    wrapper: Vec<String>,
}

impl ServerProc {
    pub fn start(dir: &Path, pool_size: &str) -> ServerProc {
        Self::start_with(dir, pool_size, &[])
    }

    /// Starts with more flags (kept for restarts).
    pub fn start_with(dir: &Path, pool_size: &str, extra: &[String]) -> ServerProc {
        Self::start_env(dir, pool_size, extra, &[])
    }

    /// Starts with more flags and environment variables (flags kept for restarts).
    pub fn start_env(
        dir: &Path,
        pool_size: &str,
        extra: &[String],
        env: &[(&str, &str)],
    ) -> ServerProc {
        Self::start_under(&[], dir, pool_size, extra, env)
    }

    /// Starts `wrapper... berth volume-server ...`: the server under a command
    /// that changes its limits or privileges (`prlimit`, `setpriv`).
    pub fn start_under(
        wrapper: &[&str],
        dir: &Path,
        pool_size: &str,
        extra: &[String],
        env: &[(&str, &str)],
    ) -> ServerProc {
        let berth = binary("berth");
        let mut cmd = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(&berth);
                c
            }
            None => Command::new(&berth),
        };
        let mut child = cmd
            .args(["volume-server", "--data"])
            .arg(dir)
            .args(["--pool-size", pool_size])
            .args([
                "--nbd-listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "127.0.0.1:0",
            ])
            .args(extra)
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn berth volume-server");
        let out = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(out)
            .read_line(&mut line)
            .expect("read ready line");
        let v: serde_json::Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("volume server did not start ({e}): {line:?}"));
        let s = |k: &str| v[k].as_str().unwrap_or_default().to_string();
        let ready = Ready {
            nbd_socket: s("nbd_socket").into(),
            nbd_tcp: s("nbd_tcp"),
            control_socket: s("control_socket").into(),
            control_tcp: s("control_tcp"),
            metrics: s("metrics"),
            pid: v["pid"].as_u64().unwrap_or(0) as u32,
        };
        ServerProc {
            dir: dir.to_path_buf(),
            ready,
            child: Some(child),
            pool_size: pool_size.to_string(),
            extra: extra.to_vec(),
            wrapper: wrapper.iter().map(|w| w.to_string()).collect(),
        }
    }

    /// The running server's process id (0 when it is not running).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// kill -9, and wait for the process to be gone.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait: the exit status of a clean shutdown.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        // SAFETY: sending a signal to our own child's pid has no memory effects.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        c.wait().expect("wait")
    }

    /// Sends `signal` and waits up to `limit` for the process to end:
    /// `None` if it is still running then (it is killed, so the test can go on).
    pub fn signal_and_wait(
        &mut self,
        signal: i32,
        limit: std::time::Duration,
    ) -> Option<std::process::ExitStatus> {
        let c = self.child.as_ref().expect("running");
        // SAFETY: sending a signal to our own child's pid has no memory effects.
        unsafe { libc::kill(c.id() as i32, signal) };
        self.wait_exit(limit)
    }

    /// Waits up to `limit` for the process to end by itself: `None` if it is
    /// still running then (it is killed, so the test can go on).
    pub fn wait_exit(&mut self, limit: std::time::Duration) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take().expect("running");
        let until = std::time::Instant::now() + limit;
        while std::time::Instant::now() < until {
            if let Ok(Some(st)) = c.try_wait() {
                return Some(st);
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
        None
    }

    pub fn restart(&mut self) {
        self.restart_env(&[]);
    }

    /// kill -9, then start again on the same data with `env` added (a
    /// fault plan, say).
    pub fn restart_env(&mut self, env: &[(&str, &str)]) {
        self.kill9();
        let wrapper = self.wrapper.clone();
        let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
        *self = ServerProc::start_under(
            &wrapper,
            &self.dir.clone(),
            &self.pool_size.clone(),
            &self.extra.clone(),
            env,
        );
    }

    /// `berthctl --output json server ARGS...` against this server.
    fn ctl_output(&self, args: &[&str]) -> std::process::Output {
        Command::new(binary("berthctl"))
            .arg("--endpoint")
            .arg(format!("unix://{}", self.ready.control_socket.display()))
            .args(["--output", "json", "server"])
            .args(args)
            .output()
            .expect("run berthctl")
    }

    /// Runs berthctl against this server; returns (exit code, stdout).
    pub fn ctl(&self, args: &[&str]) -> (i32, String) {
        let out = self.ctl_output(args);
        if !out.status.success() {
            eprintln!(
                "berthctl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).to_string(),
        )
    }

    /// berthctl that must fail; returns (exit code, stderr).
    pub fn ctl_fails(&self, args: &[&str]) -> (i32, String) {
        let out = self.ctl_output(args);
        assert!(!out.status.success(), "berthctl {args:?} succeeded");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    }

    /// berthctl that must succeed, parsed as JSON.
    pub fn ctl_json(&self, args: &[&str]) -> serde_json::Value {
        let (code, out) = self.ctl(args);
        assert_eq!(code, 0, "berthctl {args:?} failed");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("berthctl {args:?}: {e}: {out}"))
    }

    /// Creates a volume and grants it to `client`; returns the export JSON.
    pub fn volume_export(&self, name: &str, size: &str, client: &str) -> serde_json::Value {
        self.ctl_json(&[
            "volume", "create", name, "--size", size, "--tier", "extreme",
        ]);
        self.ctl_json(&["export", "grant", "--volume", name, "--client", client])
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Offsets in a pool file of the 4 KiB blocks made only of `byte`: where a
/// test wrote a pattern, to flip a bit under it.
pub fn blocks_of(pool: &[u8], byte: u8) -> Vec<u64> {
    pool.chunks(4096)
        .enumerate()
        .filter(|(_, c)| c.iter().all(|&b| b == byte))
        .map(|(i, _)| (i * 4096) as u64)
        .collect()
}

/// GET over plain HTTP/1.1 (the metrics endpoint); the whole response.
pub fn http_get(url: &str) -> String {
    use std::io::{Read, Write};
    let rest = url.trim_start_matches("http://");
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let mut s = std::net::TcpStream::connect(host).expect("connect metrics");
    write!(s, "GET /{path} HTTP/1.1\r\nHost: {host}\r\n\r\n").expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    out
}

/// The value of an unlabelled (or fully labelled) series in a metrics text.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// Runs qemu-io with commands against an NBD URI; returns (success, output).
pub fn qemu_io(uri: &str, cmds: &[String]) -> (bool, String) {
    qemu_io_with(&[], uri, cmds)
}

/// The same, read-only (`-r`), as a read-only export requires.
pub fn qemu_io_ro(uri: &str, cmds: &[String]) -> (bool, String) {
    qemu_io_with(&["-r"], uri, cmds)
}

fn qemu_io_with(flags: &[&str], uri: &str, cmds: &[String]) -> (bool, String) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]).args(flags);
    for cmd in cmds {
        c.arg("-c").arg(cmd);
    }
    c.arg(uri);
    qemu_io_run(c)
}

/// Runs a prepared qemu-io command; returns (success, stdout and stderr).
/// qemu-io exits 0 after a failed `-c` command, so its output decides too.
pub fn qemu_io_run(mut c: Command) -> (bool, String) {
    let out = c
        .output()
        .expect("run qemu-io (apt-get install qemu-utils)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let failed = text.contains("fail") || text.contains("rror") || text.contains("mismatch");
    (out.status.success() && !failed, text)
}

/// Whether a command exists on PATH.
pub fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}
