//! Real etcd clusters on loopback for tests and benchmarks: `etcd` processes
//! (Debian's `etcd-server`) on free ports, in a temporary folder that goes
//! with the cluster. Members can be killed and started again.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug)]
struct Member {
    name: String,
    client: u16,
    peer: u16,
    child: Option<Child>,
}

#[derive(Debug)]
pub struct EtcdCluster {
    members: Vec<Member>,
    dir: tempfile::TempDir,
    token: String,
    /// Serving clients over TLS with this certificate folder (tls.crt,
    /// tls.key, ca.crt), requiring client certificates signed by its CA.
    tls: Option<PathBuf>,
}

/// The `etcd` program, or a failure that says how to get it.
fn program() -> PathBuf {
    let p = std::env::var_os("BERTH_ETCD").map_or_else(|| PathBuf::from("etcd"), PathBuf::from);
    match Command::new(&p).arg("--version").output() {
        Ok(o) if o.status.success() => p,
        _ => panic!(
            "{} is not runnable: the etcd tests need a real etcd (apt-get install etcd-server, \
             which scripts/deps.sh installs; or BERTH_ETCD=/path/to/etcd)",
            p.display()
        ),
    }
}

/// A loopback port nobody listens on now (for a program that must be told
/// its port: etcd, a metadata service that advertises its address).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

impl EtcdCluster {
    /// Starts `n` members and waits until the cluster answers.
    pub fn start(n: usize) -> EtcdCluster {
        Self::start_with(n, None, None)
    }

    /// Starts `n` members serving clients over TLS with the certificate in
    /// `server` (tls.crt, tls.key, ca.crt: the CA that client certificates
    /// must be signed by), and waits until the cluster answers a client
    /// presenting `client` (a TLS configuration with its certificate).
    pub fn start_tls(
        n: usize,
        server: &std::path::Path,
        client: etcd_client::TlsOptions,
    ) -> EtcdCluster {
        Self::start_with(n, Some(server.to_path_buf()), Some(client))
    }

    fn start_with(
        n: usize,
        tls: Option<PathBuf>,
        client: Option<etcd_client::TlsOptions>,
    ) -> EtcdCluster {
        // A free port can be taken by another test between the check and
        // etcd's bind (etcd then exits): start again on other ports.
        let mut last = String::new();
        for _attempt in 0..5 {
            let dir = tempfile::tempdir().expect("tempdir");
            let members = (0..n)
                .map(|i| Member {
                    name: format!("m{i}"),
                    client: free_port(),
                    peer: free_port(),
                    child: None,
                })
                .collect();
            let mut c = EtcdCluster {
                members,
                dir,
                token: format!("berth-test-{}", std::process::id()),
                tls: tls.clone(),
            };
            for i in 0..n {
                c.spawn(i, "new");
            }
            match c.wait_ready(&c.endpoints(), client.clone(), Duration::from_secs(30)) {
                Ok(()) => return c,
                Err(e) => last = e,
            }
        }
        panic!("etcd did not start in 5 attempts: {last}");
    }

    /// A member that has exited (it could not bind its ports, say).
    fn exited(&mut self) -> Option<String> {
        let dir = self.dir.path().to_path_buf();
        self.members.iter_mut().find_map(|m| {
            let c = m.child.as_mut()?;
            let status = c.try_wait().ok().flatten()?;
            let log =
                std::fs::read_to_string(dir.join(format!("{}.log", m.name))).unwrap_or_default();
            Some(format!(
                "etcd {} exited ({status}): {}",
                m.name,
                log.lines().last().unwrap_or("")
            ))
        })
    }

    fn initial_cluster(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn spawn(&mut self, i: usize, state: &str) {
        let initial = self.initial_cluster();
        let data = self.dir.path().join(&self.members[i].name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(
                self.dir
                    .path()
                    .join(format!("{}.log", self.members[i].name)),
            )
            .expect("etcd log");
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let m = &mut self.members[i];
        let client = format!("{scheme}://127.0.0.1:{}", m.client);
        let peer = format!("http://127.0.0.1:{}", m.peer);
        let mut cmd = Command::new(program());
        if let Some(d) = &self.tls {
            cmd.arg("--cert-file")
                .arg(d.join("tls.crt"))
                .arg("--key-file")
                .arg(d.join("tls.key"))
                .arg("--trusted-ca-file")
                .arg(d.join("ca.crt"))
                .arg("--client-cert-auth");
        }
        let child = cmd
            .args(["--name", &m.name])
            .arg("--data-dir")
            .arg(&data)
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &initial])
            .args(["--initial-cluster-state", state])
            .args(["--initial-cluster-token", &self.token])
            // The group commits of the audit log put many records in one
            // transaction (docs/ha.md says the same of production).
            .args(["--max-txn-ops", "4096"])
            .args(["--heartbeat-interval", "100", "--election-timeout", "1000"])
            .args(["--logger", "zap", "--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start etcd");
        m.child = Some(child);
    }

    /// Waits until a write through `endpoints` succeeds; fails at once if
    /// a member exits.
    fn wait_ready(
        &mut self,
        endpoints: &[String],
        tls: Option<etcd_client::TlsOptions>,
        within: Duration,
    ) -> Result<(), String> {
        let deadline = Instant::now() + within;
        let mut cfg = crate::EtcdConfig::new(endpoints.to_vec());
        cfg.tls = tls;
        cfg.request_timeout = Duration::from_secs(2);
        cfg.prefix = "/berth-test-ready".into();
        loop {
            let ok = crate::EtcdCatalog::connect(&cfg).and_then(|c| {
                berth_catalog::CatalogStore::commit(
                    &*c,
                    berth_catalog::Txn::new().put(berth_catalog::Table::Meta, "ready", vec![1]),
                )
            });
            match ok {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() > deadline => {
                    return Err(format!(
                        "etcd did not answer within {within:?}: {e}; logs in {}",
                        self.dir.path().display()
                    ))
                }
                Err(_) => {
                    if let Some(why) = self.exited() {
                        return Err(why);
                    }
                    std::thread::sleep(Duration::from_millis(100))
                }
            }
        }
    }

    /// Every member's client URL.
    pub fn endpoints(&self) -> Vec<String> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        self.members
            .iter()
            .map(|m| format!("{scheme}://127.0.0.1:{}", m.client))
            .collect()
    }

    /// kill -9 of member `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts member `i` again on its data (after [`kill`](Self::kill)).
    pub fn restart(&mut self, i: usize) {
        assert!(self.members[i].child.is_none(), "member {i} is running");
        self.spawn(i, "existing");
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}
