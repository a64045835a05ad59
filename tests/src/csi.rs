//! Driving a CSI socket the way the sidecars and kubelet do, and leaving no
//! mount, loop device or `berth attach` process behind when a test fails.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use berth_proto::csi::v1 as csi;
use csi::controller_client::ControllerClient;
use csi::identity_client::IdentityClient;
use csi::node_client::NodeClient;
use csi::volume_capability::access_mode::Mode;
use csi::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
use tonic::transport::Channel;

pub use csi::volume_capability::access_mode::Mode as AccessModeKind;

/// The three CSI services on one socket.
#[derive(Debug, Clone)]
pub struct Csi {
    pub identity: IdentityClient<Channel>,
    pub controller: ControllerClient<Channel>,
    pub node: NodeClient<Channel>,
}

impl Csi {
    pub async fn connect(socket: &Path) -> Csi {
        let ch = berth_proto::channel(&format!("unix://{}", socket.display()), None)
            .await
            .unwrap_or_else(|e| panic!("connect {}: {e}", socket.display()));
        Csi {
            identity: IdentityClient::new(ch.clone()),
            controller: ControllerClient::new(ch.clone()),
            node: NodeClient::new(ch),
        }
    }

    /// ControllerPublishVolume, as the external-attacher calls it; the
    /// publish context NodeStage needs.
    pub async fn publish(
        &mut self,
        volume: &str,
        node: &str,
        cap: &csi::VolumeCapability,
    ) -> HashMap<String, String> {
        self.controller
            .controller_publish_volume(csi::ControllerPublishVolumeRequest {
                volume_id: volume.into(),
                node_id: node.into(),
                volume_capability: Some(cap.clone()),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("ControllerPublishVolume {volume} to {node}: {e}"))
            .into_inner()
            .publish_context
    }
}

/// The runtime the CSI tests drive their gRPC clients on.
pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Whether this machine can attach volumes the way the node plugin does
/// (root, FUSE and fusermount3, loop devices); `Err` says what is missing.
pub fn node_support() -> Result<(), String> {
    // SAFETY: geteuid has no arguments and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err("not root: mounting needs it".into());
    }
    for p in ["/dev/fuse", "/dev/loop-control"] {
        if !Path::new(p).exists() {
            return Err(format!("{p} is missing: the kernel lacks it"));
        }
    }
    if !crate::server::have("fusermount3") {
        return Err("fusermount3 is not installed (fuse3)".into());
    }
    Ok(())
}

pub fn mount_cap(fs: &str, mode: Mode) -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: fs.into(),
            ..Default::default()
        })),
        access_mode: Some(AccessMode { mode: mode as i32 }),
    }
}

pub fn block_cap(mode: Mode) -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_type: Some(AccessType::Block(BlockVolume {})),
        access_mode: Some(AccessMode { mode: mode as i32 }),
    }
}

pub fn params(kv: &[(&str, &str)]) -> HashMap<String, String> {
    kv.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// On drop: unmounts everything under `root`, detaches loop devices whose
/// file is under it and ends its `berth attach` processes (by unmounting
/// their FUSE mounts), so a failed test does
/// not leave the machine cluttered for the next.
#[derive(Debug)]
pub struct Cleanup {
    pub root: PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let root = self.root.to_string_lossy().to_string();
        let run = |args: &[&str]| {
            let _ = std::process::Command::new(args[0])
                .args(&args[1..])
                .output();
        };
        // First the attach processes serving under `root`: with their volume
        // server gone, releasing a loop device would wait for it (the
        // reconnect timeout) before the final flush gives up.
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            let args: Vec<String> = cmdline
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            if args.iter().any(|a| a == "attach") && args.iter().any(|a| a.starts_with(&root)) {
                // SAFETY: kill(2) takes no pointers; the process serves a
                // FUSE mount under this test's own folder.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut points: Vec<String> = mountinfo
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|p| p.starts_with(&root))
            .map(str::to_string)
            .collect();
        points.reverse();
        for p in &points {
            if p.contains("/attach/") {
                continue;
            }
            run(&["umount", "-l", p]);
        }
        let loops = std::process::Command::new("losetup")
            .args(["-l", "-n", "-O", "NAME,BACK-FILE"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
            .unwrap_or_default();
        for l in loops.lines() {
            let mut f = l.split_whitespace();
            if let (Some(dev), Some(file)) = (f.next(), f.next()) {
                if file.starts_with(&root) {
                    run(&["losetup", "-d", dev]);
                }
            }
        }
        for p in points.iter().filter(|p| p.contains("/attach/")) {
            run(&["fusermount3", "-u", "-z", p]);
        }
    }
}
