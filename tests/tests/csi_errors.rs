//! Every CSI RPC's error codes, the way the spec prescribes them and the
//! csi-sanity suite checks them (missing arguments, missing objects,
//! incompatible repeats, idempotent deletes, page tokens), and ABORTED for a
//! call on a volume another call is still working on.

use std::collections::HashMap;
use std::path::Path;

use berth_proto::csi::v1 as csi;
use berth_proto::meta::v1 as mpb;
use berth_tests::csi::{
    block_cap, mount_cap, node_support, params, rt, AccessModeKind as Mode, Cleanup, Csi,
};
use berth_tests::standalone::Standalone;
use tonic::Code;

const MIB: i64 = 1 << 20;

/// The gRPC code of a result (Ok for success).
fn code<T>(r: Result<tonic::Response<T>, tonic::Status>) -> Code {
    match r {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    }
}

/// Asserts each (what, got, want), listing every mismatch at once.
fn check(cases: Vec<(&str, Code, Code)>) {
    let bad: Vec<String> = cases
        .iter()
        .filter(|(_, got, want)| got != want)
        .map(|(what, got, want)| format!("{what}: got {got:?}, want {want:?}"))
        .collect();
    assert!(bad.is_empty(), "wrong codes:\n{}", bad.join("\n"));
    eprintln!("{} error-code cases checked", cases.len());
}

fn create(name: &str, bytes: i64) -> csi::CreateVolumeRequest {
    csi::CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![mount_cap("ext4", Mode::SingleNodeWriter)],
        ..Default::default()
    }
}

fn source(snapshot: Option<&str>, volume: Option<&str>) -> Option<csi::VolumeContentSource> {
    use csi::volume_content_source::{SnapshotSource, Type, VolumeSource};
    let t = match (snapshot, volume) {
        (Some(s), _) => Type::Snapshot(SnapshotSource {
            snapshot_id: s.into(),
        }),
        (None, Some(v)) => Type::Volume(VolumeSource {
            volume_id: v.into(),
        }),
        (None, None) => return None,
    };
    Some(csi::VolumeContentSource { r#type: Some(t) })
}

/// A second node in the catalog (no volume server behind it: enough to be a
/// publish target).
async fn register_fake_node(meta_socket: &Path, name: &str) {
    let ch = berth_proto::channel(&format!("unix://{}", meta_socket.display()), None)
        .await
        .expect("metadata socket");
    mpb::metadata_service_client::MetadataServiceClient::new(ch)
        .register_node(mpb::RegisterNodeRequest {
            name: name.into(),
            control_endpoint: "http://127.0.0.1:9".into(),
            nbd_address: "127.0.0.2:10809".into(),
            pool: Some(mpb::PoolStatus {
                id: format!("pool-{name}"),
                media: "file".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect("RegisterNode");
}

#[test]
fn controller_rpcs_answer_the_codes_the_spec_prescribes() {
    let root = tempfile::tempdir().expect("tmp");
    let s = Standalone::start(&root.path().join("data"), "1G");
    let sock = s.socket("csi_socket");
    let meta_sock = s.socket("metadata_socket");
    rt().block_on(async {
        let mut c = Csi::connect(&sock).await;
        let ctl = &mut c.controller;
        ctl.create_volume(create("vol", 64 * MIB))
            .await
            .expect("vol");
        ctl.create_snapshot(csi::CreateSnapshotRequest {
            source_volume_id: "vol".into(),
            name: "snap".into(),
            ..Default::default()
        })
        .await
        .expect("snap");
        ctl.create_volume(create("other", 64 * MIB))
            .await
            .expect("other");
        register_fake_node(&meta_sock, "node-2").await;

        let mut cases = Vec::new();
        // CreateVolume.
        cases.push((
            "CreateVolume without a name",
            code(ctl.create_volume(create("", MIB)).await),
            Code::InvalidArgument,
        ));
        let mut no_caps = create("x", MIB);
        no_caps.volume_capabilities.clear();
        cases.push((
            "CreateVolume without capabilities",
            code(ctl.create_volume(no_caps).await),
            Code::InvalidArgument,
        ));
        let mut multi_writer = create("x", MIB);
        multi_writer.volume_capabilities = vec![mount_cap("ext4", Mode::MultiNodeMultiWriter)];
        cases.push((
            "CreateVolume multi-node writer",
            code(ctl.create_volume(multi_writer).await),
            Code::InvalidArgument,
        ));
        let mut ntfs = create("x", MIB);
        ntfs.volume_capabilities = vec![mount_cap("ntfs", Mode::SingleNodeWriter)];
        cases.push((
            "CreateVolume ntfs",
            code(ctl.create_volume(ntfs).await),
            Code::InvalidArgument,
        ));
        let mut bad_param = create("x", MIB);
        bad_param.parameters = params(&[("tierr", "premium")]);
        cases.push((
            "CreateVolume unknown parameter",
            code(ctl.create_volume(bad_param).await),
            Code::InvalidArgument,
        ));
        let mut bad_tier = create("x", MIB);
        bad_tier.parameters = params(&[("tier", "gold")]);
        cases.push((
            "CreateVolume unknown tier",
            code(ctl.create_volume(bad_tier).await),
            Code::InvalidArgument,
        ));
        let mut inverted = create("x", 10 * MIB);
        inverted.capacity_range = Some(csi::CapacityRange {
            required_bytes: 10 * MIB,
            limit_bytes: MIB,
        });
        cases.push((
            "CreateVolume limit below required",
            code(ctl.create_volume(inverted).await),
            Code::OutOfRange,
        ));
        let mut negative = create("x", MIB);
        negative.capacity_range = Some(csi::CapacityRange {
            required_bytes: -1,
            limit_bytes: 0,
        });
        cases.push((
            "CreateVolume negative size",
            code(ctl.create_volume(negative).await),
            Code::InvalidArgument,
        ));
        cases.push((
            "CreateVolume larger than any pool",
            code(ctl.create_volume(create("huge", 1 << 50)).await),
            Code::ResourceExhausted,
        ));
        cases.push((
            "CreateVolume same name, other size",
            code(ctl.create_volume(create("vol", 128 * MIB)).await),
            Code::AlreadyExists,
        ));
        cases.push((
            "CreateVolume same name, same request",
            code(ctl.create_volume(create("vol", 64 * MIB)).await),
            Code::Ok,
        ));
        let mut from_missing_snap = create("x", MIB);
        from_missing_snap.volume_content_source = source(Some("no-such-snap"), None);
        cases.push((
            "CreateVolume from a missing snapshot",
            code(ctl.create_volume(from_missing_snap).await),
            Code::NotFound,
        ));
        let mut from_missing_vol = create("x", MIB);
        from_missing_vol.volume_content_source = source(None, Some("no-such-vol"));
        cases.push((
            "CreateVolume from a missing volume",
            code(ctl.create_volume(from_missing_vol).await),
            Code::NotFound,
        ));
        let mut empty_source = create("x", MIB);
        empty_source.volume_content_source = source(Some(""), None);
        cases.push((
            "CreateVolume from an empty snapshot id",
            code(ctl.create_volume(empty_source).await),
            Code::InvalidArgument,
        ));
        let mut too_small_clone = create("x", MIB);
        too_small_clone.volume_content_source = source(Some("snap"), None);
        too_small_clone.capacity_range = Some(csi::CapacityRange {
            required_bytes: MIB,
            limit_bytes: MIB,
        });
        cases.push((
            "CreateVolume from a snapshot bigger than the limit",
            code(ctl.create_volume(too_small_clone).await),
            Code::OutOfRange,
        ));

        // DeleteVolume.
        cases.push((
            "DeleteVolume without an id",
            code(ctl.delete_volume(csi::DeleteVolumeRequest::default()).await),
            Code::InvalidArgument,
        ));
        cases.push((
            "DeleteVolume of a missing volume",
            code(
                ctl.delete_volume(csi::DeleteVolumeRequest {
                    volume_id: "gone".into(),
                    ..Default::default()
                })
                .await,
            ),
            Code::Ok,
        ));

        // ControllerPublishVolume / Unpublish.
        let publish = |vol: &str, node: &str, ro: bool, cap: Option<csi::VolumeCapability>| {
            csi::ControllerPublishVolumeRequest {
                volume_id: vol.into(),
                node_id: node.into(),
                volume_capability: cap,
                readonly: ro,
                ..Default::default()
            }
        };
        let rw = Some(mount_cap("ext4", Mode::SingleNodeWriter));
        cases.push((
            "ControllerPublish without a volume id",
            code(
                ctl.controller_publish_volume(publish("", "node-1", false, rw.clone()))
                    .await,
            ),
            Code::InvalidArgument,
        ));
        cases.push((
            "ControllerPublish without a node id",
            code(
                ctl.controller_publish_volume(publish("vol", "", false, rw.clone()))
                    .await,
            ),
            Code::InvalidArgument,
        ));
        cases.push((
            "ControllerPublish without a capability",
            code(
                ctl.controller_publish_volume(publish("vol", "node-1", false, None))
                    .await,
            ),
            Code::InvalidArgument,
        ));
        cases.push((
            "ControllerPublish of a missing volume",
            code(
                ctl.controller_publish_volume(publish("gone", "node-1", false, rw.clone()))
                    .await,
            ),
            Code::NotFound,
        ));
        cases.push((
            "ControllerPublish to a missing node",
            code(
                ctl.controller_publish_volume(publish("vol", "node-9", false, rw.clone()))
                    .await,
            ),
            Code::NotFound,
        ));
        cases.push((
            "ControllerPublish",
            code(
                ctl.controller_publish_volume(publish("vol", "node-1", false, rw.clone()))
                    .await,
            ),
            Code::Ok,
        ));
        cases.push((
            "ControllerPublish again",
            code(
                ctl.controller_publish_volume(publish("vol", "node-1", false, rw.clone()))
                    .await,
            ),
            Code::Ok,
        ));
        cases.push((
            "ControllerPublish again, read-only",
            code(
                ctl.controller_publish_volume(publish("vol", "node-1", true, rw.clone()))
                    .await,
            ),
            Code::AlreadyExists,
        ));
        cases.push((
            "ControllerPublish writer on a second node",
            code(
                ctl.controller_publish_volume(publish("vol", "node-2", false, rw.clone()))
                    .await,
            ),
            Code::FailedPrecondition,
        ));
        cases.push((
            "ControllerUnpublish without a volume id",
            code(
                ctl.controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest::default())
                    .await,
            ),
            Code::InvalidArgument,
        ));
        cases.push((
            "ControllerUnpublish",
            code(
                ctl.controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
                    volume_id: "vol".into(),
                    node_id: "node-1".into(),
                    ..Default::default()
                })
                .await,
            ),
            Code::Ok,
        ));
        cases.push((
            "ControllerUnpublish again",
            code(
                ctl.controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
                    volume_id: "vol".into(),
                    node_id: "node-1".into(),
                    ..Default::default()
                })
                .await,
            ),
            Code::Ok,
        ));
        cases.push((
            "ControllerUnpublish of a missing volume",
            code(
                ctl.controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
                    volume_id: "gone".into(),
                    node_id: "node-1".into(),
                    ..Default::default()
                })
                .await,
            ),
            Code::Ok,
        ));
        let ro = Some(mount_cap("ext4", Mode::MultiNodeReaderOnly));
        cases.push((
            "ControllerPublish read-only on two nodes (1)",
            code(
                ctl.controller_publish_volume(publish("other", "node-1", true, ro.clone()))
                    .await,
            ),
            Code::Ok,
        ));
        cases.push((
            "ControllerPublish read-only on two nodes (2)",
            code(
                ctl.controller_publish_volume(publish("other", "node-2", true, ro.clone()))
                    .await,
            ),
            Code::Ok,
        ));
        cases.push((
            "ControllerPublish a writer beside readers",
            code(
                ctl.controller_publish_volume(publish("other", "node-2", false, rw.clone()))
                    .await,
            ),
            Code::AlreadyExists,
        ));

        // ValidateVolumeCapabilities.
        let validate =
            |vol: &str, caps: Vec<csi::VolumeCapability>| csi::ValidateVolumeCapabilitiesRequest {
                volume_id: vol.into(),
                volume_capabilities: caps,
                ..Default::default()
            };
        cases.push((
            "ValidateVolumeCapabilities without an id",
            code(
                ctl.validate_volume_capabilities(validate(
                    "",
                    vec![mount_cap("ext4", Mode::SingleNodeWriter)],
                ))
                .await,
            ),
            Code::InvalidArgument,
        ));
        cases.push((
            "ValidateVolumeCapabilities without capabilities",
            code(
                ctl.validate_volume_capabilities(validate("vol", vec![]))
                    .await,
            ),
            Code::InvalidArgument,
        ));
        cases.push((
            "ValidateVolumeCapabilities of a missing volume",
            code(
                ctl.validate_volume_capabilities(validate(
                    "gone",
                    vec![mount_cap("ext4", Mode::SingleNodeWriter)],
                ))
                .await,
            ),
            Code::NotFound,
        ));
        let ok = ctl
            .validate_volume_capabilities(validate(
                "vol",
                vec![
                    mount_cap("ext4", Mode::SingleNodeWriter),
                    block_cap(Mode::SingleNodeReaderOnly),
                ],
            ))
            .await
            .expect("validate")
            .into_inner();
        assert!(
            ok.confirmed.is_some(),
            "supported capabilities are confirmed: {}",
            ok.message
        );
        let no = ctl
            .validate_volume_capabilities(validate(
                "vol",
                vec![mount_cap("ext4", Mode::MultiNodeMultiWriter)],
            ))
            .await
            .expect("validate")
            .into_inner();
        assert!(
            no.confirmed.is_none() && no.message.contains("MULTI_NODE_MULTI_WRITER"),
            "{no:?}"
        );

        // ListVolumes / ListSnapshots paging.
        let list = |max: i32, token: &str| csi::ListVolumesRequest {
            max_entries: max,
            starting_token: token.into(),
        };
        cases.push((
            "ListVolumes negative max_entries",
            code(ctl.list_volumes(list(-1, "")).await),
            Code::InvalidArgument,
        ));
        cases.push((
            "ListVolumes with a bad token",
            code(ctl.list_volumes(list(0, "not-a-token")).await),
            Code::Aborted,
        ));
        let first = ctl
            .list_volumes(list(1, ""))
            .await
            .expect("page 1")
            .into_inner();
        assert_eq!(first.entries.len(), 1);
        assert!(!first.next_token.is_empty());
        let rest = ctl
            .list_volumes(list(0, &first.next_token))
            .await
            .expect("page 2")
            .into_inner();
        let mut ids: Vec<String> = first
            .entries
            .iter()
            .chain(&rest.entries)
            .filter_map(|e| e.volume.as_ref().map(|v| v.volume_id.clone()))
            .collect();
        ids.sort();
        assert_eq!(ids, ["other", "vol"], "pages cover every volume once");
        let published: Vec<String> = rest
            .entries
            .iter()
            .chain(&first.entries)
            .filter(|e| e.volume.as_ref().is_some_and(|v| v.volume_id == "other"))
            .flat_map(|e| {
                e.status
                    .clone()
                    .map(|s| s.published_node_ids)
                    .unwrap_or_default()
            })
            .collect();
        assert_eq!(
            published.len(),
            2,
            "ListVolumes reports where a volume is published: {published:?}"
        );
        let snaps = |id: &str, src: &str, token: &str| csi::ListSnapshotsRequest {
            snapshot_id: id.into(),
            source_volume_id: src.into(),
            starting_token: token.into(),
            ..Default::default()
        };
        cases.push((
            "ListSnapshots with a bad token",
            code(ctl.list_snapshots(snaps("", "", "zz")).await),
            Code::Aborted,
        ));
        assert!(ctl
            .list_snapshots(snaps("no-such", "", ""))
            .await
            .expect("by missing id")
            .into_inner()
            .entries
            .is_empty());
        assert!(ctl
            .list_snapshots(snaps("", "other", ""))
            .await
            .expect("by source")
            .into_inner()
            .entries
            .is_empty());
        assert_eq!(
            ctl.list_snapshots(snaps("snap", "", ""))
                .await
                .expect("by id")
                .into_inner()
                .entries
                .len(),
            1
        );
        assert_eq!(
            ctl.list_snapshots(snaps("", "vol", ""))
                .await
                .expect("by source")
                .into_inner()
                .entries
                .len(),
            1
        );

        // CreateSnapshot / DeleteSnapshot / GetSnapshot.
        let snap = |name: &str, src: &str, p: HashMap<String, String>| csi::CreateSnapshotRequest {
            source_volume_id: src.into(),
            name: name.into(),
            parameters: p,
            ..Default::default()
        };
        cases.push((
            "CreateSnapshot without a name",
            code(ctl.create_snapshot(snap("", "vol", HashMap::new())).await),
            Code::InvalidArgument,
        ));
        cases.push((
            "CreateSnapshot without a source",
            code(ctl.create_snapshot(snap("s2", "", HashMap::new())).await),
            Code::InvalidArgument,
        ));
        cases.push((
            "CreateSnapshot of a missing volume",
            code(
                ctl.create_snapshot(snap("s2", "gone", HashMap::new()))
                    .await,
            ),
            Code::NotFound,
        ));
        cases.push((
            "CreateSnapshot same name, other source",
            code(
                ctl.create_snapshot(snap("snap", "other", HashMap::new()))
                    .await,
            ),
            Code::AlreadyExists,
        ));
        cases.push((
            "CreateSnapshot same name, same source",
            code(
                ctl.create_snapshot(snap("snap", "vol", HashMap::new()))
                    .await,
            ),
            Code::Ok,
        ));
        cases.push((
            "CreateSnapshot with a parameter",
            code(
                ctl.create_snapshot(snap("s2", "vol", params(&[("speed", "fast")])))
                    .await,
            ),
            Code::InvalidArgument,
        ));
        cases.push((
            "GetSnapshot of a missing snapshot",
            code(
                ctl.get_snapshot(csi::GetSnapshotRequest {
                    snapshot_id: "gone".into(),
                    ..Default::default()
                })
                .await,
            ),
            Code::NotFound,
        ));
        cases.push((
            "GetSnapshot",
            code(
                ctl.get_snapshot(csi::GetSnapshotRequest {
                    snapshot_id: "snap".into(),
                    ..Default::default()
                })
                .await,
            ),
            Code::Ok,
        ));
        cases.push((
            "DeleteSnapshot without an id",
            code(
                ctl.delete_snapshot(csi::DeleteSnapshotRequest::default())
                    .await,
            ),
            Code::InvalidArgument,
        ));
        cases.push((
            "DeleteSnapshot of a missing snapshot",
            code(
                ctl.delete_snapshot(csi::DeleteSnapshotRequest {
                    snapshot_id: "gone".into(),
                    ..Default::default()
                })
                .await,
            ),
            Code::Ok,
        ));

        // ControllerExpandVolume / GetVolume / ModifyVolume / GetCapacity.
        let expand = |vol: &str, range: Option<(i64, i64)>| csi::ControllerExpandVolumeRequest {
            volume_id: vol.into(),
            capacity_range: range.map(|(required_bytes, limit_bytes)| csi::CapacityRange {
                required_bytes,
                limit_bytes,
            }),
            ..Default::default()
        };
        cases.push((
            "ControllerExpand without an id",
            code(
                ctl.controller_expand_volume(expand("", Some((MIB, 0))))
                    .await,
            ),
            Code::InvalidArgument,
        ));
        cases.push((
            "ControllerExpand without a range",
            code(ctl.controller_expand_volume(expand("vol", None)).await),
            Code::InvalidArgument,
        ));
        cases.push((
            "ControllerExpand of a missing volume",
            code(
                ctl.controller_expand_volume(expand("gone", Some((MIB, 0))))
                    .await,
            ),
            Code::NotFound,
        ));
        cases.push((
            "ControllerExpand to less (a no-op)",
            code(
                ctl.controller_expand_volume(expand("vol", Some((MIB, 0))))
                    .await,
            ),
            Code::Ok,
        ));
        cases.push((
            "ControllerExpand with a limit below the size",
            code(
                ctl.controller_expand_volume(expand("vol", Some((MIB, 2 * MIB))))
                    .await,
            ),
            Code::OutOfRange,
        ));
        cases.push((
            "ControllerExpand beyond every pool",
            code(
                ctl.controller_expand_volume(expand("vol", Some((1 << 50, 0))))
                    .await,
            ),
            Code::ResourceExhausted,
        ));
        cases.push((
            "ControllerGetVolume without an id",
            code(
                ctl.controller_get_volume(csi::ControllerGetVolumeRequest::default())
                    .await,
            ),
            Code::InvalidArgument,
        ));
        cases.push((
            "ControllerGetVolume of a missing volume",
            code(
                ctl.controller_get_volume(csi::ControllerGetVolumeRequest {
                    volume_id: "gone".into(),
                })
                .await,
            ),
            Code::NotFound,
        ));
        let modify = |vol: &str, p: HashMap<String, String>| csi::ControllerModifyVolumeRequest {
            volume_id: vol.into(),
            mutable_parameters: p,
            ..Default::default()
        };
        cases.push((
            "ControllerModify without an id",
            code(
                ctl.controller_modify_volume(modify("", params(&[("tier", "premium")])))
                    .await,
            ),
            Code::InvalidArgument,
        ));
        cases.push((
            "ControllerModify without parameters",
            code(
                ctl.controller_modify_volume(modify("vol", HashMap::new()))
                    .await,
            ),
            Code::InvalidArgument,
        ));
        cases.push((
            "ControllerModify an immutable parameter",
            code(
                ctl.controller_modify_volume(modify("vol", params(&[("fsType", "xfs")])))
                    .await,
            ),
            Code::InvalidArgument,
        ));
        cases.push((
            "ControllerModify of a missing volume",
            code(
                ctl.controller_modify_volume(modify("gone", params(&[("tier", "premium")])))
                    .await,
            ),
            Code::NotFound,
        ));
        cases.push((
            "ControllerModify to premium",
            code(
                ctl.controller_modify_volume(modify("vol", params(&[("tier", "premium")])))
                    .await,
            ),
            Code::Ok,
        ));
        let v = ctl
            .controller_get_volume(csi::ControllerGetVolumeRequest {
                volume_id: "vol".into(),
            })
            .await
            .expect("get")
            .into_inner();
        assert_eq!(
            v.volume
                .expect("volume")
                .volume_context
                .get("tier")
                .map(String::as_str),
            Some("premium"),
            "the tier changed"
        );
        let cap = ctl
            .get_capacity(csi::GetCapacityRequest::default())
            .await
            .expect("capacity")
            .into_inner();
        assert!(
            cap.available_capacity > 0 && cap.maximum_volume_size.is_some_and(|m| m > 0),
            "{cap:?}"
        );
        let none = ctl
            .get_capacity(csi::GetCapacityRequest {
                volume_capabilities: vec![mount_cap("ext4", Mode::MultiNodeMultiWriter)],
                ..Default::default()
            })
            .await
            .expect("capacity")
            .into_inner();
        assert_eq!(
            none.available_capacity, 0,
            "no room for what Berth cannot serve"
        );
        cases.push((
            "GetCapacity with a bad parameter",
            code(
                ctl.get_capacity(csi::GetCapacityRequest {
                    parameters: params(&[("tier", "gold")]),
                    ..Default::default()
                })
                .await,
            ),
            Code::InvalidArgument,
        ));

        // A volume with a clone or snapshot behind it, and deletes.
        cases.push((
            "DeleteSnapshot",
            code(
                ctl.delete_snapshot(csi::DeleteSnapshotRequest {
                    snapshot_id: "snap".into(),
                    ..Default::default()
                })
                .await,
            ),
            Code::Ok,
        ));
        cases.push((
            "DeleteVolume of a published volume",
            code(
                ctl.delete_volume(csi::DeleteVolumeRequest {
                    volume_id: "other".into(),
                    ..Default::default()
                })
                .await,
            ),
            Code::FailedPrecondition,
        ));
        check(cases);
    });
    assert_eq!(s.stop().code(), Some(0));
}

#[test]
fn node_rpcs_answer_the_codes_the_spec_prescribes() {
    if let Err(why) = node_support() {
        eprintln!("SKIP: {why}");
        return;
    }
    let root = tempfile::tempdir().expect("tmp");
    let _cleanup = Cleanup {
        root: root.path().to_path_buf(),
    };
    let s = Standalone::start(&root.path().join("data"), "1G");
    let sock = s.socket("csi_socket");
    let staging = root.path().join("staging/v");
    let target = root.path().join("pods/p/mount");
    let st = staging.display().to_string();
    let tg = target.display().to_string();
    rt().block_on(async {
        let mut c = Csi::connect(&sock).await;
        c.controller
            .create_volume(create("v", 64 * MIB))
            .await
            .expect("create");
        let rw = mount_cap("ext4", Mode::SingleNodeWriter);
        let ctx = c.publish("v", "node-1", &rw).await;
        let node = &mut c.node;
        let stage =
            |vol: &str,
             path: &str,
             cap: Option<csi::VolumeCapability>,
             ctx: HashMap<String, String>| csi::NodeStageVolumeRequest {
                volume_id: vol.into(),
                publish_context: ctx,
                staging_target_path: path.into(),
                volume_capability: cap,
                ..Default::default()
            };
        let publish = |vol: &str,
                       staging: &str,
                       target: &str,
                       cap: Option<csi::VolumeCapability>,
                       ro: bool| csi::NodePublishVolumeRequest {
            volume_id: vol.into(),
            staging_target_path: staging.into(),
            target_path: target.into(),
            volume_capability: cap,
            readonly: ro,
            ..Default::default()
        };
        let unpublish = |vol: &str, target: &str| csi::NodeUnpublishVolumeRequest {
            volume_id: vol.into(),
            target_path: target.into(),
        };
        let unstage = |vol: &str, path: &str| csi::NodeUnstageVolumeRequest {
            volume_id: vol.into(),
            staging_target_path: path.into(),
        };
        let stats = |vol: &str, path: &str| csi::NodeGetVolumeStatsRequest {
            volume_id: vol.into(),
            volume_path: path.into(),
            ..Default::default()
        };
        let expand = |vol: &str, path: &str| csi::NodeExpandVolumeRequest {
            volume_id: vol.into(),
            volume_path: path.into(),
            ..Default::default()
        };
        let some = Some(rw.clone());
        let mut cases = vec![
            (
                "NodeStage without a volume id",
                code(
                    node.node_stage_volume(stage("", &st, some.clone(), ctx.clone()))
                        .await,
                ),
                Code::InvalidArgument,
            ),
            (
                "NodeStage with a path-like id",
                code(
                    node.node_stage_volume(stage("../v", &st, some.clone(), ctx.clone()))
                        .await,
                ),
                Code::InvalidArgument,
            ),
            (
                "NodeStage without a staging path",
                code(
                    node.node_stage_volume(stage("v", "", some.clone(), ctx.clone()))
                        .await,
                ),
                Code::InvalidArgument,
            ),
            (
                "NodeStage without a capability",
                code(
                    node.node_stage_volume(stage("v", &st, None, ctx.clone()))
                        .await,
                ),
                Code::InvalidArgument,
            ),
            (
                "NodeStage without a publish context",
                code(
                    node.node_stage_volume(stage("v", &st, some.clone(), HashMap::new()))
                        .await,
                ),
                Code::FailedPrecondition,
            ),
            (
                "NodePublish before NodeStage",
                code(
                    node.node_publish_volume(publish("v", &st, &tg, some.clone(), false))
                        .await,
                ),
                Code::FailedPrecondition,
            ),
            (
                "NodeUnstage of what is not staged",
                code(node.node_unstage_volume(unstage("v", &st)).await),
                Code::Ok,
            ),
            (
                "NodeGetVolumeStats of what is not staged",
                code(node.node_get_volume_stats(stats("v", &st)).await),
                Code::NotFound,
            ),
            (
                "NodeExpand of what is not staged",
                code(node.node_expand_volume(expand("v", &st)).await),
                Code::NotFound,
            ),
            // csi-sanity's "volume not found" cases: a volume that does not
            // exist, with a relative path. Existence comes first.
            (
                "NodeGetVolumeStats of a missing volume at a relative path",
                code(
                    node.node_get_volume_stats(stats("sanity-missing", "some/path"))
                        .await,
                ),
                Code::NotFound,
            ),
            (
                "NodeExpand of a missing volume at a relative path",
                code(
                    node.node_expand_volume(expand("sanity-missing", "some/path"))
                        .await,
                ),
                Code::NotFound,
            ),
            (
                "NodeGetVolumeStats without a volume id",
                code(node.node_get_volume_stats(stats("", "some/path")).await),
                Code::InvalidArgument,
            ),
            (
                "NodeExpand without a volume id",
                code(node.node_expand_volume(expand("", "some/path")).await),
                Code::InvalidArgument,
            ),
            (
                "NodeStage",
                code(
                    node.node_stage_volume(stage("v", &st, some.clone(), ctx.clone()))
                        .await,
                ),
                Code::Ok,
            ),
            (
                "NodeStage again",
                code(
                    node.node_stage_volume(stage("v", &st, some.clone(), ctx.clone()))
                        .await,
                ),
                Code::Ok,
            ),
            (
                "NodeStage again at another path",
                code(
                    node.node_stage_volume(stage(
                        "v",
                        &format!("{st}-2"),
                        some.clone(),
                        ctx.clone(),
                    ))
                    .await,
                ),
                Code::AlreadyExists,
            ),
            (
                "NodeStage again as xfs",
                code(
                    node.node_stage_volume(stage(
                        "v",
                        &st,
                        Some(mount_cap("xfs", Mode::SingleNodeWriter)),
                        ctx.clone(),
                    ))
                    .await,
                ),
                Code::AlreadyExists,
            ),
            (
                "NodePublish without a target",
                code(
                    node.node_publish_volume(publish("v", &st, "", some.clone(), false))
                        .await,
                ),
                Code::InvalidArgument,
            ),
            (
                "NodePublish without a staging path",
                code(
                    node.node_publish_volume(publish("v", "", &tg, some.clone(), false))
                        .await,
                ),
                Code::InvalidArgument,
            ),
            (
                "NodePublish without a capability",
                code(
                    node.node_publish_volume(publish("v", &st, &tg, None, false))
                        .await,
                ),
                Code::InvalidArgument,
            ),
            (
                "NodePublish as a block device",
                code(
                    node.node_publish_volume(publish(
                        "v",
                        &st,
                        &tg,
                        Some(block_cap(Mode::SingleNodeWriter)),
                        false,
                    ))
                    .await,
                ),
                Code::FailedPrecondition,
            ),
            (
                "NodePublish",
                code(
                    node.node_publish_volume(publish("v", &st, &tg, some.clone(), false))
                        .await,
                ),
                Code::Ok,
            ),
            (
                "NodePublish again",
                code(
                    node.node_publish_volume(publish("v", &st, &tg, some.clone(), false))
                        .await,
                ),
                Code::Ok,
            ),
            (
                "NodePublish again, read-only",
                code(
                    node.node_publish_volume(publish("v", &st, &tg, some.clone(), true))
                        .await,
                ),
                Code::AlreadyExists,
            ),
            (
                "NodeGetVolumeStats without a path",
                code(node.node_get_volume_stats(stats("v", "")).await),
                Code::InvalidArgument,
            ),
            (
                "NodeGetVolumeStats of a missing path",
                code(
                    node.node_get_volume_stats(stats("v", "/nonexistent/berth"))
                        .await,
                ),
                Code::NotFound,
            ),
            // csi-sanity's "volume does not exist on the specified path".
            (
                "NodeGetVolumeStats at a relative path",
                code(node.node_get_volume_stats(stats("v", "some/path")).await),
                Code::NotFound,
            ),
            (
                "NodeGetVolumeStats",
                code(node.node_get_volume_stats(stats("v", &tg)).await),
                Code::Ok,
            ),
            (
                "NodeExpand without a path",
                code(node.node_expand_volume(expand("v", "")).await),
                Code::InvalidArgument,
            ),
            (
                "NodeUnstage while published",
                code(node.node_unstage_volume(unstage("v", &st)).await),
                Code::FailedPrecondition,
            ),
            (
                "NodeUnpublish without a target",
                code(node.node_unpublish_volume(unpublish("v", "")).await),
                Code::InvalidArgument,
            ),
            (
                "NodeUnpublish",
                code(node.node_unpublish_volume(unpublish("v", &tg)).await),
                Code::Ok,
            ),
            (
                "NodeUnpublish again",
                code(node.node_unpublish_volume(unpublish("v", &tg)).await),
                Code::Ok,
            ),
            (
                "NodeUnstage at another path",
                code(node.node_unstage_volume(unstage("v", "/elsewhere")).await),
                Code::FailedPrecondition,
            ),
            (
                "NodeUnstage",
                code(node.node_unstage_volume(unstage("v", &st)).await),
                Code::Ok,
            ),
            (
                "NodeUnstage again",
                code(node.node_unstage_volume(unstage("v", &st)).await),
                Code::Ok,
            ),
        ];
        let read_only_blank = c
            .node
            .node_stage_volume(stage(
                "v",
                &st,
                Some(mount_cap("xfs", Mode::SingleNodeReaderOnly)),
                ctx.clone(),
            ))
            .await;
        // The volume holds the ext4 made above: asking for xfs is refused,
        // never reformatted.
        cases.push((
            "NodeStage asking for another filesystem",
            code(read_only_blank),
            Code::FailedPrecondition,
        ));
        check(cases);
    });
    // That NodeStage attached the volume and detached it again; its attach
    // log is kept (the stage failed) and holds that one attachment (the clean
    // NodeUnstage before removed the earlier ones'). The attach process
    // unmounted its FUSE mount once: no failed second unmount is logged.
    let log_path = root.path().join("data/csi-node/attach/v.log");
    let log = std::fs::read_to_string(&log_path)
        .unwrap_or_else(|e| panic!("{}: {e}", log_path.display()));
    let complaints: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .filter(|l| l.to_lowercase().contains("mount"))
        .collect();
    assert!(
        complaints.is_empty(),
        "the detach logged {complaints:?}:\n{log}"
    );
    assert_eq!(s.stop().code(), Some(0));
}

/// Concurrent calls on one volume: the first works, the others are told
/// ABORTED at once; afterwards the volume is in one consistent state.
#[test]
fn concurrent_calls_on_one_volume_are_aborted_not_queued() {
    if let Err(why) = node_support() {
        eprintln!("SKIP: {why}");
        return;
    }
    let root = tempfile::tempdir().expect("tmp");
    let _cleanup = Cleanup {
        root: root.path().to_path_buf(),
    };
    let s = Standalone::start(&root.path().join("data"), "1G");
    let sock = s.socket("csi_socket");
    let staging = root.path().join("staging/v").display().to_string();
    rt().block_on(async {
        let c = Csi::connect(&sock).await;
        c.controller
            .clone()
            .create_volume(create("v", 64 * MIB))
            .await
            .expect("create");
        let cap = mount_cap("ext4", Mode::SingleNodeWriter);
        let ctx = c
            .controller
            .clone()
            .controller_publish_volume(csi::ControllerPublishVolumeRequest {
                volume_id: "v".into(),
                node_id: "node-1".into(),
                volume_capability: Some(cap.clone()),
                ..Default::default()
            })
            .await
            .expect("publish")
            .into_inner()
            .publish_context;
        // NodeStage attaches, makes a filesystem and mounts: long enough for
        // the others, sent at the same moment, to find it busy.
        let req = csi::NodeStageVolumeRequest {
            volume_id: "v".into(),
            publish_context: ctx,
            staging_target_path: staging.clone(),
            volume_capability: Some(cap),
            ..Default::default()
        };
        let calls: Vec<_> = (0..4)
            .map(|_| {
                let mut n = c.node.clone();
                let r = req.clone();
                tokio::spawn(async move { code(n.node_stage_volume(r).await) })
            })
            .collect();
        let mut codes = Vec::new();
        for t in calls {
            codes.push(t.await.expect("join"));
        }
        let ok = codes.iter().filter(|c| **c == Code::Ok).count();
        let aborted = codes.iter().filter(|c| **c == Code::Aborted).count();
        assert!(
            ok >= 1 && aborted >= 1 && ok + aborted == codes.len(),
            "{codes:?}"
        );
        // Staged once: a retry is an idempotent success, and one unstage
        // releases it all.
        assert_eq!(code(c.node.clone().node_stage_volume(req).await), Code::Ok);
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
        assert_eq!(
            mounts.lines().filter(|l| l.contains(&staging)).count(),
            1,
            "mounted once"
        );
        c.node
            .clone()
            .node_unstage_volume(csi::NodeUnstageVolumeRequest {
                volume_id: "v".into(),
                staging_target_path: staging.clone(),
            })
            .await
            .expect("unstage");

        // The same on the controller side: deletes racing a snapshot of the
        // volume being created... any mix must end consistent.
        let mut ctl = c.controller.clone();
        ctl.controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
            volume_id: "v".into(),
            node_id: "node-1".into(),
            ..Default::default()
        })
        .await
        .expect("unpublish");
        let deletes: Vec<_> = (0..4)
            .map(|_| {
                let mut ctl = c.controller.clone();
                tokio::spawn(async move {
                    code(
                        ctl.delete_volume(csi::DeleteVolumeRequest {
                            volume_id: "v".into(),
                            ..Default::default()
                        })
                        .await,
                    )
                })
            })
            .collect();
        let mut codes = Vec::new();
        for t in deletes {
            codes.push(t.await.expect("join"));
        }
        assert!(
            codes.iter().all(|c| matches!(c, Code::Ok | Code::Aborted)),
            "{codes:?}"
        );
        assert!(codes.contains(&Code::Ok), "{codes:?}");
        assert_eq!(
            code(
                ctl.delete_volume(csi::DeleteVolumeRequest {
                    volume_id: "v".into(),
                    ..Default::default()
                })
                .await
            ),
            Code::Ok
        );
        assert_eq!(
            code(
                ctl.controller_get_volume(csi::ControllerGetVolumeRequest {
                    volume_id: "v".into()
                })
                .await
            ),
            Code::NotFound,
            "deleted once and for all"
        );
    });
    assert_eq!(s.stop().code(), Some(0));
}

/// A call's code (Ok for success) and the length of its error message.
fn outcome<T>(r: Result<T, tonic::Status>) -> (Code, usize) {
    match r {
        Ok(_) => (Code::Ok, 0),
        Err(s) => (s.code(), s.message().len()),
    }
}

/// Hostile input from outside, through the real CSI socket of `berth
/// standalone`: names, StorageClass parameters, sizes and kubelet's paths.
/// Every case is INVALID_ARGUMENT or OUT_OF_RANGE (NOT_FOUND for the node
/// calls on a volume not staged here), nothing is created, no error message
/// echoes more than a short quote, and the audit log stays bounded.
#[test]
fn hostile_names_parameters_sizes_and_paths_are_refused() {
    let root = tempfile::tempdir().expect("tmp");
    let s = Standalone::start(&root.path().join("data"), "1G");
    let sock = s.socket("csi_socket");
    // 1 MiB: past every validator's bound, under gRPC's 4 MiB message limit
    // (which refuses larger requests itself, with OUT_OF_RANGE).
    let huge = "v".repeat(1 << 20);
    let bad_names: Vec<String> = [
        "",
        ".",
        "..",
        "../etc",
        "a/b",
        "a\\b",
        ".hidden",
        "-rf",
        "a b",
        "a\tb",
        "a\nb",
        "a\0b",
        "a\u{7f}",
        "caf\u{e9}",
        "a\u{200b}b",
        "db@token",
        "a:b",
        "%2e%2e",
        "a#b",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([&"a".repeat(129), &huge].map(String::clone))
    .collect();
    let long_path = format!("/{}", "p".repeat(5000));
    let bad_paths = [
        "relative/dir",
        "/var/lib/kubelet/../../etc",
        "/a/./b",
        "/a\0b",
        "/a\nb",
        "/tmp/-o",
        "--bind",
        long_path.as_str(),
    ];
    rt().block_on(async {
        let mut c = Csi::connect(&sock).await;
        c.controller
            .create_volume(create("vol", 64 * MIB))
            .await
            .expect("vol");
        let mut cases: Vec<(String, Code, Code, usize)> = Vec::new();
        let mut push = |what: String, (got, len): (Code, usize), want: Code| {
            cases.push((what, got, want, len));
        };
        let q = berth_proto::validate::quote;
        for n in &bad_names {
            let r = c.controller.create_volume(create(n, MIB)).await;
            push(
                format!("CreateVolume name {}", q(n)),
                outcome(r),
                Code::InvalidArgument,
            );
            let r = c
                .controller
                .create_snapshot(csi::CreateSnapshotRequest {
                    source_volume_id: "vol".into(),
                    name: n.clone(),
                    ..Default::default()
                })
                .await;
            push(
                format!("CreateSnapshot name {}", q(n)),
                outcome(r),
                Code::InvalidArgument,
            );
            if !n.is_empty() {
                let r = c
                    .node
                    .node_stage_volume(csi::NodeStageVolumeRequest {
                        volume_id: n.clone(),
                        staging_target_path: "/var/lib/kubelet/staging/x".into(),
                        volume_capability: Some(mount_cap("ext4", Mode::SingleNodeWriter)),
                        ..Default::default()
                    })
                    .await;
                push(
                    format!("NodeStage volume_id {}", q(n)),
                    outcome(r),
                    Code::InvalidArgument,
                );
            }
        }
        let big_value = "9".repeat(2000);
        for (k, v) in [
            ("tier", "gold"),
            ("tier", "../extreme"),
            ("maxIops", "-1"),
            ("maxIops", "1e99"),
            ("maxIops", "18446744073709551616"),
            ("maxIops", big_value.as_str()),
            ("maxMBps", "lots"),
            ("iopsPerGiB", "NaN"),
            ("burstSeconds", "NaN"),
            ("burstSeconds", "inf"),
            ("burstSeconds", "0"),
            ("burstSeconds", "3601"),
            ("fsType", "../ext4"),
            ("fsType", "ntfs"),
            ("fsType", "ext4\n"),
            ("replicas", "4"),
            ("replicas", "two"),
            ("speed", "fast"),
            ("", "x"),
            ("tier\0", "standard"),
        ] {
            let mut r = create("pvol", MIB);
            r.parameters = params(&[(k, v)]);
            let got = c.controller.create_volume(r).await;
            push(
                format!("parameter {}={}", q(k), q(v)),
                outcome(got),
                Code::InvalidArgument,
            );
        }
        let mut many = create("pvol", MIB);
        many.parameters = (0..100)
            .map(|i| (format!("csi.storage.k8s.io/x{i}"), "v".into()))
            .collect();
        let got = c.controller.create_volume(many).await;
        push("100 parameters".into(), outcome(got), Code::InvalidArgument);
        for (what, required, limit, want) in [
            ("negative size", -1, 0, Code::InvalidArgument),
            ("limit below required", 10 * MIB, MIB, Code::OutOfRange),
            ("i64::MAX bytes", i64::MAX, 0, Code::OutOfRange),
            ("i64::MAX - 1 bytes", i64::MAX - 1, 0, Code::OutOfRange),
            ("2^60 + 1 bytes", (1 << 60) + 1, 0, Code::OutOfRange),
        ] {
            let mut r = create("svol", 0);
            r.capacity_range = Some(csi::CapacityRange {
                required_bytes: required,
                limit_bytes: limit,
            });
            let got = c.controller.create_volume(r).await;
            push(format!("CreateVolume {what}"), outcome(got), want);
        }
        let got = c
            .controller
            .controller_expand_volume(csi::ControllerExpandVolumeRequest {
                volume_id: "vol".into(),
                capacity_range: Some(csi::CapacityRange {
                    required_bytes: i64::MAX,
                    limit_bytes: 0,
                }),
                ..Default::default()
            })
            .await;
        push(
            "ControllerExpand to i64::MAX".into(),
            outcome(got),
            Code::OutOfRange,
        );
        for p in bad_paths {
            let cap = Some(mount_cap("ext4", Mode::SingleNodeWriter));
            let r = c
                .node
                .node_stage_volume(csi::NodeStageVolumeRequest {
                    volume_id: "vol".into(),
                    staging_target_path: p.into(),
                    volume_capability: cap.clone(),
                    ..Default::default()
                })
                .await;
            push(
                format!("NodeStage path {}", q(p)),
                outcome(r),
                Code::InvalidArgument,
            );
            let r = c
                .node
                .node_publish_volume(csi::NodePublishVolumeRequest {
                    volume_id: "vol".into(),
                    staging_target_path: "/var/lib/kubelet/staging/vol".into(),
                    target_path: p.into(),
                    volume_capability: cap,
                    ..Default::default()
                })
                .await;
            push(
                format!("NodePublish target {}", q(p)),
                outcome(r),
                Code::InvalidArgument,
            );
            let r = c
                .node
                .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                    volume_id: "vol".into(),
                    target_path: p.into(),
                })
                .await;
            push(
                format!("NodeUnpublish target {}", q(p)),
                outcome(r),
                Code::InvalidArgument,
            );
            let r = c
                .node
                .node_unstage_volume(csi::NodeUnstageVolumeRequest {
                    volume_id: "vol".into(),
                    staging_target_path: p.into(),
                })
                .await;
            push(
                format!("NodeUnstage path {}", q(p)),
                outcome(r),
                Code::InvalidArgument,
            );
            let r = c
                .node
                .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
                    volume_id: "vol".into(),
                    volume_path: p.into(),
                    ..Default::default()
                })
                .await;
            // "vol" is not staged on this node: NOT_FOUND, whatever the
            // path (the spec's order, which csi-sanity checks with a
            // relative path). The path is never touched.
            push(
                format!("NodeGetVolumeStats path {}", q(p)),
                outcome(r),
                Code::NotFound,
            );
            let r = c
                .node
                .node_expand_volume(csi::NodeExpandVolumeRequest {
                    volume_id: "vol".into(),
                    volume_path: p.into(),
                    ..Default::default()
                })
                .await;
            push(
                format!("NodeExpand path {}", q(p)),
                outcome(r),
                Code::NotFound,
            );
        }
        let bad: Vec<String> = cases
            .iter()
            .filter(|(_, got, want, len)| got != want || *len > 1000)
            .map(|(what, got, want, len)| {
                format!("{what}: got {got:?} ({len}-byte message), want {want:?}")
            })
            .collect();
        assert!(
            bad.is_empty(),
            "{} of {} cases:\n{}",
            bad.len(),
            cases.len(),
            bad.join("\n")
        );
        eprintln!("{} hostile-input cases refused", cases.len());
    });
    // Nothing was created, and no audit entry holds the 1 MiB name.
    let vols = s.ctl(&["volume", "list"]);
    let names: Vec<&str> = vols
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|v| v["id"].as_str())
        .collect();
    assert_eq!(names, ["vol"], "{vols}");
    let audit = s.ctl(&["audit", "list", "--limit", "10000"]);
    let longest = audit
        .as_array()
        .expect("array")
        .iter()
        .map(|e| e.to_string().len())
        .max()
        .unwrap_or(0);
    assert!(longest < 10_000, "an audit entry of {longest} bytes");
}
