//! Test fixtures: key files, databases (a fresh SQLite file or a fresh PostgreSQL
//! database per test) and the application spawned on port 0 with a manual clock.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokenwarden::clock::ManualClock;
use tokenwarden::config::{FileConfig, KeyAlgorithm, KeyEntry, Settings, TokensSection};
use tokenwarden::http::Application;

/// A child process (a gateway, a browser driver) stopped when the test ends:
/// asked with SIGTERM first, so that nginx's master stops its workers (killed
/// outright, it leaves them running, orphaned, on the ports they listen on), then
/// killed if it has not exited within five seconds.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(pid) = libc::pid_t::try_from(self.0.id()) {
            // SAFETY: kill(2) only sends a signal, to our own child, which has not
            // been waited for yet, so its pid cannot have been reused.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while std::time::Instant::now() < deadline {
                match self.0.try_wait() {
                    Ok(Some(_)) => return,
                    Ok(None) => std::thread::sleep(Duration::from_millis(10)),
                    Err(_) => break,
                }
            }
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A loopback port nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A fixed start time, so expiry and grace windows are exact.
pub const T0: i64 = 1_800_000_000;
pub const APP_KEY: &str = "test-app-key-0123456789abcdefghijklmnop";
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789abcdefghijkl";

/// Where a test's data lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A database for one test. PostgreSQL databases are dropped when this is dropped.
pub struct TestDb {
    pub url: String,
    pg: Option<(String, String)>,
    _dir: Option<tempfile::TempDir>,
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some((admin_url, name)) = self.pg.take() {
            // Drop needs async work: run it on a thread with its own runtime.
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .ok()?;
                rt.block_on(async {
                    use sqlx::Connection;
                    let mut c = sqlx::PgConnection::connect(&admin_url).await.ok()?;
                    let sql = format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)");
                    sqlx::query(sqlx::AssertSqlSafe(sql))
                        .execute(&mut c)
                        .await
                        .ok()
                })
            })
            .join();
        }
    }
}

fn pg_admin_url() -> String {
    std::env::var("TOKENWARDEN_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// A fresh database, or `None` (with a loud message) when PostgreSQL is not reachable
/// and not required. CI sets `TOKENWARDEN_TEST_REQUIRE_PG=1`, which turns the skip into a failure.
pub async fn database(backend: Backend) -> Option<TestDb> {
    match backend {
        Backend::Sqlite => {
            let dir = tempfile::tempdir().expect("temp dir");
            let url = format!("sqlite://{}", dir.path().join("tw.db").display());
            Some(TestDb {
                url,
                pg: None,
                _dir: Some(dir),
            })
        }
        Backend::Postgres => {
            use sqlx::Connection;
            let admin_url = pg_admin_url();
            let required = std::env::var_os("TOKENWARDEN_TEST_REQUIRE_PG").is_some();
            let mut conn = match sqlx::PgConnection::connect(&admin_url).await {
                Ok(c) => c,
                Err(e) if required => {
                    panic!(
                        "PostgreSQL is required (TOKENWARDEN_TEST_REQUIRE_PG) but {admin_url} is unreachable: {e}"
                    )
                }
                Err(e) => {
                    eprintln!(
                        "\n*** SKIPPED: PostgreSQL test; {admin_url} is unreachable ({e}).\n*** Set TOKENWARDEN_TEST_PG_URL, or TOKENWARDEN_TEST_REQUIRE_PG=1 to make this a failure.\n"
                    );
                    return None;
                }
            };
            let name = format!("tw_test_{}", uuid::Uuid::new_v4().simple());
            sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
                .execute(&mut conn)
                .await
                .expect("create test database");
            let base = admin_url
                .rsplit_once('/')
                .map(|(b, _)| b.to_owned())
                .expect("database URL with a database name");
            Some(TestDb {
                url: format!("{base}/{name}"),
                pg: Some((admin_url, name)),
                _dir: None,
            })
        }
    }
}

/// A fresh SQLite database, key files and a data folder: what most tests start from.
pub struct Fixture {
    pub db: TestDb,
    pub keys: Keys,
    pub data: tempfile::TempDir,
}

impl Fixture {
    pub async fn sqlite() -> Self {
        Self {
            db: database(Backend::Sqlite)
                .await
                .expect("SQLite needs no server"),
            keys: Keys::all(),
            data: tempfile::tempdir().expect("temp dir"),
        }
    }
}

/// Key files for all three algorithms in one folder.
pub struct Keys {
    pub dir: tempfile::TempDir,
    pub entries: Vec<KeyEntry>,
}

impl Keys {
    pub fn all() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let entries = [
            ("hs-1", KeyAlgorithm::HS512),
            ("es-1", KeyAlgorithm::ES256),
            ("ed-1", KeyAlgorithm::EdDSA),
        ]
        .into_iter()
        .map(|(kid, alg)| {
            let path = dir.path().join(kid);
            tokenwarden::token::write_private(
                &path,
                tokenwarden::token::generate(alg).unwrap().as_bytes(),
            )
            .unwrap();
            KeyEntry {
                kid: kid.into(),
                alg,
                path,
            }
        })
        .collect();
        Self { dir, entries }
    }

    pub fn path(&self, kid: &str) -> PathBuf {
        self.dir.path().join(kid)
    }

    pub fn read(&self, kid: &str) -> String {
        std::fs::read_to_string(self.path(kid)).unwrap()
    }
}

pub fn settings(db_url: &str, keys: &Keys, signing_kid: &str, data_dir: &Path) -> Settings {
    let file = FileConfig {
        database_url: Some(db_url.to_owned()),
        data_dir: Some(data_dir.to_owned()),
        keys: keys.entries.clone(),
        tokens: TokensSection {
            signing_kid: Some(signing_kid.to_owned()),
            ..TokensSection::default()
        },
        ..FileConfig::default()
    };
    let env: BTreeMap<String, String> = [
        ("TOKENWARDEN_LISTEN", "127.0.0.1:0"),
        ("TOKENWARDEN_ADMIN_LISTEN", "127.0.0.1:0"),
        ("TOKENWARDEN_APP_KEYS", &format!("web:{APP_KEY}")),
        ("TOKENWARDEN_ADMIN_TOKEN", ADMIN_TOKEN),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    Settings::resolve(file, &env).expect("valid test settings")
}

/// The real application on loopback ports, driven over HTTP.
pub struct TestApp {
    pub base: String,
    pub admin: String,
    pub http: reqwest::Client,
    pub clock: Arc<ManualClock>,
    pub settings: Settings,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl TestApp {
    pub async fn spawn(settings: Settings) -> Self {
        Self::spawn_with_clock(settings, Arc::new(ManualClock::at(T0))).await
    }

    pub async fn spawn_with_clock(settings: Settings, clock: Arc<ManualClock>) -> Self {
        let app = Application::build(&settings, clock.clone())
            .await
            .expect("application builds");
        let base = format!("http://{}", app.public_addr().unwrap());
        let admin = format!("http://{}", app.admin_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(app.run_until_stopped(async {
            let _ = stopped.await;
        }));
        Self {
            base,
            admin,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(20))
                .build()
                .unwrap(),
            clock,
            settings,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Stops the server (draining requests) and starts a new one on the same database and clock.
    pub async fn restart(mut self) -> Self {
        self.stop().await;
        Self::spawn_with_clock(self.settings.clone(), self.clock.clone()).await
    }

    pub async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await
                .expect("server task")
                .expect("server stopped cleanly");
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn post(&self, path: &str, body: Value) -> reqwest::Response {
        self.http
            .post(self.url(path))
            .bearer_auth(APP_KEY)
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    pub async fn open(&self, subject: &str) -> Value {
        let r = self
            .post(
                "/v1/sessions",
                json!({"subject": subject, "client": client()}),
            )
            .await;
        assert_eq!(r.status(), 201, "open session");
        r.json().await.unwrap()
    }

    pub async fn verify(&self, token: &str) -> Value {
        let r = self
            .post("/v1/verify", json!({"token": token, "request": {"ip": "203.0.113.7", "user_agent": USER_AGENT, "method": "GET", "path": "/"}}))
            .await;
        assert_eq!(r.status(), 200);
        r.json().await.unwrap()
    }

    pub async fn refresh(&self, refresh_token: &str) -> reqwest::Response {
        self.post(
            "/v1/sessions/refresh",
            json!({"refresh_token": refresh_token, "client": client()}),
        )
        .await
    }
}

pub const USER_AGENT: &str =
    "Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0";

pub fn client() -> Value {
    json!({"ip": "203.0.113.7", "user_agent": USER_AGENT})
}

pub fn s(v: &Value, key: &str) -> String {
    v[key]
        .as_str()
        .unwrap_or_else(|| panic!("{key} missing in {v}"))
        .to_owned()
}
