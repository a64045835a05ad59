//! A small NBD client: fixed newstyle, GO with structured replies and
//! `base:allocation`, pipelined requests. Tests and the benchmark use it to
//! drive the server exactly (malformed frames, several connections, block
//! status); everyday clients are qemu-io, nbdfuse, nbdcopy and the kernel.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::proto::*;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("server refused option {option}: reply {reply:#x}: {message}")]
    Refused {
        option: u32,
        reply: u32,
        message: String,
    },
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("request failed with NBD error {0}")]
    Errno(u32),
}

/// A reply to one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyMsg {
    pub handle: u64,
    pub error: u32,
    /// READ data, or the block status extents' raw descriptors (len, flags).
    pub data: Vec<u8>,
    pub extents: Vec<(u32, u32)>,
    /// Whether it came as structured reply chunks (READ must, once negotiated).
    pub structured: bool,
}

#[derive(Debug)]
pub struct Client<S> {
    s: S,
    pub size_bytes: u64,
    pub flags: u16,
    pub structured: bool,
    next_handle: u64,
}

async fn read_opt_reply<S: AsyncRead + Unpin>(
    s: &mut S,
) -> Result<(u32, u32, Vec<u8>), ClientError> {
    let magic = s.read_u64().await?;
    if magic != OPT_REPLY_MAGIC {
        return Err(ClientError::Protocol(format!(
            "bad option reply magic {magic:#x}"
        )));
    }
    let option = s.read_u32().await?;
    let reply = s.read_u32().await?;
    let len = s.read_u32().await?;
    if len > 1 << 20 {
        return Err(ClientError::Protocol(format!(
            "option reply of {len} bytes"
        )));
    }
    let mut data = vec![0u8; len as usize];
    s.read_exact(&mut data).await?;
    Ok((option, reply, data))
}

pub async fn send_option<S: AsyncWrite + Unpin>(
    s: &mut S,
    option: u32,
    data: &[u8],
) -> std::io::Result<()> {
    let mut b = Vec::with_capacity(16 + data.len());
    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    s.write_all(&b).await
}

/// Reads the greeting and sends the client flags.
pub async fn greet<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) -> Result<(), ClientError> {
    if s.read_u64().await? != NBDMAGIC || s.read_u64().await? != IHAVEOPT {
        return Err(ClientError::Protocol("bad greeting".into()));
    }
    let _flags = s.read_u16().await?;
    s.write_u32(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
        .await?;
    Ok(())
}

/// Sends an option and collects its replies up to the final one.
pub async fn option<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    option: u32,
    data: &[u8],
) -> Result<Vec<(u32, Vec<u8>)>, ClientError> {
    send_option(s, option, data).await?;
    let mut out = Vec::new();
    loop {
        let (opt, reply, d) = read_opt_reply(s).await?;
        if opt != option {
            return Err(ClientError::Protocol(format!(
                "reply for option {opt}, asked {option}"
            )));
        }
        if reply & (1 << 31) != 0 {
            return Err(ClientError::Refused {
                option,
                reply,
                message: String::from_utf8_lossy(&d).into(),
            });
        }
        if reply == REP_ACK {
            return Ok(out);
        }
        out.push((reply, d));
    }
}

/// NBD's STARTTLS from the client's side: the connector (CA and client
/// certificate) and the name the server's certificate must carry.
#[derive(Clone)]
pub struct TlsClient {
    pub connector: tokio_rustls::TlsConnector,
    pub server_name: rustls_pki_types::ServerName<'static>,
}

impl std::fmt::Debug for TlsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsClient")
            .field("server_name", &self.server_name)
            .finish()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<tokio_rustls::client::TlsStream<S>> {
    /// Greeting, STARTTLS, the TLS handshake, then the same options as
    /// [`Client::connect`] on the encrypted stream.
    pub async fn connect_tls(mut s: S, export: &str, tls: &TlsClient) -> Result<Self, ClientError> {
        greet(&mut s).await?;
        // STARTTLS's only good answer is a bare ACK.
        if !option(&mut s, OPT_STARTTLS, &[]).await?.is_empty() {
            return Err(ClientError::Protocol(
                "STARTTLS was answered with more than an ACK".into(),
            ));
        }
        let t = tls
            .connector
            .connect(tls.server_name.clone(), s)
            .await
            .map_err(|e| ClientError::Protocol(format!("TLS handshake: {e}")))?;
        Client::negotiate(t, export).await
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    /// Handshake: structured replies, `base:allocation`, then GO.
    pub async fn connect(mut s: S, export: &str) -> Result<Self, ClientError> {
        greet(&mut s).await?;
        Client::negotiate(s, export).await
    }

    /// The options after the greeting (and after STARTTLS, when used).
    async fn negotiate(mut s: S, export: &str) -> Result<Self, ClientError> {
        option(&mut s, OPT_STRUCTURED_REPLY, &[]).await?;
        let mut d = (export.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&1u32.to_be_bytes());
        d.extend_from_slice(&(BASE_ALLOCATION.len() as u32).to_be_bytes());
        d.extend_from_slice(BASE_ALLOCATION.as_bytes());
        option(&mut s, OPT_SET_META_CONTEXT, &d).await?;
        let mut d = (export.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&1u16.to_be_bytes());
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        let infos = option(&mut s, OPT_GO, &d).await?;
        let mut size_bytes = 0;
        let mut flags = 0;
        for (_, info) in infos {
            if info.len() == 12 && info[0..2] == INFO_EXPORT.to_be_bytes() {
                size_bytes = u64::from_be_bytes(info[2..10].try_into().unwrap_or_default());
                flags = u16::from_be_bytes([info[10], info[11]]);
            }
        }
        Ok(Client {
            s,
            size_bytes,
            flags,
            structured: true,
            next_handle: 1,
        })
    }

    /// Sends a request (with payload for writes) without waiting; returns its handle.
    pub async fn send(
        &mut self,
        command: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> Result<u64, ClientError> {
        let handle = self.next_handle;
        self.next_handle += 1;
        let r = encode_request(&Request {
            flags,
            command,
            handle,
            offset,
            len,
        });
        self.s.write_all(&r).await?;
        if !payload.is_empty() {
            self.s.write_all(payload).await?;
        }
        Ok(handle)
    }

    /// Reads the next complete reply (in whatever order the server sends them).
    pub async fn recv(&mut self) -> Result<ReplyMsg, ClientError> {
        let magic = self.s.read_u32().await?;
        match magic {
            SIMPLE_REPLY_MAGIC => {
                let error = self.s.read_u32().await?;
                let handle = self.s.read_u64().await?;
                Ok(ReplyMsg {
                    handle,
                    error,
                    data: Vec::new(),
                    extents: Vec::new(),
                    structured: false,
                })
            }
            STRUCTURED_REPLY_MAGIC => {
                let mut out = ReplyMsg {
                    handle: 0,
                    error: 0,
                    data: Vec::new(),
                    extents: Vec::new(),
                    structured: true,
                };
                let mut magic = magic;
                loop {
                    if magic != STRUCTURED_REPLY_MAGIC {
                        return Err(ClientError::Protocol(format!("bad chunk magic {magic:#x}")));
                    }
                    let flags = self.s.read_u16().await?;
                    let kind = self.s.read_u16().await?;
                    out.handle = self.s.read_u64().await?;
                    let len = self.s.read_u32().await? as usize;
                    let mut p = vec![0u8; len];
                    self.s.read_exact(&mut p).await?;
                    match kind {
                        REPLY_TYPE_OFFSET_DATA => out.data.extend_from_slice(&p[8.min(p.len())..]),
                        REPLY_TYPE_BLOCK_STATUS => {
                            for d in p[4.min(p.len())..].chunks_exact(8) {
                                out.extents.push((
                                    u32::from_be_bytes([d[0], d[1], d[2], d[3]]),
                                    u32::from_be_bytes([d[4], d[5], d[6], d[7]]),
                                ));
                            }
                        }
                        REPLY_TYPE_NONE => {}
                        k if k & (1 << 15) != 0 && p.len() >= 4 => {
                            out.error = u32::from_be_bytes([p[0], p[1], p[2], p[3]]);
                        }
                        k => return Err(ClientError::Protocol(format!("chunk type {k}"))),
                    }
                    if flags & REPLY_FLAG_DONE != 0 {
                        return Ok(out);
                    }
                    magic = self.s.read_u32().await?;
                }
            }
            m => Err(ClientError::Protocol(format!("bad reply magic {m:#x}"))),
        }
    }

    async fn call(
        &mut self,
        command: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> Result<ReplyMsg, ClientError> {
        let h = self.send(command, flags, offset, len, payload).await?;
        let r = self.recv().await?;
        if r.handle != h {
            return Err(ClientError::Protocol(format!(
                "reply for {} while waiting for {h}",
                r.handle
            )));
        }
        if r.error != 0 {
            return Err(ClientError::Errno(r.error));
        }
        Ok(r)
    }

    pub async fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, ClientError> {
        Ok(self.call(CMD_READ, 0, offset, len, &[]).await?.data)
    }

    pub async fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> Result<(), ClientError> {
        let f = if fua { CMD_FLAG_FUA } else { 0 };
        self.call(CMD_WRITE, f, offset, data.len() as u32, data)
            .await
            .map(drop)
    }

    pub async fn flush(&mut self) -> Result<(), ClientError> {
        self.call(CMD_FLUSH, 0, 0, 0, &[]).await.map(drop)
    }

    pub async fn trim(&mut self, offset: u64, len: u32) -> Result<(), ClientError> {
        self.call(CMD_TRIM, 0, offset, len, &[]).await.map(drop)
    }

    pub async fn write_zeroes(&mut self, offset: u64, len: u32) -> Result<(), ClientError> {
        self.call(CMD_WRITE_ZEROES, 0, offset, len, &[])
            .await
            .map(drop)
    }

    /// `base:allocation` extents from `offset`: (length, flags).
    pub async fn block_status(
        &mut self,
        offset: u64,
        len: u32,
    ) -> Result<Vec<(u32, u32)>, ClientError> {
        Ok(self
            .call(CMD_BLOCK_STATUS, 0, offset, len, &[])
            .await?
            .extents)
    }

    /// Sends NBD_CMD_DISC and closes.
    pub async fn disconnect(mut self) -> Result<(), ClientError> {
        self.send(CMD_DISC, 0, 0, 0, &[]).await?;
        self.s.shutdown().await?;
        Ok(())
    }

    pub fn into_inner(self) -> S {
        self.s
    }
}
