//! Attaching an NBD export as a block device on this node.
//!
//! Where the kernel has no NBD client (no `/dev/nbd*`, as in these VMs and in
//! many managed kernels), `berth attach` ([`super::fuse`]) shows the export as
//! one file in a FUSE mount and a loop device (direct I/O, so the page cache
//! is not kept twice) makes that file a block device. The attach process runs
//! in its own process group: the attachment outlives a restart of the plugin.
//!
//! The attach process reconnects by itself when the volume server restarts
//! (replaying what was not flushed), so a mounted filesystem keeps working;
//! [`grow`] shows a grown volume to the loop device without detaching. Only if
//! the attach process itself dies is the device attached anew ([`health`]
//! tells when).

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tonic::Status;

use super::mount::{self, run, run_status};

/// The FUSE file's name inside its mount point.
const FILE: &str = super::fuse::FILE;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    pub uri: String,
    pub read_only: bool,
    /// The FUSE mount point `berth attach` serves the export in.
    pub fuse_dir: PathBuf,
    /// The `berth attach` process.
    pub daemon_pid: u32,
    /// The loop device (`/dev/loopN`).
    pub device: PathBuf,
}

impl Attachment {
    fn file(&self) -> PathBuf {
        self.fuse_dir.join(FILE)
    }
}

/// `DIR.ext` beside the attachment's folder. Appended, not
/// `with_extension`: volume ids may hold dots, and `a.1` and `a.2` must not
/// share `a.log`.
fn beside(dir: &Path, ext: &str) -> PathBuf {
    let mut name = dir.as_os_str().to_owned();
    name.push(".");
    name.push(ext);
    PathBuf::from(name)
}

fn pid_file(dir: &Path) -> PathBuf {
    beside(dir, "pid")
}

/// The attach process's stdout and stderr, beside its folder.
fn log_file(dir: &Path) -> PathBuf {
    beside(dir, "log")
}

/// The tail of the attach process's log, for errors.
fn log_tail(dir: &Path) -> String {
    let text = std::fs::read_to_string(log_file(dir)).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(5).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
}

/// The process `pid` is the attach process serving `dir` (not a recycled pid).
fn is_ours(pid: u32, dir: &Path) -> bool {
    let Ok(c) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<&[u8]> = c.split(|b| *b == 0).collect();
    let dir = dir.as_os_str().as_encoded_bytes();
    args.contains(&&b"attach"[..]) && args.contains(&dir)
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
/// `dir` is this attachment's own folder (a FUSE mount point); `program` the
/// `berth` binary; `tls_dir` its certificates for NBD over TCP.
pub async fn attach(
    program: &Path,
    dir: &Path,
    uri: &str,
    read_only: bool,
    tls_dir: Option<&Path>,
    metadata: Option<&str>,
) -> Result<Attachment, Status> {
    clear_fuse(dir).await?;
    std::fs::create_dir_all(dir)
        .map_err(|e| Status::internal(format!("create {}: {e}", dir.display())))?;
    let pid_path = pid_file(dir);
    let _ = std::fs::remove_file(&pid_path);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_file(dir))
        .map_err(|e| Status::internal(format!("attach log: {e}")))?;
    let mut cmd = tokio::process::Command::new(program);
    cmd.arg("attach");
    if let Some(t) = tls_dir {
        cmd.env("BERTH_TLS_DIR", t);
    }
    if let Some(m) = metadata {
        cmd.env("BERTH_METADATA", m);
    }
    if read_only {
        cmd.arg("--read-only");
    }
    // The URI carries the grant's secret: in the environment (the owner's
    // to read), never in argv (everyone's, in /proc).
    cmd.arg("--pid-file")
        .arg(&pid_path)
        .arg(dir)
        .env("BERTH_ATTACH_URI", uri)
        .stdin(std::process::Stdio::null())
        .stdout(
            log.try_clone()
                .map_err(|e| Status::internal(format!("attach log: {e}")))?,
        )
        .stderr(log)
        // Its own group: a signal to the plugin's group leaves it serving.
        .process_group(0);
    let mut child = cmd
        .spawn()
        .map_err(|e| Status::internal(format!("cannot run {} attach: {e}", program.display())))?;
    let pid = child.id().unwrap_or(0);
    // It writes its pid file once the FUSE file is served.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child
            .try_wait()
            .map_err(|e| Status::internal(format!("berth attach: {e}")))?
        {
            return Err(Status::unavailable(format!(
                "could not attach {} ({status}): {}",
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
                "berth attach did not serve {} within 20 s: {}",
                redact(uri),
                log_tail(dir)
            )));
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    // Reap it when it ends (after detach, or if it dies).
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
        daemon_pid: pid,
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

/// Signals the attach process `pid` if it is still this attachment's.
fn signal(a: &Attachment, sig: libc::c_int) {
    let pid = i32::try_from(a.daemon_pid).unwrap_or(0);
    if pid > 0 && is_ours(a.daemon_pid, &a.fuse_dir) {
        // SAFETY: kill(2) takes no pointers; the pid was checked to be this
        // attachment's attach process just above.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

/// Releases the loop device and ends the attach process. Safe to repeat, and on an
/// attachment whose pieces are already gone.
///
/// The attach process unmounts its own FUSE mount (on SIGTERM, through its
/// FUSE session) and exits: one unmount. Unmounting it from here as well
/// made the process's session try again on its way out and log a failed
/// unmount on every detach. `fusermount3` from here is only for a mount
/// whose process is dead or did not end in time.
pub async fn detach(a: &Attachment) -> Result<(), Status> {
    if !a.device.as_os_str().is_empty() {
        // On a device still in use (a lazily unmounted filesystem) the kernel
        // detaches it when the last user closes it.
        release_loop(&a.device, a).await?;
    }
    signal(a, libc::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(5);
    while is_ours(a.daemon_pid, &a.fuse_dir) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    clear_fuse(&a.fuse_dir).await?;
    signal(a, libc::SIGKILL);
    let _ = std::fs::remove_file(pid_file(&a.fuse_dir));
    let _ = std::fs::remove_dir(&a.fuse_dir);
    Ok(())
}

/// Removes the log of the attach processes of the attachment folder `dir`,
/// once its volume is unstaged cleanly (or unstaged without having been
/// staged).
///
/// Every other end keeps it (a failed attach, a NodeStage that failed after
/// attaching, a repair of a dead attachment): it is the only record of what
/// the attach process saw, and errors carry just its last lines. The next
/// attach of the volume appends to it, so it lasts until the CO unstages
/// the volume here.
pub fn remove_log(dir: &Path) {
    let log = log_file(dir);
    match std::fs::remove_file(&log) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        // Only a leftover: the unstage itself succeeded.
        Err(e) => tracing::warn!(log = %log.display(), error = %e, "cannot remove the attach log"),
    }
}

/// Shows a grown export to this attachment's loop devices (`device` and
/// `others`, such as read-only ones) without detaching anything: the attach
/// process asks the server for the size again (SIGHUP) and its file takes
/// it, then `losetup -c` makes each loop device read the new size. Waits for
/// the file to reach `want_bytes` (0: whatever the server says within a few
/// seconds). Returns the device's size.
pub async fn grow(a: &Attachment, want_bytes: u64, others: &[PathBuf]) -> Result<u64, Status> {
    let pid = i32::try_from(a.daemon_pid).unwrap_or(0);
    if pid <= 0 || !is_ours(a.daemon_pid, &a.fuse_dir) {
        return Err(Status::unavailable(format!(
            "the attach process of {} is gone; NodeStageVolume repairs it",
            a.device.display()
        )));
    }
    let file = a.file();
    let size_of_file = || std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
    let before = size_of_file();
    // SAFETY: kill(2) takes no pointers; the pid was checked to be this
    // attachment's attach process just above.
    unsafe {
        libc::kill(pid, libc::SIGHUP);
    }
    let deadline = Instant::now() + Duration::from_secs(if want_bytes > 0 { 15 } else { 3 });
    let mut now = size_of_file();
    while (if want_bytes > 0 {
        now < want_bytes
    } else {
        now == before
    }) && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
        now = size_of_file();
    }
    if now < want_bytes {
        return Err(Status::failed_precondition(format!(
            "the volume server still reports {now} bytes, not the {want_bytes} asked for \
             (ControllerExpandVolume first)"
        )));
    }
    for dev in std::iter::once(&a.device).chain(others) {
        if backing_file(dev) == Some(file.clone()) {
            run("losetup", &[OsStr::new("-c"), dev.as_os_str()]).await?;
        }
    }
    mount::size_of(&a.device)
}

/// What is wrong with an attachment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// The attach process is gone or the loop device no longer reads its
    /// file: only attaching anew helps.
    Broken(String),
    /// The pieces are there but a read fails or does not answer in time:
    /// the volume server is away, and the attach process reconnects by
    /// itself when it is back (attaching anew would need it too).
    Unreachable(String),
}

impl Fault {
    pub fn message(&self) -> &str {
        match self {
            Fault::Broken(m) | Fault::Unreachable(m) => m,
        }
    }
}

/// Whether the attachment serves: the attach process is alive, the loop
/// device still reads its file, and a direct read of the first block
/// succeeds within 10 s.
pub async fn health(a: &Attachment) -> Result<(), Fault> {
    if !is_ours(a.daemon_pid, &a.fuse_dir) {
        return Err(Fault::Broken(format!(
            "the attach process (pid {}) is gone: {}",
            a.daemon_pid,
            log_tail(&a.fuse_dir)
        )));
    }
    if backing_file(&a.device) != Some(a.file()) {
        return Err(Fault::Broken(format!(
            "{} no longer reads {}",
            a.device.display(),
            a.file().display()
        )));
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
        Duration::from_secs(10),
    )
    .await;
    match r {
        Ok((0, _, _)) => Ok(()),
        Ok((code, _, err)) => Err(Fault::Unreachable(format!(
            "reading {} fails (dd exit {code}): {}; {}",
            a.device.display(),
            err.trim(),
            log_tail(&a.fuse_dir)
        ))),
        Err(s) => Err(Fault::Unreachable(format!(
            "{}: the volume server does not answer; {}",
            s.message(),
            log_tail(&a.fuse_dir)
        ))),
    }
}

/// A URI without its export name, which carries the grant's secret token.
pub fn redact(uri: &str) -> String {
    if let Some(Ok(spec)) = super::fuse::ReplicatedSpec::parse(uri) {
        let legs: Vec<String> = spec
            .legs
            .iter()
            .map(|l| format!("{}: {}", l.node, redact(&l.uri)))
            .collect();
        return format!("replicas of {} [{}]", spec.volume, legs.join(", "));
    }
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
    use std::path::Path;

    #[test]
    fn volumes_with_dots_have_their_own_pid_and_log_files() {
        let a = super::log_file(Path::new("/s/attach/db.1"));
        let b = super::log_file(Path::new("/s/attach/db.2"));
        assert_eq!(a, Path::new("/s/attach/db.1.log"));
        assert_ne!(a, b);
        assert_eq!(
            super::pid_file(Path::new("/s/attach/db")),
            Path::new("/s/attach/db.pid")
        );
    }

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
