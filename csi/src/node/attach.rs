//! Attaching an NBD export as a block device on this node.
//!
//! Where the kernel has no NBD client (no `/dev/nbd*`, as in these VMs and in
//! many managed kernels), libnbd's `nbdfuse` shows the export as one file
//! in a FUSE mount and a loop device (direct I/O, so the page cache is not
//! kept twice) makes that file a block device. The nbdfuse process runs in
//! its own process group: the attachment outlives a restart of the plugin.
//!
//! An NBD connection learns its export's size once, at the handshake, and
//! nbdfuse does not reconnect: after the volume server restarts, or to see a
//! grown volume, the device is attached anew ([`health`] tells when).

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tonic::Status;

use super::mount::{self, run, run_status};

/// The FUSE file's name inside its mount point.
const FILE: &str = "disk";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    pub uri: String,
    pub read_only: bool,
    /// The FUSE mount point nbdfuse serves the export in.
    pub fuse_dir: PathBuf,
    pub nbdfuse_pid: u32,
    /// The loop device (`/dev/loopN`).
    pub device: PathBuf,
}

impl Attachment {
    fn file(&self) -> PathBuf {
        self.fuse_dir.join(FILE)
    }
}

fn pid_file(dir: &Path) -> PathBuf {
    dir.with_extension("pid")
}

/// The tail of nbdfuse's log, for errors.
fn log_tail(dir: &Path) -> String {
    let text = std::fs::read_to_string(dir.with_extension("log")).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(5).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
}

/// The process `pid` is the nbdfuse serving `dir` (not a recycled pid).
fn is_ours(pid: u32, dir: &Path) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| {
            let c = String::from_utf8_lossy(&c).replace('\0', " ");
            c.contains("nbdfuse") && c.contains(&*dir.to_string_lossy())
        })
        .unwrap_or(false)
}

/// What the loop device reads from, per sysfs.
fn backing_file(dev: &Path) -> Option<PathBuf> {
    let name = dev.file_name()?.to_str()?;
    std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file"))
        .ok()
        .map(|s| PathBuf::from(s.trim_end()))
}

/// Unmounts a FUSE mount point left behind (its daemon dead or ours).
async fn clear_fuse(dir: &Path) -> Result<(), Status> {
    if mount::mounted_at(dir)?.is_some() {
        let (code, _, err) = run_status(
            "fusermount3",
            &[OsStr::new("-u"), OsStr::new("-z"), dir.as_os_str()],
            Duration::from_secs(30),
        )
        .await?;
        if code != 0 && mount::mounted_at(dir)?.is_some() {
            return Err(Status::internal(format!(
                "fusermount3 -u -z {}: {}",
                dir.display(),
                err.trim()
            )));
        }
    }
    Ok(())
}

/// Connects to `uri` and returns the block device that shows the export.
/// `dir` is this attachment's own folder (a FUSE mount point).
pub async fn attach(dir: &Path, uri: &str, read_only: bool) -> Result<Attachment, Status> {
    clear_fuse(dir).await?;
    std::fs::create_dir_all(dir)
        .map_err(|e| Status::internal(format!("create {}: {e}", dir.display())))?;
    let pid_path = pid_file(dir);
    let _ = std::fs::remove_file(&pid_path);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.with_extension("log"))
        .map_err(|e| Status::internal(format!("nbdfuse log: {e}")))?;
    let mut cmd = tokio::process::Command::new("nbdfuse");
    if read_only {
        cmd.arg("-r");
    }
    cmd.arg("-P")
        .arg(&pid_path)
        .arg(dir.join(FILE))
        .arg(uri)
        .stdin(std::process::Stdio::null())
        .stdout(
            log.try_clone()
                .map_err(|e| Status::internal(format!("nbdfuse log: {e}")))?,
        )
        .stderr(log)
        // Its own group: a signal to the plugin's group leaves it serving.
        .process_group(0);
    let mut child = cmd
        .spawn()
        .map_err(|e| Status::internal(format!("cannot run nbdfuse: {e}")))?;
    let pid = child.id().unwrap_or(0);
    // nbdfuse writes its pid file once the FUSE file is served.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child
            .try_wait()
            .map_err(|e| Status::internal(format!("nbdfuse: {e}")))?
        {
            return Err(Status::unavailable(format!(
                "nbdfuse could not attach {} ({status}): {}",
                redact(uri),
                log_tail(dir)
            )));
        }
        if pid_path.exists() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill().await;
            let _ = clear_fuse(dir).await;
            return Err(Status::deadline_exceeded(format!(
                "nbdfuse did not serve {} within 20 s: {}",
                redact(uri),
                log_tail(dir)
            )));
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    // Reap it when it ends (after detach, or if the connection dies).
    tokio::spawn(async move {
        let _ = child.wait().await;
    });
    let mut args = vec![
        OsStr::new("--find"),
        OsStr::new("--show"),
        OsStr::new("--direct-io=on"),
    ];
    if read_only {
        args.push(OsStr::new("--read-only"));
    }
    let file = dir.join(FILE);
    args.push(file.as_os_str());
    let a = Attachment {
        uri: uri.to_string(),
        read_only,
        fuse_dir: dir.to_path_buf(),
        nbdfuse_pid: pid,
        device: PathBuf::new(),
    };
    match run("losetup", &args).await {
        Ok(out) => Ok(Attachment {
            device: PathBuf::from(out.trim()),
            ..a
        }),
        Err(e) => {
            let _ = detach(&a).await;
            Err(e)
        }
    }
}

/// A second, read-only loop device over the same export.
pub async fn read_only_loop(a: &Attachment) -> Result<PathBuf, Status> {
    let file = a.file();
    let out = run(
        "losetup",
        &[
            OsStr::new("--find"),
            OsStr::new("--show"),
            OsStr::new("--direct-io=on"),
            OsStr::new("--read-only"),
            file.as_os_str(),
        ],
    )
    .await?;
    Ok(PathBuf::from(out.trim()))
}

/// Detaches a loop device of this attachment (not one reused since).
pub async fn release_loop(dev: &Path, a: &Attachment) -> Result<(), Status> {
    if backing_file(dev) == Some(a.file()) {
        run("losetup", &[OsStr::new("-d"), dev.as_os_str()]).await?;
    }
    Ok(())
}

/// Releases the loop device and ends nbdfuse. Safe to repeat, and on an
/// attachment whose pieces are already gone.
pub async fn detach(a: &Attachment) -> Result<(), Status> {
    if !a.device.as_os_str().is_empty() {
        // On a device still in use (a lazily unmounted filesystem) the kernel
        // detaches it when the last user closes it.
        release_loop(&a.device, a).await?;
    }
    clear_fuse(&a.fuse_dir).await?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while is_ours(a.nbdfuse_pid, &a.fuse_dir) {
        if Instant::now() > deadline {
            let pid = i32::try_from(a.nbdfuse_pid).unwrap_or(0);
            if pid > 0 {
                // SAFETY: kill(2) takes no pointers; the pid was checked to be
                // this attachment's nbdfuse just above.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let _ = std::fs::remove_file(pid_file(&a.fuse_dir));
    let _ = std::fs::remove_dir(&a.fuse_dir);
    Ok(())
}

/// Whether the attachment still serves: nbdfuse is alive, the loop device
/// still reads its file, and a direct read of the first block succeeds (it
/// fails at once when the NBD connection is gone). `Err` says what broke.
pub async fn health(a: &Attachment) -> Result<(), String> {
    if !is_ours(a.nbdfuse_pid, &a.fuse_dir) {
        return Err(format!(
            "nbdfuse (pid {}) is gone: {}",
            a.nbdfuse_pid,
            log_tail(&a.fuse_dir)
        ));
    }
    if backing_file(&a.device) != Some(a.file()) {
        return Err(format!(
            "{} no longer reads {}",
            a.device.display(),
            a.file().display()
        ));
    }
    let input = format!("if={}", a.device.display());
    let r = run_status(
        "dd",
        &[
            input.as_str(),
            "of=/dev/null",
            "bs=4096",
            "count=1",
            "iflag=direct",
            "status=none",
        ],
        Duration::from_secs(15),
    )
    .await;
    match r {
        Ok((0, _, _)) => Ok(()),
        Ok((code, _, err)) => Err(format!(
            "reading {} fails (dd exit {code}): {}",
            a.device.display(),
            err.trim()
        )),
        Err(s) => Err(s.message().to_string()),
    }
}

/// A URI without its export name, which carries the grant's secret token.
pub fn redact(uri: &str) -> String {
    match uri.find("://") {
        Some(i) => {
            let rest = &uri[i + 3..];
            let host = rest.split('/').next().unwrap_or("");
            format!("{}://{host}/…", &uri[..i])
        }
        None => "…".into(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn redact_hides_the_export_token() {
        assert_eq!(
            super::redact("nbd://10.0.0.2:10809/db@0123abcd"),
            "nbd://10.0.0.2:10809/…"
        );
        assert_eq!(
            super::redact("nbd+unix:///db@0123?socket=/d/nbd.sock"),
            "nbd+unix:///…"
        );
    }
}
