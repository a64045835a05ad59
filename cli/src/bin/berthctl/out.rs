//! What berthctl prints: tables for people (sizes as people write them),
//! JSON for scripts (exact numbers), and stdout that may be closed early
//! (`berthctl audit list | head -1`).

use std::io::Write;

use serde_json::{json, Value};

#[derive(Debug, Clone, Copy, clap::ValueEnum, PartialEq, Eq)]
pub enum Output {
    Table,
    Json,
}

/// `println!` that ends berthctl quietly when stdout is a closed pipe,
/// instead of panicking (which is what `println!` does).
macro_rules! outln {
    () => { $crate::out::write_line(format_args!("")) };
    ($($arg:tt)*) => { $crate::out::write_line(format_args!($($arg)*)) };
}

/// `eprintln!` that does not panic when stderr is closed (`2>&-`): an
/// error message nobody can read is not worth a panic's exit code.
macro_rules! errln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

/// Writes one line to stdout. A reader that went away (EPIPE) ends the
/// process the way it ends other Unix tools: killed by SIGPIPE, so a shell
/// sees 141 and `set -o pipefail` still knows the output was cut short.
/// Any other write error is reported and ends berthctl with exit 1.
pub fn write_line(args: std::fmt::Arguments<'_>) {
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout
        .write_fmt(args)
        .and_then(|()| stdout.write_all(b"\n"))
    {
        stdout_failed(&e);
    }
}

fn stdout_failed(e: &std::io::Error) -> ! {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        // Rust starts programs with SIGPIPE ignored; restore the default
        // only now, so a gRPC socket closed under a write is still an error
        // berthctl reports rather than a silent death.
        // SAFETY: signal and raise have no memory preconditions; nothing
        // else in this process installs a SIGPIPE handler.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
            libc::raise(libc::SIGPIPE);
        }
        // Only reached when SIGPIPE is blocked (an inherited mask): the
        // status a shell would show for it.
        std::process::exit(128 + libc::SIGPIPE);
    }
    errln!("berthctl: cannot write to stdout: {e}");
    std::process::exit(1);
}

/// A size as people write it: 4Gi, 512Mi, 1.5Gi (powers of 1024, which is
/// what `--size` reads), rounded to one decimal; below 1 KiB, the bytes.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    if n < 1024 {
        return n.to_string();
    }
    let mut unit = 0;
    let mut scale = 1024u64;
    // The largest unit the size reaches, and one more if rounding to one
    // decimal would print 1024 of this one.
    while unit + 1 < UNITS.len() && n / scale >= 1024 {
        unit += 1;
        scale *= 1024;
    }
    let mut tenths = (u128::from(n) * 10 + u128::from(scale) / 2) / u128::from(scale);
    if tenths >= 10240 && unit + 1 < UNITS.len() {
        unit += 1;
        scale *= 1024;
        tenths = (u128::from(n) * 10 + u128::from(scale) / 2) / u128::from(scale);
    }
    let (whole, tenth) = (tenths / 10, tenths % 10);
    if tenth == 0 {
        format!("{whole}{}", UNITS[unit])
    } else {
        format!("{whole}.{tenth}{}", UNITS[unit])
    }
}

/// A table cell: columns of bytes (`size_bytes`, `used_bytes`...) as
/// people write sizes; everything else as it is.
fn cell(col: &str, v: &Value) -> String {
    match v {
        Value::Number(n) if col.ends_with("_bytes") => match n.as_u64() {
            Some(b) => human_bytes(b),
            None => n.to_string(),
        },
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// Prints rows of JSON objects as an aligned table of the given columns.
pub fn table(rows: &[Value], cols: &[&str]) {
    let mut widths: Vec<usize> = cols.iter().map(|c| c.len()).collect();
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| cols.iter().map(|c| cell(c, &r[*c])).collect())
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
        outln!("{}", s.join("  ").trim_end());
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
            Output::Json => outln!("{}", Value::Array(rows)),
            Output::Table => table(&rows, cols),
        }
    }
    pub fn one(&self, v: Value, cols: &[&str]) {
        match self.mode {
            Output::Json => outln!("{v}"),
            Output::Table => table(&[v], cols),
        }
    }
    pub fn done(&self, msg: &str) {
        match self.mode {
            Output::Json => outln!("{}", json!({"result": msg})),
            Output::Table => outln!("{msg}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_as_people_write_them_and_parse_back() {
        for (n, s) in [
            (0, "0"),
            (1023, "1023"),
            (1024, "1Ki"),
            (4096, "4Ki"),
            (512 << 20, "512Mi"),
            (1536 << 20, "1.5Gi"),
            (4 << 30, "4Gi"),
            (10 << 40, "10Ti"),
            (u64::MAX, "16Ei"),
        ] {
            assert_eq!(human_bytes(n), s, "{n}");
        }
        // Rounding to 1024 of a unit moves to the next one.
        assert_eq!(human_bytes((1 << 30) - 1), "1Gi");
        assert_eq!(human_bytes((1 << 20) + 100 * 1024), "1.1Mi");
        // Exact sizes print as `--size` reads them.
        for s in ["4Gi", "512Mi", "1.5Gi", "3Ki"] {
            let n = berth_cli::parse_size(s).expect("parses");
            assert_eq!(human_bytes(n), s);
        }
    }

    #[test]
    fn byte_columns_are_human_and_others_are_not() {
        assert_eq!(cell("size_bytes", &json!(4u64 << 30)), "4Gi");
        assert_eq!(cell("seq", &json!(4u64 << 30)), "4294967296");
        assert_eq!(cell("node", &json!("n1")), "n1");
        assert_eq!(cell("condition", &Value::Null), "");
    }
}
