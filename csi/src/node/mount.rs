//! Mounts, filesystems and the programs that make them (util-linux's mount
//! and blkid, e2fsprogs, xfsprogs): run as child processes with their error
//! output kept for the caller, and the kernel's mount table read from
//! `/proc/self/mountinfo`.

use std::ffi::OsStr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tonic::Status;

/// How long one helper program may run (mkfs of a large volume included).
const TOOL_TIMEOUT: Duration = Duration::from_secs(600);

/// Runs `prog args…`; INTERNAL with its output when it fails.
pub async fn run<S: AsRef<OsStr>>(prog: &str, args: &[S]) -> Result<String, Status> {
    let (code, out, err) = run_status(prog, args, TOOL_TIMEOUT).await?;
    if code != 0 {
        return Err(Status::internal(format!(
            "{prog} {} failed (exit {code}): {}",
            args.iter()
                .map(|a| a.as_ref().to_string_lossy())
                .collect::<Vec<_>>()
                .join(" "),
            err.trim()
        )));
    }
    Ok(out)
}

/// Runs `prog args…` and returns its exit code, stdout and stderr.
pub async fn run_status<S: AsRef<OsStr>>(
    prog: &str,
    args: &[S],
    timeout: Duration,
) -> Result<(i32, String, String), Status> {
    let child = tokio::process::Command::new(prog)
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(timeout, child)
        .await
        .map_err(|_| Status::deadline_exceeded(format!("{prog} did not finish in {timeout:?}")))?
        .map_err(|e| Status::internal(format!("cannot run {prog}: {e}")))?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// One line of `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// The mounted filesystem's device (major, minor).
    pub dev: (u32, u32),
    /// The directory (or file) of that filesystem the mount shows.
    pub root: String,
    pub mount_point: PathBuf,
    /// Per-mount options ("rw,relatime"...).
    pub options: String,
    pub fs_type: String,
    pub source: String,
}

impl MountEntry {
    pub fn read_only(&self) -> bool {
        self.options.split(',').any(|o| o == "ro")
    }
}

/// Undoes mountinfo's octal escapes (`\040` for a space...).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses mountinfo text (see proc(5)); malformed lines are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let l: Vec<&str> = left.split(' ').collect();
            let r: Vec<&str> = right.split(' ').collect();
            if l.len() < 6 || r.len() < 2 {
                return None;
            }
            let (maj, min) = l[2].split_once(':')?;
            Some(MountEntry {
                dev: (maj.parse().ok()?, min.parse().ok()?),
                root: unescape(l[3]),
                mount_point: PathBuf::from(unescape(l[4])),
                options: l[5].to_string(),
                fs_type: r[0].to_string(),
                source: unescape(r[1]),
            })
        })
        .collect()
}

/// The mount table now.
pub fn mounts() -> Result<Vec<MountEntry>, Status> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| Status::internal(format!("read /proc/self/mountinfo: {e}")))?;
    Ok(parse_mountinfo(&text))
}

/// The topmost mount at `path`, if it is a mount point.
pub fn mounted_at(path: &Path) -> Result<Option<MountEntry>, Status> {
    let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    Ok(mounts()?.into_iter().rev().find(|m| m.mount_point == path))
}

/// A block device's (major, minor).
pub fn device_number(dev: &Path) -> Result<(u32, u32), Status> {
    let md = std::fs::metadata(dev)
        .map_err(|e| Status::internal(format!("stat {}: {e}", dev.display())))?;
    let rdev = md.rdev();
    Ok((libc::major(rdev), libc::minor(rdev)))
}

/// The size of a block device or file, in bytes.
pub fn size_of(dev: &Path) -> Result<u64, Status> {
    use std::io::Seek;
    let mut f = std::fs::File::open(dev)
        .map_err(|e| Status::internal(format!("open {}: {e}", dev.display())))?;
    f.seek(std::io::SeekFrom::End(0))
        .map_err(|e| Status::internal(format!("size of {}: {e}", dev.display())))
}

/// The filesystem on a device ("" when blkid finds none).
pub async fn probe_fs(dev: &Path) -> Result<String, Status> {
    let (code, out, err) = run_status(
        "blkid",
        &[
            OsStr::new("-p"),
            OsStr::new("-o"),
            OsStr::new("value"),
            OsStr::new("-s"),
            OsStr::new("TYPE"),
            dev.as_os_str(),
        ],
        Duration::from_secs(60),
    )
    .await?;
    match code {
        0 => Ok(out.trim().to_string()),
        // 2: nothing was found on the device.
        2 => Ok(String::new()),
        _ => Err(Status::internal(format!(
            "blkid -p {} failed (exit {code}): {}",
            dev.display(),
            err.trim()
        ))),
    }
}

/// Makes a filesystem. Volumes are thin and read zeros, so discarding every
/// block first (mkfs's default) would only cost time.
pub async fn mkfs(dev: &Path, fs_type: &str) -> Result<(), Status> {
    let d = dev.as_os_str();
    match fs_type {
        "ext4" => {
            run(
                "mkfs.ext4",
                &[
                    OsStr::new("-q"),
                    OsStr::new("-F"),
                    OsStr::new("-E"),
                    OsStr::new("nodiscard"),
                    d,
                ],
            )
            .await
        }
        "xfs" => run("mkfs.xfs", &[OsStr::new("-q"), OsStr::new("-K"), d]).await,
        other => Err(Status::invalid_argument(format!(
            "cannot make a {other} filesystem"
        ))),
    }
    .map(|_| ())
}

/// Mount options for a filesystem: the caller's flags, read-only when asked,
/// and for xfs `nouuid` (a clone carries its source's UUID, and both may be
/// mounted on one node).
pub fn fs_options(fs_type: &str, read_only: bool, flags: &[String]) -> String {
    let mut o: Vec<String> = flags.to_vec();
    if read_only {
        o.push("ro".into());
    }
    if fs_type == "xfs" {
        o.push("nouuid".into());
    }
    if o.is_empty() {
        o.push("defaults".into());
    }
    o.join(",")
}

pub async fn mount_fs(
    dev: &Path,
    target: &Path,
    fs_type: &str,
    options: &str,
) -> Result<(), Status> {
    run(
        "mount",
        &[
            OsStr::new("-t"),
            OsStr::new(fs_type),
            OsStr::new("-o"),
            OsStr::new(options),
            dev.as_os_str(),
            target.as_os_str(),
        ],
    )
    .await
    .map(|_| ())
}

/// Bind-mounts `source` (a directory or a device file) at `target`, then
/// makes the bind read-only when asked (a bind ignores `ro` on creation).
pub async fn bind(source: &Path, target: &Path, read_only: bool) -> Result<(), Status> {
    run(
        "mount",
        &[OsStr::new("--bind"), source.as_os_str(), target.as_os_str()],
    )
    .await?;
    if read_only {
        if let Err(e) = run(
            "mount",
            &[
                OsStr::new("-o"),
                OsStr::new("remount,bind,ro"),
                target.as_os_str(),
            ],
        )
        .await
        {
            let _ = unmount(target, false).await;
            return Err(e);
        }
    }
    Ok(())
}

/// Unmounts every mount stacked at `path`; `lazy` detaches a filesystem
/// whose device is gone or busy (`umount -l`).
pub async fn unmount(path: &Path, lazy: bool) -> Result<(), Status> {
    while mounted_at(path)?.is_some() {
        let mut args = vec![path.as_os_str()];
        if lazy {
            args.insert(0, OsStr::new("-l"));
        }
        run("umount", &args).await?;
    }
    Ok(())
}

/// Whether this process holds a capability (a bit of `CapEff`).
fn has_capability(bit: u32) -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << bit) != 0)
}

/// CAP_SYS_RESOURCE, which ext4's online resize ioctl requires.
const CAP_SYS_RESOURCE: u32 = 24;

/// Grows the filesystem mounted at `mount_point` on `dev` to the device's size.
pub async fn grow_fs(dev: &Path, mount_point: &Path, fs_type: &str) -> Result<(), Status> {
    match fs_type {
        "ext4" if !has_capability(CAP_SYS_RESOURCE) => Err(Status::failed_precondition(
            "growing a mounted ext4 needs CAP_SYS_RESOURCE, which the node plugin lacks \
             (grant its container that capability, or use xfs)",
        )),
        "ext4" => run("resize2fs", &[dev.as_os_str()]).await,
        "xfs" => run("xfs_growfs", &[mount_point.as_os_str()]).await,
        other => Err(Status::failed_precondition(format!(
            "cannot grow a {other} filesystem"
        ))),
    }
    .map(|_| ())
}

/// statvfs(3) of a mounted path.
#[derive(Debug, Clone, Copy)]
pub struct FsUsage {
    pub total_bytes: u64,
    pub available_bytes: u64,
    pub used_bytes: u64,
    pub total_inodes: u64,
    pub free_inodes: u64,
}

pub fn usage(path: &Path) -> Result<FsUsage, Status> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| Status::invalid_argument("path has a NUL byte"))?;
    let mut s = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is a NUL-terminated path that outlives the call and `s`
    // points to writable memory of the struct's size; statvfs fills it
    // completely when it returns 0, which is checked before it is read.
    let s = unsafe {
        if libc::statvfs(c.as_ptr(), s.as_mut_ptr()) != 0 {
            return Err(Status::internal(format!(
                "statvfs {}: {}",
                path.display(),
                std::io::Error::last_os_error()
            )));
        }
        s.assume_init()
    };
    let frsize = s.f_frsize as u64;
    let total = s.f_blocks as u64 * frsize;
    Ok(FsUsage {
        total_bytes: total,
        available_bytes: s.f_bavail as u64 * frsize,
        used_bytes: total.saturating_sub(s.f_bfree as u64 * frsize),
        total_inodes: s.f_files as u64,
        free_inodes: s.f_ffree as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_parse_with_escapes() {
        let text = "22 1 0:21 / / rw,relatime shared:1 - ext4 /dev/vda rw\n\
                    36 22 7:0 / /var/lib/kubelet/plugins/x\\040y rw,relatime - xfs /dev/loop0 rw,nouuid\n\
                    37 22 0:5 /loop0 /pods/block ro,nosuid master:2 - devtmpfs udev rw\n\
                    garbage\n";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 3);
        assert_eq!(m[1].dev, (7, 0));
        assert_eq!(
            m[1].mount_point,
            PathBuf::from("/var/lib/kubelet/plugins/x y")
        );
        assert_eq!(m[1].fs_type, "xfs");
        assert_eq!(m[1].source, "/dev/loop0");
        assert!(!m[1].read_only());
        assert_eq!(m[2].root, "/loop0");
        assert!(m[2].read_only());
    }

    #[test]
    fn options_add_ro_and_nouuid_for_xfs() {
        assert_eq!(fs_options("ext4", false, &[]), "defaults");
        assert_eq!(
            fs_options("xfs", true, &["noatime".into()]),
            "noatime,ro,nouuid"
        );
    }
}
