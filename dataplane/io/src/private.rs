//! Files and folders only their owner may open.
//!
//! A pool file holds every volume's bytes, a state file holds every grant's
//! token, a catalog holds every name: none of it is for the node's other
//! users. Berth creates its folders 0700 and its files 0600, and at start
//! tightens what it finds looser (an older version's 0755 folder, a pool file
//! copied with 0644), saying so in the log. Block devices are left alone: their
//! modes belong to the system (udev), and root:disk 0660 is the norm.

use std::fs::Permissions;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// The mode Berth's folders have.
pub const DIR_MODE: u32 = 0o700;
/// The mode Berth's files have.
pub const FILE_MODE: u32 = 0o600;

/// Creates `path` (and missing parents, each 0700), or tightens an existing
/// folder to 0700 when group or others have any access to it.
pub fn dir(path: &Path) -> io::Result<()> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => tighten(path, m.mode(), DIR_MODE),
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a folder", path.display()),
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => std::fs::DirBuilder::new()
            .recursive(true)
            .mode(DIR_MODE)
            .create(path),
        Err(e) => Err(e),
    }
}

/// Tightens an existing regular file to 0600 when group or others have any
/// access to it; anything else (a block device, a missing file) is left as is.
pub fn file(path: &Path) -> io::Result<()> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => tighten(path, m.mode(), FILE_MODE),
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Options that create a file 0600 (whatever the umask allows beyond that).
pub fn create_options() -> std::fs::OpenOptions {
    let mut o = std::fs::OpenOptions::new();
    o.mode(FILE_MODE);
    o
}

fn tighten(path: &Path, mode: u32, want: u32) -> io::Result<()> {
    if mode & 0o077 == 0 {
        return Ok(());
    }
    std::fs::set_permissions(path, Permissions::from_mode(want))?;
    tracing::warn!(
        path = %path.display(),
        was = format!("{:o}", mode & 0o7777),
        now = format!("{want:o}"),
        "tightened permissions: other users of this node could read it"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).expect("stat").mode() & 0o7777
    }

    #[test]
    fn creates_private_and_tightens_what_is_loose() {
        let t = tempfile::tempdir().expect("tempdir");
        let d = t.path().join("a/b");
        dir(&d).expect("create");
        assert_eq!(mode(&d), 0o700);
        assert_eq!(mode(&t.path().join("a")), 0o700);
        std::fs::set_permissions(&d, Permissions::from_mode(0o755)).expect("chmod");
        dir(&d).expect("tighten");
        assert_eq!(mode(&d), 0o700);

        let f = d.join("pool.img");
        std::fs::write(&f, b"x").expect("write");
        std::fs::set_permissions(&f, Permissions::from_mode(0o644)).expect("chmod");
        file(&f).expect("tighten");
        assert_eq!(mode(&f), 0o600);
        // Already private: untouched (the owner's own bits are kept).
        std::fs::set_permissions(&f, Permissions::from_mode(0o400)).expect("chmod");
        file(&f).expect("keep");
        assert_eq!(mode(&f), 0o400);
        // Missing files and devices are not Berth's to change.
        file(&d.join("missing")).expect("missing");
        file(Path::new("/dev/null")).expect("device");
        assert_eq!(mode(Path::new("/dev/null")) & 0o666, 0o666);

        let g = d.join("new");
        create_options()
            .write(true)
            .create_new(true)
            .open(&g)
            .expect("create");
        assert_eq!(mode(&g) & 0o077, 0);
        // A file where a folder should be is an error, not a chmod.
        assert!(dir(&f).is_err());
    }
}
