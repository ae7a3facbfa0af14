//! The command line. Parsing (clap) is separate from acting: each subcommand
//! turns into one call of the library.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::clock::SystemClock;
use crate::config::{KeyAlgorithm, Settings, sha256, to_hex};
use crate::http::Application;
use crate::token::{generate, random_bytes, write_private};

/// tokenwarden: issues and verifies short-lived JWTs bound to the client they were
/// issued to, and revokes them (one token, one session or every session of a user)
/// the moment they must stop working.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
pub struct Cli {
    /// Config file (TOML). Default: ./tokenwarden.toml if it exists. Every setting can
    /// also come from TOKENWARDEN_* environment variables, which win over the file.
    #[arg(long, global = true, env = "TOKENWARDEN_CONFIG")]
    config: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the service: public API on 127.0.0.1:8080, admin API on 127.0.0.1:9090.
    /// With no config at all it uses SQLite in ./data and generates a development
    /// signing key and app key on first start.
    Serve,
    /// Create or upgrade the database schema, then exit (serve also does this at start).
    Migrate,
    /// Key management.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Rule files: validate them and run their test cases.
    #[command(subcommand)]
    Rules(RulesCommand),
    /// Audit events.
    #[command(subcommand)]
    Events(EventsCommand),
    /// Re-evaluate recorded events (NDJSON) under candidate rules and report what changes
    /// against a baseline rule set, or against the decisions recorded in the events.
    Replay {
        /// The candidate rule file.
        #[arg(long)]
        rules: PathBuf,
        /// The rule file to compare with (default: the recorded decisions).
        #[arg(long)]
        baseline: Option<PathBuf>,
        /// `text` tables or `json` for tools.
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
        /// Also write every replayed event, with the candidate's decision, to this file.
        #[arg(long)]
        emit: Option<PathBuf>,
        /// Report bad lines and go on instead of stopping at the first.
        #[arg(long)]
        skip_bad_lines: bool,
        /// City database for events recorded without enrichment.
        #[arg(long, env = "TOKENWARDEN_GEOIP_CITY")]
        geoip_city: Option<PathBuf>,
        /// ASN database for events recorded without enrichment.
        #[arg(long, env = "TOKENWARDEN_GEOIP_ASN")]
        geoip_asn: Option<PathBuf>,
        /// The events, one JSON object a line (`-` for standard input).
        events: PathBuf,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Format {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum EventsCommand {
    /// Write recorded events as NDJSON (the replay format) to standard output, oldest first.
    Export {
        /// Only events at or after this time (RFC 3339).
        #[arg(long)]
        since: Option<String>,
        /// Only events before this time (RFC 3339).
        #[arg(long)]
        until: Option<String>,
        #[arg(long)]
        subject: Option<String>,
        /// Only this session's events.
        #[arg(long)]
        session: Option<String>,
        /// Only events with this decision (allow, deny, step_up, revoke, revoke_user, invalid).
        #[arg(long)]
        decision: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum RulesCommand {
    /// Validate rule files; errors name file, line and column.
    Check {
        /// Rule files (TOML).
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Run rule test cases: every *.toml in DIR (or one file), each a sequence of
    /// timestamped session events with the decisions they must produce.
    Test {
        /// A case file or a directory of them, e.g. rules/tests.
        path: PathBuf,
    },
    /// Show, for one recorded event, every rule's evaluation: what it saw, whether it
    /// fired, its points and why. The events before it build the state it meets.
    Explain {
        #[arg(long)]
        rules: PathBuf,
        /// The line of the event to explain (default: the last).
        #[arg(long, default_value_t = 0)]
        line: usize,
        /// An events file (NDJSON) or a file holding one event.
        events: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum KeysCommand {
    /// Generate a signing key: a PKCS#8 PEM for ES256 and EdDSA, a random secret for HS512.
    Generate {
        /// HS512, ES256 or EdDSA.
        #[arg(long)]
        alg: KeyAlgorithm,
        /// Write the key to this file (mode 0600) instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Generate an app key and print the config entry that holds only its hash.
    AppKey {
        /// The app's id, e.g. `web`.
        #[arg(long)]
        id: String,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn load_settings(config: Option<&Path>) -> anyhow::Result<Settings> {
    let default = Path::new("tokenwarden.toml");
    let file = config.or_else(|| default.is_file().then_some(default));
    Ok(Settings::load(file, std::env::vars())?)
}

fn init_logging(filter: &str) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .with_context(|| format!("TOKENWARDEN_LOG: {filter:?} is not a log filter"))?;
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stdout().is_terminal())
        .init();
    Ok(())
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve => {
            let settings = load_settings(cli.config.as_deref())?;
            init_logging(&settings.log)?;
            runtime()?.block_on(async {
                let app = Application::build(&settings, Arc::new(SystemClock)).await?;
                tracing::info!(
                    public = %app.public_addr()?,
                    admin = %app.admin_addr()?,
                    database = app.state().sessions.store().backend(),
                    "tokenwarden listening"
                );
                app.run_until_stopped(shutdown_signal()).await
            })
        }
        Command::Migrate => {
            let settings = load_settings(cli.config.as_deref())?;
            init_logging(&settings.log)?;
            runtime()?.block_on(async {
                let store = crate::store::connect(&settings.database_url).await?;
                store.migrate().await?;
                println!("database schema is up to date ({})", store.backend());
                anyhow::Ok(())
            })
        }
        Command::Rules(RulesCommand::Check { files }) => {
            let mut failed = 0;
            for file in &files {
                match crate::risk::RuleSet::load(file) {
                    Ok(rules) => println!(
                        "ok    {} ({} rules, hash {})",
                        file.display(),
                        rules.rules.len(),
                        rules.hash
                    ),
                    Err(e) => {
                        failed += 1;
                        println!("error {e}");
                    }
                }
            }
            anyhow::ensure!(
                failed == 0,
                "{failed} of {} rule files have errors",
                files.len()
            );
            Ok(())
        }
        Command::Rules(RulesCommand::Test { path }) => {
            let ua = crate::enrich::UaParser::new()?;
            let reports =
                crate::risk::cases::run_dir(&path, &ua).map_err(|e| anyhow::anyhow!(e))?;
            let mut failed = 0;
            for r in &reports {
                if r.passed() {
                    println!("ok    {} ({} steps)", r.file.display(), r.steps);
                } else {
                    failed += 1;
                    println!("FAIL  {}", r.file.display());
                    if let Some(d) = &r.description {
                        println!("      {d}");
                    }
                    for f in &r.failures {
                        println!("      {f}");
                    }
                }
            }
            println!(
                "{} case files, {} passed, {failed} failed",
                reports.len(),
                reports.len() - failed
            );
            anyhow::ensure!(failed == 0, "{failed} case files failed");
            Ok(())
        }
        Command::Events(EventsCommand::Export {
            since,
            until,
            subject,
            session,
            decision,
        }) => {
            let settings = load_settings(cli.config.as_deref())?;
            let ms = |name: &str, v: Option<String>| -> anyhow::Result<Option<i64>> {
                v.map(|v| {
                    crate::clock::parse_rfc3339_ms(&v)
                        .with_context(|| format!("--{name}: {v:?} is not an RFC 3339 time"))
                })
                .transpose()
            };
            let mut filter = crate::store::EventFilter {
                since_ms: ms("since", since)?,
                until_ms: ms("until", until)?,
                subject,
                session_id: session,
                decision,
                after: (i64::MIN, 0),
                limit: 10_000,
            };
            runtime()?.block_on(async {
                use std::io::Write;
                let store = crate::store::connect(&settings.database_url).await?;
                let stdout = std::io::stdout();
                let mut out = std::io::BufWriter::new(stdout.lock());
                loop {
                    let page = store.events(&filter).await?;
                    let Some((ts, id, _)) = page.last() else {
                        break;
                    };
                    filter.after = (*ts, *id);
                    for (_, _, line) in &page {
                        writeln!(out, "{line}")?;
                    }
                }
                out.flush()?;
                anyhow::Ok(())
            })
        }
        Command::Replay {
            rules,
            baseline,
            format,
            emit,
            skip_bad_lines,
            geoip_city,
            geoip_asn,
            events,
        } => replay_command(ReplayArgs {
            rules,
            baseline,
            format,
            emit,
            skip_bad_lines,
            geoip_city,
            geoip_asn,
            events,
        }),
        Command::Rules(RulesCommand::Explain {
            rules,
            line,
            events,
        }) => {
            let rules = crate::risk::RuleSet::load(&rules).map_err(|e| anyhow::anyhow!(e))?;
            let ua = crate::enrich::UaParser::new()?;
            let input = open_input(&events)?;
            let text = crate::replay::explain(input, rules, line, &ua, None)
                .map_err(|b| anyhow::anyhow!("{}:{}: {}", events.display(), b.line, b.message))?;
            print!("{text}");
            Ok(())
        }
        Command::Keys(KeysCommand::Generate { alg, out }) => {
            let key = generate(alg)?;
            match out {
                Some(path) => {
                    write_private(&path, key.as_bytes())?;
                    println!(
                        "wrote a new {alg} key to {} (mode 0600). Add it to the config:\n\n[[keys]]\nkid = \"{}\"\nalg = \"{alg}\"\npath = \"{}\"",
                        path.display(),
                        path.file_stem().and_then(|s| s.to_str()).unwrap_or("key-1"),
                        path.display()
                    );
                }
                None => print!("{key}"),
            }
            Ok(())
        }
        Command::Keys(KeysCommand::AppKey { id }) => {
            let key = format!("twk_{}", to_hex(&random_bytes::<24>()?));
            println!(
                "app key for {id:?} (give it to the app; it is not stored anywhere):\n\n    {key}\n\nconfig entry:\n\n[[apps]]\nid = \"{id}\"\nkey_sha256 = \"{}\"",
                to_hex(&sha256(key.as_bytes()))
            );
            Ok(())
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutting down: draining in-flight requests");
}

struct ReplayArgs {
    rules: PathBuf,
    baseline: Option<PathBuf>,
    format: Format,
    emit: Option<PathBuf>,
    skip_bad_lines: bool,
    geoip_city: Option<PathBuf>,
    geoip_asn: Option<PathBuf>,
    events: PathBuf,
}

fn open_input(path: &Path) -> anyhow::Result<Box<dyn std::io::BufRead>> {
    Ok(open_counted(path, Arc::default())?.0)
}

/// Counts the bytes read through it, for the progress bar.
struct Counted<R> {
    inner: R,
    read: Arc<std::sync::atomic::AtomicU64>,
}

impl<R: std::io::Read> std::io::Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read
            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(n)
    }
}

/// The input, and its size when known (a file, not standard input).
fn open_counted(
    path: &Path,
    read: Arc<std::sync::atomic::AtomicU64>,
) -> anyhow::Result<(Box<dyn std::io::BufRead>, Option<u64>)> {
    if path == Path::new("-") {
        let stdin = Counted {
            inner: std::io::stdin(),
            read,
        };
        return Ok((Box::new(std::io::BufReader::new(stdin)), None));
    }
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let size = file.metadata().ok().map(|m| m.len());
    let counted = Counted { inner: file, read };
    Ok((
        Box::new(std::io::BufReader::with_capacity(1 << 20, counted)),
        size,
    ))
}

/// `[#######.............]  35%  1200000 lines` on one rewritten line.
fn progress_bar(lines: usize, read: u64, size: Option<u64>) -> String {
    const WIDTH: u64 = 30;
    match size.filter(|s| *s > 0) {
        Some(total) => {
            let done = (read.min(total) * WIDTH / total) as usize;
            format!(
                "\r[{}{}] {:>3}%  {lines} lines",
                "#".repeat(done),
                ".".repeat(WIDTH as usize - done),
                read.min(total) * 100 / total
            )
        }
        None => format!("\r{lines} lines"),
    }
}

fn replay_command(a: ReplayArgs) -> anyhow::Result<()> {
    use std::io::{IsTerminal, Write};
    let candidate = crate::risk::RuleSet::load(&a.rules).map_err(|e| anyhow::anyhow!(e))?;
    let baseline = a
        .baseline
        .as_deref()
        .map(crate::risk::RuleSet::load)
        .transpose()
        .map_err(|e| anyhow::anyhow!(e))?;
    let ua = Arc::new(crate::enrich::UaParser::new()?);
    let geo = if a.geoip_city.is_some() || a.geoip_asn.is_some() {
        Some(crate::enrich::Enricher::new(
            crate::enrich::EnrichConfig {
                geoip_city: a.geoip_city,
                geoip_asn: a.geoip_asn,
                ..crate::enrich::EnrichConfig::default()
            },
            ua.clone(),
        )?)
    } else {
        None
    };
    let mut emit_file = a
        .emit
        .as_deref()
        .map(|p| std::fs::File::create(p).with_context(|| format!("cannot write {}", p.display())))
        .transpose()?
        .map(|f| std::io::BufWriter::with_capacity(1 << 20, f));
    let on_error = if a.skip_bad_lines {
        crate::replay::OnError::Skip
    } else {
        crate::replay::OnError::Stop
    };
    let show_progress = std::io::stderr().is_terminal();
    let read = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (input, size) = open_counted(&a.events, read.clone())?;
    let started = std::time::Instant::now();
    let report = crate::replay::replay(
        input,
        candidate,
        baseline,
        crate::replay::ReplayContext {
            ua: &ua,
            geo: geo.as_ref(),
            on_error,
        },
        emit_file.as_mut().map(|w| w as &mut dyn Write),
        |n| {
            if show_progress && n % 50_000 == 0 {
                let bytes = read.load(std::sync::atomic::Ordering::Relaxed);
                eprint!("{}", progress_bar(n, bytes, size));
            }
        },
    )
    .map_err(|b| {
        anyhow::anyhow!(
            "{}:{}: {} (use --skip-bad-lines to report bad lines and go on)",
            a.events.display(),
            b.line,
            b.message
        )
    })?;
    if let Some(mut w) = emit_file {
        w.flush()?;
    }
    let secs = started.elapsed().as_secs_f64();
    if show_progress {
        eprintln!();
    }
    eprintln!(
        "{} events in {:.2} s ({:.0} events/s)",
        report.events,
        secs,
        report.events as f64 / secs.max(1e-9)
    );
    match a.format {
        Format::Text => print!("{}", report.render()),
        Format::Json => println!("{}", serde_json::to_string_pretty(&report)?),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_progress_bar_shows_the_share_of_the_file_read() {
        assert_eq!(
            super::progress_bar(1200, 35, Some(100)),
            "\r[##########....................]  35%  1200 lines"
        );
        assert_eq!(super::progress_bar(7, 10, None), "\r7 lines");
    }
}
