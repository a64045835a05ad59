//! Every manifest in `deploy/*.yaml`, checked the way a cluster and Berth's
//! programs would read it, so that a typo fails here instead of in a cluster.
//!
//! - Each YAML document is dispatched on apiVersion + kind into its
//!   `k8s-openapi` type (or, for the CRDs VolumeSnapshotClass and
//!   cert-manager's Issuer and Certificate, a local type that refuses
//!   unknown fields); an unknown kind is an error.
//! - `k8s-openapi` ignores fields it does not know, so a misspelled key would
//!   deserialize silently: each object is serialized back and compared with
//!   the document, and a key the round trip lost (or a required one it had
//!   to invent) is reported with its path. Values the types keep as plain
//!   strings but the API server only accepts from a list (mountPropagation,
//!   hostPath types, binding modes...) are checked against that list.
//! - References between objects resolve: ServiceAccounts, Roles and
//!   ClusterRoles of bindings, ConfigMaps of volumes and the files read from
//!   them, volume mounts, Services of the StatefulSet and of the metadata
//!   address, the CSI socket shared with the sidecars, kubelet's
//!   registration path, the seccomp profile; driver names equal
//!   `berth_csi::DRIVER_NAME`.
//! - Berth containers name a real `berth` subcommand and only the flags and
//!   environment variables it accepts, read from `cli/src/bin/berth.rs`
//!   itself; `$(VAR)` references are defined.
//! - StorageClass and VolumeAttributesClass parameters are resolved by the
//!   metadata service's own parser against the tiers ConfigMap.
//! - Mutual TLS: cert-manager's objects live in `11-certificates.yaml` only
//!   (the file a cluster without cert-manager skips) and form one CA that
//!   issues every program's certificate; every Berth program that talks
//!   over TCP gets `--tls-dir` (or `BERTH_TLS_DIR`) at a read-only mount of
//!   a Secret one of those Certificates makes, readable by the container's
//!   user and nobody else; every address of a Service here is `https://`,
//!   and the server's certificate carries the name its clients dial (the
//!   volume servers', `berth_proto::tls::VOLUME_SERVER_NAME`, read from
//!   `proto/src/tls.rs`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::str::FromStr;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, Namespace, PersistentVolumeClaim, PodTemplateSpec, Service,
    ServiceAccount,
};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::api::storage::v1::{CSIDriver, StorageClass, VolumeAttributesClass};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Where every namespaced object lives.
const NAMESPACE: &str = "berth-system";

/// The certificate people give berthctl (deploy/README.md shows how to
/// make it), which no Berth container uses: the one name an allow-list may
/// hold beside the Certificates here.
const ADMIN_CERT: &str = "berth-admin";

/// The one file of cert-manager objects, which a cluster without
/// cert-manager skips (its Secrets then come from `berthctl tls generate`).
const CERTIFICATES_FILE: &str = "11-certificates.yaml";

/// Key usages every program's certificate needs: each is a server (its
/// listeners) and a client (what it dials) of the others.
const TLS_USAGES: &[&str] = &[
    "server auth",
    "client auth",
    "digital signature",
    "key encipherment",
];

/// The one image of every Berth program, tagged with the workspace's version.
fn berth_image() -> String {
    format!("ghcr.io/berth-storage/berth:{}", env!("CARGO_PKG_VERSION"))
}

fn deploy_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

// ---- loading ----------------------------------------------------------------

/// One YAML document of a manifest file, as JSON.
#[derive(Debug, Clone)]
struct Doc {
    /// "05-csi-controller.yaml, document 1 (Deployment berth-csi-controller)".
    at: String,
    value: Value,
}

/// Every non-empty document of every `deploy/*.yaml`, in file order.
fn load_docs() -> Vec<Doc> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy_dir())
        .expect("read deploy/")
        .map(|e| e.expect("deploy/ entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no manifests in deploy/");
    let mut docs = Vec::new();
    for file in files {
        let name = file
            .file_name()
            .expect("file name")
            .to_string_lossy()
            .into_owned();
        let text = std::fs::read_to_string(&file).expect("read manifest");
        docs.extend(parse_docs(&name, &text).unwrap_or_else(|e| panic!("{e}")));
    }
    docs
}

/// The documents of one file. Comment-only documents are skipped.
fn parse_docs(file: &str, text: &str) -> Result<Vec<Doc>, String> {
    let mut docs = Vec::new();
    for (i, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let yaml = serde_yaml::Value::deserialize(de)
            .map_err(|e| format!("{file}, document {}: not YAML: {e}", i + 1))?;
        if yaml.is_null() {
            continue;
        }
        let value = serde_json::to_value(&yaml)
            .map_err(|e| format!("{file}, document {}: not JSON-like: {e}", i + 1))?;
        let kind = value["kind"].as_str().unwrap_or("?");
        let name = value["metadata"]["name"].as_str().unwrap_or("?");
        docs.push(Doc {
            at: format!("{file}, document {} ({kind} {name})", i + 1),
            value,
        });
    }
    Ok(docs)
}

// ---- typed objects and the round trip --------------------------------------

/// The VolumeSnapshotClass CRD (snapshot.storage.k8s.io/v1), which
/// `k8s-openapi` does not have: its fields as the CRD defines them, and no
/// others.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct VolumeSnapshotClass {
    api_version: String,
    kind: String,
    metadata: ObjectMeta,
    driver: String,
    deletion_policy: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    parameters: Option<BTreeMap<String, String>>,
}

/// cert-manager's Issuer (cert-manager.io/v1), which `k8s-openapi` does not
/// have: the two issuer types Berth uses, `selfSigned` and `ca`, with the
/// fields the CRD gives them. Another type (acme, vault...) is refused as an
/// unknown field: teach this test it if the manifests ever need one.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Issuer {
    api_version: String,
    kind: String,
    metadata: ObjectMeta,
    spec: IssuerSpec,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct IssuerSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    self_signed: Option<SelfSignedIssuer>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ca: Option<CaIssuer>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct SelfSignedIssuer {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    crl_distribution_points: Option<Vec<String>>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct CaIssuer {
    secret_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    crl_distribution_points: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ocsp_servers: Option<Vec<String>>,
    #[serde(
        default,
        rename = "issuingCertificateURLs",
        skip_serializing_if = "Option::is_none"
    )]
    issuing_certificate_urls: Option<Vec<String>>,
}

/// cert-manager's Certificate (cert-manager.io/v1): the fields of its CRD
/// that a Secret for `--tls-dir` can need, and no others (keystores, other
/// names, name constraints... are refused: add them here when the manifests
/// use them).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Certificate {
    api_version: String,
    kind: String,
    metadata: ObjectMeta,
    spec: CertificateSpec,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct CertificateSpec {
    secret_name: String,
    issuer_ref: IssuerRef,
    #[serde(default, rename = "isCA", skip_serializing_if = "Option::is_none")]
    is_ca: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    common_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    dns_names: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ip_addresses: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    uris: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    email_addresses: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    duration: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    renew_before: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    usages: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    private_key: Option<CertificatePrivateKey>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    secret_template: Option<CertificateSecretTemplate>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    revision_history_limit: Option<i32>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct IssuerRef {
    name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    group: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct CertificatePrivateKey {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    algorithm: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    size: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    encoding: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rotation_policy: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct CertificateSecretTemplate {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    labels: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    annotations: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Clone)]
enum Object {
    Namespace(Namespace),
    ServiceAccount(ServiceAccount),
    ConfigMap(ConfigMap),
    Service(Service),
    ClusterRole(ClusterRole),
    ClusterRoleBinding(ClusterRoleBinding),
    Role(Role),
    RoleBinding(RoleBinding),
    Deployment(Deployment),
    DaemonSet(DaemonSet),
    StatefulSet(StatefulSet),
    CsiDriver(CSIDriver),
    StorageClass(StorageClass),
    VolumeAttributesClass(VolumeAttributesClass),
    VolumeSnapshotClass(VolumeSnapshotClass),
    Issuer(Issuer),
    Certificate(Certificate),
}

#[derive(Debug, Clone)]
struct Manifest {
    at: String,
    object: Object,
}

impl Object {
    fn metadata(&self) -> &ObjectMeta {
        match self {
            Object::Namespace(o) => &o.metadata,
            Object::ServiceAccount(o) => &o.metadata,
            Object::ConfigMap(o) => &o.metadata,
            Object::Service(o) => &o.metadata,
            Object::ClusterRole(o) => &o.metadata,
            Object::ClusterRoleBinding(o) => &o.metadata,
            Object::Role(o) => &o.metadata,
            Object::RoleBinding(o) => &o.metadata,
            Object::Deployment(o) => &o.metadata,
            Object::DaemonSet(o) => &o.metadata,
            Object::StatefulSet(o) => &o.metadata,
            Object::CsiDriver(o) => &o.metadata,
            Object::StorageClass(o) => &o.metadata,
            Object::VolumeAttributesClass(o) => &o.metadata,
            Object::VolumeSnapshotClass(o) => &o.metadata,
            Object::Issuer(o) => &o.metadata,
            Object::Certificate(o) => &o.metadata,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Object::Namespace(_) => "Namespace",
            Object::ServiceAccount(_) => "ServiceAccount",
            Object::ConfigMap(_) => "ConfigMap",
            Object::Service(_) => "Service",
            Object::ClusterRole(_) => "ClusterRole",
            Object::ClusterRoleBinding(_) => "ClusterRoleBinding",
            Object::Role(_) => "Role",
            Object::RoleBinding(_) => "RoleBinding",
            Object::Deployment(_) => "Deployment",
            Object::DaemonSet(_) => "DaemonSet",
            Object::StatefulSet(_) => "StatefulSet",
            Object::CsiDriver(_) => "CSIDriver",
            Object::StorageClass(_) => "StorageClass",
            Object::VolumeAttributesClass(_) => "VolumeAttributesClass",
            Object::VolumeSnapshotClass(_) => "VolumeSnapshotClass",
            Object::Issuer(_) => "Issuer",
            Object::Certificate(_) => "Certificate",
        }
    }

    fn namespaced(&self) -> bool {
        matches!(
            self,
            Object::ServiceAccount(_)
                | Object::ConfigMap(_)
                | Object::Service(_)
                | Object::Role(_)
                | Object::RoleBinding(_)
                | Object::Deployment(_)
                | Object::DaemonSet(_)
                | Object::StatefulSet(_)
                | Object::Issuer(_)
                | Object::Certificate(_)
        )
    }

    fn name(&self) -> &str {
        self.metadata().name.as_deref().unwrap_or("")
    }
}

/// Deserializes `doc` as a `T`, serializes it back and reports what the
/// round trip changed.
fn round_trip<T: DeserializeOwned + Serialize>(doc: &Value) -> Result<(T, Vec<String>), String> {
    let typed: T = serde_json::from_value(doc.clone()).map_err(|e| e.to_string())?;
    let back = serde_json::to_value(&typed).map_err(|e| e.to_string())?;
    let mut problems = Vec::new();
    compare(doc, &back, "", &mut problems);
    Ok((typed, problems))
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// What differs between a document and its round trip through its type.
/// A null in the document is the same as an absent key (both are None);
/// empty maps and lists are kept by the types, so they must come back.
fn compare(orig: &Value, back: &Value, path: &str, out: &mut Vec<String>) {
    match (orig, back) {
        (Value::Object(o), Value::Object(b)) => {
            for (k, v) in o {
                let p = join(path, k);
                match b.get(k) {
                    _ if v.is_null() => {}
                    None => out.push(format!(
                        "{p}: not a field of this type (misspelled, or in the wrong place?)"
                    )),
                    Some(bv) => compare(v, bv, &p, out),
                }
            }
            for (k, bv) in b {
                // Embedded objects (a StatefulSet's claim templates) come
                // back with the apiVersion and kind their type implies.
                let implied = k == "apiVersion" || k == "kind";
                if !implied && !bv.is_null() && o.get(k).is_none_or(Value::is_null) {
                    out.push(format!(
                        "{}: required, and missing (the type filled in {bv})",
                        join(path, k)
                    ));
                }
            }
        }
        (Value::Array(o), Value::Array(b)) if o.len() == b.len() => {
            for (i, (ov, bv)) in o.iter().zip(b).enumerate() {
                compare(ov, bv, &format!("{path}[{i}]"), out);
            }
        }
        (o, b) if o == b => {}
        (o, b) => out.push(format!("{path}: {o} came back as {b}")),
    }
}

/// Values the API types keep as strings but the API server accepts only
/// from a list: (the field's parent key or "" for any, its key, the values).
#[rustfmt::skip]
const ENUMS: &[(&str, &str, &[&str])] = &[
    ("", "mountPropagation", &["None", "HostToContainer", "Bidirectional"]),
    ("", "imagePullPolicy", &["Always", "IfNotPresent", "Never"]),
    ("", "protocol", &["TCP", "UDP", "SCTP"]),
    ("", "volumeBindingMode", &["Immediate", "WaitForFirstConsumer"]),
    ("", "reclaimPolicy", &["Delete", "Retain"]),
    ("", "deletionPolicy", &["Delete", "Retain"]),
    ("", "fsGroupPolicy", &["None", "File", "ReadWriteOnceWithFSType"]),
    ("", "fsGroupChangePolicy", &["OnRootMismatch", "Always"]),
    ("", "dnsPolicy", &["ClusterFirst", "ClusterFirstWithHostNet", "Default", "None"]),
    ("", "restartPolicy", &["Always", "OnFailure", "Never"]),
    ("", "podManagementPolicy", &["OrderedReady", "Parallel"]),
    ("", "volumeLifecycleModes", &["Persistent", "Ephemeral"]),
    ("", "accessModes", &["ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod"]),
    ("", "effect", &["NoSchedule", "PreferNoSchedule", "NoExecute"]),
    // cert-manager's Certificate.
    ("spec", "usages", &[
        "signing", "digital signature", "content commitment", "key encipherment",
        "key agreement", "data encipherment", "cert sign", "crl sign", "encipher only",
        "decipher only", "any", "server auth", "client auth", "code signing",
        "email protection", "s/mime", "ipsec end system", "ipsec tunnel", "ipsec user",
        "timestamping", "ocsp signing", "microsoft sgc", "netscape sgc",
    ]),
    ("privateKey", "algorithm", &["RSA", "ECDSA", "Ed25519"]),
    ("privateKey", "encoding", &["PKCS1", "PKCS8"]),
    ("privateKey", "rotationPolicy", &["Never", "Always"]),
    ("issuerRef", "kind", &["Issuer", "ClusterIssuer"]),
    (
        "hostPath",
        "type",
        &["", "DirectoryOrCreate", "Directory", "FileOrCreate", "File", "Socket", "CharDevice", "BlockDevice"],
    ),
    ("seccompProfile", "type", &["RuntimeDefault", "Localhost", "Unconfined"]),
    ("strategy", "type", &["RollingUpdate", "Recreate"]),
    ("updateStrategy", "type", &["RollingUpdate", "OnDelete"]),
    ("tolerations[]", "operator", &["Exists", "Equal"]),
    ("fieldRef", "fieldPath", &[
        "metadata.name",
        "metadata.namespace",
        "metadata.uid",
        "spec.nodeName",
        "spec.serviceAccountName",
        "status.hostIP",
        "status.hostIPs",
        "status.podIP",
        "status.podIPs",
    ]),
];

/// Checks the listed string values anywhere in `v`; `parent` is the key of
/// the object holding `v` ("tolerations[]" for an element of that list).
fn check_enums(v: &Value, parent: &str, path: &str, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, val) in m {
                let p = join(path, k);
                for (want_parent, key, allowed) in ENUMS {
                    if k != key || !(want_parent.is_empty() || *want_parent == parent) {
                        continue;
                    }
                    let values: Vec<&Value> = match val {
                        Value::Array(a) => a.iter().collect(),
                        other => vec![other],
                    };
                    for x in values {
                        match x.as_str() {
                            Some(s) if allowed.contains(&s) => {}
                            _ => out.push(format!("{p}: {x} is not one of {allowed:?}")),
                        }
                    }
                }
                check_enums(val, k, &p, out);
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                check_enums(x, &format!("{parent}[]"), &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

/// The typed object of a document, or what is wrong with it.
fn typed(doc: &Doc) -> Result<Manifest, Vec<String>> {
    let v = &doc.value;
    let api = v["apiVersion"].as_str().unwrap_or("");
    let kind = v["kind"].as_str().unwrap_or("");
    macro_rules! as_ {
        ($t:ty, $variant:ident) => {
            round_trip::<$t>(v).map(|(o, p)| (Object::$variant(o), p))
        };
    }
    let r = match (api, kind) {
        ("v1", "Namespace") => as_!(Namespace, Namespace),
        ("v1", "ServiceAccount") => as_!(ServiceAccount, ServiceAccount),
        ("v1", "ConfigMap") => as_!(ConfigMap, ConfigMap),
        ("v1", "Service") => as_!(Service, Service),
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => as_!(ClusterRole, ClusterRole),
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
            as_!(ClusterRoleBinding, ClusterRoleBinding)
        }
        ("rbac.authorization.k8s.io/v1", "Role") => as_!(Role, Role),
        ("rbac.authorization.k8s.io/v1", "RoleBinding") => as_!(RoleBinding, RoleBinding),
        ("apps/v1", "Deployment") => as_!(Deployment, Deployment),
        ("apps/v1", "DaemonSet") => as_!(DaemonSet, DaemonSet),
        ("apps/v1", "StatefulSet") => as_!(StatefulSet, StatefulSet),
        ("storage.k8s.io/v1", "CSIDriver") => as_!(CSIDriver, CsiDriver),
        ("storage.k8s.io/v1", "StorageClass") => as_!(StorageClass, StorageClass),
        ("storage.k8s.io/v1", "VolumeAttributesClass") => {
            as_!(VolumeAttributesClass, VolumeAttributesClass)
        }
        ("snapshot.storage.k8s.io/v1", "VolumeSnapshotClass") => {
            as_!(VolumeSnapshotClass, VolumeSnapshotClass)
        }
        ("cert-manager.io/v1", "Issuer") => as_!(Issuer, Issuer),
        ("cert-manager.io/v1", "Certificate") => as_!(Certificate, Certificate),
        _ => Err(format!(
            "unknown kind {kind:?} of apiVersion {api:?} (a typo, or a kind this test must learn)"
        )),
    };
    let at = |p: String| format!("{}: {p}", doc.at);
    match r {
        Err(e) => Err(vec![at(e)]),
        Ok((object, mut problems)) => {
            check_enums(v, "", "", &mut problems);
            if problems.is_empty() {
                Ok(Manifest {
                    at: doc.at.clone(),
                    object,
                })
            } else {
                Err(problems.into_iter().map(at).collect())
            }
        }
    }
}

/// Every manifest, typed; panics listing every document that is not valid.
fn manifests() -> Vec<Manifest> {
    let mut out = Vec::new();
    let mut problems = Vec::new();
    for doc in load_docs() {
        match typed(&doc) {
            Ok(m) => out.push(m),
            Err(p) => problems.extend(p),
        }
    }
    report(
        "manifests that do not match their Kubernetes types",
        problems,
    );
    out
}

fn report(what: &str, problems: Vec<String>) {
    assert!(problems.is_empty(), "{what}:\n  {}", problems.join("\n  "));
}

// ---- lookups ----------------------------------------------------------------

struct Index<'a> {
    all: &'a [Manifest],
}

impl<'a> Index<'a> {
    fn find(&self, kind: &str, namespace: Option<&str>, name: &str) -> Option<&'a Object> {
        self.all.iter().map(|m| &m.object).find(|o| {
            o.kind() == kind && o.name() == name && o.metadata().namespace.as_deref() == namespace
        })
    }

    fn exists(&self, kind: &str, namespace: Option<&str>, name: &str) -> bool {
        self.find(kind, namespace, name).is_some()
    }

    fn config_map(&self, name: &str) -> Option<&'a ConfigMap> {
        match self.find("ConfigMap", Some(NAMESPACE), name) {
            Some(Object::ConfigMap(c)) => Some(c),
            _ => None,
        }
    }

    fn services(&self) -> impl Iterator<Item = &'a Service> {
        self.all.iter().filter_map(|m| match &m.object {
            Object::Service(s) => Some(s),
            _ => None,
        })
    }

    fn issuer(&self, name: &str) -> Option<&'a Issuer> {
        match self.find("Issuer", Some(NAMESPACE), name) {
            Some(Object::Issuer(i)) => Some(i),
            _ => None,
        }
    }

    /// The Certificate whose Secret is `secret`.
    fn certificate_for_secret(&self, secret: &str) -> Option<&'a Certificate> {
        self.all.iter().find_map(|m| match &m.object {
            Object::Certificate(c)
                if c.spec.secret_name == secret
                    && c.metadata.namespace.as_deref() == Some(NAMESPACE) =>
            {
                Some(c)
            }
            _ => None,
        })
    }

    /// A Secret of the namespace: written here, or made by a Certificate.
    fn secret_exists(&self, name: &str) -> bool {
        self.exists("Secret", Some(NAMESPACE), name) || self.certificate_for_secret(name).is_some()
    }
}

/// A workload's pod template, with the claims a StatefulSet adds.
struct Workload<'a> {
    at: &'a str,
    selector: Option<&'a BTreeMap<String, String>>,
    template: &'a PodTemplateSpec,
    claims: &'a [PersistentVolumeClaim],
}

fn workloads(all: &[Manifest]) -> Vec<Workload<'_>> {
    let mut out = Vec::new();
    for m in all {
        let (selector, template, claims) = match &m.object {
            Object::Deployment(d) => match &d.spec {
                Some(s) => (&s.selector, &s.template, None),
                None => continue,
            },
            Object::DaemonSet(d) => match &d.spec {
                Some(s) => (&s.selector, &s.template, None),
                None => continue,
            },
            Object::StatefulSet(d) => match &d.spec {
                Some(s) => (
                    &s.selector,
                    &s.template,
                    s.volume_claim_templates.as_deref(),
                ),
                None => continue,
            },
            _ => continue,
        };
        out.push(Workload {
            at: &m.at,
            selector: selector.match_labels.as_ref(),
            template,
            claims: claims.unwrap_or(&[]),
        });
    }
    out
}

fn containers(t: &PodTemplateSpec) -> Vec<&Container> {
    let Some(spec) = &t.spec else {
        return Vec::new();
    };
    spec.init_containers
        .iter()
        .flatten()
        .chain(spec.containers.iter())
        .collect()
}

fn args(c: &Container) -> &[String] {
    c.args.as_deref().unwrap_or(&[])
}

/// `--name=value` or `--name value` in a container's args.
fn flag<'a>(c: &'a Container, name: &str) -> Option<&'a str> {
    let a = args(c);
    let long = format!("--{name}");
    for (i, x) in a.iter().enumerate() {
        if let Some(v) = x.strip_prefix(&format!("{long}=")) {
            return Some(v);
        }
        if *x == long {
            return a.get(i + 1).map(String::as_str);
        }
    }
    None
}

fn is_berth(c: &Container) -> bool {
    c.image
        .as_deref()
        .is_some_and(|i| i.starts_with("ghcr.io/berth-storage/berth:"))
}

/// The volume mounted at the directory holding `path` in container `c`,
/// and the path relative to the mount.
fn mount_of<'a>(c: &'a Container, path: &str) -> Option<(&'a str, String)> {
    c.volume_mounts
        .iter()
        .flatten()
        .filter_map(|m| {
            let rest = path.strip_prefix(m.mount_path.trim_end_matches('/'))?;
            let rest = rest.strip_prefix('/')?;
            Some((m.name.as_str(), rest.to_string(), m.mount_path.len()))
        })
        .max_by_key(|(_, _, len)| *len)
        .map(|(n, r, _)| (n, r))
}

/// The literal value of environment variable `name` in container `c`.
fn env_value<'a>(c: &'a Container, name: &str) -> Option<&'a str> {
    c.env
        .iter()
        .flatten()
        .find(|e| e.name == name)
        .and_then(|e| e.value.as_deref())
}

/// The `berth` subcommand a container runs (None for a shell script).
fn berth_subcommand(c: &Container) -> Option<&str> {
    match c.command.as_deref() {
        None => {}
        Some(cmd) if cmd == ["berth"] => {}
        Some(_) => return None,
    }
    args(c).first().map(String::as_str)
}

/// The metadata service a Berth container dials: `--metadata` or
/// `BERTH_METADATA`.
fn metadata_endpoint(c: &Container) -> Option<&str> {
    flag(c, "metadata").or_else(|| env_value(c, "BERTH_METADATA"))
}

/// A Berth container's certificate folder: `--tls-dir` or `BERTH_TLS_DIR`.
fn tls_dir(c: &Container) -> Option<&str> {
    flag(c, "tls-dir").or_else(|| env_value(c, "BERTH_TLS_DIR"))
}

/// `https://SERVICE.NAMESPACE.svc:PORT` naming a Service here: the host as
/// written, the Service and the port.
fn service_of_url<'a, 'u>(idx: &Index<'a>, url: &'u str) -> Option<(&'u str, &'a Service, i32)> {
    let (host, port) = url.strip_prefix("https://")?.rsplit_once(':')?;
    let (svc, ns) = host.strip_suffix(".svc")?.split_once('.')?;
    let port: i32 = port.parse().ok()?;
    match idx.find("Service", Some(ns), svc) {
        Some(Object::Service(s)) => Some((host, s, port)),
        _ => None,
    }
}

// ---- the berth command line, read from its source --------------------------

/// What one `berth` subcommand accepts.
#[derive(Debug, Default, Clone)]
struct Accepts {
    flags: BTreeSet<String>,
    envs: BTreeSet<String>,
}

#[derive(Debug)]
struct Field {
    attrs: Vec<String>,
    name: String,
    ty: String,
}

/// `"SomeName"` -> `"some-name"`, `"some_name"` -> `"some-name"`.
fn kebab(s: &str) -> String {
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if ch.is_ascii_uppercase() {
            if i > 0 {
                out.push('-');
            }
            out.push(ch.to_ascii_lowercase());
        } else if ch == '_' {
            out.push('-');
        } else {
            out.push(ch);
        }
    }
    out
}

/// The body of `struct NAME { ... }` or `enum NAME { ... }`.
fn item_body<'a>(src: &'a str, keyword: &str, name: &str) -> Option<&'a str> {
    let head = format!("{keyword} {name} {{");
    let start = src.find(&head)? + head.len();
    let mut depth = 1;
    for (i, ch) in src[start..].char_indices() {
        match ch {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(&src[start..start + i]);
                }
            }
            _ => {}
        }
    }
    None
}

/// The fields (or tuple variants) of a struct (or enum) body, with their
/// attributes. Comments are dropped; strings inside attributes are kept
/// whole, so a `,` or `]` in a default value does not split anything.
fn fields(body: &str) -> Vec<Field> {
    let text: String = body
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n");
    let mut out = Vec::new();
    let mut attrs = Vec::new();
    let mut chars = text.char_indices().peekable();
    let mut item = String::new();
    while let Some((_, ch)) = chars.next() {
        if ch == '#' && chars.peek().is_some_and(|(_, c)| *c == '[') && item.trim().is_empty() {
            let mut attr = String::from("#");
            let mut depth = 0;
            let mut in_str = false;
            for (_, c) in chars.by_ref() {
                attr.push(c);
                match c {
                    '"' => in_str = !in_str,
                    '[' if !in_str => depth += 1,
                    ']' if !in_str => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    _ => {}
                }
            }
            attrs.push(attr);
            item.clear();
            continue;
        }
        let depth_open = item.matches(['<', '(', '[']).count();
        let depth_close = item.matches(['>', ')', ']']).count();
        if ch == ',' && depth_open == depth_close {
            push_field(&mut out, &mut attrs, &item);
            item.clear();
        } else {
            item.push(ch);
        }
    }
    push_field(&mut out, &mut attrs, &item);
    out
}

fn push_field(out: &mut Vec<Field>, attrs: &mut Vec<String>, item: &str) {
    let item = item.trim();
    if item.is_empty() {
        return;
    }
    let item = item.strip_prefix("pub ").unwrap_or(item);
    let (name, ty) = match (item.split_once(':'), item.split_once('(')) {
        (Some((n, t)), _) => (n.trim(), t.trim()),
        (None, Some((n, t))) => (n.trim(), t.trim_end_matches(')').trim()),
        (None, None) => (item, ""),
    };
    out.push(Field {
        attrs: std::mem::take(attrs),
        name: name.to_string(),
        ty: ty.to_string(),
    });
}

/// `key = "value"` inside an attribute, or `key` alone (`Some("")`).
fn attr_item(attr: &str, key: &str) -> Option<String> {
    let inner = attr.split_once('(')?.1.rsplit_once(')')?.0;
    let mut parts = Vec::new();
    let (mut cur, mut in_str) = (String::new(), false);
    for c in inner.chars() {
        match c {
            '"' => {
                in_str = !in_str;
                cur.push(c);
            }
            ',' if !in_str => parts.push(std::mem::take(&mut cur)),
            _ => cur.push(c),
        }
    }
    parts.push(cur);
    parts.iter().find_map(|p| {
        let p = p.trim();
        match p.split_once('=') {
            Some((k, v)) if k.trim() == key => Some(v.trim().trim_matches('"').to_string()),
            None if p == key => Some(String::new()),
            _ => None,
        }
    })
}

/// Flags and environment variables of a clap `Args` struct, flattened ones
/// included.
fn accepts_of(src: &str, ty: &str, global_only: bool) -> Accepts {
    let body = item_body(src, "struct", ty)
        .unwrap_or_else(|| panic!("struct {ty} not found in cli/src/bin/berth.rs"));
    let mut acc = Accepts::default();
    for f in fields(body) {
        for a in &f.attrs {
            if a.starts_with("#[command") && attr_item(a, "flatten").is_some() {
                let inner = accepts_of(src, &f.ty, global_only);
                acc.flags.extend(inner.flags);
                acc.envs.extend(inner.envs);
            }
            if !a.starts_with("#[arg") {
                continue;
            }
            if global_only && attr_item(a, "global").as_deref() != Some("true") {
                continue;
            }
            if let Some(long) = attr_item(a, "long") {
                acc.flags.insert(if long.is_empty() {
                    kebab(&f.name)
                } else {
                    long
                });
            }
            if let Some(env) = attr_item(a, "env") {
                acc.envs.insert(env);
            }
        }
    }
    acc
}

/// Every `berth` subcommand and what it accepts, from the program's source.
fn berth_cli() -> BTreeMap<String, Accepts> {
    let path = deploy_dir().join("../cli/src/bin/berth.rs");
    let src = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let global = accepts_of(&src, "Cli", true);
    let body = item_body(&src, "enum", "Command").expect("enum Command in berth.rs");
    let mut out = BTreeMap::new();
    for v in fields(body) {
        let mut acc = accepts_of(&src, &v.ty, false);
        acc.flags.extend(global.flags.iter().cloned());
        acc.envs.extend(global.envs.iter().cloned());
        acc.flags.insert("help".into());
        out.insert(kebab(&v.name), acc);
    }
    assert!(
        out.contains_key("volume-server") && out.contains_key("csi"),
        "could not read the subcommands of berth.rs: {out:?}"
    );
    out
}

/// What is wrong with a Berth container's command line.
fn check_berth_container(c: &Container, cli: &BTreeMap<String, Accepts>) -> Vec<String> {
    let mut out = Vec::new();
    match c.command.as_deref() {
        // A shell script in the image (an init container): not a berth command line.
        Some([sh, ..]) if sh.ends_with("/sh") => return out,
        None => {}
        Some(cmd) if cmd == ["berth"] => {}
        Some(cmd) => {
            out.push(format!("command {cmd:?}: the image's entrypoint is berth"));
            return out;
        }
    }
    let a = args(c);
    let Some(sub) = a.first() else {
        out.push("no subcommand in args".into());
        return out;
    };
    let Some(acc) = cli.get(sub) else {
        out.push(format!(
            "args[0] {sub:?} is not a berth subcommand ({:?})",
            cli.keys().collect::<Vec<_>>()
        ));
        return out;
    };
    for x in &a[1..] {
        if let Some(f) = x.strip_prefix("--") {
            let name = f.split('=').next().unwrap_or(f);
            if !acc.flags.contains(name) {
                out.push(format!(
                    "berth {sub} has no flag --{name} (it has {:?})",
                    acc.flags
                ));
            }
        } else if x.starts_with('-') {
            out.push(format!("{x:?}: berth {sub} takes only --long flags"));
        }
    }
    if sub == "csi" {
        let mode = flag(c, "mode").unwrap_or("all");
        if let Err(e) = berth_csi::Mode::from_str(mode) {
            out.push(format!("--mode: {e}"));
        }
    }
    for e in c.env.iter().flatten() {
        let ours = e.name.starts_with("BERTH_") || e.name == "CSI_ENDPOINT";
        if ours && !acc.envs.contains(&e.name) {
            out.push(format!(
                "env {}: berth {sub} does not read it (it reads {:?})",
                e.name, acc.envs
            ));
        }
    }
    out
}

/// `$(VAR)` in a container's command or args that no env entry defines:
/// Kubernetes would pass the text through unexpanded.
fn undefined_vars(c: &Container) -> Vec<String> {
    let defined: BTreeSet<&str> = c.env.iter().flatten().map(|e| e.name.as_str()).collect();
    let mut out = Vec::new();
    for s in c.command.iter().flatten().chain(args(c)) {
        let mut rest = s.as_str();
        while let Some(i) = rest.find("$(") {
            rest = &rest[i + 2..];
            let Some(end) = rest.find(')') else { break };
            let var = &rest[..end];
            if !defined.contains(var) {
                out.push(format!("$({var}) is used but not in env"));
            }
            rest = &rest[end..];
        }
    }
    out
}

// ---- mutual TLS -------------------------------------------------------------

/// Berth subcommands that listen or dial over TCP, so need certificates.
const TLS_SUBCOMMANDS: &[&str] = &["metadata", "volume-server", "csi", "standalone"];

/// `berth_proto::tls::VOLUME_SERVER_NAME`, the name the metadata service and
/// `berth attach` require of a volume server's certificate, read from its
/// source (this crate does not depend on berth-proto).
fn volume_server_name() -> String {
    let path = deploy_dir().join("../proto/src/tls.rs");
    let src = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let head = "pub const VOLUME_SERVER_NAME: &str = \"";
    let start = src
        .find(head)
        .unwrap_or_else(|| panic!("no VOLUME_SERVER_NAME in {}", path.display()))
        + head.len();
    let len = src[start..]
        .find('"')
        .expect("the end of VOLUME_SERVER_NAME");
    src[start..start + len].to_string()
}

/// A Go duration as cert-manager takes it (`8760h`, `1h30m`, `90s`), in
/// seconds; None if it is not one (or uses units below a second).
fn go_duration(s: &str) -> Option<u64> {
    if s.is_empty() {
        return None;
    }
    let (mut total, mut num) = (0u64, String::new());
    for ch in s.chars() {
        if ch.is_ascii_digit() {
            num.push(ch);
            continue;
        }
        let n: u64 = num.parse().ok()?;
        num.clear();
        let unit = match ch {
            'h' => 3600,
            'm' => 60,
            's' => 1,
            _ => return None,
        };
        total = total.checked_add(n.checked_mul(unit)?)?;
    }
    num.is_empty().then_some(total)
}

/// What is wrong with the Issuers and Certificates: one self-signed CA,
/// kept across renewals, issuing every program's certificate through a CA
/// Issuer, each with the usages of a server and a client, a new key at each
/// renewal, and durations that leave time to restart the pods (the programs
/// read their certificates once, at start).
/// CA Issuers over a CA that is not Berth's: etcd's, which signs the
/// metadata service's etcd client certificate (`--etcd-tls-dir`). The
/// administrator makes their Secret from that CA (the file's comments show
/// the `kubectl create secret tls`); what they issue is a client
/// certificate only.
const EXTERNAL_CA_ISSUERS: &[&str] = &["berth-etcd-ca"];

/// A Certificate issued by one of [`EXTERNAL_CA_ISSUERS`].
fn is_external(c: &Certificate) -> bool {
    EXTERNAL_CA_ISSUERS.contains(&c.spec.issuer_ref.name.as_str())
}

fn certificate_problems(idx: &Index) -> Vec<String> {
    let mut problems = Vec::new();
    let mut cas = Vec::new();
    let mut longest = 0u64;
    for m in idx.all {
        match &m.object {
            Object::Issuer(i) => match (&i.spec.self_signed, &i.spec.ca) {
                (Some(_), None) => {}
                (None, Some(ca)) => {
                    let is_ca = idx
                        .certificate_for_secret(&ca.secret_name)
                        .is_some_and(|c| c.spec.is_ca == Some(true));
                    let external = i
                        .metadata
                        .name
                        .as_deref()
                        .is_some_and(|n| EXTERNAL_CA_ISSUERS.contains(&n));
                    if external && idx.certificate_for_secret(&ca.secret_name).is_some() {
                        problems.push(format!(
                            "{}: the Secret {} of an external CA is the administrator's, not a Certificate's",
                            m.at, ca.secret_name
                        ));
                    }
                    if !is_ca && !external {
                        problems.push(format!(
                            "{}: ca.secretName {} is not the Secret of a Certificate with isCA: true",
                            m.at, ca.secret_name
                        ));
                    }
                }
                _ => problems.push(format!("{}: exactly one of selfSigned and ca", m.at)),
            },
            Object::Certificate(c) => {
                let s = &c.spec;
                if Some(s.secret_name.as_str()) != c.metadata.name.as_deref() {
                    problems.push(format!(
                        "{}: secretName {} is not the Certificate's name",
                        m.at, s.secret_name
                    ));
                }
                let r = &s.issuer_ref;
                let kind = r.kind.as_deref().unwrap_or("Issuer");
                let group = r.group.as_deref().unwrap_or("cert-manager.io");
                let issuer = idx
                    .issuer(&r.name)
                    .filter(|_| kind == "Issuer" && group == "cert-manager.io");
                let Some(issuer) = issuer else {
                    problems.push(format!(
                        "{}: issuerRef {kind} {} ({group}) is not an Issuer here",
                        m.at, r.name
                    ));
                    continue;
                };
                let duration = s.duration.as_deref().and_then(go_duration);
                let renew = s.renew_before.as_deref().and_then(go_duration);
                let (Some(duration), Some(renew)) = (duration, renew) else {
                    problems.push(format!(
                        "{}: duration and renewBefore must be set, as Go durations (8760h): the programs do not reload certificates, so renewals must be planned",
                        m.at
                    ));
                    continue;
                };
                if duration < 3600 || renew < 300 || renew >= duration {
                    problems.push(format!(
                        "{}: duration {duration}s, renewBefore {renew}s: cert-manager wants a duration of 1h or more and renewBefore from 5m to below the duration",
                        m.at
                    ));
                }
                let rotation = s
                    .private_key
                    .as_ref()
                    .and_then(|k| k.rotation_policy.as_deref());
                if s.is_ca == Some(true) {
                    cas.push(duration);
                    if issuer.spec.self_signed.is_none() {
                        problems.push(format!("{}: the CA is issued by a selfSigned Issuer", m.at));
                    }
                    if s.common_name.is_none() {
                        problems.push(format!(
                            "{}: the CA needs a commonName, its only name",
                            m.at
                        ));
                    }
                    if rotation != Some("Never") {
                        problems.push(format!(
                            "{}: privateKey.rotationPolicy {rotation:?}: the CA keeps its key when renewed (Never), so the certificates it signed and the ca.crt copies pods hold stay valid",
                            m.at
                        ));
                    }
                } else if is_external(c) {
                    // A client certificate for a store outside Berth (etcd).
                    let usages: Vec<&str> = s.usages.iter().flatten().map(String::as_str).collect();
                    if !usages.contains(&"client auth") || issuer.spec.ca.is_none() {
                        problems.push(format!(
                            "{}: a certificate of an external CA is a client certificate (usages client auth) from its CA Issuer",
                            m.at
                        ));
                    }
                    if rotation != Some("Always") {
                        problems.push(format!(
                            "{}: privateKey.rotationPolicy {rotation:?}, expected Always (a new key at each renewal)",
                            m.at
                        ));
                    }
                } else {
                    longest = longest.max(duration);
                    if issuer.spec.ca.is_none() {
                        problems.push(format!(
                            "{}: issued by {}, not by the CA Issuer: the programs trust only the CA",
                            m.at, r.name
                        ));
                    }
                    let usages: Vec<&str> = s.usages.iter().flatten().map(String::as_str).collect();
                    for u in TLS_USAGES {
                        if !usages.contains(u) {
                            problems.push(format!(
                                "{}: usages lack {u:?} (every program is a server and a client)",
                                m.at
                            ));
                        }
                    }
                    if rotation != Some("Always") {
                        problems.push(format!(
                            "{}: privateKey.rotationPolicy {rotation:?}, expected Always (a new key at each renewal)",
                            m.at
                        ));
                    }
                    if s.dns_names.as_ref().is_none_or(Vec::is_empty) {
                        problems.push(format!("{}: no dnsNames", m.at));
                    }
                    if renew < 7 * 86_400 {
                        problems.push(format!(
                            "{}: renewBefore under 7 days leaves too little time to restart the pods after a renewal",
                            m.at
                        ));
                    }
                }
            }
            _ => {}
        }
    }
    match cas.as_slice() {
        [ca] if *ca <= longest => problems.push(format!(
            "the CA ({ca}s) must outlive the certificates it signs ({longest}s)"
        )),
        [_] => {}
        other => problems.push(format!(
            "{} CA Certificates (isCA: true), expected 1",
            other.len()
        )),
    }
    problems
}

/// The Secrets Berth containers mount at their `--etcd-tls-dir`.
fn etcd_tls_secrets(all: &[Manifest]) -> Vec<&str> {
    let mut out = Vec::new();
    for w in workloads(all) {
        let Some(spec) = w.template.spec.as_ref() else {
            continue;
        };
        for c in containers(w.template).into_iter().filter(|c| is_berth(c)) {
            let Some(dir) = flag(c, "etcd-tls-dir").or_else(|| env_value(c, "BERTH_ETCD_TLS_DIR"))
            else {
                continue;
            };
            let mount = c
                .volume_mounts
                .iter()
                .flatten()
                .find(|m| m.mount_path.trim_end_matches('/') == dir.trim_end_matches('/'));
            let secret = mount.and_then(|m| {
                spec.volumes
                    .iter()
                    .flatten()
                    .find(|v| v.name == m.name)
                    .and_then(|v| v.secret.as_ref())
                    .and_then(|s| s.secret_name.as_deref())
            });
            out.extend(secret);
        }
    }
    out
}

/// A Berth container with certificates: the Secret at its `--tls-dir` and
/// the Certificate that makes it.
struct TlsUse<'a> {
    /// "FILE, document N (KIND NAME): container NAME".
    at: String,
    container: &'a Container,
    subcommand: &'a str,
    /// The pod's labels, which Services select.
    labels: Option<&'a BTreeMap<String, String>>,
    secret: &'a str,
    certificate: Option<&'a Certificate>,
}

/// Every Berth container that talks over TCP, with its certificates; what
/// is wrong with how they are given to it goes to `problems`: a folder that
/// is not a read-only mount of a whole Secret, a Secret no Certificate
/// makes (or the CA's), a mode that lets another user read the key or
/// keeps the container's own user from reading it.
fn tls_uses<'a>(all: &'a [Manifest], problems: &mut Vec<String>) -> Vec<TlsUse<'a>> {
    let idx = Index { all };
    let mut out = Vec::new();
    for w in workloads(all) {
        let Some(spec) = w.template.spec.as_ref() else {
            continue;
        };
        let labels = w.template.metadata.as_ref().and_then(|m| m.labels.as_ref());
        let pod = spec.security_context.as_ref();
        for c in containers(w.template).into_iter().filter(|c| is_berth(c)) {
            let Some(sub) = berth_subcommand(c).filter(|s| TLS_SUBCOMMANDS.contains(s)) else {
                continue;
            };
            let at = format!("{}: container {}", w.at, c.name);
            let Some(dir) = tls_dir(c) else {
                problems.push(format!(
                    "{at}: berth {sub} talks over TCP without certificates: set --tls-dir (or BERTH_TLS_DIR)"
                ));
                continue;
            };
            let dir = dir.trim_end_matches('/');
            let Some(mount) = c
                .volume_mounts
                .iter()
                .flatten()
                .find(|m| m.mount_path.trim_end_matches('/') == dir)
            else {
                problems.push(format!(
                    "{at}: --tls-dir {dir} is not a volume mount of the container"
                ));
                continue;
            };
            if mount.read_only != Some(true) {
                problems.push(format!("{at}: the mount at {dir} is not readOnly"));
            }
            if mount.sub_path.is_some() || mount.sub_path_expr.is_some() {
                problems.push(format!(
                    "{at}: the mount at {dir} has a subPath, which kubelet never updates: mount the Secret whole"
                ));
            }
            let Some(secret) = spec
                .volumes
                .iter()
                .flatten()
                .find(|v| v.name == mount.name)
                .and_then(|v| v.secret.as_ref())
            else {
                problems.push(format!(
                    "{at}: --tls-dir {dir} is volume {}, not a Secret",
                    mount.name
                ));
                continue;
            };
            let name = secret.secret_name.as_deref().unwrap_or("");
            if secret.items.is_some() {
                problems.push(format!(
                    "{at}: Secret {name}: items picks keys; mount it whole (tls.crt, tls.key, ca.crt)"
                ));
            }
            if secret.optional == Some(true) {
                problems.push(format!(
                    "{at}: Secret {name} is optional: the program would start without its certificates and fail"
                ));
            }
            // Secret files are root's; with an fsGroup their group is that
            // group (which every container of the pod is in), and kubelet
            // adds group read to the mode.
            let mode = secret.default_mode.unwrap_or(0o644);
            let fs_group = pod.and_then(|p| p.fs_group);
            let uid = c
                .security_context
                .as_ref()
                .and_then(|s| s.run_as_user)
                .or_else(|| pod.and_then(|p| p.run_as_user));
            if mode & !0o440 != 0 {
                problems.push(format!(
                    "{at}: Secret {name} defaultMode {mode:04o}: the key is for its owner (root) and group (the pod's fsGroup) only, 0400 or 0440"
                ));
            }
            let readable =
                fs_group.is_some() || (uid == Some(0) && mode & 0o400 != 0) || mode & 0o004 != 0;
            if !readable {
                let who =
                    uid.map_or_else(|| "the image's user".to_string(), |u| format!("uid {u}"));
                problems.push(format!(
                    "{at}: {who} cannot read Secret {name} (mode {mode:04o}, owned by root): give the pod an fsGroup, with mode 0440"
                ));
            }
            let certificate = match idx.certificate_for_secret(name) {
                Some(cert) => {
                    if cert.spec.is_ca == Some(true) {
                        problems.push(format!(
                            "{at}: mounts Secret {name}, the CA's, whose key signs certificates: mount a program's certificate"
                        ));
                    }
                    Some(cert)
                }
                None => {
                    problems.push(format!(
                        "{at}: Secret {name} is made by no Certificate of {CERTIFICATES_FILE}"
                    ));
                    None
                }
            };
            out.push(TlsUse {
                at,
                container: c,
                subcommand: sub,
                labels,
                secret: name,
                certificate,
            });
        }
    }
    out
}

/// Everything about mutual TLS that the typed manifests tell:
/// [`certificate_problems`], [`tls_uses`], and that every client dials its
/// server as `https://` by a name in the server's certificate, volume
/// servers carry `volume_server_name` and require STARTTLS, and no
/// program's Certificate goes unused.
fn tls_problems(all: &[Manifest], volume_server_name: &str) -> Vec<String> {
    let idx = Index { all };
    let mut problems = certificate_problems(&idx);
    let uses = tls_uses(all, &mut problems);
    for u in &uses {
        let (at, c) = (&u.at, u.container);
        let Some(cert) = u.certificate else {
            continue;
        };
        let cert_name = cert.metadata.name.as_deref().unwrap_or("");
        if u.subcommand == "volume-server" {
            if !cert
                .spec
                .dns_names
                .iter()
                .flatten()
                .any(|n| n == volume_server_name)
            {
                problems.push(format!(
                    "{at}: Certificate {cert_name} lacks the DNS name {volume_server_name}, which the metadata service and berth attach require of a volume server"
                ));
            }
            let optional = args(c)
                .iter()
                .any(|a| a == "--nbd-tls-optional" || a.starts_with("--nbd-tls-optional="))
                || env_value(c, "BERTH_NBD_TLS_OPTIONAL").is_some();
            if optional {
                problems.push(format!(
                    "{at}: NBD over TCP must require STARTTLS (drop --nbd-tls-optional / BERTH_NBD_TLS_OPTIONAL)"
                ));
            }
            let advertised = flag(c, "advertise-control")
                .or_else(|| env_value(c, "BERTH_ADVERTISE_CONTROL"))
                .filter(|a| !a.is_empty());
            if let Some(a) = advertised.filter(|a| !a.starts_with("https://")) {
                problems.push(format!(
                    "{at}: --advertise-control {a} must be https:// with --tls-dir"
                ));
            }
        }
    }
    // Every client of the metadata service dials https://, by a name the
    // certificate of the pods behind the Service carries.
    for w in workloads(all) {
        for c in containers(w.template).into_iter().filter(|c| is_berth(c)) {
            let Some(url) = metadata_endpoint(c) else {
                continue;
            };
            let at = format!("{}: container {}", w.at, c.name);
            if !url.starts_with("https://") {
                problems.push(format!(
                    "{at}: metadata endpoint {url} is not https:// (the service requires mutual TLS)"
                ));
                continue;
            }
            // An address that names no Service is reported by
            // csi_driver_name_sockets_and_metadata_address_agree.
            let Some((host, svc, _)) = service_of_url(&idx, url) else {
                continue;
            };
            let sel = svc.spec.as_ref().and_then(|s| s.selector.as_ref());
            let behind: Vec<&TlsUse> = uses
                .iter()
                .filter(|u| {
                    sel.is_some_and(|sel| {
                        !sel.is_empty()
                            && sel
                                .iter()
                                .all(|(k, v)| u.labels.and_then(|l| l.get(k)) == Some(v))
                    })
                })
                .collect();
            if behind.is_empty() {
                problems.push(format!(
                    "{at}: {url}: no Berth container with certificates is behind that Service"
                ));
            }
            for server in behind {
                let Some(cert) = server.certificate else {
                    continue;
                };
                if !cert.spec.dns_names.iter().flatten().any(|n| n == host) {
                    problems.push(format!(
                        "{at}: dials {url}, but Certificate {} ({}) does not carry the name {host}",
                        cert.metadata.name.as_deref().unwrap_or(""),
                        server.at
                    ));
                }
            }
        }
    }
    problems.extend(allow_problems(&uses));
    // A program's certificate that no container uses is a typo somewhere
    // (an external CA's, for etcd, is used at --etcd-tls-dir).
    for m in all {
        if let Object::Certificate(c) = &m.object {
            if is_external(c) {
                if !etcd_tls_secrets(all).contains(&c.spec.secret_name.as_str()) {
                    problems.push(format!(
                        "{}: no Berth container uses Secret {} as its --etcd-tls-dir",
                        m.at, c.spec.secret_name
                    ));
                }
                continue;
            }
            if c.spec.is_ca != Some(true) && !uses.iter().any(|u| u.secret == c.spec.secret_name) {
                problems.push(format!(
                    "{}: no Berth container uses Secret {} as its --tls-dir",
                    m.at, c.spec.secret_name
                ));
            }
        }
    }
    problems
}

/// The name a program's certificate goes by at its peers (what
/// `--tls-allow` lists): its common name, else its first DNS name, as
/// `berth_proto::peer::cert_name` reads a certificate.
fn certificate_name(c: &Certificate) -> Option<&str> {
    c.spec
        .common_name
        .as_deref()
        .filter(|n| !n.is_empty())
        .or_else(|| c.spec.dns_names.iter().flatten().next().map(String::as_str))
}

/// Who may call whom: the metadata service and the volume servers each
/// have `--tls-allow` (or `BERTH_TLS_ALLOW`), a list that parses, permits
/// the certificate of every program that dials them (the metadata
/// service's clients: each container with a metadata endpoint; the volume
/// servers': the metadata service), and names no certificate that is not
/// made here, but for [`ADMIN_CERT`].
fn allow_problems(uses: &[TlsUse]) -> Vec<String> {
    let mut problems = Vec::new();
    let named = |u: &TlsUse| u.certificate.and_then(certificate_name).map(str::to_string);
    let known: BTreeSet<String> = uses
        .iter()
        .filter_map(named)
        .chain([ADMIN_CERT.to_string()])
        .collect();
    for server in uses {
        let clients: Vec<&TlsUse> = match server.subcommand {
            "metadata" => uses
                .iter()
                .filter(|u| metadata_endpoint(u.container).is_some())
                .collect(),
            "volume-server" => uses.iter().filter(|u| u.subcommand == "metadata").collect(),
            _ => continue,
        };
        let at = &server.at;
        let Some(list) = flag(server.container, "tls-allow")
            .or_else(|| env_value(server.container, "BERTH_TLS_ALLOW"))
            .filter(|l| !l.is_empty())
        else {
            problems.push(format!(
                "{at}: berth {} takes calls from any certificate the CA signed: set --tls-allow to the certificates of its clients",
                server.subcommand
            ));
            continue;
        };
        let allow = match berth_proto::Allow::parse(list) {
            Ok(a) => a,
            Err(e) => {
                problems.push(format!("{at}: --tls-allow {e}"));
                continue;
            }
        };
        for n in allow.names() {
            let stem = n.trim_end_matches('*');
            if !known
                .iter()
                .any(|k| k == n || (n.ends_with('*') && k.starts_with(stem)))
            {
                problems.push(format!(
                    "{at}: --tls-allow names {n}, which is no Certificate here (nor {ADMIN_CERT})"
                ));
            }
        }
        for c in clients {
            match named(c) {
                Some(n) if allow.permits(&n) => {}
                Some(n) => problems.push(format!(
                    "{at}: --tls-allow {list} refuses {n}, the certificate of {}, which calls it",
                    c.at
                )),
                None => {}
            }
        }
    }
    problems
}

/// Plain `http://` addresses of `services` anywhere in the documents'
/// values (args, env, ConfigMap data...): with mutual TLS every one is
/// `https://`.
fn plain_http_to_services(docs: &[Doc], services: &BTreeSet<String>) -> Vec<String> {
    fn walk(v: &Value, path: &str, found: &mut dyn FnMut(&str, &str)) {
        match v {
            Value::String(s) => found(path, s.as_str()),
            Value::Array(a) => {
                for (i, x) in a.iter().enumerate() {
                    walk(x, &format!("{path}[{i}]"), found);
                }
            }
            Value::Object(m) => {
                for (k, x) in m {
                    walk(x, &join(path, k), found);
                }
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    for d in docs {
        walk(&d.value, "", &mut |path: &str, s: &str| {
            for svc in services {
                if s.contains(&format!("http://{svc}")) {
                    out.push(format!(
                        "{}: {path}: {s:?} dials Service {svc} in plain HTTP; it requires https://",
                        d.at
                    ));
                }
            }
        });
    }
    out
}

// ---- the tests ----------------------------------------------------------------

#[test]
fn every_document_is_a_known_kind_that_round_trips_through_its_type() {
    let all = manifests();
    let kinds: BTreeSet<&str> = all.iter().map(|m| m.object.kind()).collect();
    for want in [
        "Namespace",
        "CSIDriver",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "Deployment",
        "DaemonSet",
        "StatefulSet",
        "Service",
        "StorageClass",
        "VolumeSnapshotClass",
        "VolumeAttributesClass",
        "Issuer",
        "Certificate",
    ] {
        assert!(kinds.contains(want), "no {want} in deploy/");
    }
}

#[test]
fn names_and_namespaces_are_unique_and_exist() {
    let all = manifests();
    let idx = Index { all: &all };
    let mut problems = Vec::new();
    let mut seen = BTreeSet::new();
    for m in &all {
        let o = &m.object;
        let ns = o.metadata().namespace.as_deref();
        match (o.namespaced(), ns) {
            (true, Some(NAMESPACE)) | (false, None) => {}
            (true, other) => problems.push(format!(
                "{}: namespace {other:?}, expected {NAMESPACE}",
                m.at
            )),
            (false, Some(n)) => problems.push(format!(
                "{}: {} is cluster-scoped but has namespace {n}",
                m.at,
                o.kind()
            )),
        }
        if o.name().is_empty() {
            problems.push(format!("{}: no metadata.name", m.at));
        }
        if !seen.insert((o.kind(), ns.map(str::to_string), o.name().to_string())) {
            problems.push(format!("{}: a second {} {}", m.at, o.kind(), o.name()));
        }
    }
    if !idx.exists("Namespace", None, NAMESPACE) {
        problems.push(format!("no Namespace {NAMESPACE}"));
    }
    report("names and namespaces", problems);
}

#[test]
fn rbac_and_service_accounts_resolve() {
    let all = manifests();
    let idx = Index { all: &all };
    let mut problems = Vec::new();
    for w in workloads(&all) {
        let sa = w
            .template
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.as_deref())
            .unwrap_or("default");
        if !idx.exists("ServiceAccount", Some(NAMESPACE), sa) {
            problems.push(format!("{}: ServiceAccount {sa} does not exist", w.at));
        }
    }
    for m in &all {
        let (role_ref, subjects, binding_ns) = match &m.object {
            Object::ClusterRoleBinding(b) => (&b.role_ref, b.subjects.as_deref(), None),
            Object::RoleBinding(b) => (
                &b.role_ref,
                b.subjects.as_deref(),
                b.metadata.namespace.as_deref(),
            ),
            _ => continue,
        };
        if role_ref.api_group != "rbac.authorization.k8s.io" {
            problems.push(format!(
                "{}: roleRef.apiGroup {:?}",
                m.at, role_ref.api_group
            ));
        }
        let found = match (role_ref.kind.as_str(), binding_ns) {
            ("ClusterRole", _) => idx.exists("ClusterRole", None, &role_ref.name),
            ("Role", Some(ns)) => idx.exists("Role", Some(ns), &role_ref.name),
            (k, _) => {
                problems.push(format!("{}: roleRef.kind {k} cannot be bound here", m.at));
                true
            }
        };
        if !found {
            problems.push(format!(
                "{}: {} {} does not exist",
                m.at, role_ref.kind, role_ref.name
            ));
        }
        let subjects = subjects.unwrap_or(&[]);
        if subjects.is_empty() {
            problems.push(format!("{}: binds nobody", m.at));
        }
        for s in subjects {
            match (s.kind.as_str(), s.namespace.as_deref()) {
                ("ServiceAccount", Some(ns)) => {
                    if !idx.exists("ServiceAccount", Some(ns), &s.name) {
                        problems.push(format!(
                            "{}: ServiceAccount {ns}/{} does not exist",
                            m.at, s.name
                        ));
                    }
                }
                ("ServiceAccount", None) => problems.push(format!(
                    "{}: ServiceAccount {} has no namespace",
                    m.at, s.name
                )),
                (k, _) => problems.push(format!("{}: subject kind {k} is not expected", m.at)),
            }
        }
    }
    report("RBAC references", problems);
}

#[test]
fn pod_volumes_config_maps_and_services_resolve() {
    let all = manifests();
    let idx = Index { all: &all };
    let mut problems = Vec::new();
    for w in workloads(&all) {
        let spec = w.template.spec.as_ref().expect("pod spec");
        let labels = w.template.metadata.as_ref().and_then(|m| m.labels.as_ref());
        match (w.selector, labels) {
            (Some(sel), Some(l)) if sel.iter().all(|(k, v)| l.get(k) == Some(v)) => {}
            _ => problems.push(format!("{}: selector does not match the pod labels", w.at)),
        }
        let mut volumes: BTreeMap<&str, &k8s_openapi::api::core::v1::Volume> = BTreeMap::new();
        for v in spec.volumes.iter().flatten() {
            if volumes.insert(v.name.as_str(), v).is_some() {
                problems.push(format!("{}: volume {} twice", w.at, v.name));
            }
            if let Some(cm) = &v.config_map {
                if idx.config_map(&cm.name).is_none() && cm.optional != Some(true) {
                    problems.push(format!(
                        "{}: volume {}: ConfigMap {} does not exist (and is not optional)",
                        w.at, v.name, cm.name
                    ));
                }
            }
            if let Some(s) = &v.secret {
                let name = s.secret_name.as_deref().unwrap_or("");
                if !idx.secret_exists(name) && s.optional != Some(true) {
                    problems.push(format!(
                        "{}: volume {}: Secret {name} neither exists nor is made by a Certificate (and is not optional)",
                        w.at, v.name
                    ));
                }
            }
            if let Some(h) = &v.host_path {
                if !h.path.starts_with('/') {
                    problems.push(format!("{}: hostPath {} is not absolute", w.at, h.path));
                }
            }
        }
        let claims: BTreeSet<&str> = w
            .claims
            .iter()
            .filter_map(|c| c.metadata.name.as_deref())
            .collect();
        for c in containers(w.template) {
            let mut ports = BTreeSet::new();
            for p in c.ports.iter().flatten() {
                if let Some(n) = &p.name {
                    let ok = n.len() <= 15
                        && n.chars()
                            .all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '-')
                        && n.chars().any(|ch| ch.is_ascii_lowercase());
                    if !ok {
                        problems.push(format!(
                            "{}: container {}: port name {n:?} is not an IANA service name (15 chars, a-z0-9-)",
                            w.at, c.name
                        ));
                    }
                    if !ports.insert(n) {
                        problems.push(format!("{}: port name {n} twice", w.at));
                    }
                }
            }
            for m in c.volume_mounts.iter().flatten() {
                if !volumes.contains_key(m.name.as_str()) && !claims.contains(m.name.as_str()) {
                    problems.push(format!(
                        "{}: container {} mounts {}, which is neither a volume nor a claim",
                        w.at, c.name, m.name
                    ));
                }
            }
            // Files the container names under a ConfigMap's mount must be
            // keys of that ConfigMap.
            let words = c
                .command
                .iter()
                .flatten()
                .chain(args(c))
                .flat_map(|a| a.split(|ch: char| ch.is_whitespace() || ch == '='));
            for word in words.filter(|x| x.starts_with('/')) {
                let Some((vol, file)) = mount_of(c, word) else {
                    continue;
                };
                let Some(cm) = volumes.get(vol).and_then(|v| v.config_map.as_ref()) else {
                    continue;
                };
                if let Some(map) = idx.config_map(&cm.name) {
                    let keys: BTreeSet<&String> =
                        map.data.iter().flatten().map(|(k, _)| k).collect();
                    if !keys.contains(&file) {
                        problems.push(format!(
                            "{}: container {} reads {word}, but ConfigMap {} has no key {file} ({keys:?})",
                            w.at, c.name, cm.name
                        ));
                    }
                }
            }
            problems.extend(
                undefined_vars(c)
                    .into_iter()
                    .map(|p| format!("{}: container {}: {p}", w.at, c.name)),
            );
        }
    }
    // Services select some pod and name its ports; the StatefulSet's
    // governing Service exists.
    let pods = workloads(&all);
    for s in idx.services() {
        let spec = s.spec.as_ref().expect("service spec");
        let sel = spec.selector.clone().unwrap_or_default();
        let targets: Vec<&Workload> = pods
            .iter()
            .filter(|w| {
                let l = w.template.metadata.as_ref().and_then(|m| m.labels.as_ref());
                !sel.is_empty() && sel.iter().all(|(k, v)| l.and_then(|l| l.get(k)) == Some(v))
            })
            .collect();
        if targets.is_empty() {
            problems.push(format!(
                "Service {}: selects no pod",
                s.metadata.name.as_deref().unwrap_or("")
            ));
        }
        for p in spec.ports.iter().flatten() {
            if let Some(IntOrString::String(name)) = &p.target_port {
                let named = targets.iter().any(|w| {
                    containers(w.template)
                        .iter()
                        .flat_map(|c| c.ports.iter().flatten())
                        .any(|cp| cp.name.as_deref() == Some(name))
                });
                if !named {
                    problems.push(format!(
                        "Service port {:?}: no container port named {name}",
                        p.name
                    ));
                }
            }
        }
    }
    for m in &all {
        if let Object::StatefulSet(s) = &m.object {
            let svc = s
                .spec
                .as_ref()
                .and_then(|s| s.service_name.as_deref())
                .unwrap_or("");
            if !idx.exists("Service", Some(NAMESPACE), svc) {
                problems.push(format!("{}: serviceName {svc:?} is not a Service", m.at));
            }
        }
    }
    report("pod references", problems);
}

#[test]
fn berth_containers_use_real_subcommands_flags_and_env_vars() {
    let all = manifests();
    let cli = berth_cli();
    let mut problems = Vec::new();
    let mut berth_containers = 0;
    for w in workloads(&all) {
        for c in containers(w.template).into_iter().filter(|c| is_berth(c)) {
            berth_containers += 1;
            problems.extend(
                check_berth_container(c, &cli)
                    .into_iter()
                    .map(|p| format!("{}: container {}: {p}", w.at, c.name)),
            );
        }
    }
    assert!(
        berth_containers >= 4,
        "found only {berth_containers} berth containers"
    );
    report("berth command lines", problems);
}

#[test]
fn images_are_pinned_and_berth_is_one_image_of_the_workspace_version() {
    let all = manifests();
    let mut problems = Vec::new();
    let mut sidecar_tags: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for w in workloads(&all) {
        for c in containers(w.template) {
            let image = c.image.as_deref().unwrap_or("");
            let (repo, tag) = match image.rsplit_once(':') {
                Some((r, t)) if !t.contains('/') => (r, t),
                _ => {
                    problems.push(format!(
                        "{}: container {}: image {image:?} has no tag",
                        w.at, c.name
                    ));
                    continue;
                }
            };
            if tag == "latest" || tag.is_empty() {
                problems.push(format!(
                    "{}: container {}: image {image} is not pinned",
                    w.at, c.name
                ));
            }
            if is_berth(c) {
                if image != berth_image() {
                    problems.push(format!(
                        "{}: container {}: image {image}, expected {} (the workspace version)",
                        w.at,
                        c.name,
                        berth_image()
                    ));
                }
            } else if !repo.starts_with("registry.k8s.io/sig-storage/") {
                problems.push(format!(
                    "{}: container {}: unexpected image {image}",
                    w.at, c.name
                ));
            } else {
                sidecar_tags
                    .entry(repo.to_string())
                    .or_default()
                    .insert(tag.to_string());
            }
        }
    }
    for (repo, tags) in sidecar_tags {
        if tags.len() > 1 {
            problems.push(format!("{repo} is used at several versions: {tags:?}"));
        }
    }
    report("images", problems);
}

#[test]
fn csi_driver_name_sockets_and_metadata_address_agree() {
    let all = manifests();
    let idx = Index { all: &all };
    let driver = berth_csi::DRIVER_NAME;
    let mut problems = Vec::new();
    let mut drivers = 0;
    for m in &all {
        let named = match &m.object {
            Object::CsiDriver(d) => {
                drivers += 1;
                d.metadata.name.as_deref()
            }
            Object::StorageClass(s) => Some(s.provisioner.as_str()),
            Object::VolumeAttributesClass(v) => Some(v.driver_name.as_str()),
            Object::VolumeSnapshotClass(v) => Some(v.driver.as_str()),
            _ => continue,
        };
        if named != Some(driver) {
            problems.push(format!("{}: driver {named:?}, expected {driver}", m.at));
        }
    }
    if drivers != 1 {
        problems.push(format!("{drivers} CSIDriver objects, expected 1"));
    }
    for w in workloads(&all) {
        let spec = w.template.spec.as_ref().expect("pod spec");
        let host_path = |vol: &str| {
            spec.volumes
                .iter()
                .flatten()
                .find(|v| v.name == vol)
                .and_then(|v| v.host_path.as_ref())
                .map(|h| h.path.clone())
        };
        let cs = containers(w.template);
        for c in cs.iter().filter(|c| is_berth(c)) {
            // The metadata address names a Service of these manifests and its
            // port, over mutual TLS (tls_problems checks the certificates).
            if let Some(url) = metadata_endpoint(c) {
                let ok = service_of_url(&idx, url).is_some_and(|(_, s, port)| {
                    s.spec
                        .iter()
                        .flat_map(|s| s.ports.iter().flatten())
                        .any(|p| p.port == port)
                });
                if !ok {
                    problems.push(format!(
                        "{}: container {}: metadata endpoint {url} is not https://SERVICE.NAMESPACE.svc:PORT of a Service here",
                        w.at, c.name
                    ));
                }
            }
            // The CSI socket: every sidecar's --csi-address is the same file,
            // through a mount of the same volume.
            let Some(endpoint) = flag(c, "endpoint") else {
                continue;
            };
            let socket = endpoint.strip_prefix("unix://").unwrap_or(endpoint);
            let Some((vol, file)) = mount_of(c, socket) else {
                problems.push(format!("{}: the CSI socket {socket} is on no volume", w.at));
                continue;
            };
            let mut sidecars = 0;
            for s in cs.iter().filter(|s| !is_berth(s)) {
                let Some(addr) = flag(s, "csi-address") else {
                    continue;
                };
                sidecars += 1;
                if mount_of(s, addr) != Some((vol, file.clone())) {
                    problems.push(format!(
                        "{}: {} --csi-address={addr} is not {socket} of volume {vol}",
                        w.at, s.name
                    ));
                }
                if let Some(reg) = flag(s, "kubelet-registration-path") {
                    let want = format!("/var/lib/kubelet/plugins/{driver}");
                    if host_path(vol).as_deref() != Some(want.as_str())
                        || reg != format!("{want}/{file}")
                    {
                        problems.push(format!(
                            "{}: kubelet-registration-path {reg} is not the plugin socket on the host ({want}/{file} via {vol})",
                            w.at
                        ));
                    }
                }
            }
            if sidecars == 0 {
                problems.push(format!("{}: a CSI plugin without sidecars", w.at));
            }
        }
    }
    report("driver, sockets and addresses", problems);
}

#[test]
fn certificates_tls_dirs_and_https_endpoints_agree() {
    let all = manifests();
    let idx = Index { all: &all };
    let mut problems = tls_problems(&all, &volume_server_name());
    // cert-manager's objects, and nothing else, in the one file a cluster
    // without cert-manager skips.
    let mut cert_manager = 0;
    for m in &all {
        let ours = matches!(m.object, Object::Issuer(_) | Object::Certificate(_));
        cert_manager += usize::from(ours);
        if ours != m.at.starts_with(&format!("{CERTIFICATES_FILE},")) {
            problems.push(format!(
                "{}: cert-manager objects belong in {CERTIFICATES_FILE}, and nothing else does (a cluster without cert-manager skips it)",
                m.at
            ));
        }
    }
    if cert_manager == 0 {
        problems.push(format!("no Issuer or Certificate in {CERTIFICATES_FILE}"));
    }
    // No plain http:// to a Service here, in any value of any document.
    let services: BTreeSet<String> = idx
        .services()
        .filter_map(|s| s.metadata.name.clone())
        .collect();
    problems.extend(plain_http_to_services(&load_docs(), &services));
    // The file's comment shows how to make the same Secrets without
    // cert-manager: a `kubectl create secret generic` per Secret, from a
    // folder that `berthctl tls generate` makes with the same names.
    let path = deploy_dir().join(CERTIFICATES_FILE);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    for m in &all {
        let Object::Certificate(c) = &m.object else {
            continue;
        };
        if c.spec.is_ca == Some(true) {
            continue;
        }
        let secret = &c.spec.secret_name;
        if is_external(c) {
            // Its CA's Secret is the administrator's to make, as the file says.
            let issuer = &c.spec.issuer_ref.name;
            let ca_secret = idx
                .issuer(issuer)
                .and_then(|i| i.spec.ca.as_ref())
                .map(|ca| ca.secret_name.clone())
                .unwrap_or_default();
            if !text.contains(&format!("create secret tls {ca_secret}")) {
                problems.push(format!(
                    "{CERTIFICATES_FILE}: no `kubectl -n {NAMESPACE} create secret tls {ca_secret}` for the external CA of {secret}"
                ));
            }
            continue;
        }
        let cmd = format!("create secret generic {secret} --from-file=pki/");
        let Some(i) = text.find(&cmd) else {
            problems.push(format!(
                "{CERTIFICATES_FILE}: no `kubectl -n {NAMESPACE} {cmd}FOLDER/` for clusters without cert-manager"
            ));
            continue;
        };
        let folder = text[i + cmd.len()..].split('/').next().unwrap_or("");
        let issue = format!(" {folder}=");
        let Some(j) = text.find(&issue) else {
            problems.push(format!(
                "{CERTIFICATES_FILE}: berthctl tls generate makes no {folder}=SAN,... for Secret {secret}"
            ));
            continue;
        };
        let sans: BTreeSet<&str> = text[j + issue.len()..]
            .split(char::is_whitespace)
            .next()
            .unwrap_or("")
            .split(',')
            .collect();
        let want: BTreeSet<&str> = c
            .spec
            .dns_names
            .iter()
            .chain(c.spec.ip_addresses.iter())
            .flatten()
            .map(String::as_str)
            .collect();
        if sans != want {
            problems.push(format!(
                "{CERTIFICATES_FILE}: berthctl tls generate {folder}= names {sans:?}, Certificate {secret} {want:?}"
            ));
        }
    }
    report("mutual TLS", problems);
}

#[test]
fn seccomp_profile_is_installed_where_it_is_used_and_allows_io_uring() {
    let all = manifests();
    let idx = Index { all: &all };
    let mut problems = Vec::new();
    let seccomp_dir = deploy_dir().join("seccomp");
    let mut uses = 0;
    for w in workloads(&all) {
        let spec = w.template.spec.as_ref().expect("pod spec");
        let pod_level = spec
            .security_context
            .as_ref()
            .and_then(|s| s.seccomp_profile.as_ref());
        for c in containers(w.template) {
            let profile = c
                .security_context
                .as_ref()
                .and_then(|s| s.seccomp_profile.as_ref())
                .or(pod_level);
            let Some(p) = profile.filter(|p| p.type_ == "Localhost") else {
                continue;
            };
            uses += 1;
            let lp = p.localhost_profile.as_deref().unwrap_or("");
            let Some((dir, file)) = lp.split_once('/') else {
                problems.push(format!("{}: localhostProfile {lp:?} is not DIR/FILE", w.at));
                continue;
            };
            let Ok(text) = std::fs::read_to_string(seccomp_dir.join(file)) else {
                problems.push(format!("{}: deploy/seccomp/{file} does not exist", w.at));
                continue;
            };
            let profile: Value = serde_json::from_str(&text).expect("seccomp profile is JSON");
            let allowed: BTreeSet<&str> = profile["syscalls"]
                .as_array()
                .expect("syscalls")
                .iter()
                .filter(|r| r["action"] == "SCMP_ACT_ALLOW" && r.get("args").is_none())
                .flat_map(|r| r["names"].as_array().expect("names").iter())
                .filter_map(Value::as_str)
                .collect();
            for must in ["io_uring_setup", "io_uring_enter", "io_uring_register"] {
                if !allowed.contains(must) {
                    problems.push(format!("seccomp/{file}: {must} is not allowed"));
                }
            }
            for never in [
                "ptrace",
                "mount",
                "umount2",
                "unshare",
                "setns",
                "bpf",
                "init_module",
                "kexec_load",
            ] {
                if allowed.contains(never) {
                    problems.push(format!("seccomp/{file}: {never} should stay refused"));
                }
            }
            if profile["defaultAction"] != "SCMP_ACT_ERRNO" {
                problems.push(format!("seccomp/{file}: the default must refuse"));
            }
            // The pod installs it where kubelet looks, from a ConfigMap that
            // holds the same profile.
            let host_dir = format!("/var/lib/kubelet/seccomp/{dir}");
            let installer = spec
                .volumes
                .iter()
                .flatten()
                .find(|v| v.host_path.as_ref().is_some_and(|h| h.path == host_dir));
            if installer.is_none() {
                problems.push(format!(
                    "{}: nothing installs the profile into {host_dir}",
                    w.at
                ));
            }
            let from_config_map = spec
                .volumes
                .iter()
                .flatten()
                .filter_map(|v| v.config_map.as_ref())
                .filter_map(|cm| idx.config_map(&cm.name))
                .filter_map(|cm| cm.data.as_ref()?.get(file))
                .next();
            match from_config_map.map(|s| serde_json::from_str::<Value>(s)) {
                Some(Ok(v)) if v == profile => {}
                Some(Ok(_)) => problems.push(format!(
                    "{}: the ConfigMap copy of {file} differs from deploy/seccomp/{file}",
                    w.at
                )),
                Some(Err(e)) => {
                    problems.push(format!("{}: the ConfigMap copy of {file}: {e}", w.at))
                }
                None => problems.push(format!("{}: no ConfigMap of this pod holds {file}", w.at)),
            }
        }
    }
    if uses == 0 {
        problems.push("no container uses the io_uring seccomp profile".into());
    }
    report("seccomp", problems);
}

#[test]
fn storage_parameters_are_what_the_metadata_service_accepts() {
    let all = manifests();
    let idx = Index { all: &all };
    let tiers_json = idx
        .config_map("berth-tiers")
        .and_then(|c| c.data.as_ref()?.get("tiers.json").cloned())
        .expect("ConfigMap berth-tiers with tiers.json");
    let tiers = berth_metadata::tiers::load(Some(&tiers_json))
        .unwrap_or_else(|e| panic!("berth-tiers tiers.json: {e}"));
    let mut problems = Vec::new();
    let mut classes = 0;
    for m in &all {
        match &m.object {
            Object::StorageClass(sc) => {
                classes += 1;
                let params: BTreeMap<String, String> = sc.parameters.clone().unwrap_or_default();
                for (k, v) in &params {
                    match k.strip_prefix("csi.storage.k8s.io/") {
                        // The only reserved key Berth uses (it takes no secrets).
                        Some("fstype") => {
                            if !berth_csi::caps::FS_TYPES.contains(&v.as_str()) {
                                problems.push(format!("{}: fstype {v} (Berth makes {:?})", m.at, berth_csi::caps::FS_TYPES));
                            }
                            if params.get("fsType").is_some_and(|f| f != v) {
                                problems.push(format!("{}: fsType and csi.storage.k8s.io/fstype disagree", m.at));
                            }
                        }
                        Some(other) => problems.push(format!("{}: reserved parameter csi.storage.k8s.io/{other} is not one Berth uses", m.at)),
                        None => {}
                    }
                }
                if let Err(e) = berth_metadata::tiers::resolve(&tiers, &params) {
                    problems.push(format!("{}: the metadata service would refuse: {e}", m.at));
                }
                for o in sc.mount_options.iter().flatten() {
                    if o.is_empty() || o.contains(',') || o.contains(char::is_whitespace) {
                        problems.push(format!(
                            "{}: mount option {o:?}: one option each, no commas",
                            m.at
                        ));
                    }
                }
            }
            Object::VolumeAttributesClass(vac) => {
                let params: BTreeMap<String, String> = vac.parameters.clone().unwrap_or_default();
                if params.is_empty() {
                    problems.push(format!(
                        "{}: no parameters (ControllerModifyVolume needs some)",
                        m.at
                    ));
                }
                if let Err(e) = berth_metadata::tiers::check_mutable(&params) {
                    problems.push(format!("{}: {e}", m.at));
                }
                if let Err(e) = berth_metadata::tiers::resolve(&tiers, &params) {
                    problems.push(format!("{}: the metadata service would refuse: {e}", m.at));
                }
            }
            Object::VolumeSnapshotClass(vsc) => {
                for k in vsc.parameters.iter().flatten().map(|(k, _)| k) {
                    if !k.starts_with("csi.storage.k8s.io/") {
                        problems.push(format!(
                            "{}: snapshot parameter {k}: Berth snapshots take none",
                            m.at
                        ));
                    }
                }
            }
            _ => {}
        }
    }
    if classes < 4 {
        problems.push(format!(
            "{classes} StorageClasses, expected one per use case"
        ));
    }
    // Every built-in tier has its VolumeAttributesClass.
    for t in berth_metadata::tiers::default_tiers() {
        let has = all.iter().any(|m| match &m.object {
            Object::VolumeAttributesClass(v) => {
                v.parameters.as_ref().and_then(|p| p.get("tier")) == Some(&t.name)
            }
            _ => false,
        });
        if !has {
            problems.push(format!("no VolumeAttributesClass for tier {}", t.name));
        }
    }
    report("storage parameters", problems);
}

// ---- the checks themselves fail where they should -----------------------------

fn problems_of(yaml: &str) -> Vec<String> {
    let docs = parse_docs("inline.yaml", yaml).expect("yaml");
    docs.iter()
        .flat_map(|d| typed(d).err().unwrap_or_default())
        .collect()
}

#[test]
fn a_misspelled_key_an_unknown_kind_and_a_bad_value_are_caught() {
    let p = problems_of(
        "apiVersion: apps/v1
kind: DaemonSet
metadata: {name: x, namespace: berth-system}
spec:
  selector: {matchLabels: {a: b}}
  template:
    metadata: {labels: {a: b}}
    spec:
      containers:
        - name: c
          image: i:1
          volumeMounts:
            - {name: v, mountPath: /v, mountPropogation: Bidirectional}
            - {name: w, mountPath: /w, mountPropagation: Bidirectonal}
      volumes:
        - {name: v, emtpyDir: {}}
",
    );
    let all = p.join("\n");
    assert!(
        all.contains(
            "spec.template.spec.containers[0].volumeMounts[0].mountPropogation: not a field"
        ),
        "{all}"
    );
    assert!(all.contains("volumes[0].emtpyDir: not a field"), "{all}");
    assert!(
        all.contains("mountPropagation: \"Bidirectonal\" is not one of"),
        "{all}"
    );
    let p = problems_of("apiVersion: v1\nkind: Secrett\nmetadata: {name: x}\n");
    assert!(
        p.iter().any(|e| e.contains("unknown kind \"Secrett\"")),
        "{p:?}"
    );
    let p = problems_of("apiVersion: storage.k8s.io/v1\nkind: StorageClass\nmetadata: {name: x}\nprovisionr: csi.berth.dev\n");
    let all = p.join("\n");
    assert!(all.contains("provisionr: not a field"), "{all}");
    assert!(all.contains("provisioner: required, and missing"), "{all}");
    let p = problems_of(
        "apiVersion: snapshot.storage.k8s.io/v1\nkind: VolumeSnapshotClass\nmetadata: {name: x}\ndriver: d\ndeletionPolicy: Delete\nparamters: {}\n",
    );
    assert!(p.iter().any(|e| e.contains("paramters")), "{p:?}");
    let p = problems_of(
        "apiVersion: cert-manager.io/v1\nkind: Certificate\nmetadata: {name: x}\nspec: {secretName: x, issuerRef: {name: i}, dnsName: [x]}\n",
    );
    assert!(p.iter().any(|e| e.contains("dnsName")), "{p:?}");
    let p = problems_of(
        "apiVersion: cert-manager.io/v1\nkind: Certificate\nmetadata: {name: x}\nspec: {secretName: x, issuerRef: {name: i}, usages: [server-auth]}\n",
    );
    assert!(
        p.iter()
            .any(|e| e.contains("spec.usages: \"server-auth\" is not one of")),
        "{p:?}"
    );
    let p = problems_of("apiVersion: cert-manager.io/v1\nkind: Issuer\nmetadata: {name: x}\nspec: {selfSinged: {}}\n");
    assert!(p.iter().any(|e| e.contains("selfSinged")), "{p:?}");
}

#[test]
fn a_flag_berth_does_not_have_and_an_undefined_variable_are_caught() {
    let cli = berth_cli();
    let c: Container = serde_json::from_value(serde_json::json!({
        "name": "v",
        "image": berth_image(),
        "args": ["volume-server", "--data=/d", "--nbd-listn=$(NODE_IP):10809", "--log-json"],
        "env": [{"name": "BERTH_POOL_SIZ", "value": "1G"}],
    }))
    .expect("container");
    let p = check_berth_container(&c, &cli).join("\n");
    assert!(p.contains("no flag --nbd-listn"), "{p}");
    assert!(!p.contains("--data") && !p.contains("--log-json"), "{p}");
    assert!(p.contains("env BERTH_POOL_SIZ"), "{p}");
    assert_eq!(undefined_vars(&c), ["$(NODE_IP) is used but not in env"]);
    let c: Container = serde_json::from_value(serde_json::json!({
        "name": "c", "image": berth_image(), "args": ["csi", "--mode=controler"],
    }))
    .expect("container");
    assert!(check_berth_container(&c, &cli)
        .join("\n")
        .contains("--mode"));
    let c: Container = serde_json::from_value(serde_json::json!({
        "name": "c", "image": berth_image(), "args": ["volume-srever"],
    }))
    .expect("container");
    assert!(check_berth_container(&c, &cli)
        .join("\n")
        .contains("not a berth subcommand"));
}

#[test]
fn tls_checks_catch_plain_http_missing_certificates_and_open_keys() {
    let yaml = "apiVersion: cert-manager.io/v1
kind: Certificate
metadata: {name: x-tls, namespace: berth-system}
spec:
  secretName: x-tls
  issuerRef: {name: nobody}
  dnsNames: [x]
---
apiVersion: v1
kind: Service
metadata: {name: berth-metadata, namespace: berth-system}
spec:
  selector: {a: meta}
  ports: [{name: grpc, port: 9580}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: d, namespace: berth-system}
spec:
  selector: {matchLabels: {a: b}}
  template:
    metadata: {labels: {a: b}}
    spec:
      securityContext: {runAsUser: 10001}
      containers:
        - name: csi
          image: IMAGE
          args:
            - csi
            - --metadata=http://berth-metadata.berth-system.svc:9580
        - name: vs
          image: IMAGE
          args:
            - volume-server
            - --data=/d
            - --tls-dir=/tls
            - --nbd-tls-optional
          volumeMounts:
            - {name: tls, mountPath: /tls}
        - name: vs2
          image: IMAGE
          args:
            - volume-server
            - --data=/d
            - --tls-dir=/tls2
            - --tls-allow=berth-admin,ghost
          volumeMounts:
            - {name: tls2, mountPath: /tls2, readOnly: true}
        - name: meta
          image: IMAGE
          args:
            - metadata
            - --data=/m
            - --tls-dir=/tls
            - --tls-allow=a*b
          volumeMounts:
            - {name: tls, mountPath: /tls, readOnly: true}
      volumes:
        - name: tls
          secret: {secretName: x-tls, defaultMode: 420}
        - name: tls2
          secret: {secretName: made-by-nobody, defaultMode: 256}
"
    .replace("IMAGE", &berth_image());
    let docs = parse_docs("inline.yaml", &yaml).expect("yaml");
    let all: Vec<Manifest> = docs
        .iter()
        .map(|d| typed(d).unwrap_or_else(|p| panic!("{p:?}")))
        .collect();
    let p = tls_problems(&all, "berth-volume-server").join("\n");
    for want in [
        "container csi: berth csi talks over TCP without certificates",
        "container csi: metadata endpoint http://berth-metadata.berth-system.svc:9580 is not https://",
        "container vs: the mount at /tls is not readOnly",
        "container vs: Secret x-tls defaultMode 0644",
        "container vs: Certificate x-tls lacks the DNS name berth-volume-server",
        "container vs: NBD over TCP must require STARTTLS",
        "container vs2: uid 10001 cannot read Secret made-by-nobody",
        "container vs2: Secret made-by-nobody is made by no Certificate",
        "issuerRef Issuer nobody (cert-manager.io) is not an Issuer here",
        "0 CA Certificates",
        "container vs: berth volume-server takes calls from any certificate the CA signed",
        "container vs2: --tls-allow names ghost, which is no Certificate here (nor berth-admin)",
        "container vs2: --tls-allow berth-admin,ghost refuses x, the certificate of inline.yaml",
        "container meta: --tls-allow \"a*b\": not a certificate name",
    ] {
        assert!(p.contains(want), "missing {want:?} in:\n{p}");
    }
    let services = BTreeSet::from(["berth-metadata".to_string()]);
    let http = plain_http_to_services(&docs, &services).join("\n");
    assert!(
        http.contains("args[1]: \"--metadata=http://berth-metadata.berth-system.svc:9580\" dials Service berth-metadata in plain HTTP"),
        "{http}"
    );
    assert_eq!(go_duration("8760h"), Some(8760 * 3600));
    assert_eq!(go_duration("1h30m"), Some(5400));
    assert_eq!(go_duration("90d"), None);
    assert_eq!(go_duration("10ms"), None);
    assert_eq!(volume_server_name(), "berth-volume-server");
}

#[test]
fn the_cli_reader_sees_what_berth_rs_declares() {
    let cli = berth_cli();
    let vs = &cli["volume-server"];
    for f in [
        "data",
        "pool",
        "pool-size",
        "nbd-listen",
        "label",
        "node-name",
        "pool-media",
        "log-json",
        "drain-seconds",
    ] {
        assert!(vs.flags.contains(f), "volume-server --{f}: {vs:?}");
    }
    for e in [
        "BERTH_DATA",
        "BERTH_NODE_NAME",
        "BERTH_LOG_JSON",
        "BERTH_POOL_MEDIA",
    ] {
        assert!(vs.envs.contains(e), "volume-server {e}: {vs:?}");
    }
    let csi = &cli["csi"];
    assert!(csi.flags.contains("mode") && csi.flags.contains("state-dir"));
    assert!(csi.envs.contains("CSI_ENDPOINT"));
    assert!(!csi.flags.contains("pool-size"));
    assert!(
        cli["metadata"].flags.contains("tiers"),
        "flattened CatalogArgs"
    );
    // TlsArgs, flattened into every program that talks over TCP.
    for sub in ["metadata", "volume-server", "csi", "standalone", "attach"] {
        let a = &cli[sub];
        assert!(
            a.flags.contains("tls-dir") && a.envs.contains("BERTH_TLS_DIR"),
            "{sub} --tls-dir: {a:?}"
        );
    }
    assert!(vs.flags.contains("nbd-tls-optional") && vs.envs.contains("BERTH_NBD_TLS_OPTIONAL"));
    // AllowArgs, in the programs that serve gRPC over TCP.
    for sub in ["metadata", "volume-server", "standalone"] {
        let a = &cli[sub];
        assert!(
            a.flags.contains("tls-allow") && a.envs.contains("BERTH_TLS_ALLOW"),
            "{sub} --tls-allow: {a:?}"
        );
    }
    assert!(vs.flags.contains("advertise-control") && vs.flags.contains("metadata"));
}

/// Whether ClusterRole `role` allows `verb` on `group`/`resource`.
fn cluster_role_allows(
    all: &[Manifest],
    role: &str,
    group: &str,
    resource: &str,
    verb: &str,
) -> bool {
    all.iter().any(|m| match &m.object {
        Object::ClusterRole(r) if r.metadata.name.as_deref() == Some(role) => {
            r.rules.iter().flatten().any(|rule| {
                let has = |list: &Option<Vec<String>>, want: &str| {
                    list.iter().flatten().any(|x| x == want || x == "*")
                };
                has(&rule.api_groups, group)
                    && has(&rule.resources, resource)
                    && rule.verbs.iter().any(|v| v == verb || v == "*")
            })
        }
        _ => false,
    })
}

#[test]
fn the_snapshotter_role_grants_what_csi_snapshotter_v8_6_asks_for() {
    // The rules of upstream's deploy/kubernetes/csi-snapshotter/rbac-csi-snapshotter.yaml
    // at v8.6.0 (the version 05-csi-controller.yaml runs), group snapshots included.
    let all = manifests();
    let snap = "snapshot.storage.k8s.io";
    let group = "groupsnapshot.storage.k8s.io";
    let needed: &[(&str, &str, &[&str])] = &[
        (
            "",
            "events",
            &["list", "watch", "create", "update", "patch"],
        ),
        (snap, "volumesnapshotclasses", &["get", "list", "watch"]),
        (
            snap,
            "volumesnapshotcontents",
            &["get", "list", "watch", "update", "patch"],
        ),
        (snap, "volumesnapshotcontents/status", &["update", "patch"]),
        (
            group,
            "volumegroupsnapshotclasses",
            &["get", "list", "watch"],
        ),
        (
            group,
            "volumegroupsnapshotcontents",
            &["get", "list", "watch", "update", "patch"],
        ),
        (
            group,
            "volumegroupsnapshotcontents/status",
            &["update", "patch"],
        ),
    ];
    let mut problems = Vec::new();
    for (g, resource, verbs) in needed {
        for verb in *verbs {
            if !cluster_role_allows(&all, "berth-external-snapshotter", g, resource, verb) {
                problems.push(format!(
                    "berth-external-snapshotter cannot {verb} {g}/{resource}"
                ));
            }
        }
    }
    report("csi-snapshotter RBAC", problems);
}
