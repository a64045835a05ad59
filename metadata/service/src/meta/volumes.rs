//! Volumes: create (new, clone, restore), delete, expand, modify, views.

use super::*;

impl Meta {
    pub(crate) fn spec_of(&self, v: &VolumeRecord) -> Result<Spec> {
        tiers::resolve(&self.cfg.tiers, &v.parameters)
    }

    /// Why an existing volume does not match a create request, if it does not.
    pub(crate) fn incompatibility(v: &VolumeRecord, req: &CreateVolume) -> Option<String> {
        if v.size_bytes < req.required_bytes {
            return Some(format!(
                "it has {} bytes, {} were asked",
                v.size_bytes, req.required_bytes
            ));
        }
        if req.limit_bytes != 0 && v.size_bytes > req.limit_bytes {
            return Some(format!(
                "it has {} bytes, above limit_bytes {}",
                v.size_bytes, req.limit_bytes
            ));
        }
        if v.parameters != req.parameters {
            // Each differing parameter with both values, so the caller sees
            // what to change rather than a map to diff by eye.
            let keys: std::collections::BTreeSet<&String> =
                v.parameters.keys().chain(req.parameters.keys()).collect();
            let value = |m: &BTreeMap<String, String>, k: &String| {
                m.get(k).map_or("unset".to_string(), |x| format!("{x:?}"))
            };
            let diffs: Vec<String> = keys
                .into_iter()
                .filter(|k| v.parameters.get(*k) != req.parameters.get(*k))
                .map(|k| {
                    format!(
                        "parameter {k} is {} on it, {} in this request",
                        value(&v.parameters, k),
                        value(&req.parameters, k)
                    )
                })
                .collect();
            return Some(diffs.join("; "));
        }
        if v.source != req.source {
            return Some(format!("it was created from {:?}", v.source));
        }
        if !placement::in_topology(&v.topology, &req.requisite) {
            return Some(format!(
                "it lives on node {}, outside the requested topology",
                v.node
            ));
        }
        None
    }

    pub async fn create_volume(&self, call: &Call, req: CreateVolume) -> Result<VolumeRecord> {
        let _changing = self.changing();
        check_new_name("volume", &req.name)?;
        let spec = tiers::resolve(&self.cfg.tiers, &req.parameters)?;
        let _name = self.locks.lock(format!("v:{}", req.name)).await;
        if let Some(v) = self.get::<VolumeRecord>(&req.name)? {
            if let Some(why) = Self::incompatibility(&v, &req) {
                return Err(MetaError::AlreadyExists(format!(
                    "volume {} already exists and differs: {why}",
                    req.name
                )));
            }
            return match v.state {
                State::Ready => Ok(v),
                // Left by a crash before reconcile saw it: finish it now.
                State::Creating => self.finish_create(call, &spec, v).await,
                State::Deleting => Err(MetaError::FailedPrecondition(format!(
                    "volume {} is being deleted; retry once it is gone",
                    req.name
                ))),
            };
        }
        if let Some(Source::Volume(v)) = &req.source {
            if self
                .get::<VolumeRecord>(v)?
                .is_some_and(|v| v.replicas.is_some())
            {
                return Err(MetaError::FailedPrecondition(format!(
                    "volume {v} is replicated: snapshot it and clone the snapshot (a \
                     snapshot is taken on every copy in sync at one point)"
                )));
            }
        }
        // Clones live on their source's pool: that is what makes them O(1).
        // A replicated snapshot's clone is replicated on the same copies.
        let mut source_copies: Vec<(String, String)> = Vec::new();
        let (floor, placed) = match &req.source {
            Some(Source::Snapshot(s)) => {
                let snap: SnapshotRecord = self.get(s)?.ok_or_else(|| {
                    MetaError::NotFound(format!("source snapshot {s} does not exist"))
                })?;
                if snap.state != State::Ready {
                    return Err(MetaError::FailedPrecondition(format!(
                        "source snapshot {s} is not ready ({:?})",
                        snap.state
                    )));
                }
                let copies = snap.copies.len().max(1);
                let asked = req.parameters.contains_key("replicas");
                if (asked && spec.replicas != copies) || (!asked && spec.replicas > copies) {
                    return Err(MetaError::FailedPrecondition(format!(
                        "volume {}: a clone has its snapshot's copies ({copies}, snapshot {s} is \
                         on {}); {} replicas cannot be made from it",
                        req.name,
                        snap.nodes()
                            .iter()
                            .map(|(n, _)| n.as_str())
                            .collect::<Vec<_>>()
                            .join(", "),
                        spec.replicas
                    )));
                }
                source_copies = snap.copies.clone();
                (snap.size_bytes, Some((snap.node, snap.pool_id)))
            }
            Some(Source::Volume(src)) => {
                let v: VolumeRecord = self.get(src)?.ok_or_else(|| {
                    MetaError::NotFound(format!("source volume {src} does not exist"))
                })?;
                if v.state != State::Ready {
                    return Err(MetaError::FailedPrecondition(format!(
                        "source volume {src} is not ready ({:?})",
                        v.state
                    )));
                }
                (v.size_bytes, Some((v.node, v.pool_id)))
            }
            None => (0, None),
        };
        let size = size_for(req.required_bytes, req.limit_bytes, floor)?;
        let record = {
            let _placing = self.placement.lock().await;
            let cands = self.candidates()?;
            let mut copies: Vec<(String, String)> = Vec::new();
            let (node, pool_id) = match placed {
                Some((node, pool_id)) => {
                    let on = if source_copies.is_empty() {
                        vec![(node.clone(), pool_id.clone())]
                    } else {
                        source_copies.clone()
                    };
                    for (node, pool_id) in &on {
                        self.require_up(node)?;
                        let c = cands
                            .iter()
                            .find(|c| c.pool_id == *pool_id)
                            .ok_or_else(|| {
                                MetaError::Unavailable(format!(
                                "the source's pool {pool_id} on node {node} is no longer reported"
                            ))
                            })?;
                        if !placement::in_topology(&c.labels, &req.requisite) {
                            return Err(MetaError::Unplaceable(format!(
                                "the source lives on node {node}, outside the requested topology \
                                 (a clone must stay on its source's pool)"
                            )));
                        }
                        if c.available(self.cfg.overcommit) < size {
                            return Err(MetaError::Unplaceable(format!(
                                "pool {pool_id} on node {node}, where the source lives, has {} \
                                 bytes left to promise; the clone needs {size}",
                                c.available(self.cfg.overcommit)
                            )));
                        }
                    }
                    if on.len() > 1 {
                        copies = on;
                    }
                    (node, pool_id)
                }
                None => {
                    let r = placement::Request {
                        size_bytes: size,
                        requisite: req.requisite.clone(),
                        preferred: req.preferred.clone(),
                        media: spec.media.clone(),
                    };
                    let picked = placement::choose_n(
                        &cands,
                        &r,
                        self.cfg.overcommit,
                        spec.replicas,
                        spec.spread.as_deref(),
                    )
                    .map_err(|why| {
                        MetaError::Unplaceable(format!("cannot place volume {}: {why}", req.name))
                    })?;
                    copies = picked
                        .iter()
                        .map(|&i| (cands[i].node.clone(), cands[i].pool_id.clone()))
                        .collect();
                    copies[0].clone()
                }
            };
            let replicas = if copies.len() > 1 {
                Some(ReplicaSet::new(&copies)?)
            } else {
                None
            };
            let labels = |n: &str| -> Result<BTreeMap<String, String>> {
                Ok(self
                    .get::<NodeRecord>(n)?
                    .map(|n| n.labels)
                    .unwrap_or_default())
            };
            let topology = labels(&node)?;
            let copy_topology = match &replicas {
                Some(_) => copies
                    .iter()
                    .map(|(n, _)| labels(n))
                    .collect::<Result<Vec<_>>>()?,
                None => Vec::new(),
            };
            let record = VolumeRecord {
                id: req.name.clone(),
                size_bytes: size,
                tier: spec.tier.name.clone(),
                parameters: req.parameters.clone(),
                qos: spec.qos(size),
                fs_type: spec.fs_type.clone(),
                node,
                pool_id,
                source: req.source.clone(),
                state: State::Creating,
                topology,
                copy_topology,
                created_ms: now_ms(),
                condition: String::new(),
                replicas,
            };
            // Reserved under the placement lock, so the next placement sees
            // it; made durable after, so creates do not queue behind each
            // other's fsync (recount waits while `_changing` is held).
            self.reserve_copies(&record, i128::from(size));
            record
        };
        if let Err(e) = self.commit_intent(record.create()).await {
            self.reserve_copies(&record, -i128::from(size));
            return Err(e);
        }
        self.point("create-volume:after-catalog")?;
        self.finish_create(call, &spec, record).await
    }

    /// Steps 2 and 3 of a create: the volume server, then the outcome.
    pub(crate) async fn finish_create(
        &self,
        call: &Call,
        spec: &Spec,
        rec: VolumeRecord,
    ) -> Result<VolumeRecord> {
        let made = self.create_on_server(call, spec, &rec).await;
        if let Err(e) = made {
            // Nobody was told the volume exists: undo, unless the node is out
            // of reach (reconcile will undo it when it is back).
            if !matches!(e, MetaError::Unavailable(_)) {
                let owns_it = !matches!(
                    &e,
                    MetaError::Server {
                        code: tonic::Code::AlreadyExists,
                        ..
                    }
                );
                if let Err(undo) = self.undo_create(&rec, owns_it).await {
                    tracing::warn!(volume = %rec.id, error = %undo, "could not undo a failed create; reconcile will");
                }
            }
            return Err(e);
        }
        self.point("create-volume:after-server")?;
        let ready = VolumeRecord {
            state: State::Ready,
            ..rec.clone()
        };
        let detail = format!(
            "{} bytes, tier {}, pool {}{}",
            ready.size_bytes,
            ready.tier,
            ready.pool_id,
            match &ready.source {
                Some(Source::Snapshot(s)) => format!(", from snapshot {s}"),
                Some(Source::Volume(v)) => format!(", from volume {v}"),
                None => String::new(),
            }
        );
        self.commit(call, ready.replace(&rec), &ready.node, detail)
            .await?;
        tracing::info!(volume = %ready.id, node = %ready.node, size = ready.size_bytes, "volume created");
        Ok(ready)
    }

    /// Creates the volume on each of its nodes (every copy of a replicated
    /// one), in order; the first failure stops it.
    pub(crate) async fn create_on_server(
        &self,
        call: &Call,
        spec: &Spec,
        rec: &VolumeRecord,
    ) -> Result<()> {
        for (node, _) in rec.nodes() {
            self.create_on(call, spec, rec, &node).await?;
        }
        Ok(())
    }

    pub(crate) async fn create_on(
        &self,
        call: &Call,
        spec: &Spec,
        rec: &VolumeRecord,
        node: &str,
    ) -> Result<()> {
        let mut c = self.server(node).await?;
        let class = tiers::server_class(spec.tier.priority).to_string();
        let overrides = Some(server_overrides(&rec.qos));
        let r = match &rec.source {
            None => {
                c.create_volume(server_req(
                    call,
                    vpb::CreateVolumeRequest {
                        name: rec.id.clone(),
                        size_bytes: rec.size_bytes,
                        tier: class,
                        overrides,
                    },
                ))
                .await
            }
            Some(src) => {
                use vpb::clone_volume_request::Source as S;
                let source = match src {
                    Source::Snapshot(s) => S::Snapshot(s.clone()),
                    Source::Volume(v) => S::Volume(v.clone()),
                };
                c.clone_volume(server_req(
                    call,
                    vpb::CloneVolumeRequest {
                        name: rec.id.clone(),
                        source: Some(source),
                        size_bytes: rec.size_bytes,
                        tier: class,
                        overrides,
                    },
                ))
                .await
            }
        };
        r.map(|_| ()).map_err(|s| MetaError::server(node, &s))
    }

    /// Reserves (or returns) `delta` bytes on every pool holding a copy.
    pub(crate) fn reserve_copies(&self, v: &VolumeRecord, delta: i128) {
        for (_, pool) in v.nodes() {
            self.reserve(&pool, delta);
        }
    }

    /// Removes a half-created volume: from its server (when it is ours), then
    /// from the catalog.
    pub(crate) async fn undo_create(&self, rec: &VolumeRecord, on_server: bool) -> Result<()> {
        let _changing = self.changing();
        if on_server {
            self.delete_on_server(&rec.node, &rec.id, "reconcile")
                .await?;
        }
        // The other copies, wherever the create got to (gone is fine).
        for (node, _) in rec.nodes().iter().skip(1) {
            self.delete_on_server(node, &rec.id, "reconcile").await?;
        }
        self.commit_intent(rec.remove()).await?;
        self.reserve_copies(rec, -i128::from(rec.size_bytes));
        Ok(())
    }

    pub(crate) async fn delete_on_server(
        &self,
        node: &str,
        volume: &str,
        actor: &str,
    ) -> Result<()> {
        let mut c = self.server(node).await?;
        let call = Call::new(actor, "DeleteVolume", volume, "");
        match c
            .delete_volume(server_req(
                &call,
                vpb::DeleteVolumeRequest {
                    name: volume.into(),
                },
            ))
            .await
        {
            Ok(_) => Ok(()),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(()),
            Err(s) => Err(MetaError::server(node, &s)),
        }
    }

    pub async fn delete_volume(&self, call: &Call, id: &str) -> Result<()> {
        let _changing = self.changing();
        check_name("volume", id)?;
        let _name = self.locks.lock(format!("v:{id}")).await;
        let Some(v) = self.get::<VolumeRecord>(id)? else {
            return Ok(()); // Already gone: deleting is idempotent.
        };
        let attached = self.attachments(id)?;
        if !attached.is_empty() {
            let nodes: Vec<&str> = attached.iter().map(|a| a.node.as_str()).collect();
            return Err(MetaError::FailedPrecondition(format!(
                "volume {id} is published to node(s) {}; unpublish it first",
                nodes.join(", ")
            )));
        }
        for (node, _) in v.nodes() {
            self.require_up(&node)?;
        }
        let deleting = VolumeRecord {
            state: State::Deleting,
            ..v.clone()
        };
        if v.state != State::Deleting {
            self.commit_intent(deleting.replace(&v)).await?;
        }
        self.point("delete-volume:after-catalog")?;
        for (node, _) in v.nodes() {
            if let Err(e) = self.delete_on_server(&node, id, &call.actor).await {
                if !matches!(e, MetaError::Unavailable(_)) && v.state == State::Ready {
                    // The server refused (in use...): the volume stays as it
                    // was (copies deleted before it are recreated by nobody:
                    // the volume is marked deleting and a retry finishes it).
                    if node == v.node {
                        self.commit_intent(v.replace(&deleting)).await?;
                    }
                }
                return Err(e);
            }
        }
        self.commit(
            call,
            deleting.remove(),
            &v.node,
            format!("{} bytes freed", v.size_bytes),
        )
        .await?;
        self.reserve_copies(&v, -i128::from(v.size_bytes));
        tracing::info!(volume = %id, node = %v.node, "volume deleted");
        Ok(())
    }

    pub(crate) fn ready_volume(&self, id: &str) -> Result<VolumeRecord> {
        let v: VolumeRecord = self
            .get(id)?
            .ok_or_else(|| MetaError::NotFound(format!("volume {id} does not exist")))?;
        if v.state != State::Ready {
            return Err(MetaError::FailedPrecondition(format!(
                "volume {id} is {:?}, not ready",
                v.state
            )));
        }
        Ok(v)
    }

    /// Applies a volume's limits on its server, live.
    pub(crate) async fn push_qos(&self, call: &Call, v: &VolumeRecord, spec: &Spec) -> Result<()> {
        let mut c = self.server(&v.node).await?;
        c.set_qos(server_req(
            call,
            vpb::SetQosRequest {
                volume: v.id.clone(),
                tier: tiers::server_class(spec.tier.priority).to_string(),
                overrides: Some(server_overrides(&v.qos)),
                clear_overrides: true,
            },
        ))
        .await
        .map_err(|s| MetaError::server(&v.node, &s))?;
        Ok(())
    }

    pub async fn expand_volume(
        &self,
        call: &Call,
        id: &str,
        required: u64,
        limit: u64,
    ) -> Result<VolumeRecord> {
        let _changing = self.changing();
        check_name("volume", id)?;
        let _name = self.locks.lock(format!("v:{id}")).await;
        let v = self.ready_volume(id)?;
        if required <= v.size_bytes {
            if limit != 0 && v.size_bytes > limit {
                return Err(MetaError::OutOfRange(format!(
                    "volume {id} already has {} bytes, above limit_bytes {limit}; volumes do not shrink",
                    v.size_bytes
                )));
            }
            return Ok(v);
        }
        let size = size_for(required, limit, 0)?;
        self.require_up(&v.node)?;
        {
            let _placing = self.placement.lock().await;
            let room = self
                .candidates()?
                .into_iter()
                .find(|c| c.pool_id == v.pool_id)
                .map_or(0, |c| c.available(self.cfg.overcommit));
            let delta = size - v.size_bytes;
            if room < delta {
                return Err(MetaError::Unplaceable(format!(
                    "pool {} on node {} can promise {room} more bytes; growing volume {id} needs {delta}",
                    v.pool_id, v.node
                )));
            }
            self.reserve(&v.pool_id, i128::from(delta));
        }
        let spec = self.spec_of(&v)?;
        let grown = VolumeRecord {
            size_bytes: size,
            qos: spec.qos(size),
            ..v.clone()
        };
        let r = async {
            let mut c = self.server(&v.node).await?;
            c.resize_volume(server_req(
                call,
                vpb::ResizeVolumeRequest {
                    name: id.to_string(),
                    size_bytes: size,
                },
            ))
            .await
            .map_err(|s| MetaError::server(&v.node, &s))?;
            // Limits scale with size.
            self.push_qos(call, &grown, &spec).await
        }
        .await;
        if let Err(e) = r {
            self.reserve(&v.pool_id, -i128::from(size - v.size_bytes));
            return Err(e);
        }
        let detail = format!("{} -> {size} bytes", v.size_bytes);
        if let Err(e) = self.commit(call, grown.replace(&v), &v.node, detail).await {
            // The server grew; reconcile adopts its size and counts it then.
            self.reserve(&v.pool_id, -i128::from(size - v.size_bytes));
            return Err(e);
        }
        Ok(grown)
    }

    pub async fn modify_volume(
        &self,
        call: &Call,
        id: &str,
        changes: BTreeMap<String, String>,
    ) -> Result<VolumeRecord> {
        check_name("volume", id)?;
        tiers::check_mutable(&changes)?;
        let _name = self.locks.lock(format!("v:{id}")).await;
        let v = self.ready_volume(id)?;
        let mut params = v.parameters.clone();
        for (k, val) in &changes {
            if val.is_empty() {
                params.remove(k);
            } else {
                params.insert(k.clone(), val.clone());
            }
        }
        let spec = tiers::resolve(&self.cfg.tiers, &params)?;
        let new = VolumeRecord {
            tier: spec.tier.name.clone(),
            qos: spec.qos(v.size_bytes),
            parameters: params,
            ..v.clone()
        };
        if new == v {
            return Ok(v);
        }
        self.push_qos(call, &new, &spec).await?;
        let detail = format!(
            "tier {} -> {}, iops {} -> {}, bytes/s {} -> {}",
            v.tier,
            new.tier,
            v.qos.iops_limit,
            new.qos.iops_limit,
            v.qos.bytes_per_second_limit,
            new.qos.bytes_per_second_limit
        );
        self.commit(call, new.replace(&v), &v.node, detail).await?;
        Ok(new)
    }

    /// A volume with its condition as of now (a down node makes it abnormal).
    pub fn volume_view(&self, mut v: VolumeRecord) -> VolumeRecord {
        if let Some(set) = v.replicas.as_ref().filter(|s| s.degraded()) {
            if v.condition.is_empty() {
                let out: Vec<String> = set
                    .replicas()
                    .iter()
                    .filter(|r| r.state != berth_catalog::replication::ReplicaState::InSync)
                    .map(|r| format!("{} {:?}", r.node, r.state).to_lowercase())
                    .collect();
                v.condition = format!(
                    "degraded: {} of {} replicas in sync at generation {} ({})",
                    set.counted().count(),
                    set.replicas().len(),
                    set.generation(),
                    out.join(", ")
                );
            }
            return v;
        }
        if v.condition.is_empty() && !self.is_up(&v.node) {
            v.condition = format!(
                "volume server {} is down ({})",
                v.node,
                self.down_since(&v.node)
            );
        }
        v
    }
}
