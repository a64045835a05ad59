//! The volume server's error type and its one mapping to gRPC status codes.

use berth_store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("the volume server is shutting down")]
    ShuttingDown,
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = ServerError> = std::result::Result<T, E>;

impl ServerError {
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ServerError {
        let what = what.into();
        move |source| ServerError::Io { what, source }
    }
}

impl From<ServerError> for tonic::Status {
    fn from(e: ServerError) -> Self {
        use tonic::Code;
        let code = match &e {
            ServerError::Store(s) => match s {
                StoreError::NotFound { .. } => Code::NotFound,
                StoreError::AlreadyExists { .. } => Code::AlreadyExists,
                StoreError::InvalidArgument(_) => Code::InvalidArgument,
                StoreError::OutOfRange { .. } => Code::OutOfRange,
                StoreError::ShrinkRefused { .. } | StoreError::ReadOnly { .. } => {
                    Code::FailedPrecondition
                }
                StoreError::FailedPrecondition(_) => Code::FailedPrecondition,
                StoreError::NoSpace { .. } | StoreError::NoRoom { .. } => Code::ResourceExhausted,
                StoreError::Integrity { .. } | StoreError::Corrupt { .. } => Code::DataLoss,
                StoreError::ShuttingDown => Code::Unavailable,
                StoreError::PoolLocked { .. } => Code::Unavailable,
                _ => Code::Internal,
            },
            ServerError::InvalidArgument(_) => Code::InvalidArgument,
            ServerError::NotFound(_) => Code::NotFound,
            ServerError::FailedPrecondition(_) => Code::FailedPrecondition,
            ServerError::ShuttingDown => Code::Unavailable,
            ServerError::Io { .. } => Code::Internal,
        };
        tonic::Status::new(code, e.to_string())
    }
}
