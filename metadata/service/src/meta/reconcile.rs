//! The audit log's queries, and reconcile: the catalog compared with what each volume server
//! reports, every difference finished, undone or flagged.

use super::*;

impl Meta {
    // ---- audit --------------------------------------------------------------

    pub fn audit_query(&self, q: &audit::Query) -> Result<(Vec<AuditEntry>, u64)> {
        Ok(audit::query(&*self.store, q)?)
    }

    pub fn audit_head(&self) -> Result<audit::Head> {
        Ok(audit::head(&*self.store)?)
    }

    pub fn audit_verify(&self) -> Result<audit::Verification> {
        Ok(audit::verify(&*self.store)?)
    }

    // ---- reconcile ----------------------------------------------------------

    /// Compares one node's volume server with the catalog and repairs the
    /// difference: half-created objects are undone, half-deleted ones
    /// finished, lost ones flagged, and the node's audit events chained. One
    /// object that cannot be repaired now is logged and left for the next
    /// pass; it does not hold up the others.
    pub async fn reconcile_node(&self, node: &str) -> Result<()> {
        if !self.reconciling.lock().insert(node.to_string()) {
            return Ok(()); // A pass for this node is running.
        }
        let r = self.reconcile_node_inner(node).await;
        self.reconciling.lock().remove(node);
        r
    }

    pub(crate) async fn reconcile_node_inner(&self, node: &str) -> Result<()> {
        let call = Call::new(SERVER_CALLER_PREFIX, "Reconcile", "", node);
        let mut c = self.server(node).await?;
        let server_vols: HashMap<String, u64> = c
            .list_volumes(server_req(&call, vpb::ListVolumesRequest {}))
            .await
            .map_err(|s| MetaError::server(node, &s))?
            .into_inner()
            .volumes
            .into_iter()
            .map(|v| (v.name, v.size_bytes))
            .collect();
        let pool_id = self
            .get::<NodeRecord>(node)?
            .map(|n| n.pool_id)
            .unwrap_or_default();

        let failed = |what: &str, id: &str, e: MetaError| {
            tracing::warn!(node, object = id, error = %e, "reconcile could not repair {what}; next pass retries");
        };
        for v in records::list::<VolumeRecord>(&*self.store, None, 0)? {
            let copy = v.nodes().into_iter().find(|(n, _)| n == node);
            if let Some((_, copy_pool)) = copy {
                let r = self
                    .reconcile_volume(
                        &call,
                        node,
                        &pool_id,
                        &copy_pool,
                        &v.id,
                        server_vols.get(&v.id).copied(),
                    )
                    .await;
                if let Err(e) = r {
                    failed("volume", &v.id, e);
                }
            }
        }
        for s in records::list::<SnapshotRecord>(&*self.store, None, 0)? {
            if s.node == node && s.state != State::Ready {
                if let Err(e) = self.reconcile_snapshot(&call, node, &s.id).await {
                    failed("snapshot", &s.id, e);
                }
            }
        }
        for a in self.all_attachments()? {
            if a.server_node == node && a.state != State::Ready {
                if let Err(e) = self.reconcile_attachment(&call, node, &a.key()).await {
                    failed("attachment", &a.key(), e);
                }
            }
        }
        let unmanaged: Vec<&String> = server_vols
            .keys()
            .filter(|k| self.get::<VolumeRecord>(k).ok().flatten().is_none())
            .collect();
        if !unmanaged.is_empty() {
            tracing::info!(node, volumes = ?unmanaged, "volumes on the node that the catalog does not manage (left alone)");
        }
        self.pull_audit(node).await
    }

    /// Takes `key`'s name lock without waiting (a live call working on it
    /// wins; the next pass sees the outcome) and reads the record again under
    /// it, so reconcile never acts on a stale copy.
    pub(crate) fn locked_fresh<R: Record>(
        &self,
        lock: String,
        key: &str,
    ) -> Result<Option<(NameGuard<'_>, R)>> {
        let Some(g) = self.locks.try_lock(lock) else {
            return Ok(None);
        };
        Ok(self.get::<R>(key)?.map(|r| (g, r)))
    }

    pub(crate) async fn reconcile_volume(
        &self,
        call: &Call,
        node: &str,
        pool_id: &str,
        copy_pool: &str,
        id: &str,
        listed_size: Option<u64>,
    ) -> Result<()> {
        let _changing = self.changing();
        let Some((_g, v)) = self.locked_fresh::<VolumeRecord>(format!("v:{id}"), id)? else {
            return Ok(());
        };
        match v.state {
            State::Creating => {
                // A server call that timed out may have finished after the
                // listing: ask again under the lock before undoing.
                let on_server = match listed_size {
                    Some(_) => true,
                    None => self.server_volume_size(call, node, id).await?.is_some(),
                };
                self.undo_create(&v, on_server).await?;
                self.note(node, id, "undid a create that never finished")
                    .await;
            }
            State::Deleting => {
                for (n, _) in v.nodes() {
                    self.delete_on_server(&n, id, SERVER_CALLER_PREFIX).await?;
                }
                self.commit_intent(v.remove()).await?;
                self.reserve_copies(&v, -i128::from(v.size_bytes));
                self.note(node, id, "finished a delete that never finished")
                    .await;
            }
            State::Ready => {
                // The listing is older than a create that finished since:
                // ask the server again before calling anything lost.
                let size = match listed_size {
                    Some(s) => Some(s),
                    None => self.server_volume_size(call, node, id).await?,
                };
                let condition = match size {
                    None if copy_pool != pool_id => format!(
                        "lost: node {node} now serves pool {pool_id}, the volume was on pool \
                         {copy_pool}"
                    ),
                    None => format!("lost: volume server {node} does not have it"),
                    Some(_) => String::new(),
                };
                let mut fixed = VolumeRecord {
                    condition: condition.clone(),
                    ..v.clone()
                };
                // An expand that reached the server but not the catalog.
                if let Some(server_size) = size.filter(|s| *s > v.size_bytes) {
                    let spec = self.spec_of(&v)?;
                    fixed.size_bytes = server_size;
                    fixed.qos = spec.qos(server_size);
                    self.push_qos(call, &fixed, &spec).await?;
                }
                if fixed != v {
                    self.commit_intent(fixed.replace(&v)).await?;
                    self.reserve(
                        &v.pool_id,
                        i128::from(fixed.size_bytes) - i128::from(v.size_bytes),
                    );
                    if !condition.is_empty() {
                        tracing::error!(volume = %id, node, %condition, "volume missing on its server");
                    }
                    let what = if condition.is_empty() {
                        format!(
                            "adopted the size the server has: {} bytes",
                            fixed.size_bytes
                        )
                    } else {
                        condition
                    };
                    self.note(node, id, &what).await;
                }
            }
        }
        Ok(())
    }

    pub(crate) async fn server_volume_size(
        &self,
        call: &Call,
        node: &str,
        id: &str,
    ) -> Result<Option<u64>> {
        let mut c = self.server(node).await?;
        match c
            .get_volume(server_req(call, vpb::GetVolumeRequest { name: id.into() }))
            .await
        {
            Ok(v) => Ok(Some(v.into_inner().size_bytes)),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(None),
            Err(s) => Err(MetaError::server(node, &s)),
        }
    }

    pub(crate) async fn reconcile_snapshot(&self, call: &Call, node: &str, id: &str) -> Result<()> {
        let Some((_g, s)) = self.locked_fresh::<SnapshotRecord>(format!("s:{id}"), id)? else {
            return Ok(());
        };
        if s.state == State::Ready {
            return Ok(());
        }
        // Whatever a listing said: a timed-out server call may have finished
        // since. Deleting what is not there is fine; a replicated volume's
        // may be on each of its copies.
        for (n, _) in s.nodes() {
            self.delete_snapshot_on_server(call, &n, id).await?;
        }
        self.commit_intent(s.remove()).await?;
        self.note(
            node,
            id,
            "removed a snapshot left half-made or half-deleted",
        )
        .await;
        Ok(())
    }

    pub(crate) async fn reconcile_attachment(
        &self,
        call: &Call,
        node: &str,
        key: &str,
    ) -> Result<()> {
        let volume = key.split('/').next().unwrap_or_default();
        let Some((_g, a)) = self.locked_fresh::<AttachmentRecord>(format!("v:{volume}"), key)?
        else {
            return Ok(());
        };
        if a.state == State::Ready {
            return Ok(()); // Finished by a retry since the listing.
        }
        // A replicated volume's half-made publish may have granted on any
        // of its copies' nodes.
        let servers: Vec<String> = match self.get::<VolumeRecord>(&a.volume)? {
            Some(v) if v.replicas.is_some() => v.nodes().into_iter().map(|(n, _)| n).collect(),
            _ => vec![node.to_string()],
        };
        for s in &servers {
            self.revoke_on_server(call, s, &a.volume, &a.node).await?;
        }
        self.commit_intent(a.remove()).await?;
        self.note(
            node,
            &a.volume,
            &format!("removed an unfinished attachment to node {}", a.node),
        )
        .await;
        Ok(())
    }

    /// Rebuilds what each pool has promised from the catalog, so a count that
    /// drifted (a failed step between a reservation and its commit) heals.
    /// Only at a quiet moment: no size-changing call in progress (creates
    /// also wait for the placement lock held here). Returns whether the
    /// count had drifted (and is warned about).
    pub async fn recount(&self) -> Result<bool> {
        let _placing = self.placement.lock().await;
        if self.changing.load(Ordering::SeqCst) > 0 {
            return Ok(false); // Not a quiet moment; the next pass tries again.
        }
        let fresh = provisioned_by_pool(records::list::<VolumeRecord>(&*self.store, None, 0)?);
        let mut cur = self.provisioned.lock();
        // A pool counted at 0 and a pool not counted promise the same: only
        // a difference in bytes is drift.
        let drifted = nonzero(&cur) != nonzero(&fresh);
        if drifted {
            tracing::warn!(before = ?*cur, after = ?fresh, "provisioned bytes recounted from the catalog");
        }
        *cur = fresh;
        Ok(drifted)
    }

    /// Logs and audits what reconcile did.
    pub(crate) async fn note(&self, node: &str, object: &str, what: &str) {
        tracing::warn!(node, object, "reconcile: {what}");
        let call = Call::new(SERVER_CALLER_PREFIX, "Reconcile", object, node);
        if let Err(e) = self.record(call.entry(node, "ok", what.to_string())).await {
            tracing::error!(error = %e, "cannot append to the audit log");
        }
    }

    /// Chains the node's new audit events (connects, disconnects, refusals,
    /// and control calls nobody made through this service).
    pub async fn pull_audit(&self, node: &str) -> Result<()> {
        let Some(rec) = self.get::<NodeRecord>(node)? else {
            return Ok(());
        };
        let after = if rec.audit_pool_id == rec.pool_id {
            rec.audit_cursor
        } else {
            0
        };
        let mut c = self.server(node).await?;
        let call = Call::new(SERVER_CALLER_PREFIX, "PullAudit", "", node);
        let events = c
            .list_audit_events(server_req(
                &call,
                vpb::ListAuditEventsRequest {
                    target: String::new(),
                    client: String::new(),
                    after_seq: after,
                    limit: 1000,
                },
            ))
            .await
            .map_err(|s| MetaError::server(node, &s))?
            .into_inner()
            .events;
        let Some(last) = events.last().map(|e| e.seq) else {
            return Ok(());
        };
        let entries: Vec<AuditEntry> = events
            .into_iter()
            .filter(|e| !e.client.starts_with(SERVER_CALLER_PREFIX))
            .map(|e| AuditEntry {
                time_ms: e.time_unix_ms,
                actor: e.client,
                action: e.action,
                volume: e.target,
                target: String::new(),
                node: node.to_string(),
                result: e.result,
                peer: e.peer,
                read_bytes: e.read_bytes,
                write_bytes: e.write_bytes,
                detail: format!(
                    "{}{}node seq {}, {} reads, {} writes",
                    e.detail,
                    if e.detail.is_empty() { "" } else { "; " },
                    e.seq,
                    e.read_ops,
                    e.write_ops
                ),
                ..AuditEntry::default()
            })
            .collect();
        let moved = NodeRecord {
            audit_cursor: last,
            audit_pool_id: rec.pool_id.clone(),
            ..rec.clone()
        };
        // The entries and the cursor move together: nothing chained twice or lost.
        lost_race_is_fine(
            self.commit_entries(moved.replace(&rec), entries)
                .await
                .map(drop),
        )
    }

    /// One pass of the background work: liveness, then reconcile/audit pulls.
    pub async fn tick(self: &Arc<Self>, full_reconcile: bool) {
        if full_reconcile {
            if let Err(e) = self.recount().await {
                tracing::error!(error = %e, "recount of provisioned bytes failed");
            }
            // Copies of the head outside the catalog are what pin history.
            match self.audit_head() {
                Ok(h) => tracing::info!(seq = h.seq, hash = %h.hash, "audit chain head"),
                Err(e) => tracing::error!(error = %e, "cannot read the audit chain head"),
            }
        }
        let up = match self.check_nodes().await {
            Ok(up) => up,
            Err(e) => {
                tracing::error!(error = %e, "node check failed");
                return;
            }
        };
        if full_reconcile {
            if let Err(e) = self.replace_lost().await {
                tracing::error!(error = %e, "replacing the copies of lost nodes failed");
            }
        }
        for n in up {
            let me = self.clone();
            tokio::spawn(async move {
                let r = if full_reconcile {
                    me.reconcile_node(&n.name).await
                } else {
                    me.pull_audit(&n.name).await
                };
                match r {
                    Ok(()) => {}
                    // A node that just died: the liveness check will say so.
                    Err(MetaError::Unavailable(e)) => {
                        tracing::debug!(node = %n.name, error = %e, "node unreachable")
                    }
                    Err(e) => tracing::warn!(node = %n.name, error = %e, "reconcile pass failed"),
                }
            });
        }
    }
}
