//! The node's audit log: every export connect, disconnect and refusal, and every
//! control call, appended durably (`fdatasync` before the call that caused it
//! returns) as one JSON object per line in `DATA/audit.log`.
//!
//! The metadata service chains these centrally (hash-chained there); on the node
//! the log is append-only and its lines carry increasing sequence numbers, so a
//! gap or a reordering is visible. A torn last line (crash mid-append) is
//! skipped at open and the sequence continues after the last whole entry.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEvent {
    pub seq: u64,
    pub time_unix_ms: u64,
    /// `connect`, `disconnect`, `refused`, or a control call's name.
    pub action: String,
    pub client: String,
    pub target: String,
    /// `ok` or the error.
    pub result: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub peer: String,
    #[serde(default)]
    pub read_ops: u64,
    #[serde(default)]
    pub read_bytes: u64,
    #[serde(default)]
    pub write_ops: u64,
    #[serde(default)]
    pub write_bytes: u64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

/// Which events a query wants.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    pub target: Option<String>,
    pub client: Option<String>,
    pub after_seq: u64,
    pub limit: usize,
}

#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    file: Mutex<(File, u64)>,
}

pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl AuditLog {
    pub fn open(path: &Path) -> std::io::Result<AuditLog> {
        let mut last = 0;
        // Bytes up to the end of the last whole line: a torn tail from a crash
        // mid-append is cut off so the next entry starts on its own line.
        let mut whole = 0u64;
        if path.exists() {
            let mut r = BufReader::new(File::open(path)?);
            let mut line = Vec::new();
            loop {
                line.clear();
                let n = r.read_until(b'\n', &mut line)?;
                if n == 0 || line.last() != Some(&b'\n') {
                    break;
                }
                whole += n as u64;
                if let Ok(e) = serde_json::from_slice::<AuditEvent>(&line) {
                    last = last.max(e.seq);
                }
            }
        }
        let file = berth_proto::private::create_options()
            .create(true)
            .append(true)
            .open(path)?;
        berth_proto::private::file(path)?;
        if file.metadata()?.len() > whole {
            tracing::warn!(path = %path.display(), "audit log ends in a torn entry; cutting it off");
            file.set_len(whole)?;
            file.sync_data()?;
        }
        Ok(AuditLog {
            path: path.to_path_buf(),
            file: Mutex::new((file, last)),
        })
    }

    /// Appends an event (its `seq` and time are set here) and makes it durable.
    pub fn append(&self, mut e: AuditEvent) -> std::io::Result<u64> {
        let mut g = self.file.lock();
        e.seq = g.1 + 1;
        if e.time_unix_ms == 0 {
            e.time_unix_ms = now_unix_ms();
        }
        let mut line = serde_json::to_vec(&e).map_err(std::io::Error::other)?;
        line.push(b'\n');
        g.0.write_all(&line)?;
        g.0.sync_data()?;
        g.1 = e.seq;
        tracing::info!(
            target: "audit",
            seq = e.seq,
            action = %e.action,
            client = %e.client,
            volume = %e.target,
            result = %e.result,
            "audit"
        );
        Ok(e.seq)
    }

    /// Appends, logging instead of failing: audit trouble is loud but does not
    /// take the data path down.
    pub fn record(&self, e: AuditEvent) {
        if let Err(err) = self.append(e) {
            tracing::error!(error = %err, path = %self.path.display(), "audit log append failed");
        }
    }

    pub fn query(&self, f: &AuditFilter) -> std::io::Result<Vec<AuditEvent>> {
        let _g = self.file.lock();
        let limit = if f.limit == 0 { 1000 } else { f.limit };
        let mut out = Vec::new();
        for line in BufReader::new(File::open(&self.path)?).lines() {
            let Ok(e) = serde_json::from_str::<AuditEvent>(&line?) else {
                continue;
            };
            if e.seq <= f.after_seq
                || f.target.as_ref().is_some_and(|t| *t != e.target)
                || f.client.as_ref().is_some_and(|c| *c != e.client)
            {
                continue;
            }
            out.push(e);
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_numbered_survive_reopen_and_filter() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("audit.log");
        let log = AuditLog::open(&p).expect("open");
        for (i, who) in ["a", "b", "a"].iter().enumerate() {
            let seq = log
                .append(AuditEvent {
                    action: "connect".into(),
                    client: who.to_string(),
                    target: format!("vol{i}"),
                    result: "ok".into(),
                    ..Default::default()
                })
                .expect("append");
            assert_eq!(seq, i as u64 + 1);
        }
        drop(log);
        // A torn tail from a crash is skipped, numbering goes on.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&p)
            .and_then(|mut f| f.write_all(b"{\"seq\":4,\"acti"))
            .expect("tear");
        let log = AuditLog::open(&p).expect("reopen");
        let seq = log
            .append(AuditEvent {
                action: "DeleteVolume".into(),
                client: "a".into(),
                target: "vol0".into(),
                result: "ok".into(),
                ..Default::default()
            })
            .expect("append");
        assert_eq!(seq, 4);
        let a = log
            .query(&AuditFilter {
                client: Some("a".into()),
                ..Default::default()
            })
            .expect("query");
        assert_eq!(a.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1, 3, 4]);
        let v0 = log
            .query(&AuditFilter {
                target: Some("vol0".into()),
                after_seq: 1,
                ..Default::default()
            })
            .expect("query");
        assert_eq!(v0.len(), 1);
        assert_eq!(v0[0].action, "DeleteVolume");
        assert!(v0[0].time_unix_ms > 0);
    }
}
