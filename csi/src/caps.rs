//! Volume capabilities: what Berth volumes can be used as.
//!
//! A Berth volume is a block device written from one node at a time (the
//! metadata service enforces it): raw block or a filesystem (ext4, xfs), any
//! single-node mode, and read-only from many nodes. Multi-node writers would
//! need a cluster filesystem or fencing Berth does not have.

use berth_proto::csi::v1 as csi;
use csi::volume_capability::access_mode::Mode;
use csi::volume_capability::AccessType;
use tonic::Status;

/// Filesystems the node plugin creates and grows.
pub const FS_TYPES: &[&str] = &["ext4", "xfs"];

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    Block,
    /// `fs_type` empty: the volume's (its tier's) default.
    Mount {
        fs_type: String,
        flags: Vec<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capability {
    pub access: Access,
    pub mode: Mode,
}

impl Capability {
    /// The mode only lets the node read.
    pub fn read_only(&self) -> bool {
        matches!(
            self.mode,
            Mode::SingleNodeReaderOnly | Mode::MultiNodeReaderOnly
        )
    }

    pub fn is_block(&self) -> bool {
        self.access == Access::Block
    }
}

/// One mount option: printable, no separators that would smuggle in others.
fn check_flag(f: &str) -> Result<(), String> {
    if f.is_empty() || f.len() > 256 {
        return Err(format!("mount flag {f:?} is empty or too long"));
    }
    if f.chars()
        .any(|c| c.is_control() || c.is_whitespace() || c == ',')
    {
        return Err(format!(
            "mount flag {f:?} has a comma, space or control character (give one option per flag)"
        ));
    }
    Ok(())
}

/// Reads one capability; `Err` says why Berth cannot honour it.
pub fn parse(c: &csi::VolumeCapability) -> Result<Capability, String> {
    let mode = c
        .access_mode
        .as_ref()
        .and_then(|m| Mode::try_from(m.mode).ok())
        .unwrap_or(Mode::Unknown);
    match mode {
        Mode::Unknown => return Err("access_mode is missing or unknown".into()),
        Mode::MultiNodeSingleWriter | Mode::MultiNodeMultiWriter => {
            return Err(format!(
                "access mode {} is not supported: a Berth volume is written from one node at a \
                 time (read-only on many nodes is)",
                mode.as_str_name()
            ))
        }
        _ => {}
    }
    let access = match &c.access_type {
        None => return Err("access_type (block or mount) is missing".into()),
        Some(AccessType::Block(_)) => Access::Block,
        Some(AccessType::Mount(m)) => {
            if !m.fs_type.is_empty() && !FS_TYPES.contains(&m.fs_type.as_str()) {
                return Err(format!(
                    "fs_type {:?} is not supported (supported: {})",
                    m.fs_type,
                    FS_TYPES.join(", ")
                ));
            }
            for f in &m.mount_flags {
                check_flag(f)?;
            }
            Access::Mount {
                fs_type: m.fs_type.clone(),
                flags: m.mount_flags.clone(),
            }
        }
    };
    Ok(Capability { access, mode })
}

/// One required capability, as INVALID_ARGUMENT when missing or unsupported.
pub fn required(c: Option<&csi::VolumeCapability>) -> Result<Capability, Status> {
    let c = c.ok_or_else(|| Status::invalid_argument("volume_capability is required"))?;
    parse(c).map_err(Status::invalid_argument)
}

/// A non-empty list, every entry supported.
pub fn all(cs: &[csi::VolumeCapability]) -> Result<Vec<Capability>, Status> {
    if cs.is_empty() {
        return Err(Status::invalid_argument("volume_capabilities is required"));
    }
    cs.iter()
        .map(|c| parse(c).map_err(Status::invalid_argument))
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn mount(fs: &str, mode: Mode) -> csi::VolumeCapability {
        csi::VolumeCapability {
            access_type: Some(AccessType::Mount(csi::volume_capability::MountVolume {
                fs_type: fs.into(),
                ..Default::default()
            })),
            access_mode: Some(csi::volume_capability::AccessMode { mode: mode as i32 }),
        }
    }

    pub fn block(mode: Mode) -> csi::VolumeCapability {
        csi::VolumeCapability {
            access_type: Some(AccessType::Block(csi::volume_capability::BlockVolume {})),
            access_mode: Some(csi::volume_capability::AccessMode { mode: mode as i32 }),
        }
    }

    #[test]
    fn supported_and_unsupported_capabilities() {
        let ok = parse(&mount("xfs", Mode::SingleNodeWriter)).expect("xfs rw");
        assert!(!ok.read_only() && !ok.is_block());
        assert!(parse(&mount("", Mode::MultiNodeReaderOnly))
            .expect("ro many")
            .read_only());
        assert!(parse(&block(Mode::SingleNodeMultiWriter))
            .expect("block")
            .is_block());
        for (c, why) in [
            (mount("ntfs", Mode::SingleNodeWriter), "ntfs"),
            (
                mount("ext4", Mode::MultiNodeMultiWriter),
                "MULTI_NODE_MULTI_WRITER",
            ),
            (
                block(Mode::MultiNodeSingleWriter),
                "MULTI_NODE_SINGLE_WRITER",
            ),
            (mount("ext4", Mode::Unknown), "access_mode"),
            (
                csi::VolumeCapability {
                    access_type: None,
                    ..mount("ext4", Mode::SingleNodeWriter)
                },
                "access_type",
            ),
        ] {
            let e = parse(&c).expect_err(why);
            assert!(e.contains(why), "{e}");
        }
        let mut smuggled = mount("ext4", Mode::SingleNodeWriter);
        if let Some(AccessType::Mount(m)) = &mut smuggled.access_type {
            m.mount_flags = vec!["noatime,exec".into()];
        }
        assert!(parse(&smuggled).expect_err("comma").contains("comma"));
        assert_eq!(
            all(&[]).expect_err("empty").code(),
            tonic::Code::InvalidArgument
        );
    }
}
