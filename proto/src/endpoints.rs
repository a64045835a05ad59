//! One gRPC channel to a service run as several instances of which one
//! leads (the metadata service over etcd): calls go to the leader, found by
//! the client itself.
//!
//! A follower refuses a call at once with UNAVAILABLE and the leader's
//! address in [`LEADER_HEADER`] (empty while nobody leads). The channel then
//! sends the same request to that address (one of its endpoints, or a new
//! one it learns), and remembers it for the next call. A call is sent again
//! only where it provably did not run: a follower's refusal, or a connection
//! that could not be made. A call whose connection broke after it was sent
//! fails to the caller (it may have run), and the next call tries the next
//! endpoint; the metadata API's calls are idempotent by name, so callers
//! retry them.
//!
//! While no leader is known (an election in progress), calls wait and try
//! again, up to [`PATIENCE`] (a failover takes about one lease TTL), then
//! fail UNAVAILABLE.
//!
//! Requests are buffered (to send them again): this channel is for APIs
//! whose requests are single messages (unary or server-streaming calls), as
//! every metadata call is.

use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use tonic::transport::Channel;
use tower::{Service, ServiceExt};

use crate::{ChannelError, ClientTls};

/// The metadata (gRPC header) in which a follower names the leader.
pub const LEADER_HEADER: &str = "berth-leader";

/// How long a call looks for a leader before it fails.
pub const PATIENCE: Duration = Duration::from_secs(15);

/// Endpoints a client may learn from followers (a bound: the addresses
/// come from the network).
const MAX_ENDPOINTS: usize = 16;

type StdError = Box<dyn std::error::Error + Send + Sync>;
type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

struct Inner {
    endpoints: parking_lot::Mutex<(Vec<(String, Channel)>, usize)>,
    tls: Option<ClientTls>,
}

/// A channel to the leader among `endpoints` (see the module).
#[derive(Clone)]
pub struct LeaderChannel {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for LeaderChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let e = self.inner.endpoints.lock();
        f.debug_struct("LeaderChannel")
            .field("endpoints", &e.0.iter().map(|(a, _)| a).collect::<Vec<_>>())
            .field("current", &e.1)
            .finish()
    }
}

/// Splits `A,B,C` into endpoints.
pub fn split(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

impl LeaderChannel {
    /// Channels to every endpoint of `list` (`A,B,C`: each as
    /// [`crate::channel`] takes it), connected on first use.
    pub fn new(list: &str, tls: Option<&ClientTls>) -> Result<LeaderChannel, ChannelError> {
        let names = split(list);
        if names.is_empty() {
            return Err(ChannelError::Endpoint(format!(
                "no endpoint in {list:?} (give A or A,B,C)"
            )));
        }
        let mut v = Vec::with_capacity(names.len());
        for n in names {
            let ch = crate::lazy_channel(&n, tls)?;
            v.push((n, ch));
        }
        Ok(LeaderChannel {
            inner: Arc::new(Inner {
                endpoints: parking_lot::Mutex::new((v, 0)),
                tls: tls.cloned(),
            }),
        })
    }

    /// Like [`new`](Self::new), but connects to each endpoint now and
    /// starts with the first that answers; fails (with that endpoint's error)
    /// only when none does. For commands, which report a server that is
    /// not there at once.
    pub async fn connect(
        list: &str,
        tls: Option<&ClientTls>,
    ) -> Result<LeaderChannel, ChannelError> {
        let lazy = LeaderChannel::new(list, tls)?;
        let mut first_err = None;
        for (i, n) in split(list).iter().enumerate() {
            match crate::channel(n, tls).await {
                Ok(ch) => {
                    let mut e = lazy.inner.endpoints.lock();
                    e.0[i].1 = ch;
                    e.1 = i;
                    drop(e);
                    return Ok(lazy);
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        Err(first_err.unwrap_or_else(|| ChannelError::Endpoint("no endpoint".into())))
    }

    /// Calls go to the next endpoint from now on: for a caller whose call
    /// got no answer in time (a paused process holds calls without
    /// refusing them), where the call may safely be asked again elsewhere.
    pub fn skip(&self) {
        let i = self.inner.endpoints.lock().1;
        self.inner.advance(i);
    }
}

impl Inner {
    fn pick(&self) -> (usize, Channel) {
        let e = self.endpoints.lock();
        (e.1, e.0[e.1].1.clone())
    }

    /// The endpoint after `i` (unless another call moved on already).
    fn advance(&self, i: usize) {
        let mut e = self.endpoints.lock();
        if e.1 == i {
            e.1 = (i + 1) % e.0.len();
        }
    }

    /// Calls go to `leader` from now on.
    fn point_to(&self, leader: &str) -> bool {
        let mut e = self.endpoints.lock();
        if let Some(i) = e.0.iter().position(|(a, _)| a == leader) {
            e.1 = i;
            return true;
        }
        if e.0.len() >= MAX_ENDPOINTS {
            return false;
        }
        match crate::lazy_channel(leader, self.tls.as_ref()) {
            Ok(ch) => {
                e.0.push((leader.to_string(), ch));
                e.1 = e.0.len() - 1;
                true
            }
            Err(err) => {
                tracing::warn!(leader, error = %err, "cannot dial the leader a follower named");
                false
            }
        }
    }
}

/// A follower's refusal: the leader it names (empty: none known).
fn leader_hint<B>(resp: &http::Response<B>) -> Option<String> {
    let h = resp.headers();
    if h.get("grpc-status").map(|v| v.as_bytes()) != Some(b"14") {
        return None;
    }
    h.get(LEADER_HEADER)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
}

/// The connection could not be made, so the request was never sent.
fn not_sent(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind as K;
            if matches!(
                io.kind(),
                K::ConnectionRefused
                    | K::NotFound
                    | K::AddrNotAvailable
                    | K::HostUnreachable
                    | K::NetworkUnreachable
            ) {
                return true;
            }
        }
        cur = err.source();
    }
    false
}

impl Service<http::Request<tonic::body::Body>> for LeaderChannel {
    type Response = http::Response<tonic::body::Body>;
    type Error = StdError;
    type Future = BoxFuture<Result<Self::Response, StdError>>;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), StdError>> {
        // Each call waits for its endpoint's channel to be ready.
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let inner = self.inner.clone();
        Box::pin(async move {
            let (parts, body) = req.into_parts();
            let bytes = body.collect().await.map_err(StdError::from)?.to_bytes();
            let deadline = Instant::now() + PATIENCE;
            // Refusals and refused connections so far: the first refusal
            // that names a leader is followed at once, later ones after a
            // pause that gives the election time.
            let mut misses = 0usize;
            loop {
                let (i, ch) = inner.pick();
                let req = http::Request::from_parts(
                    parts.clone(),
                    tonic::body::Body::new(http_body_util::Full::new(bytes.clone())),
                );
                let late = Instant::now() >= deadline;
                match ch.oneshot(req).await {
                    Ok(resp) => match leader_hint(&resp) {
                        None => return Ok(resp),
                        Some(_) if late => return Ok(resp),
                        Some(leader) if leader.is_empty() => {
                            inner.advance(i);
                            misses += 2;
                        }
                        Some(leader) => {
                            if !inner.point_to(&leader) {
                                // A leader this client cannot dial (https://
                                // without certificates, say): the refusal,
                                // which names it, is the answer.
                                return Ok(resp);
                            }
                            misses += 1;
                        }
                    },
                    Err(e) => {
                        inner.advance(i);
                        if late || !not_sent(&e) {
                            return Err(e.into());
                        }
                        misses += 2;
                    }
                }
                if misses > 1 {
                    let pause = if misses < 6 { 50 } else { 250 };
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                }
            }
        })
    }
}

/// A metadata API client over [`LeaderChannel`].
pub type MetaClient =
    crate::meta::v1::metadata_service_client::MetadataServiceClient<LeaderChannel>;

/// A metadata API client for `A[,B,...]`, connected on first use.
pub fn meta_client(list: &str, tls: Option<&ClientTls>) -> Result<MetaClient, ChannelError> {
    Ok(MetaClient::new(LeaderChannel::new(list, tls)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_split_and_bad_lists_fail() {
        assert_eq!(split(" a, b ,,c"), ["a", "b", "c"]);
        assert!(LeaderChannel::new(" , ", None).is_err());
    }

    #[test]
    fn a_refused_connection_was_not_sent() {
        let e = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert!(not_sent(&e));
        let e = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert!(!not_sent(&e));
    }

    #[test]
    fn only_an_unavailable_refusal_names_a_leader() {
        let r = http::Response::builder()
            .header("grpc-status", "14")
            .header(LEADER_HEADER, "http://b:1")
            .body(())
            .expect("response");
        assert_eq!(leader_hint(&r).as_deref(), Some("http://b:1"));
        let r = http::Response::builder()
            .header("grpc-status", "5")
            .header(LEADER_HEADER, "http://b:1")
            .body(())
            .expect("response");
        assert_eq!(leader_hint(&r), None);
        let r = http::Response::builder()
            .header("grpc-status", "14")
            .body(())
            .expect("response");
        assert_eq!(leader_hint(&r), None, "an UNAVAILABLE of another cause");
    }
}
