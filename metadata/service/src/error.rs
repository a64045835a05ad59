//! The metadata service's errors and their one conversion to gRPC statuses.

use berth_catalog::CatalogError;
use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    OutOfRange(String),
    #[error("{0}")]
    FailedPrecondition(String),
    /// Nowhere to put it: the message says why, node by node.
    #[error("{0}")]
    Unplaceable(String),
    /// The node that holds the object is down or unreachable; names it.
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Aborted(String),
    #[error("catalog: {0}")]
    Catalog(#[from] CatalogError),
    /// A volume server answered with an error; its code is kept.
    #[error("volume server {node}: {message}")]
    Server {
        node: String,
        code: Code,
        message: String,
    },
}

/// A membership change the replica set refused (an old generation, the last
/// in-sync copy...): the caller's view is out of date.
impl From<berth_catalog::replication::MembershipError> for MetaError {
    fn from(e: berth_catalog::replication::MembershipError) -> Self {
        MetaError::FailedPrecondition(e.to_string())
    }
}

impl MetaError {
    pub fn server(node: &str, s: &Status) -> Self {
        match s.code() {
            // The transport failed or the server is stopping: the node is
            // unreachable, whatever its last heartbeat said.
            Code::Unavailable | Code::DeadlineExceeded | Code::Unknown | Code::Cancelled => {
                MetaError::Unavailable(format!(
                    "volume server {node} is unreachable: {}",
                    s.message()
                ))
            }
            // The catalog has the object but its server does not: not the
            // caller's "does not exist"; reconcile will flag it as lost.
            Code::NotFound => MetaError::FailedPrecondition(format!(
                "volume server {node} does not have it: {}",
                s.message()
            )),
            code => MetaError::Server {
                node: node.to_string(),
                code,
                message: s.message().to_string(),
            },
        }
    }

    pub fn code(&self) -> Code {
        match self {
            MetaError::NotFound(_) => Code::NotFound,
            MetaError::AlreadyExists(_) => Code::AlreadyExists,
            MetaError::InvalidArgument(_) => Code::InvalidArgument,
            MetaError::OutOfRange(_) => Code::OutOfRange,
            MetaError::FailedPrecondition(_) => Code::FailedPrecondition,
            MetaError::Unplaceable(_) => Code::ResourceExhausted,
            MetaError::Unavailable(_) => Code::Unavailable,
            MetaError::Aborted(_) => Code::Aborted,
            MetaError::Catalog(CatalogError::Conflict { .. }) => Code::Aborted,
            // Ask again: the store is back, or another service leads and the
            // client finds it.
            MetaError::Catalog(CatalogError::Unavailable(_) | CatalogError::Fenced(_)) => {
                Code::Unavailable
            }
            MetaError::Catalog(_) => Code::Internal,
            MetaError::Server { code, .. } => *code,
        }
    }
}

impl From<MetaError> for Status {
    fn from(e: MetaError) -> Status {
        Status::new(e.code(), e.to_string())
    }
}

pub type Result<T> = std::result::Result<T, MetaError>;
