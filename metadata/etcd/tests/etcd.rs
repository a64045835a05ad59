//! The etcd backend against a real etcd on loopback: the catalog contract,
//! the model test, pagination, and the fencing of a leader whose lease is
//! gone.

use std::sync::Arc;
use std::time::Duration;

use berth_catalog::{CatalogError, CatalogStore, Role, Table, Txn};
use berth_catalog_etcd::testing::EtcdCluster;
use berth_catalog_etcd::{campaign, EtcdCatalog, EtcdConfig};
use proptest::prelude::*;

fn catalog(etcd: &EtcdCluster, prefix: &str) -> Arc<EtcdCatalog> {
    let mut cfg = EtcdConfig::new(etcd.endpoints());
    cfg.prefix = format!("/t/{prefix}");
    EtcdCatalog::connect(&cfg).expect("connect")
}

#[test]
fn meets_the_catalog_contract() {
    let etcd = EtcdCluster::start(1);
    berth_catalog::conformance::run(&*catalog(&etcd, "contract"));
}

/// Random transactions with random conditions: etcd accepts and refuses
/// exactly what the in-memory model does and ends in the same state, seen
/// again through a second client; and so does a leader's fenced store. (A runner of our own rather than
/// `proptest!`, so that one etcd serves every case and stops with the test.)
#[test]
fn etcd_matches_the_in_memory_model() {
    use proptest::test_runner::{Config, TestRunner};
    let etcd = EtcdCluster::start(1);
    let n = std::sync::atomic::AtomicUsize::new(0);
    let mut runner = TestRunner::new(Config {
        cases: 48,
        ..Config::default()
    });
    runner
        .run(
            &proptest::collection::vec(berth_catalog::model::txn(), 1..30),
            |txns| {
                let prefix = format!(
                    "model{}",
                    n.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                );
                let model = berth_catalog::model::check(&*catalog(&etcd, &prefix), txns.clone())?;
                prop_assert_eq!(
                    berth_catalog::model::dump(&*catalog(&etcd, &prefix)),
                    berth_catalog::model::dump(&model)
                );
                // The same through a leader's store (its copy in memory, its
                // fence), seen again through a plain client.
                let leader_prefix = format!("{prefix}-leader");
                let c = catalog(&etcd, &leader_prefix);
                let (mut roles, _resign) = campaign(&c, "http://me".into(), Duration::from_secs(2));
                let Role::Leader { store, .. } =
                    wait_role(&mut roles, "leads", |r| matches!(r, Role::Leader { .. }))
                else {
                    unreachable!()
                };
                let model = berth_catalog::model::check(&*store, txns)?;
                prop_assert_eq!(
                    berth_catalog::model::dump(&*catalog(&etcd, &leader_prefix)),
                    berth_catalog::model::dump(&model)
                );
                Ok(())
            },
        )
        .expect("etcd behaves as the model");
}

#[test]
fn scans_page_through_long_tables_at_one_revision() {
    let etcd = EtcdCluster::start(1);
    let c = catalog(&etcd, "pages");
    // More than two of the backend's pages, in batches.
    let n = 1200usize;
    for chunk in (0..n).collect::<Vec<_>>().chunks(200) {
        let mut t = Txn::new();
        for i in chunk {
            t = t.put(Table::Volumes, format!("v{i:05}"), vec![(*i % 251) as u8]);
        }
        c.commit(t).expect("batch");
    }
    let all = c.scan(Table::Volumes, None, 0).expect("scan");
    assert_eq!(all.len(), n);
    assert!(all.windows(2).all(|w| w[0].0 < w[1].0), "key order");
    assert_eq!(all[777].0, b"v00777");
    let page = c.scan(Table::Volumes, Some(b"v00511"), 600).expect("scan");
    assert_eq!(page.len(), 600);
    assert_eq!(page[0].0, b"v00512");
    assert_eq!(page[599].0, b"v01111");
    assert_eq!(
        c.scan(Table::Volumes, Some(b"v00511"), 0)
            .expect("scan")
            .len(),
        n - 512
    );
    // Other tables and other prefixes are not in the range.
    assert!(c.scan(Table::Snapshots, None, 0).expect("scan").is_empty());
    assert!(catalog(&etcd, "pages-other")
        .scan(Table::Volumes, None, 0)
        .expect("scan")
        .is_empty());
}

fn wait_role(
    rx: &mut tokio::sync::watch::Receiver<Role>,
    what: &str,
    want: impl Fn(&Role) -> bool,
) -> Role {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let r = rx.borrow().clone();
        if want(&r) {
            return r;
        }
        assert!(std::time::Instant::now() < deadline, "{what}: still {r:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Two services campaign on one catalog: one leads, the other follows it
/// and names it. When the leadership key goes (as when the leader's lease
/// expires), the follower leads a later term, and etcd refuses every write
/// of the old leader's store, which then steps down.
#[test]
fn one_leader_and_a_deposed_leader_cannot_write() {
    let etcd = EtcdCluster::start(1);
    let a = catalog(&etcd, "elect");
    let b = catalog(&etcd, "elect");
    let ttl = Duration::from_secs(2);
    let (mut ra, _resign_a) = campaign(&a, "http://a".into(), ttl);
    let Role::Leader {
        term: ta,
        store: sa,
    } = wait_role(&mut ra, "a leads", |r| matches!(r, Role::Leader { .. }))
    else {
        unreachable!()
    };
    let (mut rb, resign_b) = campaign(&b, "http://b".into(), ttl);
    wait_role(
        &mut rb,
        "b follows a",
        |r| matches!(r, Role::Follower { leader: Some(l) } if l == "http://a"),
    );
    sa.commit(Txn::new().put(Table::Volumes, "by-a", vec![1]))
        .expect("the leader writes");

    // The key goes: b campaigns and wins a later term.
    let mut client = a.client();
    let key = a.leader_key().to_vec();
    tokio::runtime::Runtime::new()
        .expect("rt")
        .block_on(client.delete(key, None))
        .expect("delete the leader key");
    let Role::Leader {
        term: tb,
        store: sb,
    } = wait_role(&mut rb, "b leads", |r| matches!(r, Role::Leader { .. }))
    else {
        unreachable!()
    };
    assert!(tb > ta, "terms grow: {ta} then {tb}");
    // a's store is refused by etcd, whatever a believes.
    let e = sa
        .commit(Txn::new().put(Table::Volumes, "by-a", vec![2]))
        .expect_err("a deposed leader's write");
    assert!(matches!(e, CatalogError::Fenced(_)), "{e}");
    assert!(
        e.to_string().contains("http://b"),
        "names the new leader: {e}"
    );
    sb.commit(
        Txn::new()
            .require_equals(Table::Volumes, "by-a", vec![1])
            .put(Table::Volumes, "by-a", vec![3]),
    )
    .expect("b writes over a's last acknowledged write");
    // And a steps down and follows b.
    wait_role(
        &mut ra,
        "a follows b",
        |r| matches!(r, Role::Follower { leader: Some(l) } if l == "http://b"),
    );
    assert_eq!(a.get(Table::Volumes, b"by-a").expect("get"), Some(vec![3]));
    // b resigns: a leads at once, without waiting for b's lease to expire.
    let t = std::time::Instant::now();
    tokio::runtime::Runtime::new()
        .expect("rt")
        .block_on(resign_b.now());
    wait_role(&mut ra, "a leads after b resigned", |r| {
        matches!(r, Role::Leader { .. })
    });
    assert!(
        t.elapsed() < ttl,
        "a took over in {:?}, not after b's lease",
        t.elapsed()
    );
}

/// Conditions that fail are told apart from a lost leadership, and name
/// their key.
#[test]
fn a_refused_condition_names_its_key() {
    let etcd = EtcdCluster::start(1);
    let c = catalog(&etcd, "conflict");
    c.commit(Txn::new().put(Table::Volumes, "x", b"1".to_vec()))
        .expect("put");
    let e = c
        .commit(
            Txn::new()
                .require_absent(Table::Volumes, "y")
                .require_equals(Table::Volumes, "x", b"2".to_vec())
                .put(Table::Volumes, "y", vec![]),
        )
        .expect_err("stale");
    match e {
        CatalogError::Conflict { table, key } => {
            assert_eq!((table, key.as_str()), ("volumes", "x"));
        }
        e => panic!("{e}"),
    }
}

/// An etcd nobody answers on is Unavailable, within the request timeout.
#[test]
fn an_unreachable_etcd_is_unavailable() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let mut cfg = EtcdConfig::new(vec![format!("http://127.0.0.1:{port}")]);
    cfg.request_timeout = Duration::from_secs(1);
    let t = std::time::Instant::now();
    let r = EtcdCatalog::connect(&cfg).and_then(|c| c.get(Table::Volumes, b"x"));
    let e = r.expect_err("nobody listens");
    assert!(matches!(e, CatalogError::Unavailable(_)), "{e}");
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
}

/// The leader reads from its copy of the catalog, but etcd decides: a
/// write that someone made behind its back makes its stale compare fail,
/// and its next reads see etcd's value.
#[test]
fn the_leaders_copy_yields_to_what_etcd_holds() {
    let etcd = EtcdCluster::start(1);
    let a = catalog(&etcd, "copy");
    let (mut ra, _resign) = campaign(&a, "http://a".into(), Duration::from_secs(2));
    let Role::Leader { store, .. } =
        wait_role(&mut ra, "a leads", |r| matches!(r, Role::Leader { .. }))
    else {
        unreachable!()
    };
    store
        .commit(Txn::new().put(Table::Volumes, "v", b"1".to_vec()))
        .expect("put");
    assert_eq!(
        store.get(Table::Volumes, b"v").expect("get"),
        Some(b"1".to_vec())
    );
    // Behind the leader's back (an administrator with etcdctl).
    a.commit(Txn::new().put(Table::Volumes, "v", b"2".to_vec()))
        .expect("outside write");
    let e = store
        .commit(
            Txn::new()
                .require_equals(Table::Volumes, "v", b"1".to_vec())
                .put(Table::Volumes, "v", b"3".to_vec()),
        )
        .expect_err("a compare on the stale copy");
    assert!(matches!(e, CatalogError::Conflict { .. }), "{e}");
    assert_eq!(
        store.get(Table::Volumes, b"v").expect("get"),
        Some(b"2".to_vec())
    );
    assert_eq!(store.scan(Table::Volumes, None, 0).expect("scan").len(), 1);
    // The audit log is always read from etcd.
    a.commit(Txn::new().put(Table::Audit, "e1", b"x".to_vec()))
        .expect("audit");
    assert_eq!(
        store.get(Table::Audit, b"e1").expect("get"),
        Some(b"x".to_vec())
    );
}

/// etcd with client certificate authentication, as a cluster runs it: the
/// catalog works with a certificate its CA signed, and a client without one
/// is turned away.
#[test]
fn over_tls_with_a_client_certificate() {
    let pki = tempfile::tempdir().expect("tempdir");
    let issues: Vec<berth_proto::tls::Issue> = ["etcd=127.0.0.1,localhost", "berth-metadata"]
        .iter()
        .map(|s| s.parse().expect("issue"))
        .collect();
    berth_proto::tls::generate(&pki.path().join("pki"), &issues, 1).expect("certificates");
    let dir = |n: &str| pki.path().join("pki").join(n);
    let client = berth_proto::TlsDir::load(dir("berth-metadata")).expect("client certificate");
    let etcd = EtcdCluster::start_tls(1, &dir("etcd"), client.grpc_client(None));
    let mut cfg = EtcdConfig::new(etcd.endpoints());
    cfg.prefix = "/t/tls".into();
    cfg.tls = Some(client.grpc_client(None));
    berth_catalog::conformance::run(&*EtcdCatalog::connect(&cfg).expect("connect over TLS"));

    // The same CA but no certificate of one's own: refused.
    let ca = std::fs::read(dir("etcd").join("ca.crt")).expect("ca");
    cfg.tls =
        Some(etcd_client::TlsOptions::new().ca_certificate(etcd_client::Certificate::from_pem(ca)));
    cfg.request_timeout = Duration::from_secs(2);
    let r = EtcdCatalog::connect(&cfg).and_then(|c| c.get(Table::Volumes, b"a"));
    assert!(
        r.is_err(),
        "a client without a certificate was served: {r:?}"
    );
}
