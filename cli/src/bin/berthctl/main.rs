//! `berthctl`: the command line for Berth.
//!
//! Its commands talk to the metadata service (`--endpoint`, default
//! http://127.0.0.1:9580, or `--data DIR` for DIR/meta.sock): volumes,
//! snapshots, clones, tiers, nodes, pools, attachments, capacity, audit.
//! `berthctl server ...` talks to one volume server directly
//! (`--data DIR` for DIR/control.sock).
//!
//! Output: tables for people, `--output json` for scripts. Exit codes: 0 done;
//! 1 other error; 2 bad usage; 3 not found; 4 already exists; 5 invalid
//! argument or out of range; 6 failed precondition; 7 unavailable (cannot
//! connect, a node is down); 8 resource exhausted (no room); 9 data loss
//! (checksum errors found, or the audit chain was tampered with); 10
//! permission denied (the server does not allow this certificate).

mod meta;
mod server;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use serde_json::{json, Value};

#[derive(Debug, Parser)]
#[command(
    name = "berthctl",
    version,
    about = "Control Berth: volumes, snapshots, clones, tiers, nodes, pools, attachments, audit",
    after_help = "Exit codes: 0 ok, 1 error, 2 usage, 3 not found, 4 already exists, \
5 invalid argument, 6 failed precondition, 7 unavailable, 8 no room, 9 data loss or tampering"
)]
struct Cli {
    /// Endpoint: unix:///path.sock or http://host:port (the metadata service,
    /// or the volume server for `server` commands).
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

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum Output {
    Table,
    Json,
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

/// Prints rows of JSON objects as an aligned table of the given columns.
pub fn table(rows: &[Value], cols: &[&str]) {
    let cell = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    };
    let mut widths: Vec<usize> = cols.iter().map(|c| c.len()).collect();
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| cols.iter().map(|c| cell(&r[*c])).collect())
        .collect();
    for row in &cells {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |vals: Vec<String>| {
        let s: Vec<String> = vals
            .iter()
            .zip(&widths)
            .map(|(v, w)| format!("{v:<w$}"))
            .collect();
        println!("{}", s.join("  ").trim_end());
    };
    line(cols.iter().map(|c| c.to_uppercase()).collect());
    for row in cells {
        line(row);
    }
}

#[derive(Debug)]
pub struct Out {
    pub mode: Output,
}

impl Out {
    pub fn rows(&self, rows: Vec<Value>, cols: &[&str]) {
        match self.mode {
            Output::Json => println!("{}", Value::Array(rows)),
            Output::Table => table(&rows, cols),
        }
    }
    pub fn one(&self, v: Value, cols: &[&str]) {
        match self.mode {
            Output::Json => println!("{v}"),
            Output::Table => table(&[v], cols),
        }
    }
    pub fn done(&self, msg: &str) {
        match self.mode {
            Output::Json => println!("{}", json!({"result": msg})),
            Output::Table => println!("{msg}"),
        }
    }
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Cmd::Tls(TlsCmd::Generate { out, days, certs }) = &cli.command {
        return match berth_proto::tls::generate(out, certs, *days) {
            Ok(()) => {
                println!(
                    "wrote {}/ca.crt, {}/ca.key and {} certificate folders",
                    out.display(),
                    out.display(),
                    certs.len()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("berthctl: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let tls = match &cli.tls_dir {
        Some(d) => match berth_proto::TlsDir::load(d) {
            Ok(t) => Some(t),
            Err(e) => {
                eprintln!("berthctl: --tls-dir: {e}");
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
            eprintln!("berthctl: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let out = Out { mode: cli.output };
    rt.block_on(async move {
        let channel = match berth_proto::channel(&endpoint, tls.as_ref()).await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("berthctl: cannot reach the {what} at {endpoint}: {e} (is the server running? set --endpoint, --data or BERTH_ENDPOINT)");
                return ExitCode::from(7);
            }
        };
        let r = match cli.command {
            Cmd::Server(c) => {
                server::run(&out, c, berth_proto::volume::v1::volume_service_client::VolumeServiceClient::new(channel)).await
            }
            Cmd::Meta(c) => {
                meta::run(&out, c, berth_proto::meta::v1::metadata_service_client::MetadataServiceClient::new(channel)).await
            }
            // Handled before connecting.
            Cmd::Tls(_) => Ok(()),
        };
        match r {
            Ok(()) => ExitCode::SUCCESS,
            Err(s) => {
                eprintln!("berthctl: {}", s.message());
                ExitCode::from(exit_code(&s))
            }
        }
    })
}
