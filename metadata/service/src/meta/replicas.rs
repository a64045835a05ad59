//! The replica sets of replicated volumes: faults reported by the nexus, rebuilds, drains and
//! replacement (docs/replication.md).

use super::*;

impl Meta {
    /// A nexus saw the replica on `node` fail: it leaves the set and the
    /// generation moves on, durably, before the nexus acknowledges the
    /// writes it holds. Refused at an old generation (a newer nexus owns the
    /// volume) and for the last in-sync replica.
    pub async fn report_replica_fault(
        &self,
        call: &Call,
        volume: &str,
        node: &str,
        generation: u64,
        pending: &[(u64, u64)],
        reason: &str,
    ) -> Result<u64> {
        check_name("volume", volume)?;
        check_name("node", node)?;
        const MAX_PENDING: usize = 1 << 16;
        if pending.len() > MAX_PENDING {
            return Err(MetaError::InvalidArgument(format!(
                "{} pending ranges, more than {MAX_PENDING}",
                pending.len()
            )));
        }
        let _name = self.locks.lock(format!("v:{volume}")).await;
        let v = self.ready_volume(volume)?;
        let mut set = replica_set(&v)?;
        if pending
            .iter()
            .any(|&(o, l)| o.checked_add(l).is_none_or(|e| e > v.size_bytes))
        {
            return Err(MetaError::InvalidArgument(format!(
                "a pending range lies past the end of volume {volume} ({} bytes)",
                v.size_bytes
            )));
        }
        let was_in = v.replicas.as_ref().is_some_and(|s| {
            s.replicas().iter().any(|r| {
                r.node == node && matches!(r.state, ReplicaState::InSync | ReplicaState::Rebuilding)
            })
        });
        let g = set.fault(node, generation, pending)?;
        // The copies that go on record what changes from here, before the
        // nexus may write without this one.
        let survivors: Vec<String> = set.counted().map(|r| r.node.clone()).collect();
        let rounds = self.track_changes_on(call, volume, &survivors, g).await;
        if was_in {
            // Only when it leaves now: a repeated report must not move the
            // rounds past writes it missed.
            set.note_left_rounds(node, rounds)?;
        }
        let faulted = VolumeRecord {
            replicas: Some(set),
            ..v.clone()
        };
        self.point("replica-fault:before-catalog")?;
        let detail = format!(
            "generation {generation} -> {g}; {} pending range(s); {}",
            pending.len(),
            berth_proto::validate::bounded(reason, 512)
        );
        if faulted != v {
            self.commit(call, faulted.replace(&v), node, detail).await?;
        }
        self.point("replica-fault:after-catalog")?;
        tracing::warn!(volume, node, generation = g, reason, "replica marked out");
        Ok(g)
    }

    /// Starts recording changed blocks on the copies of `volume` on `nodes`
    /// (the ones still in sync when another left at `generation`), so the
    /// one that left can be rebuilt from what changed. Best effort: a copy
    /// that cannot start is only not a delta source (the rebuild copies
    /// everything from another, or from it, instead).
    pub(crate) async fn track_changes_on(
        &self,
        call: &Call,
        volume: &str,
        nodes: &[String],
        generation: u64,
    ) -> Vec<(String, u64, u64)> {
        // All at once: the nexus holds writes until this is done.
        let each = nodes.iter().map(|n| async move {
            let started = async {
                self.require_up(n)?;
                let mut c = self.server(n).await?;
                c.track_changes(server_req(
                    call,
                    vpb::TrackChangesRequest {
                        volume: volume.to_string(),
                        point: generation,
                    },
                ))
                .await
                .map(tonic::Response::into_inner)
                .map_err(|s| MetaError::server(n, &s))
            }
            .await;
            match started {
                Ok(t) => Some((n.clone(), t.point, t.round)),
                Err(e) => {
                    tracing::warn!(volume, node = %n, error = %e, "cannot track changed blocks on a replica: rebuilds of the others copy everything from it");
                    None
                }
            }
        });
        futures_util::future::join_all(each)
            .await
            .into_iter()
            .flatten()
            .collect()
    }

    /// What a membership step on the replica of `volume` on `node` works
    /// on, names checked, under the volume's name lock: the lock, the
    /// volume and its replica set.
    pub(crate) async fn replica_step(
        &self,
        volume: &str,
        node: &str,
    ) -> Result<(NameGuard<'_>, VolumeRecord, ReplicaSet)> {
        check_name("volume", volume)?;
        check_name("node", node)?;
        let name = self.locks.lock(format!("v:{volume}")).await;
        let v = self.ready_volume(volume)?;
        let set = replica_set(&v)?;
        Ok((name, v, set))
    }

    /// The replicated volume `volume`, its set, and its read-write
    /// attachment (a rebuild runs in that attachment's nexus).
    pub(crate) fn replicated_attached(
        &self,
        volume: &str,
    ) -> Result<(VolumeRecord, ReplicaSet, AttachmentRecord)> {
        let v = self.ready_volume(volume)?;
        let set = replica_set(&v)?;
        let a = self
            .attachments(volume)?
            .into_iter()
            .find(|a| a.state == State::Ready && !a.read_only && !a.legs.is_empty())
            .ok_or_else(|| {
                MetaError::FailedPrecondition(format!(
                    "volume {volume} is not attached: a rebuild runs in the nexus of its attachment"
                ))
            })?;
        Ok((v, set, a))
    }

    /// The nexus at `generation` rebuilds the faulted replica on `node`: its
    /// server grants the nexus's node an export at the fence, the
    /// attachment lists the leg (so unpublishing revokes it), and the
    /// replica becomes a write member (`Rebuilding`). Returns the new
    /// generation and the leg. The nexus then adds the leg and asks for
    /// the ranges to copy ([`Meta::rebuild_ranges`]).
    pub async fn start_rebuild(
        &self,
        call: &Call,
        volume: &str,
        node: &str,
        generation: u64,
    ) -> Result<(u64, AttachmentRecord, records::LegRecord)> {
        check_name("volume", volume)?;
        check_name("node", node)?;
        let _name = self.locks.lock(format!("v:{volume}")).await;
        let (v, mut set, a) = self.replicated_attached(volume)?;
        // Not UNAVAILABLE: that says "this service, ask again" to the nexus.
        if !self.is_up(node) {
            return Err(MetaError::FailedPrecondition(format!(
                "volume server {node} is down ({}): its replica is rebuilt once it is back",
                self.down_since(node)
            )));
        }
        let peer = if a.node == node {
            String::new()
        } else {
            match self.get::<NodeRecord>(&a.node)? {
                Some(n) => peer_ip(&n.nbd_address),
                None => String::new(),
            }
        };
        let g = set.start_rebuild(node, generation, v.size_bytes)?;
        let mut c = self.server(node).await?;
        let e = c
            .grant_export(server_req(
                call,
                vpb::GrantExportRequest {
                    kind: vpb::TargetKind::Volume as i32,
                    name: v.id.clone(),
                    client: node_client(&a.node),
                    read_only: false,
                    peer_address: peer,
                    generation: set.fence(),
                },
            ))
            .await
            .map_err(|s| MetaError::server(node, &s))?
            .into_inner();
        let leg = records::LegRecord {
            node: node.to_string(),
            export_name: e.export_name,
        };
        let mut legs: Vec<records::LegRecord> =
            a.legs.iter().filter(|l| l.node != node).cloned().collect();
        legs.push(leg.clone());
        let attached = AttachmentRecord { legs, ..a.clone() };
        let rebuilding = VolumeRecord {
            replicas: Some(set),
            ..v.clone()
        };
        if rebuilding != v || attached != a {
            self.commit(
                call,
                rebuilding.replace(&v).merge(attached.replace(&a)),
                node,
                format!(
                    "generation {generation} -> {g}: rebuilding into the nexus on {}",
                    a.node
                ),
            )
            .await?;
        }
        Ok((g, attached, leg))
    }

    /// What the rebuild of the replica on `node` must copy, once the nexus
    /// writes to it: the blocks an in-sync replica recorded as changed
    /// since it left, plus the ranges the nexus reported pending for it;
    /// everything when no replica tracked from early enough (or it is new).
    /// Returns (ranges, whether it is a full copy, the source consulted).
    pub async fn rebuild_ranges(
        &self,
        call: &Call,
        volume: &str,
        node: &str,
        generation: u64,
    ) -> Result<(Vec<(u64, u64)>, bool, String, u64)> {
        let (_name, v, mut set) = self.replica_step(volume, node).await?;
        let r = set
            .replicas()
            .iter()
            .find(|r| r.node == node)
            .cloned()
            .ok_or_else(|| MembershipError::NoSuchReplica(node.to_string()))?;
        // Tracking that started when it left (or before) covers it.
        let left_at = r.synced_generation + 1;
        let sources: Vec<String> = set.readable().map(|r| r.node.clone()).collect();
        let list = |s: String, since: u64| async move {
            self.require_up(&s)?;
            let mut c = self.server(&s).await?;
            c.list_changes(server_req(
                call,
                vpb::ListChangesRequest {
                    volume: volume.to_string(),
                    max_ranges: 0,
                    since_round: since,
                },
            ))
            .await
            .map(tonic::Response::into_inner)
            .map_err(|e| MetaError::server(&s, &e))
        };
        let pairs = |l: &vpb::ListChangesResponse| -> Vec<(u64, u64)> {
            l.ranges.iter().map(|r| (r.offset, r.length)).collect()
        };
        let mut delta = None;
        if r.synced_generation > 0 {
            for s in &sources {
                match list(s.clone(), 0).await {
                    Ok(l) if l.tracking && !l.too_many && l.point <= left_at => {
                        delta = Some((pairs(&l), s.clone()));
                        break;
                    }
                    Ok(l) => {
                        tracing::info!(volume, source = %s, tracking = l.tracking, point = l.point, left_at, too_many = l.too_many, "replica cannot serve a delta rebuild")
                    }
                    Err(e) => {
                        tracing::warn!(volume, source = %s, error = %e, "cannot list changed blocks")
                    }
                }
            }
        }
        let full = delta.is_none();
        let (base, source) = delta.unwrap_or_else(|| (vec![(0, v.size_bytes)], String::new()));
        // The rebuild before stopped at its cursor: below it only what
        // changed since it stopped is copied again, as a source that was in
        // sync then (in the same recording of changes) lists it.
        let mut resumed = None;
        if r.rebuild_cursor > 0 {
            let mut by: Vec<&(String, u64, u64)> = r
                .left_rounds
                .iter()
                .filter(|(n, _, _)| sources.contains(n))
                .collect();
            by.sort_by_key(|(n, _, _)| *n != source);
            for (s, point, round) in by {
                match list(s.clone(), *round).await {
                    Ok(l) if l.tracking && !l.too_many && l.point == *point => {
                        resumed = Some((r.rebuild_cursor, pairs(&l)));
                        break;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(volume, source = %s, error = %e, "cannot list changed blocks")
                    }
                }
            }
        }
        let mut ranges: Vec<(u64, u64)> = match &resumed {
            Some((cursor, since)) => {
                let mut v: Vec<(u64, u64)> = base
                    .iter()
                    .filter_map(|&(o, l)| {
                        let end = o.saturating_add(l);
                        (end > *cursor).then(|| (o.max(*cursor), end - o.max(*cursor)))
                    })
                    .collect();
                v.extend(since.iter().copied());
                v
            }
            None => base,
        };
        ranges.extend(r.pending.iter().copied());
        let ranges = coalesce_ranges(ranges, v.size_bytes);
        let resumed_from = resumed.map_or(0, |(c, _)| c);
        let total: u64 = ranges.iter().map(|r| r.1).sum();
        set.plan_rebuild(node, generation, total)?;
        let planned = VolumeRecord {
            replicas: Some(set),
            ..v.clone()
        };
        self.commit_intent(planned.replace(&v)).await?;
        tracing::info!(volume, node, full, total, source = %source, ranges = ranges.len(), resumed_from, "rebuild planned");
        Ok((ranges, full, source, resumed_from))
    }

    /// Records a rebuild's progress (shown by `volume get`).
    pub async fn rebuild_progress(
        &self,
        volume: &str,
        node: &str,
        generation: u64,
        done: u64,
        cursor: u64,
    ) -> Result<()> {
        let (_name, v, mut set) = self.replica_step(volume, node).await?;
        set.rebuild_progress(node, generation, done, cursor)?;
        let cur = VolumeRecord {
            replicas: Some(set),
            ..v.clone()
        };
        if cur != v {
            self.commit_intent(cur.replace(&v)).await?;
        }
        Ok(())
    }

    /// The nexus copied everything to the replica on `node` (and flushed
    /// it): it counts again. When none is left out, the replicas stop
    /// recording changed blocks.
    pub async fn finish_rebuild(
        &self,
        call: &Call,
        volume: &str,
        node: &str,
        generation: u64,
    ) -> Result<u64> {
        let (_name, v, mut set) = self.replica_step(volume, node).await?;
        let (done, total) = set
            .replicas()
            .iter()
            .find(|r| r.node == node)
            .map_or((0, 0), |r| (r.rebuild_done_bytes, r.rebuild_total_bytes));
        let g = set.finish_rebuild(node, generation)?;
        let whole = !set.degraded();
        let nodes: Vec<String> = set.replicas().iter().map(|r| r.node.clone()).collect();
        let cur = VolumeRecord {
            replicas: Some(set),
            ..v.clone()
        };
        if cur == v {
            return Ok(g); // The same call again: done already.
        }
        self.point("rebuild:before-catalog")?;
        self.commit(
            call,
            cur.replace(&v),
            node,
            format!("generation {generation} -> {g}: in sync again after copying {done} of {total} bytes"),
        )
        .await?;
        self.point("rebuild:after-catalog")?;
        if let Err(e) = self.drop_retired(call, volume).await {
            tracing::warn!(volume, error = %e, "cannot drop retired copies yet");
        }
        if whole {
            for n in &nodes {
                let stopped = async {
                    let mut c = self.server(n).await?;
                    c.stop_tracking(server_req(
                        call,
                        vpb::StopTrackingRequest {
                            volume: volume.to_string(),
                        },
                    ))
                    .await
                    .map_err(|s| MetaError::server(n, &s))
                }
                .await;
                if let Err(e) = stopped {
                    tracing::warn!(volume, node = %n, error = %e, "cannot stop tracking changed blocks (it costs a key per write until it does)");
                }
            }
        }
        Ok(g)
    }

    /// Moves every replica off `node` (see the `DrainNode` call): returns,
    /// per volume with a copy there, where its new copy is or why it cannot
    /// move.
    pub async fn drain_node(
        &self,
        call: &Call,
        node: &str,
    ) -> Result<Vec<(String, String, String)>> {
        check_name("node", node)?;
        super::node_cas(node, || async {
            let rec: NodeRecord = self
                .get(node)?
                .ok_or_else(|| MetaError::NotFound(format!("node {node} is not registered")))?;
            if rec.cordoned {
                return Ok(());
            }
            let cordoned = NodeRecord {
                cordoned: true,
                ..rec.clone()
            };
            self.commit(
                call,
                cordoned.replace(&rec),
                node,
                "cordoned: no new volumes".into(),
            )
            .await
        })
        .await?;
        let mut out = Vec::new();
        for v in records::list::<VolumeRecord>(&*self.store, None, 0)? {
            let on_it = v.nodes().iter().any(|(n, _)| n == node);
            if !on_it {
                continue;
            }
            let outcome = match &v.replicas {
                None => Err(MetaError::FailedPrecondition(
                    "not replicated: its only copy cannot move".into(),
                )),
                Some(set)
                    if set
                        .replicas()
                        .iter()
                        .any(|r| r.node == node && r.state == ReplicaState::Stale) =>
                {
                    Ok(("".to_string(), "retired already".to_string()))
                }
                Some(_) => self.replace_copy(call, &v.id, node).await,
            };
            let (to, what) = match outcome {
                Ok(x) => x,
                Err(e) => (String::new(), e.to_string()),
            };
            out.push((v.id.clone(), to, what));
        }
        Ok(out)
    }

    /// Places a new copy of replicated volume `volume` away from `node`,
    /// creates it there (empty), and in one catalog change retires the copy
    /// on `node` and adds the new one (out of sync: its nexus rebuilds it in
    /// full). Returns the new copy's node and what happens next.
    pub(crate) async fn replace_copy(
        &self,
        call: &Call,
        volume: &str,
        node: &str,
    ) -> Result<(String, String)> {
        let _changing = self.changing();
        let _name = self.locks.lock(format!("v:{volume}")).await;
        let v = self.ready_volume(volume)?;
        let mut set = replica_set(&v)?;
        let spec = self.spec_of(&v)?;
        let kept: Vec<String> = set
            .replicas()
            .iter()
            .filter(|r| r.node != node && r.state != ReplicaState::Stale)
            .map(|r| r.node.clone())
            .collect();
        let holding: Vec<String> = set.replicas().iter().map(|r| r.node.clone()).collect();
        let (to, pool) = {
            let _placing = self.placement.lock().await;
            let mut excluded = Vec::new();
            let spread_values: Vec<Option<String>> = match spec.spread.as_deref() {
                Some(label) => kept
                    .iter()
                    .map(|n| {
                        self.get::<NodeRecord>(n)
                            .ok()
                            .flatten()
                            .and_then(|r| r.labels.get(label).cloned())
                    })
                    .collect(),
                None => Vec::new(),
            };
            let cands: Vec<Candidate> = self
                .candidates()?
                .into_iter()
                .filter(|c| {
                    if holding.contains(&c.node) {
                        excluded.push(format!("{}: holds a copy", c.node));
                        return false;
                    }
                    if let Some(label) = spec.spread.as_deref() {
                        let val = c.labels.get(label).cloned();
                        if spread_values.contains(&val) {
                            excluded.push(format!("{}: same {label} as a copy it keeps", c.node));
                            return false;
                        }
                    }
                    true
                })
                .collect();
            let r = placement::Request {
                size_bytes: v.size_bytes,
                requisite: Vec::new(),
                preferred: Vec::new(),
                media: spec.media.clone(),
            };
            let mut why_not = |why: String| {
                excluded.push(why);
                MetaError::Unplaceable(format!(
                    "no node for a new copy of {volume}: {}",
                    excluded.join("; ")
                ))
            };
            if cands.is_empty() {
                return Err(why_not(
                    "no other node takes new volumes (drained nodes do not)".into(),
                ));
            }
            let picked =
                placement::choose_n(&cands, &r, self.cfg.overcommit, 1, None).map_err(why_not)?;
            let c = &cands[picked[0]];
            self.reserve(&c.pool_id, i128::from(v.size_bytes));
            (c.node.clone(), c.pool_id.clone())
        };
        let made = async {
            let mut c = self.server(&to).await?;
            c.create_volume(server_req(
                call,
                vpb::CreateVolumeRequest {
                    name: v.id.clone(),
                    size_bytes: v.size_bytes,
                    tier: tiers::server_class(spec.tier.priority).to_string(),
                    overrides: Some(server_overrides(&v.qos)),
                },
            ))
            .await
            .map_err(|s| MetaError::server(&to, &s))
        }
        .await;
        let changed = made.and_then(|_| {
            let g = set.retire(node, set.generation())?;
            Ok(set.add(&to, &pool, g)?)
        });
        let g = match changed {
            Ok(g) => g,
            Err(e) => {
                self.reserve(&pool, -i128::from(v.size_bytes));
                let _ = self.delete_on_server(&to, volume, &call.actor).await;
                return Err(e);
            }
        };
        let mut copy_topology = v.copy_topology.clone();
        copy_topology.push(
            self.get::<NodeRecord>(&to)?
                .map(|n| n.labels)
                .unwrap_or_default(),
        );
        let cur = VolumeRecord {
            replicas: Some(set),
            copy_topology,
            ..v.clone()
        };
        self.commit(
            call,
            cur.replace(&v),
            node,
            format!(
                "generation {g}: the copy on {node} is retired, a new one on {to} is to be rebuilt"
            ),
        )
        .await?;
        let attached = self
            .attachments(volume)?
            .iter()
            .any(|a| !a.read_only && !a.legs.is_empty());
        Ok((
            to,
            if attached {
                "moving: its nexus copies it to the new copy".into()
            } else {
                "moving once attached: a nexus copies it".into()
            },
        ))
    }

    /// Replaces the copies on nodes down for longer than the grace period
    /// (each once: the replaced copy is retired). A copy that cannot be
    /// placed is tried again at the next pass.
    pub(crate) async fn replace_lost(&self) -> Result<()> {
        let Some(grace) = self.cfg.replica_grace else {
            return Ok(());
        };
        let lost: Vec<String> = {
            let live = self.live.lock();
            records::list::<NodeRecord>(&*self.store, None, 0)?
                .into_iter()
                .filter(|n| {
                    live.get(&n.name)
                        .is_some_and(|t| t.elapsed() >= grace + self.cfg.node_timeout)
                })
                .map(|n| n.name)
                .collect()
        };
        for v in records::list::<VolumeRecord>(&*self.store, None, 0)? {
            let Some(set) = &v.replicas else { continue };
            // Retired copies whose node answers again are deleted now.
            if set
                .replicas()
                .iter()
                .any(|r| r.state == ReplicaState::Stale && self.is_up(&r.node))
            {
                let call = Call::new(SERVER_CALLER_PREFIX, "DropRetired", &v.id, "");
                let _name = self.locks.lock(format!("v:{}", v.id)).await;
                if let Err(e) = self.drop_retired(&call, &v.id).await {
                    tracing::warn!(volume = %v.id, error = %e, "cannot drop retired copies yet");
                }
            }
            for r in set.replicas() {
                if r.state == ReplicaState::Stale || !lost.contains(&r.node) {
                    continue;
                }
                let call = Call::new(SERVER_CALLER_PREFIX, "ReplaceReplica", &v.id, &r.node);
                match self.replace_copy(&call, &v.id, &r.node).await {
                    Ok((to, _)) => {
                        tracing::warn!(volume = %v.id, from = %r.node, %to, ?grace, "a node stayed down past the grace period: its copy is replaced")
                    }
                    Err(e) => {
                        tracing::warn!(volume = %v.id, node = %r.node, error = %e, "cannot replace the copy of a lost node yet")
                    }
                }
            }
        }
        Ok(())
    }

    /// Forgets the retired copies of a volume whose copies are all in sync
    /// again, deleting them where their server answers (one that does not
    /// stays retired: never read or counted, its space on that pool still
    /// promised, until it answers).
    pub(crate) async fn drop_retired(&self, call: &Call, volume: &str) -> Result<()> {
        let v = self.ready_volume(volume)?;
        let Some(set) = v.replicas.clone() else {
            return Ok(());
        };
        let retired: Vec<(usize, String, String)> = set
            .replicas()
            .iter()
            .enumerate()
            .filter(|(_, r)| r.state == ReplicaState::Stale)
            .map(|(i, r)| (i, r.node.clone(), r.pool_id.clone()))
            .collect();
        if retired.is_empty()
            || set
                .replicas()
                .iter()
                .any(|r| !matches!(r.state, ReplicaState::Stale | ReplicaState::InSync))
        {
            return Ok(());
        }
        let mut cur = v.clone();
        // From the last, so the indexes of the others hold.
        for (i, node, pool) in retired.into_iter().rev() {
            if let Err(e) = self.delete_on_server(&node, volume, &call.actor).await {
                tracing::warn!(volume, node = %node, error = %e, "the retired copy stays until its server answers");
                continue;
            }
            let before = cur.clone();
            let Some(mut set) = cur.replicas.clone() else {
                break;
            };
            set.remove_stale(&node, set.generation())?;
            if i < cur.copy_topology.len() {
                cur.copy_topology.remove(i);
            }
            cur.replicas = Some(set);
            self.commit(
                call,
                cur.replace(&before),
                &node,
                "the retired copy is deleted".into(),
            )
            .await?;
            self.reserve(&pool, -i128::from(v.size_bytes));
        }
        Ok(())
    }
}
