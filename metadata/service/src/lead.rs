//! Serving while this process leads the catalog.
//!
//! Several metadata services can share one catalog (etcd); one leads at a
//! time ([`berth_catalog::Role`], elected by the program's catalog backend).
//! Each term of leadership gets a fresh [`Meta`] (nothing cached from an
//! earlier term or from the time another service led: node liveness, pools
//! and provisioned sizes are read from the catalog again) over the term's
//! fenced store, and its own background loop. When the term ends, the loop
//! stops, nexuses listening here are let go (they find the new leader), and
//! calls still running finish against a store that refuses their writes.
//!
//! A call that reaches a follower is answered at once with UNAVAILABLE and
//! the leader's address in the `berth-leader` metadata (empty while nobody
//! leads): never with an answer from a catalog this process does not lead.
//! Clients given several endpoints follow it
//! ([`berth_proto::endpoints`]).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use berth_catalog::{CatalogStore, Role};
use berth_proto::meta::v1::metadata_service_server::MetadataServiceServer;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::meta::{Meta, MetaConfig};

/// Where the catalog is and who may write it.
pub enum Catalog {
    /// This process alone (an embedded RocksDB): it always leads.
    Single(Arc<dyn CatalogStore>),
    /// Shared with other services (etcd): it leads while elected.
    Elected(watch::Receiver<Role>),
}

impl std::fmt::Debug for Catalog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Catalog::Single(_) => f.write_str("Catalog::Single"),
            Catalog::Elected(r) => write!(f, "Catalog::Elected({:?})", *r.borrow()),
        }
    }
}

/// What the API serves now.
#[derive(Clone)]
pub enum Serving {
    Leader(Arc<Meta>, MetadataServiceServer<crate::grpc::Service>),
    /// The leader's address, when one is known.
    Follower(Option<String>),
}

impl std::fmt::Debug for Serving {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Serving::Leader(..) => f.write_str("Leader"),
            Serving::Follower(l) => write!(f, "Follower({l:?})"),
        }
    }
}

/// The metadata API, answered by the current term or refused with the
/// leader's address.
#[derive(Clone, Debug)]
pub struct Switch {
    serving: watch::Receiver<Serving>,
}

impl Switch {
    pub fn new(serving: watch::Receiver<Serving>) -> Self {
        Switch { serving }
    }
}

impl tonic::server::NamedService for Switch {
    const NAME: &'static str =
        <MetadataServiceServer<crate::grpc::Service> as tonic::server::NamedService>::NAME;
}

type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl tower::Service<http::Request<tonic::body::Body>> for Switch {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let now = self.serving.borrow().clone();
        match now {
            Serving::Leader(_, mut server) => Box::pin(async move { server.call(req).await }),
            Serving::Follower(leader) => {
                let mut st = tonic::Status::unavailable(match &leader {
                    Some(l) => format!("this metadata service does not lead; the leader is {l}"),
                    None => "this metadata service does not lead, and no leader is elected yet; \
                             retry"
                        .to_string(),
                });
                if let Ok(v) = leader.unwrap_or_default().parse() {
                    st.metadata_mut()
                        .insert(berth_proto::endpoints::LEADER_HEADER, v);
                }
                Box::pin(std::future::ready(Ok(st.into_http())))
            }
        }
    }
}

struct Term {
    id: u64,
    meta: Arc<Meta>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Term {
    /// Stops the term's background loop and lets its nexuses go; with
    /// `wait`, also waits (up to 60 s) for its calls to finish.
    async fn end(self, wait: bool) {
        self.stop.cancel();
        let _ = self.task.await;
        self.meta.nexuses.close_all();
        self.meta.calls.close();
        if wait
            && tokio::time::timeout(Duration::from_secs(60), self.meta.calls.wait())
                .await
                .is_err()
        {
            tracing::warn!(
                "calls still running after 60 s; stopping anyway (reconcile finishes them)"
            );
        }
        tracing::info!(term = self.id, "term ended");
    }
}

/// Follows this process's role until `stop`: a term per leadership.
pub(crate) async fn govern(
    catalog: Catalog,
    cfg: MetaConfig,
    serving: watch::Sender<Serving>,
    stop: CancellationToken,
) {
    let (_single, mut roles) = match catalog {
        Catalog::Single(store) => {
            let (tx, rx) = watch::channel(Role::Leader { term: 1, store });
            (Some(tx), rx)
        }
        Catalog::Elected(rx) => (None, rx),
    };
    let mut term: Option<Term> = None;
    loop {
        let role = roles.borrow_and_update().clone();
        let mut retry = false;
        match role {
            Role::Leader { term: id, store } => {
                if term.as_ref().map(|t| t.id) != Some(id) {
                    if let Some(t) = term.take() {
                        t.end(false).await;
                    }
                    // A fresh state, read from the catalog as it is now.
                    match Meta::new(store, cfg.clone()) {
                        Ok(meta) => {
                            let t_stop = CancellationToken::new();
                            let task =
                                tokio::spawn(crate::background(meta.clone(), t_stop.clone()));
                            let server = crate::grpc::Service::new(meta.clone()).into_server();
                            let _ = serving.send(Serving::Leader(meta.clone(), server));
                            tracing::info!(term = id, "serving as the leader");
                            term = Some(Term {
                                id,
                                meta,
                                stop: t_stop,
                                task,
                            });
                        }
                        Err(e) => {
                            tracing::warn!(term = id, error = %e, "cannot load the catalog to lead; retrying");
                            let _ = serving.send(Serving::Follower(None));
                            retry = true;
                        }
                    }
                }
            }
            Role::Follower { leader } => {
                let _ = serving.send(Serving::Follower(leader));
                if let Some(t) = term.take() {
                    t.end(false).await;
                }
            }
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            r = roles.changed() => if r.is_err() {
                tracing::error!("the catalog's election ended; serving nothing");
                let _ = serving.send(Serving::Follower(None));
                break;
            },
            _ = tokio::time::sleep(Duration::from_secs(1)), if retry => {}
        }
    }
    if let Some(t) = term.take() {
        t.end(true).await;
    }
}
