//! `berth attach` for a volume whose data is on this node: the volume server
//! serves the FUSE file itself.
//!
//! Over NBD, every request of the loop device crossed this process twice
//! (its FUSE reader, its runtime, the socket) on top of the server's NBD
//! thread. Here this process only mounts the file and hands the mount's
//! `/dev/fuse` descriptor to the volume server (`fuse.sock` beside the NBD
//! socket, see [`berth_nbd::handoff`]); the server reads the kernel's
//! requests and answers them from the store.
//!
//! The process stays for as long as the mount needs a server:
//! - it keeps its own copy of the descriptor, so the mount outlives a volume
//!   server that dies or restarts; it hands the descriptor to the next one
//!   (`resume`), and the kernel sends that one whatever the last had not
//!   answered. Requests meanwhile wait, for up to `reconnect_timeout`;
//! - on SIGTERM/SIGINT it unmounts (lazily when a loop device still holds
//!   the file: the server serves it until the loop device lets go) and ends
//!   when the server says the mount is gone, after its final flush;
//! - if it dies, the server lets go of the descriptor too, and the kernel
//!   ends the mount: the node plugin's repair sees a dead attachment, as
//!   before.
//!
//! Chosen when the URI is a unix socket with a `fuse.sock` beside it and
//! this process may mount (root), unless `BERTH_ATTACH_NBD` is set.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use berth_nbd::handoff::{self, Answer, Hello};
use berth_nbd::session::{Endpoint, Uri};
use tokio::io::{AsyncBufReadExt, BufReader, Interest};
use tokio::net::UnixStream;

use super::fuse::AttachOptions;

/// Set (to anything) to attach through NBD even where the server could
/// serve the mount.
pub const FORCE_NBD: &str = "BERTH_ATTACH_NBD";
/// How long the server has to answer a handoff.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// Where a local attachment hands its mount over.
#[derive(Debug, Clone)]
pub struct Local {
    pub socket: PathBuf,
    pub export: String,
}

/// `Some` when the volume server can serve this attachment's mount itself.
pub fn eligible(o: &AttachOptions) -> Option<Local> {
    if std::env::var_os(FORCE_NBD).is_some() {
        return None;
    }
    let uri = Uri::parse(&o.uri).ok()?;
    let Endpoint::Unix(sock) = uri.endpoint else {
        return None;
    };
    // SAFETY: geteuid has no preconditions. mount(2) of a FUSE file needs
    // root here (fusermount3 would, unprivileged, keep the descriptor).
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    let socket = sock.parent()?.join(handoff::SOCKET);
    socket.exists().then_some(Local {
        socket,
        export: uri.export,
    })
}

/// Mounts, hands the mount over, and stays until it is gone.
pub fn run(o: &AttachOptions, l: &Local) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    std::fs::create_dir_all(&o.dir).map_err(|e| format!("{}: {e}", o.dir.display()))?;
    let dev = nix::fcntl::open(
        "/dev/fuse",
        nix::fcntl::OFlag::O_RDWR | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|e| format!("/dev/fuse: {e}"))?;
    mount(&o.dir, &dev, o.read_only)?;
    let r = rt.block_on(serve(o, l, &dev));
    if r.is_err() {
        // Nobody serves the mount any more: let the kernel end it (with our
        // descriptor closed, I/O fails instead of waiting).
        unmount(&o.dir);
    }
    if let Some(p) = &o.pid_file {
        let _ = std::fs::remove_file(p);
    }
    r
}

fn mount(dir: &Path, dev: &OwnedFd, read_only: bool) -> Result<(), String> {
    use nix::mount::MsFlags;
    // SAFETY: getuid/getgid take no arguments and cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let data = format!(
        "fd={},rootmode=40000,user_id={uid},group_id={gid},default_permissions",
        dev.as_raw_fd()
    );
    let mut flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    if read_only {
        flags |= MsFlags::MS_RDONLY;
    }
    nix::mount::mount(
        Some("berth"),
        dir,
        Some("fuse.berth"),
        flags,
        Some(data.as_str()),
    )
    .map_err(|e| format!("cannot mount FUSE at {}: {e}", dir.display()))
}

/// Unmounts `dir`, lazily if a loop device still holds the file.
fn unmount(dir: &Path) {
    use nix::mount::{umount2, MntFlags};
    match umount2(dir, MntFlags::empty()) {
        Ok(()) | Err(nix::Error::EINVAL | nix::Error::ENOENT) => {}
        Err(nix::Error::EBUSY) => {
            tracing::info!("the mount is busy: unmounting it lazily");
            if let Err(e) = umount2(dir, MntFlags::MNT_DETACH) {
                tracing::warn!(error = %e, dir = %dir.display(), "lazy unmount failed");
            }
        }
        Err(e) => tracing::warn!(error = %e, dir = %dir.display(), "unmount failed"),
    }
}

enum Handoff {
    /// Worth trying again (no server yet).
    Retry(String),
    /// The server refused the export: no use asking again.
    Refused(String),
}

/// Connects and hands `dev` over; the connection once the server serves it.
async fn handoff(
    l: &Local,
    dev: &OwnedFd,
    resume: bool,
    writable: bool,
) -> Result<BufReader<UnixStream>, Handoff> {
    let s = UnixStream::connect(&l.socket)
        .await
        .map_err(|e| Handoff::Retry(format!("{}: {e}", l.socket.display())))?;
    let hello = Hello {
        resume,
        export: l.export.clone(),
    };
    loop {
        s.writable()
            .await
            .map_err(|e| Handoff::Retry(e.to_string()))?;
        match s.try_io(Interest::WRITABLE, || {
            handoff::send_hello(s.as_raw_fd(), &hello, dev.as_fd())
        }) {
            Ok(()) => break,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(Handoff::Retry(format!("send the mount: {e}"))),
        }
    }
    let mut r = BufReader::new(s);
    let mut line = String::new();
    match tokio::time::timeout(ANSWER_TIMEOUT, r.read_line(&mut line)).await {
        Err(_) => return Err(Handoff::Retry("the volume server did not answer".into())),
        Ok(Err(e)) => return Err(Handoff::Retry(e.to_string())),
        Ok(Ok(_)) => {}
    }
    match Answer::parse(&line) {
        Ok(Answer::Ok {
            read_only: true, ..
        }) if writable => Err(Handoff::Refused(
            "the export is read-only: attach it with --read-only".into(),
        )),
        Ok(Answer::Ok { size_bytes, .. }) => {
            tracing::info!(size_bytes, resume, "the volume server serves the mount");
            Ok(r)
        }
        Ok(Answer::Err(why)) => Err(Handoff::Refused(why)),
        Ok(Answer::End(why)) => Err(Handoff::Retry(why)),
        Err(e) => Err(Handoff::Retry(e)),
    }
}

/// Hands the mount to the next volume server, for up to `timeout`.
async fn hand_again(
    o: &AttachOptions,
    l: &Local,
    dev: &OwnedFd,
) -> Result<BufReader<UnixStream>, String> {
    let timeout = o.reconnect_timeout;
    let deadline = Instant::now() + timeout;
    let mut last;
    loop {
        match handoff(l, dev, true, !o.read_only).await {
            Ok(c) => return Ok(c),
            Err(Handoff::Refused(why)) => {
                return Err(format!("the volume server refuses the mount: {why}"))
            }
            Err(Handoff::Retry(why)) => last = why,
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "no volume server took the mount within {timeout:?}: {last}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn serve(o: &AttachOptions, l: &Local, dev: &OwnedFd) -> Result<(), String> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut ctl = match handoff(l, dev, false, !o.read_only).await {
        Ok(c) => c,
        Err(Handoff::Refused(why) | Handoff::Retry(why)) => {
            return Err(format!("cannot attach the export: {why}"))
        }
    };
    let (Ok(mut hup), Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::hangup()),
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return Err("cannot install signal handlers".into());
    };
    if let Some(p) = &o.pid_file {
        std::fs::write(p, format!("{}\n", std::process::id()))
            .map_err(|e| format!("{}: {e}", p.display()))?;
    }
    tracing::info!(
        dir = %o.dir.display(),
        read_only = o.read_only,
        socket = %l.socket.display(),
        "serving the export: the volume server answers the FUSE file"
    );
    let mut line = String::new();
    loop {
        line.clear();
        tokio::select! {
            _ = hup.recv() => {
                tracing::info!("the file's size follows the volume's at every stat: nothing to refresh");
            }
            _ = term.recv() => unmount(&o.dir),
            _ = int.recv() => unmount(&o.dir),
            r = ctl.read_line(&mut line) => {
                let why = match r {
                    Ok(0) => "the connection closed".to_string(),
                    Ok(_) => match Answer::parse(&line) {
                        Ok(Answer::End(why)) if why == handoff::UNMOUNTED => {
                            tracing::info!("the mount is gone and flushed");
                            return Ok(());
                        }
                        Ok(Answer::End(why)) => why,
                        _ => continue,
                    },
                    Err(e) => e.to_string(),
                };
                tracing::warn!(reason = %why, "the volume server let go of the mount: handing it over again");
                ctl = hand_again(o, l, dev).await?;
                tracing::warn!("volume server back: the mount is served again");
            }
        }
    }
}
