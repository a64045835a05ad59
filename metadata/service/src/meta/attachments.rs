//! Attachments: publish (plain and replicated) and unpublish, and the URIs clients dial.

use super::*;

impl Meta {
    pub fn attachments(&self, volume: &str) -> Result<Vec<AttachmentRecord>> {
        let prefix = format!("{volume}/");
        // Keys sort by volume: start just before this volume's range.
        let mut out = Vec::new();
        let mut after = Some(volume.to_string());
        loop {
            let page = records::list::<AttachmentRecord>(&*self.store, after.as_deref(), 256)?;
            let Some(last) = page.last() else { break };
            after = Some(last.key());
            let n = page.len();
            let mut done = false;
            for a in page {
                if a.key().starts_with(&prefix) {
                    out.push(a);
                } else if a.key() > prefix {
                    done = true;
                    break;
                }
            }
            if done || n < 256 {
                break;
            }
        }
        Ok(out)
    }

    /// The attachment with URIs built from its server node's addresses as
    /// the node reports them now (a restarted node may listen elsewhere; the
    /// export name, the secret, stays).
    pub fn with_current_uris(&self, mut a: AttachmentRecord) -> AttachmentRecord {
        if a.export_name.is_empty() {
            return a;
        }
        if !a.legs.is_empty() {
            return a; // A replicated volume's: see `leg_uris`.
        }
        let (tcp, unix) = self.current_uris(&a.server_node, &a.node, &a.export_name);
        if let Some(t) = tcp {
            a.tcp_uri = t;
        }
        if let Some(u) = unix {
            a.unix_uri = u;
        }
        a
    }

    /// (tcp, unix) URIs of a replicated attachment's leg, from its node's
    /// addresses as reported now; the unix one only where the leg's replica
    /// is on the connecting node.
    pub fn leg_uris(&self, a: &AttachmentRecord, leg: &records::LegRecord) -> (String, String) {
        let (tcp, unix) = self.current_uris(&leg.node, &a.node, &leg.export_name);
        (tcp.unwrap_or_default(), unix.unwrap_or_default())
    }

    /// The URIs of `export` on `server` as that node reports its addresses
    /// now: TCP where it listens, the unix socket only for a `client` on the
    /// same node. `None` for what cannot be built.
    pub(crate) fn current_uris(
        &self,
        server: &str,
        client: &str,
        export: &str,
    ) -> (Option<String>, Option<String>) {
        let Ok(Some(n)) = self.get::<NodeRecord>(server) else {
            return (None, None);
        };
        let tcp =
            (!n.nbd_address.is_empty()).then(|| berth_proto::nbd_tcp_uri(&n.nbd_address, export));
        let unix = (client == server && !n.nbd_socket.is_empty())
            .then(|| berth_proto::nbd_unix_uri(std::path::Path::new(&n.nbd_socket), export));
        (tcp, unix)
    }

    pub fn all_attachments(&self) -> Result<Vec<AttachmentRecord>> {
        Ok(records::list::<AttachmentRecord>(&*self.store, None, 0)?)
    }

    pub async fn publish(
        &self,
        call: &Call,
        volume: &str,
        node: &str,
        read_only: bool,
    ) -> Result<AttachmentRecord> {
        check_name("volume", volume)?;
        check_name("node", node)?;
        let _name = self.locks.lock(format!("v:{volume}")).await;
        let v = self.ready_volume(volume)?;
        let client: NodeRecord = self
            .get(node)?
            .ok_or_else(|| MetaError::NotFound(format!("node {node} is not registered")))?;
        let existing = self.attachments(volume)?;
        if let Some(a) = existing.iter().find(|a| a.node == node) {
            if a.read_only != read_only {
                return Err(MetaError::AlreadyExists(format!(
                    "volume {volume} is already published to node {node} {}",
                    if a.read_only {
                        "read-only"
                    } else {
                        "read-write"
                    }
                )));
            }
            if a.state == State::Ready {
                return Ok(self.with_current_uris(a.clone()));
            }
        } else if let Some(w) = existing.iter().find(|a| !a.read_only || !read_only) {
            return Err(MetaError::FailedPrecondition(format!(
                "volume {volume} is published to node {} ({}); a volume is written from one \
                 node at a time",
                w.node,
                if w.read_only {
                    "read-only"
                } else {
                    "read-write"
                }
            )));
        }
        if let Some(set) = v.replicas.clone() {
            let pending = existing.into_iter().find(|a| a.node == node);
            return self
                .publish_replicated(call, v, set, &client, read_only, pending)
                .await;
        }
        self.require_up(&v.node)?;
        let pending = existing.into_iter().find(|a| a.node == node);
        let rec = self.attachment_intent(&v, node, read_only, pending).await?;
        self.point("publish-volume:after-catalog")?;
        // Connections from another node must come from its address.
        let peer = if node == v.node {
            String::new()
        } else {
            peer_ip(&client.nbd_address)
        };
        let granted = async {
            let mut c = self.server(&v.node).await?;
            c.grant_export(server_req(
                call,
                vpb::GrantExportRequest {
                    kind: vpb::TargetKind::Volume as i32,
                    name: volume.to_string(),
                    client: node_client(node),
                    read_only,
                    peer_address: peer,
                    generation: 0,
                },
            ))
            .await
            .map(tonic::Response::into_inner)
            .map_err(|s| MetaError::server(&v.node, &s))
        }
        .await;
        let e = match granted {
            Ok(e) => e,
            Err(err) => {
                if !matches!(err, MetaError::Unavailable(_)) {
                    self.commit_intent(rec.remove()).await?;
                }
                return Err(err);
            }
        };
        self.point("publish-volume:after-server")?;
        let ready = AttachmentRecord {
            export_name: e.export_name,
            tcp_uri: e.tcp_uri,
            unix_uri: if node == v.node {
                e.unix_uri
            } else {
                String::new()
            },
            state: State::Ready,
            ..rec.clone()
        };
        let detail = format!(
            "{} to node {node}",
            if read_only { "read-only" } else { "read-write" }
        );
        self.commit(call, ready.replace(&rec), &v.node, detail)
            .await?;
        Ok(self.with_current_uris(ready))
    }

    /// The attachment a publish works on: the one a failed attempt left, or
    /// a new intent (Creating), durable before any server is asked.
    pub(crate) async fn attachment_intent(
        &self,
        v: &VolumeRecord,
        node: &str,
        read_only: bool,
        pending: Option<AttachmentRecord>,
    ) -> Result<AttachmentRecord> {
        if let Some(a) = pending {
            return Ok(a);
        }
        let a = AttachmentRecord {
            volume: v.id.clone(),
            node: node.to_string(),
            read_only,
            server_node: v.node.clone(),
            export_name: String::new(),
            tcp_uri: String::new(),
            unix_uri: String::new(),
            state: State::Creating,
            created_ms: now_ms(),
            legs: Vec::new(),
            generation: 0,
        };
        self.commit_intent(a.create()).await?;
        Ok(a)
    }

    /// Publishes a replicated volume to `client` for a new nexus there: the
    /// set's generation moves on (fencing any earlier nexus), each in-sync
    /// replica grants the node an export at that generation, and a replica
    /// whose server cannot be reached is marked out (the set goes on with
    /// the others; at least one must answer). Called with the volume's name
    /// lock held.
    pub(crate) async fn publish_replicated(
        &self,
        call: &Call,
        v: VolumeRecord,
        mut set: ReplicaSet,
        client: &NodeRecord,
        read_only: bool,
        pending: Option<AttachmentRecord>,
    ) -> Result<AttachmentRecord> {
        if read_only {
            return Err(MetaError::FailedPrecondition(format!(
                "volume {}: read-only publishing of replicated volumes is not built yet; \
                 snapshot it and publish the snapshot's clone",
                v.id
            )));
        }
        let node = client.name.as_str();
        let rec = self.attachment_intent(&v, node, read_only, pending).await?;
        self.point("publish-volume:after-catalog")?;
        // The new nexus's generation, durable before any grant carries it.
        let fence = set.new_nexus(set.generation())?;
        let mut cur = VolumeRecord {
            replicas: Some(set.clone()),
            ..v.clone()
        };
        self.commit_intent(cur.replace(&v)).await?;
        self.point("publish-volume:after-generation")?;
        let mut legs = Vec::new();
        let mut missing = Vec::new();
        let readable: Vec<String> = set.readable().map(|r| r.node.clone()).collect();
        for rnode in readable {
            let peer = if rnode == node {
                String::new()
            } else {
                peer_ip(&client.nbd_address)
            };
            let granted = async {
                self.require_up(&rnode)?;
                let mut c = self.server(&rnode).await?;
                c.grant_export(server_req(
                    call,
                    vpb::GrantExportRequest {
                        kind: vpb::TargetKind::Volume as i32,
                        name: v.id.clone(),
                        client: node_client(node),
                        read_only,
                        peer_address: peer,
                        generation: fence,
                    },
                ))
                .await
                .map(tonic::Response::into_inner)
                .map_err(|s| MetaError::server(&rnode, &s))
            }
            .await;
            match granted {
                Ok(e) => legs.push(records::LegRecord {
                    node: rnode,
                    export_name: e.export_name,
                }),
                Err(MetaError::Unavailable(why)) => missing.push((rnode, why)),
                Err(e) => return Err(e),
            }
        }
        if legs.is_empty() {
            return Err(MetaError::Unavailable(format!(
                "no replica of volume {} can be reached: {}",
                v.id,
                missing
                    .iter()
                    .map(|(n, why)| format!("{n}: {why}"))
                    .collect::<Vec<_>>()
                    .join("; ")
            )));
        }
        for (rnode, why) in &missing {
            let before = cur.clone();
            let g = set.fault(rnode, set.generation(), &[])?;
            let survivors: Vec<String> = set.counted().map(|r| r.node.clone()).collect();
            let rounds = self.track_changes_on(call, &v.id, &survivors, g).await;
            set.note_left_rounds(rnode, rounds)?;
            cur = VolumeRecord {
                replicas: Some(set.clone()),
                ..before.clone()
            };
            let c = Call::new(&call.actor, "FaultReplica", &v.id, rnode);
            self.commit(
                &c,
                cur.replace(&before),
                rnode,
                format!("unreachable at publish: {why}"),
            )
            .await?;
            tracing::warn!(volume = %v.id, node = %rnode, error = %why, "replica unreachable at publish: marked out");
        }
        self.point("publish-volume:after-server")?;
        // The local replica first: the nexus reads from it.
        legs.sort_by_key(|l| l.node != node);
        let ready = AttachmentRecord {
            legs,
            generation: set.generation(),
            state: State::Ready,
            ..rec.clone()
        };
        let detail = format!(
            "read-write to node {node}, generation {} ({} replica(s): {})",
            set.generation(),
            ready.legs.len(),
            ready
                .legs
                .iter()
                .map(|l| l.node.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        self.commit(call, ready.replace(&rec), &v.node, detail)
            .await?;
        Ok(ready)
    }

    pub async fn unpublish(&self, call: &Call, volume: &str, node: &str) -> Result<u32> {
        check_name("volume", volume)?;
        let _name = self.locks.lock(format!("v:{volume}")).await;
        let mut closed = 0;
        for a in self.attachments(volume)? {
            if !node.is_empty() && a.node != node {
                continue;
            }
            closed += self.revoke(call, a).await?;
        }
        Ok(closed)
    }

    /// Removes one attachment: catalog intent, server revoke, catalog outcome.
    pub(crate) async fn revoke(&self, call: &Call, a: AttachmentRecord) -> Result<u32> {
        // A replicated volume's grants are on every copy's node; one that is
        // down keeps its grant, fenced by the next publish's generation.
        let copies: Vec<String> = match self.get::<VolumeRecord>(&a.volume)? {
            Some(v) if v.replicas.is_some() => v.nodes().into_iter().map(|(n, _)| n).collect(),
            _ => Vec::new(),
        };
        if copies.is_empty() {
            self.require_up(&a.server_node)?;
        }
        let deleting = AttachmentRecord {
            state: State::Deleting,
            ..a.clone()
        };
        if a.state != State::Deleting {
            self.commit_intent(deleting.replace(&a)).await?;
        }
        let closed = if copies.is_empty() {
            self.revoke_on_server(call, &a.server_node, &a.volume, &a.node)
                .await?
        } else {
            let mut closed = 0;
            for n in &copies {
                if !self.is_up(n) {
                    tracing::warn!(volume = %a.volume, node = %n, "replica node down: its grant stays, fenced");
                    continue;
                }
                match self.revoke_on_server(call, n, &a.volume, &a.node).await {
                    Ok(c) => closed += c,
                    Err(MetaError::Unavailable(why)) => {
                        tracing::warn!(volume = %a.volume, node = %n, error = %why, "replica node unreachable: its grant stays, fenced");
                    }
                    Err(e) => return Err(e),
                }
            }
            closed
        };
        self.commit(
            call,
            deleting.remove(),
            &a.server_node,
            format!("from node {}; {closed} connection(s) closed", a.node),
        )
        .await?;
        Ok(closed)
    }

    /// Revokes every grant of `volume` to `node` on its server.
    pub(crate) async fn revoke_on_server(
        &self,
        call: &Call,
        server: &str,
        volume: &str,
        node: &str,
    ) -> Result<u32> {
        let mut c = self.server(server).await?;
        let grants = c
            .list_exports(server_req(call, vpb::ListExportsRequest {}))
            .await
            .map_err(|s| MetaError::server(server, &s))?
            .into_inner()
            .exports;
        let mut closed = 0;
        for g in grants
            .into_iter()
            .filter(|g| g.name == volume && g.client == node_client(node))
        {
            match c
                .revoke_export(server_req(
                    call,
                    vpb::RevokeExportRequest {
                        export_name: g.export_name,
                    },
                ))
                .await
            {
                Ok(r) => closed += r.into_inner().closed_connections,
                Err(s) if s.code() == tonic::Code::NotFound => {}
                Err(s) => return Err(MetaError::server(server, &s)),
            }
        }
        Ok(closed)
    }
}
