//! `berthctl`: the command line for Berth.
//!
//! Its commands talk to the metadata service (`--endpoint`, default
//! http://127.0.0.1:9580, or `--data DIR` for DIR/meta.sock): volumes,
//! snapshots, clones, tiers, nodes, pools, attachments, capacity, audit.
//! `berthctl server ...` talks to one volume server directly
//! (`--data DIR` for DIR/control.sock).
//!
//! Output: tables for people, `--output json` for scripts. Exit codes:
//! [`EXIT_CODES`], which `--help` prints.

#[macro_use]
mod out;
mod meta;
mod server;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub use out::{table, Out, Output};

/// Every exit code berthctl uses, as `--help` lists them (a unit test checks
/// that each code [`exit_code`] returns is here).
const EXIT_CODES: &str = "\
Exit codes:
  0   done (deleting or unexporting what is already absent is done too)
  1   other error
  2   bad usage (unknown command or flag, unreadable --tls-dir)
  3   not found
  4   already exists with different parameters
  5   invalid argument or out of range (--size 0, a size below the volume's or its source's)
  6   failed precondition (in use, not ready, being deleted)
  7   unavailable (nothing listens at the endpoint, or a node is down)
  8   no room (resource exhausted)
  9   data loss (checksum errors found, or the audit chain was tampered with)
  10  permission denied (the server refuses this certificate, or this user may not open its unix socket)
Closing berthctl's output early (| head) ends it quietly by SIGPIPE, as it ends other Unix tools.";

#[derive(Debug, Parser)]
#[command(
    name = "berthctl",
    version,
    about = "Control Berth: volumes, snapshots, clones, tiers, nodes, pools, attachments, audit",
    after_help = EXIT_CODES
)]
struct Cli {
    /// Endpoint: unix:///path.sock or http://host:port (the metadata service,
    /// or the volume server for `server` commands). Several metadata
    /// services as A,B,C: commands go to the one that leads.
    #[arg(long, env = "BERTH_ENDPOINT", conflicts_with = "data", global = true)]
    endpoint: Option<String>,
    /// Data directory of a local service (DATA/meta.sock, or DATA/control.sock
    /// for `server` commands).
    #[arg(long, env = "BERTH_DATA", global = true)]
    data: Option<PathBuf>,
    #[arg(long, short, value_enum, default_value_t = Output::Table, global = true)]
    output: Output,
    /// Folder with this client's tls.crt, tls.key and ca.crt, for https://
    /// endpoints (mutual TLS).
    #[arg(long, env = "BERTH_TLS_DIR", global = true)]
    tls_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    #[command(flatten)]
    Meta(meta::Cmd),
    /// One volume server's own API (node-local administration).
    #[command(subcommand)]
    Server(server::Cmd),
    /// Certificates for mutual TLS without cert-manager.
    #[command(subcommand)]
    Tls(TlsCmd),
}

#[derive(Debug, Subcommand)]
enum TlsCmd {
    /// Make a CA (OUT/ca.crt, OUT/ca.key) and one certificate per NAME, each
    /// in OUT/NAME/{tls.crt,tls.key,ca.crt}: the folder --tls-dir takes.
    Generate {
        /// Where to write; nothing there is overwritten.
        #[arg(long)]
        out: PathBuf,
        /// Days the certificates are valid.
        #[arg(long, default_value_t = 365)]
        days: u32,
        /// NAME=SAN,SAN,... (DNS names or IP addresses), or NAME alone. Volume
        /// servers' certificates must include berth-volume-server.
        #[arg(required = true)]
        certs: Vec<berth_proto::tls::Issue>,
    },
}

pub fn exit_code(s: &tonic::Status) -> u8 {
    use tonic::Code::*;
    match s.code() {
        NotFound => 3,
        AlreadyExists => 4,
        InvalidArgument | OutOfRange => 5,
        FailedPrecondition | Aborted => 6,
        Unavailable => 7,
        ResourceExhausted => 8,
        DataLoss => 9,
        PermissionDenied | Unauthenticated => 10,
        _ => 1,
    }
}

/// `--size 0` is refused: the APIs read 0 as "unset, pick a size" (CSI's
/// empty capacity range, a clone's source size), which is not what a person
/// typing 0 meant. Exit 5 (invalid argument), like the service's own checks.
pub fn nonzero(size: u64) -> Result<u64, tonic::Status> {
    if size == 0 {
        return Err(tonic::Status::invalid_argument(
            "--size 0: a volume needs a size, such as 512Mi or 4Gi",
        ));
    }
    Ok(size)
}

/// Up to `limit` rows (0: all) fetched `page` at a time: `fetch(after,
/// want)` returns a page's rows and the cursor to go on after (`None`: that
/// page was the last). A cursor that does not move ends it too, so a
/// misbehaving server cannot make this loop forever.
pub async fn in_pages<T>(
    limit: u64,
    after: u64,
    page: u64,
    mut fetch: impl AsyncFnMut(u64, u64) -> Result<(Vec<T>, Option<u64>), tonic::Status>,
) -> Result<Vec<T>, tonic::Status> {
    let mut rows = Vec::new();
    let mut after = after;
    loop {
        let want = match limit {
            0 => page,
            l => page.min(l.saturating_sub(rows.len() as u64)),
        };
        if want == 0 {
            break;
        }
        let (got, next) = fetch(after, want).await?;
        rows.extend(got.into_iter().take(want as usize));
        match next {
            Some(n) if n > after => after = n,
            _ => break,
        }
    }
    Ok(rows)
}

/// A request naming the caller, for the audit logs: the login name, else the uid.
pub fn req<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    let who = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| {
            // SAFETY: getuid has no preconditions and cannot fail.
            format!("uid:{}", unsafe { libc::getuid() })
        });
    berth_proto::name_caller(&mut r, &format!("berthctl:{who}"));
    r
}

/// Why berthctl could not connect, and its exit code: a socket this user may
/// not open (10) is told apart from one nobody serves (7), since the cure
/// differs (run as the server's user, or start the server).
fn connect_failure(what: &str, endpoint: &str, e: &berth_proto::ChannelError) -> (u8, String) {
    let denied = std::iter::successors(Some(e as &(dyn std::error::Error + 'static)), |e| {
        (*e).source()
    })
    .filter_map(|e| e.downcast_ref::<std::io::Error>())
    .any(|io| io.kind() == std::io::ErrorKind::PermissionDenied);
    if !denied {
        return (
            7,
            format!(
                "cannot reach the {what} at {endpoint}: {e} (is the server running? \
                 set --endpoint, --data or BERTH_ENDPOINT)"
            ),
        );
    }
    let msg = match endpoint
        .strip_prefix("unix://")
        .or_else(|| endpoint.starts_with('/').then_some(endpoint))
    {
        Some(path) => format!(
            "permission denied opening the {what}'s socket {path}: this user may not \
             connect to it (Berth makes its sockets mode 0600, for the user running the \
             server: run berthctl as that user, e.g. with sudo, or use a TCP --endpoint)"
        ),
        None => format!("permission denied connecting to the {what} at {endpoint}: {e}"),
    };
    (10, msg)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Cmd::Tls(TlsCmd::Generate { out, days, certs }) = &cli.command {
        return match berth_proto::tls::generate(out, certs, *days) {
            Ok(()) => {
                outln!(
                    "wrote {}/ca.crt, {}/ca.key and {} certificate folders",
                    out.display(),
                    out.display(),
                    certs.len()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                errln!("berthctl: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let tls = match &cli.tls_dir {
        Some(d) => match berth_proto::TlsDir::load(d) {
            Ok(t) => Some(t),
            Err(e) => {
                errln!("berthctl: --tls-dir: {e}");
                return ExitCode::from(2);
            }
        },
        None => None,
    };
    let is_server = matches!(cli.command, Cmd::Server(_));
    // A volume server's certificate names its role, not its address.
    let tls = tls.map(|dir| berth_proto::ClientTls {
        dir,
        server_name: is_server.then(|| berth_proto::tls::VOLUME_SERVER_NAME.to_string()),
    });
    let (socket, fallback, what) = if is_server {
        (
            "control.sock",
            "unix:///var/lib/berth/control.sock",
            "volume server",
        )
    } else {
        ("meta.sock", "http://127.0.0.1:9580", "metadata service")
    };
    let endpoint = match (&cli.endpoint, &cli.data) {
        (Some(e), _) => e.clone(),
        (None, Some(d)) => format!("unix://{}", d.join(socket).display()),
        (None, None) => fallback.to_string(),
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            errln!("berthctl: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let out = Out { mode: cli.output };
    rt.block_on(async move {
        let r = match cli.command {
            Cmd::Server(c) => {
                let channel = match berth_proto::channel(&endpoint, tls.as_ref()).await {
                    Ok(c) => c,
                    Err(e) => {
                        let (code, msg) = connect_failure(what, &endpoint, &e);
                        errln!("berthctl: {msg}");
                        return ExitCode::from(code);
                    }
                };
                server::run(
                    &out,
                    c,
                    berth_proto::volume::v1::volume_service_client::VolumeServiceClient::new(
                        channel,
                    ),
                )
                .await
            }
            Cmd::Meta(c) => {
                // A list of services (A,B,C): calls go to the one that leads.
                let channel =
                    match berth_proto::LeaderChannel::connect(&endpoint, tls.as_ref()).await {
                        Ok(c) => c,
                        Err(e) => {
                            let (code, msg) = connect_failure(what, &endpoint, &e);
                            errln!("berthctl: {msg}");
                            return ExitCode::from(code);
                        }
                    };
                let conn = meta::Conn {
                    endpoint: endpoint.clone(),
                    tls_dir: cli.tls_dir.clone(),
                };
                meta::run(&out, c, berth_proto::MetaClient::new(channel), &conn).await
            }
            // Handled before connecting.
            Cmd::Tls(_) => Ok(()),
        };
        match r {
            Ok(()) => ExitCode::SUCCESS,
            Err(s) => {
                errln!("berthctl: {}", s.message());
                ExitCode::from(exit_code(&s))
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn help_lists_every_exit_code_berthctl_uses() {
        use tonic::Code;
        let codes = [
            Code::Ok,
            Code::Cancelled,
            Code::Unknown,
            Code::InvalidArgument,
            Code::DeadlineExceeded,
            Code::NotFound,
            Code::AlreadyExists,
            Code::PermissionDenied,
            Code::ResourceExhausted,
            Code::FailedPrecondition,
            Code::Aborted,
            Code::OutOfRange,
            Code::Unimplemented,
            Code::Internal,
            Code::Unavailable,
            Code::DataLoss,
            Code::Unauthenticated,
        ];
        // From the gRPC status, plus 0 (done), 2 (usage), 7 and 10 (connect).
        let mut used: Vec<u8> = codes
            .iter()
            .map(|c| exit_code(&tonic::Status::new(*c, "")))
            .chain([0, 2, 7, 10])
            .collect();
        used.sort_unstable();
        used.dedup();
        for c in used {
            assert!(
                EXIT_CODES
                    .lines()
                    .any(|l| l.trim_start().starts_with(&format!("{c} "))),
                "exit code {c} is not in --help"
            );
        }
        use clap::CommandFactory;
        let help = Cli::command().render_long_help().to_string();
        assert!(help.contains("10  permission denied"), "{help}");
    }
}
