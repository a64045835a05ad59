//! What the volume server keeps beside the block store: each volume's tier and
//! overrides, and the export grants. One JSON file (`DATA/server-state.json`),
//! replaced atomically (write, fsync, rename, fsync the directory) on every
//! change, so a restart serves the same grants under the same limits.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::qos::Overrides;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TargetKind {
    Volume,
    Snapshot,
}

impl TargetKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TargetKind::Volume => "volume",
            TargetKind::Snapshot => "snapshot",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VolumeQos {
    pub tier: String,
    #[serde(default)]
    pub overrides: Overrides,
}

/// A volume with no QoS record (created before one existed) runs as standard.
impl Default for VolumeQos {
    fn default() -> Self {
        VolumeQos {
            tier: "standard".into(),
            overrides: Overrides::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    pub kind: TargetKind,
    pub name: String,
    pub client: String,
    pub read_only: bool,
    /// TCP peers must have this IP address when set.
    #[serde(default)]
    pub peer_address: String,
    /// 128 random bits, hex: the secret in the export name.
    pub token: String,
    pub granted_unix: u64,
    /// The store id of the volume or snapshot granted: a later object that
    /// reuses the name is not reachable through this grant.
    #[serde(default)]
    pub target_id: u64,
    /// For a replicated volume's nexus: the replica set's generation when
    /// it was published. Its connections are refused once the volume's
    /// fence is past it (0: the volume is not replicated).
    #[serde(default)]
    pub generation: u64,
}

impl Grant {
    /// What an NBD client asks for: `<name>@<token>`.
    pub fn export_name(&self) -> String {
        format!("{}@{}", self.name, self.token)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ServerState {
    #[serde(default)]
    pub volumes: BTreeMap<String, VolumeQos>,
    /// By token.
    #[serde(default)]
    pub grants: BTreeMap<String, Grant>,
    /// Replicated volumes: the generation of the nexus that owns each (the
    /// highest a grant was made at). Grants at a lower one are fenced.
    #[serde(default)]
    pub fences: BTreeMap<String, u64>,
}

#[derive(Debug)]
pub struct StateFile {
    path: PathBuf,
}

impl StateFile {
    pub fn new(dir: &Path) -> Self {
        StateFile {
            path: dir.join("server-state.json"),
        }
    }

    pub fn load(&self) -> std::io::Result<ServerState> {
        // An older version wrote it 0644: tighten it before reading tokens.
        berth_proto::private::file(&self.path)?;
        match std::fs::read(&self.path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{}: {e}", self.path.display()),
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ServerState::default()),
            Err(e) => Err(e),
        }
    }

    pub fn save(&self, s: &ServerState) -> std::io::Result<()> {
        let tmp = self.path.with_extension("json.tmp");
        // Every grant's token is in here: the owner's alone.
        let mut f = berth_proto::private::create_options()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        f.write_all(&serde_json::to_vec_pretty(s).map_err(std::io::Error::other)?)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }
}

/// A new unguessable token: 128 bits from the OS's random source.
pub fn new_token() -> std::io::Result<String> {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).map_err(|e| std::io::Error::other(e.to_string()))?;
    Ok(hex::encode(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_through_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = StateFile::new(dir.path());
        assert_eq!(f.load().expect("empty"), ServerState::default());
        let mut s = ServerState::default();
        s.volumes.insert(
            "db".into(),
            VolumeQos {
                tier: "premium".into(),
                overrides: Overrides {
                    iops_limit: Some(5),
                    ..Default::default()
                },
            },
        );
        let token = new_token().expect("token");
        assert_eq!(token.len(), 32);
        assert_ne!(token, new_token().expect("token"));
        s.grants.insert(
            token.clone(),
            Grant {
                kind: TargetKind::Volume,
                name: "db".into(),
                client: "node-1".into(),
                read_only: false,
                peer_address: String::new(),
                token,
                granted_unix: 1,
                target_id: 7,
                generation: 3,
            },
        );
        s.fences.insert("db".into(), 3);
        f.save(&s).expect("save");
        assert_eq!(f.load().expect("load"), s);
        std::fs::write(dir.path().join("server-state.json"), b"{not json").expect("write");
        assert!(f.load().is_err());
    }
}
