//! Heap allocations per request, counted rather than timed: a figure that does not
//! move with a noisy machine. tokenwarden runs in this process as `serve` runs it
//! (SQLite, `rules/default.toml`, MaxMind's test databases, the mimalloc allocator,
//! one worker thread as the benchmark's pinned core gives it); a plain blocking
//! client on a thread of its own drives it over loopback, and its own allocations
//! are not counted. Every other thread's are: the request path, the event writer
//! and the SQLite thread, spread over the requests.
//!
//! `cargo run --release --example bench-allocs -- [SESSIONS] [--sites]`
//!
//! Prints allocations and bytes per request for warm forward-auth and
//! `/v1/verify` (each session's token used 10 times; a reallocation counts as
//! one allocation of its new size). `--sites` also records a
//! backtrace at every allocation of a few hundred requests and prints where they
//! come from: the innermost frame in our code, or in the framework when none is.

mod mix;

use std::alloc::{GlobalAlloc, Layout};
use std::backtrace::Backtrace;
use std::cell::Cell;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use tokenwarden::clock::SystemClock;
use tokenwarden::config::{FileConfig, Settings, TokensSection};
use tokenwarden::http::Application;

struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);
static TRACING: AtomicBool = AtomicBool::new(false);
static SITES: Mutex<Vec<Backtrace>> = Mutex::new(Vec::new());

thread_local! {
    /// Set on the client's thread (and the report's): not counted.
    static UNCOUNTED: Cell<bool> = const { Cell::new(false) };
    /// Set while a backtrace is taken, so its own allocations are not traced.
    static IN_TRACE: Cell<bool> = const { Cell::new(false) };
}

impl Counting {
    fn count(size: usize) {
        if UNCOUNTED.try_with(Cell::get).unwrap_or(true) {
            return;
        }
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(size as u64, Ordering::Relaxed);
        if TRACING.load(Ordering::Relaxed)
            && IN_TRACE.try_with(|t| !t.replace(true)).unwrap_or(false)
        {
            let trace = Backtrace::force_capture();
            if let Ok(mut sites) = SITES.lock() {
                sites.push(trace);
            }
            let _ = IN_TRACE.try_with(|t| t.set(false));
        }
    }
}

// SAFETY: every call is passed to mimalloc unchanged. Counting touches only atomics
// and thread-locals with const initialisers and no destructors. Tracing (only with
// `--sites`) allocates and takes two locks inside the allocator, std's backtrace
// lock and `SITES`: `IN_TRACE` keeps it from re-entering itself, and `main`
// refuses `--sites` when std could be inside a capture of its own (a panic or
// error backtrace asked for in the environment), which would hold that lock while
// allocating.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        Self::count(layout.size());
        unsafe { mimalloc::MiMalloc.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        Self::count(layout.size());
        unsafe { mimalloc::MiMalloc.alloc_zeroed(layout) }
    }

    /// A reallocation counts as one allocation of its new size.
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        Self::count(new_size);
        unsafe { mimalloc::MiMalloc.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { mimalloc::MiMalloc.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// One HTTP/1.1 connection, kept alive.
struct Client {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Client {
    fn connect(addr: SocketAddr) -> anyhow::Result<Self> {
        let stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        Ok(Self {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
        })
    }

    /// Sends one request and returns the status and body.
    fn send(&mut self, request: &[u8]) -> anyhow::Result<(u16, Vec<u8>)> {
        self.writer.write_all(request)?;
        let mut line = String::new();
        self.reader.read_line(&mut line)?;
        let status: u16 = line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("status line {line:?}"))?;
        let mut length = 0;
        loop {
            line.clear();
            self.reader.read_line(&mut line)?;
            if line == "\r\n" || line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse()?;
            }
        }
        let mut body = vec![0; length];
        self.reader.read_exact(&mut body)?;
        Ok((status, body))
    }
}

fn forward_auth(token: &str, ip: &str, ua: &str) -> Vec<u8> {
    format!(
        "GET /v1/forward-auth HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n\
         User-Agent: {ua}\r\nX-Forwarded-For: {ip}\r\nX-Original-URI: /account\r\n\
         X-Original-Method: GET\r\n\r\n"
    )
    .into_bytes()
}

fn verify(app_key: &str, token: &str, ip: &str, ua: &str) -> Vec<u8> {
    let body = serde_json::json!({
        "token": token,
        "request": {"ip": ip, "user_agent": ua, "method": "GET", "path": "/account"},
    })
    .to_string();
    format!(
        "POST /v1/verify HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {app_key}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Where one traced allocation came from: the innermost frame in our code (with
/// the innermost library frame under it, if any), or else the innermost library
/// frame. Frames are told apart by their source path: `src/` is ours, a registry
/// path names its crate, the standard library and this file are skipped.
fn site(trace: &Backtrace) -> String {
    let text = trace.to_string();
    let mut library: Option<String> = None;
    let mut name = "";
    for line in text.lines().map(str::trim) {
        if let Some(at) = line.strip_prefix("at ") {
            let place = |file: &str| format!("{name}  ({file})");
            if let Some(ours) = at.strip_prefix("./src/") {
                let here = place(&format!("src/{ours}"));
                return match library {
                    Some(l) => format!("{here}  via {l}"),
                    None => here,
                };
            }
            if library.is_none()
                && let Some((_, tail)) = at.split_once("index.crates.io-")
                && let Some((_, file)) = tail.split_once('/')
            {
                library = Some(place(file));
            }
        } else if let Some((_, n)) = line.split_once(": ") {
            name = n;
        }
    }
    format!("[library] {}", library.unwrap_or_else(|| "unknown".into()))
}

struct Session {
    token: String,
    ip: String,
    ua: &'static str,
}

fn drive(addr: SocketAddr, app_key: &str, sessions: usize, sites: bool) -> anyhow::Result<()> {
    UNCOUNTED.with(|u| u.set(true));
    let mut client = Client::connect(addr)?;
    let mut opened = Vec::with_capacity(sessions);
    for i in 0..sessions {
        let (ip, ua) = (mix::address(i), mix::agent(i));
        let body = serde_json::json!({
            "subject": mix::subject(i, sessions),
            "client": {"ip": ip, "user_agent": ua},
        })
        .to_string();
        let request = format!(
            "POST /v1/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {app_key}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let (status, body) = client.send(request.as_bytes())?;
        if status != 201 && status != 200 {
            bail!(
                "opening a session: {status} {}",
                String::from_utf8_lossy(&body)
            );
        }
        let answer: serde_json::Value = serde_json::from_slice(&body)?;
        let token = answer["access_token"]
            .as_str()
            .context("access_token")?
            .to_owned();
        opened.push(Session { token, ip, ua });
    }
    let modes: [(&str, Vec<Vec<u8>>); 2] = [
        (
            "forward-auth",
            opened
                .iter()
                .map(|s| forward_auth(&s.token, &s.ip, s.ua))
                .collect(),
        ),
        (
            "/v1/verify",
            opened
                .iter()
                .map(|s| verify(app_key, &s.token, &s.ip, s.ua))
                .collect(),
        ),
    ];
    println!("{sessions} sessions; each token used 10 times per mode, the first pass not counted");
    println!(
        "{:<14} {:>18} {:>16}",
        "mode", "allocations/req", "bytes/req"
    );
    for (mode, requests) in &modes {
        let pass = |client: &mut Client| -> anyhow::Result<()> {
            for r in requests {
                let (status, body) = client.send(r)?;
                if status != 200 {
                    bail!("{mode}: {status} {}", String::from_utf8_lossy(&body));
                }
            }
            Ok(())
        };
        pass(&mut client)?;
        settle();
        let (a0, b0) = (
            ALLOCATIONS.load(Ordering::Relaxed),
            BYTES.load(Ordering::Relaxed),
        );
        for _ in 1..10 {
            pass(&mut client)?;
        }
        settle();
        let n = (requests.len() * 9) as f64;
        let a = (ALLOCATIONS.load(Ordering::Relaxed) - a0) as f64 / n;
        let b = (BYTES.load(Ordering::Relaxed) - b0) as f64 / n;
        println!("{mode:<14} {a:>18.1} {b:>16.0}");
        if sites {
            let traced = requests.len().min(200);
            SITES
                .lock()
                .map_err(|_| anyhow::anyhow!("poisoned"))?
                .clear();
            TRACING.store(true, Ordering::Relaxed);
            for r in &requests[..traced] {
                client.send(r)?;
            }
            settle();
            TRACING.store(false, Ordering::Relaxed);
            let traces =
                std::mem::take(&mut *SITES.lock().map_err(|_| anyhow::anyhow!("poisoned"))?);
            let mut by_site: HashMap<String, usize> = HashMap::new();
            for t in &traces {
                *by_site.entry(site(t)).or_default() += 1;
            }
            let mut by_site: Vec<_> = by_site.into_iter().collect();
            by_site.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
            println!("  where ({traced} requests traced, allocations per request):");
            for (s, count) in by_site {
                println!("  {:>6.2}  {s}", count as f64 / traced as f64);
            }
        }
    }
    Ok(())
}

/// Gives the event writer time to store what it holds: a batch waits at most
/// `LINGER` (100 ms).
fn settle() {
    std::thread::sleep(Duration::from_millis(400));
}

fn main() -> anyhow::Result<()> {
    let mut sessions = 2000;
    let mut sites = false;
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--sites" => sites = true,
            n => {
                sessions = n
                    .parse()
                    .context("usage: bench-allocs [SESSIONS] [--sites]")?
            }
        }
    }
    if sites
        && let Some(var) = ["RUST_BACKTRACE", "RUST_LIB_BACKTRACE"]
            .into_iter()
            .find(|v| std::env::var_os(v).is_some())
    {
        bail!("--sites takes its own backtraces: unset {var}");
    }
    let data = tempfile::tempdir()?;
    let app_key = tokenwarden::config::to_hex(&tokenwarden::token::random_bytes::<32>()?);
    let file = FileConfig {
        data_dir: Some(data.path().to_owned()),
        geoip_city: Some(repo("tests/data/geoip/GeoIP2-City-Test.mmdb")),
        geoip_asn: Some(repo("tests/data/geoip/GeoLite2-ASN-Test.mmdb")),
        rules: Some(repo("rules/default.toml")),
        trusted_proxies: Some(vec!["127.0.0.1/32".parse()?]),
        tokens: TokensSection {
            access_ttl: Some("1h".into()),
            ..TokensSection::default()
        },
        ..FileConfig::default()
    };
    let env = [
        (
            "TOKENWARDEN_DATABASE_URL",
            format!("sqlite://{}/tw.db", data.path().display()),
        ),
        ("TOKENWARDEN_LISTEN", "127.0.0.1:0".to_owned()),
        ("TOKENWARDEN_ADMIN_LISTEN", "127.0.0.1:0".to_owned()),
        ("TOKENWARDEN_APP_KEYS", format!("bench:{app_key}")),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let settings = Settings::resolve(file, &env)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let app = runtime.block_on(Application::build(
        &settings,
        std::sync::Arc::new(SystemClock),
    ))?;
    let addr = app.public_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = runtime.spawn(app.run_until_stopped(async {
        let _ = stopped.await;
    }));
    let client = std::thread::spawn(move || drive(addr, &app_key, sessions, sites));
    let result = client
        .join()
        .map_err(|_| anyhow::anyhow!("the client panicked"))?;
    let _ = stop.send(());
    runtime.block_on(server)??;
    result
}
