//! Handing a FUSE connection to the volume server (a local attachment).
//!
//! For a volume whose data is on this node, `berth attach` does not speak
//! NBD: it mounts the FUSE file, then hands the mount's `/dev/fuse`
//! descriptor to the volume server over its unix socket `fuse.sock`, and the
//! server answers the kernel's FUSE requests straight from its store. The
//! attach process keeps a copy of the descriptor and the connection: while
//! it lives, the mount does (a restarted server is handed the descriptor
//! again and asks the kernel to send what the dead one had not answered);
//! when it dies, the server lets go and the kernel ends the mount.
//!
//! The exchange, one line each way:
//!
//! - client: `BERTH-FUSE/1 attach EXPORT` or `BERTH-FUSE/1 resume EXPORT`,
//!   in one message that carries the descriptor (`SCM_RIGHTS`). `attach`
//!   is a new mount (the kernel's `FUSE_INIT` is waiting); `resume` is a
//!   mount an earlier server served. `EXPORT` is the grant's export name,
//!   as in the NBD URI: it is the only credential.
//! - server: `OK SIZE ro|rw`, or `ERR MESSAGE` and the connection closes.
//! - later, server: `END REASON` when it stops serving the mount (`unmounted`
//!   when the kernel ended it; anything else, such as a shutdown, means
//!   the mount still needs a server).

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};

/// The socket's default name in the volume server's data folder.
pub const SOCKET: &str = "fuse.sock";
const MAGIC: &str = "BERTH-FUSE/1";
/// Longest hello a server reads.
pub const HELLO_MAX: usize = 4096;
/// The reason of an `END` line when the kernel ended the mount.
pub const UNMOUNTED: &str = "unmounted";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// A mount an earlier server served (no `FUSE_INIT` will come).
    pub resume: bool,
    pub export: String,
}

impl Hello {
    pub fn line(&self) -> String {
        let mode = if self.resume { "resume" } else { "attach" };
        format!("{MAGIC} {mode} {}\n", self.export)
    }

    pub fn parse(b: &[u8]) -> Result<Hello, String> {
        let s = std::str::from_utf8(b).map_err(|_| "the hello is not UTF-8".to_string())?;
        let s = s
            .strip_suffix('\n')
            .ok_or("the hello is not one whole line")?;
        let mut it = s.splitn(3, ' ');
        if it.next() != Some(MAGIC) {
            return Err(format!("not a {MAGIC} hello"));
        }
        let resume = match it.next() {
            Some("attach") => false,
            Some("resume") => true,
            other => return Err(format!("unknown mode {other:?} (attach or resume)")),
        };
        let export = it.next().unwrap_or_default();
        if export.is_empty() || export.contains(['\n', ' ']) {
            return Err("the hello names no export".into());
        }
        Ok(Hello {
            resume,
            export: export.to_string(),
        })
    }
}

/// What the server says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Ok { size_bytes: u64, read_only: bool },
    Err(String),
    End(String),
}

impl Answer {
    pub fn line(&self) -> String {
        // Messages are single lines whatever they quote.
        let one = |m: &str| m.replace('\n', " ");
        match self {
            Answer::Ok {
                size_bytes,
                read_only,
            } => format!("OK {size_bytes} {}\n", if *read_only { "ro" } else { "rw" }),
            Answer::Err(m) => format!("ERR {}\n", one(m)),
            Answer::End(m) => format!("END {}\n", one(m)),
        }
    }

    pub fn parse(line: &str) -> Result<Answer, String> {
        let line = line.trim_end_matches('\n');
        let (word, rest) = line.split_once(' ').unwrap_or((line, ""));
        match word {
            "OK" => {
                let (size, mode) = rest.split_once(' ').ok_or("OK without a mode")?;
                Ok(Answer::Ok {
                    size_bytes: size.parse().map_err(|_| format!("bad size {size:?}"))?,
                    read_only: match mode {
                        "ro" => true,
                        "rw" => false,
                        m => return Err(format!("bad mode {m:?}")),
                    },
                })
            }
            "ERR" => Ok(Answer::Err(rest.to_string())),
            "END" => Ok(Answer::End(rest.to_string())),
            _ => Err(format!("not an answer: {line:?}")),
        }
    }
}

/// Sends `hello` with `dev` attached, in one message.
pub fn send_hello(sock: RawFd, hello: &Hello, dev: BorrowedFd<'_>) -> std::io::Result<()> {
    let line = hello.line();
    let fds = [dev.as_raw_fd()];
    let n = sendmsg::<()>(
        sock,
        &[IoSlice::new(line.as_bytes())],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::MSG_NOSIGNAL,
        None,
    )?;
    if n != line.len() {
        return Err(std::io::Error::other("the hello went out in part"));
    }
    Ok(())
}

/// Receives a hello and its descriptor (on a non-blocking socket this
/// returns `WouldBlock` until one is there). Every descriptor that came
/// with it but the first is closed; a hello without one is an error.
pub fn recv_hello(sock: RawFd) -> std::io::Result<(Hello, OwnedFd)> {
    let mut buf = [0u8; HELLO_MAX];
    let mut space = nix::cmsg_space!([RawFd; 4]);
    let (n, mut fds) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(sock, &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)?;
        let mut fds = Vec::new();
        // Descriptors are owned as soon as they are seen, so none leaks
        // whatever is wrong with the message.
        let cmsgs = msg.cmsgs();
        if let Ok(cmsgs) = cmsgs {
            for c in cmsgs {
                if let ControlMessageOwned::ScmRights(v) = c {
                    for fd in v {
                        // SAFETY: the kernel just installed `fd` in this
                        // process for this message; nothing else owns it.
                        fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                    }
                }
            }
        } else {
            return Err(std::io::Error::other(
                "the hello's descriptors were cut off",
            ));
        }
        (msg.bytes, fds)
    };
    if n == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    let hello = Hello::parse(&buf[..n]).map_err(std::io::Error::other)?;
    if fds.is_empty() {
        return Err(std::io::Error::other(
            "the hello carries no /dev/fuse descriptor",
        ));
    }
    Ok((hello, fds.swap_remove(0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hellos_and_answers_round_trip_and_bad_ones_are_refused() {
        for h in [
            Hello {
                resume: false,
                export: "db@0123abcd".into(),
            },
            Hello {
                resume: true,
                export: "x@y".into(),
            },
        ] {
            assert_eq!(Hello::parse(h.line().as_bytes()), Ok(h));
        }
        for bad in [
            &b"BERTH-FUSE/1 attach db"[..],
            b"BERTH-FUSE/2 attach db\n",
            b"BERTH-FUSE/1 mount db\n",
            b"BERTH-FUSE/1 attach \n",
            b"BERTH-FUSE/1 attach a b\n",
            b"\xff\n",
        ] {
            assert!(Hello::parse(bad).is_err(), "{bad:?}");
        }
        for a in [
            Answer::Ok {
                size_bytes: 1 << 30,
                read_only: true,
            },
            Answer::Ok {
                size_bytes: 0,
                read_only: false,
            },
            Answer::Err("no such export".into()),
            Answer::End(UNMOUNTED.into()),
        ] {
            assert_eq!(Answer::parse(&a.line()), Ok(a));
        }
        assert_eq!(
            Answer::parse(&Answer::Err("two\nlines".into()).line()),
            Ok(Answer::Err("two lines".into()))
        );
        assert!(Answer::parse("OK 12").is_err());
        assert!(Answer::parse("OK x rw").is_err());
        assert!(Answer::parse("HELLO").is_err());
    }

    #[test]
    fn a_descriptor_crosses_with_its_hello() {
        use std::io::{Read, Write};
        let (a, b) = std::os::unix::net::UnixStream::pair().expect("pair");
        let (mut r, w) = std::os::unix::net::UnixStream::pair().expect("pair");
        let h = Hello {
            resume: false,
            export: "v@t".into(),
        };
        send_hello(a.as_raw_fd(), &h, std::os::fd::AsFd::as_fd(&w)).expect("send");
        let (got, fd) = recv_hello(b.as_raw_fd()).expect("recv");
        assert_eq!(got, h);
        // The descriptor received is the same socket: bytes written through
        // it arrive at the other end.
        let mut passed = std::os::unix::net::UnixStream::from(fd);
        passed.write_all(b"ping").expect("write");
        let mut four = [0u8; 4];
        r.read_exact(&mut four).expect("read");
        assert_eq!(&four, b"ping");
        r.write_all(b"pong").expect("write");
        passed.read_exact(&mut four).expect("read");
        assert_eq!(&four, b"pong");
        // Without a descriptor: refused.
        (&a).write_all(h.line().as_bytes()).expect("write");
        assert!(recv_hello(b.as_raw_fd()).is_err());
    }
}
