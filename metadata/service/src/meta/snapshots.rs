//! Snapshots: create (on every in-sync copy of a replicated volume), delete, list.

use super::*;

impl Meta {
    pub async fn create_snapshot(
        &self,
        call: &Call,
        name: &str,
        source: &str,
    ) -> Result<SnapshotRecord> {
        check_new_name("snapshot", name)?;
        check_name("source volume", source)?;
        let _name = self.locks.lock(format!("s:{name}")).await;
        let rec = match self.get::<SnapshotRecord>(name)? {
            Some(s) if s.source_volume != source => {
                return Err(MetaError::AlreadyExists(format!(
                    "snapshot {name} already exists, of volume {}",
                    s.source_volume
                )))
            }
            Some(s) if s.state == State::Ready => return Ok(s),
            Some(s) if s.state == State::Deleting => {
                return Err(MetaError::FailedPrecondition(format!(
                    "snapshot {name} is being deleted; retry once it is gone"
                )))
            }
            Some(s) => s,
            None => {
                let v = self.ready_volume(source)?;
                // A replicated volume's snapshot is taken on every copy in
                // sync (each holds every acknowledged write) at one point:
                // its nexus pauses meanwhile.
                let copies: Vec<(String, String)> = match &v.replicas {
                    Some(set) => {
                        let c: Vec<(String, String)> = set
                            .readable()
                            .map(|r| (r.node.clone(), r.pool_id.clone()))
                            .collect();
                        for (n, _) in &c {
                            self.require_up(n)?;
                        }
                        c
                    }
                    None => Vec::new(),
                };
                let (node, pool_id) = copies
                    .first()
                    .cloned()
                    .unwrap_or_else(|| (v.node.clone(), v.pool_id.clone()));
                self.require_up(&node)?;
                let rec = SnapshotRecord {
                    id: name.to_string(),
                    source_volume: source.to_string(),
                    size_bytes: v.size_bytes,
                    node,
                    pool_id,
                    state: State::Creating,
                    created_ms: now_ms(),
                    copies,
                };
                self.commit_intent(rec.create()).await?;
                rec
            }
        };
        self.point("create-snapshot:after-catalog")?;
        let made = async {
            // A replicated volume in use: its nexus pauses while every copy
            // takes the snapshot.
            let _pause = match self.writer_of(&rec)? {
                Some(nexus_node) => Some(
                    self.nexuses
                        .pause(
                            source,
                            &nexus_node,
                            &format!("snapshot {name}"),
                            NEXUS_FIND_WITHIN,
                        )
                        .await?,
                ),
                None => None,
            };
            for (node, _) in rec.nodes() {
                let mut c = self.server(&node).await?;
                c.create_snapshot(server_req(
                    call,
                    vpb::CreateSnapshotRequest {
                        volume: source.to_string(),
                        name: name.to_string(),
                    },
                ))
                .await
                .map_err(|s| MetaError::server(&node, &s))?;
            }
            Ok::<(), MetaError>(())
        }
        .await;
        if let Err(e) = made {
            // Undone on every copy that may have it; one out of reach is
            // reconcile's (the intent stays).
            let mut undone = true;
            for (node, _) in rec.nodes() {
                if self
                    .delete_snapshot_on_server(call, &node, name)
                    .await
                    .is_err()
                {
                    undone = false;
                }
            }
            if undone {
                self.commit_intent(rec.remove()).await?;
            }
            return Err(e);
        }
        self.point("create-snapshot:after-server")?;
        let ready = SnapshotRecord {
            state: State::Ready,
            ..rec.clone()
        };
        let detail = if rec.copies.is_empty() {
            format!("of {} bytes", rec.size_bytes)
        } else {
            format!(
                "of {} bytes, on every copy in sync at one point: {}",
                rec.size_bytes,
                rec.copies
                    .iter()
                    .map(|(n, _)| n.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        self.commit(call, ready.replace(&rec), &rec.node, detail)
            .await?;
        Ok(ready)
    }

    /// The node whose nexus writes the replicated volume a snapshot is of,
    /// if it is attached read-write.
    pub(crate) fn writer_of(&self, s: &SnapshotRecord) -> Result<Option<String>> {
        if s.copies.is_empty() {
            return Ok(None);
        }
        Ok(self
            .attachments(&s.source_volume)?
            .into_iter()
            .find(|a| !a.read_only && a.state == State::Ready && !a.legs.is_empty())
            .map(|a| a.node))
    }

    pub async fn delete_snapshot(&self, call: &Call, id: &str) -> Result<()> {
        check_name("snapshot", id)?;
        let _name = self.locks.lock(format!("s:{id}")).await;
        let Some(s) = self.get::<SnapshotRecord>(id)? else {
            return Ok(());
        };
        for (node, _) in s.nodes() {
            self.require_up(&node)?;
        }
        let deleting = SnapshotRecord {
            state: State::Deleting,
            ..s.clone()
        };
        if s.state != State::Deleting {
            self.commit_intent(deleting.replace(&s)).await?;
        }
        for (node, _) in s.nodes() {
            self.delete_snapshot_on_server(call, &node, id).await?;
        }
        self.commit(call, deleting.remove(), &s.node, String::new())
            .await
    }

    /// Deletes a snapshot on its server; one already gone is fine.
    pub(crate) async fn delete_snapshot_on_server(
        &self,
        call: &Call,
        node: &str,
        id: &str,
    ) -> Result<()> {
        let mut c = self.server(node).await?;
        match c
            .delete_snapshot(server_req(
                call,
                vpb::DeleteSnapshotRequest { name: id.into() },
            ))
            .await
        {
            Ok(_) => Ok(()),
            Err(st) if st.code() == tonic::Code::NotFound => Ok(()),
            Err(st) => Err(MetaError::server(node, &st)),
        }
    }
}
