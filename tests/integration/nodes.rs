//! Real tokenwarden processes for the cluster tests and the propagation benchmark.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::{APP_KEY, Keys, USER_AGENT, client};

pub struct Node {
    pub child: Child,
    pub base: String,
    pub name: String,
    pub http: reqwest::Client,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn config(dir: &Path, keys: &Keys, name: &str, poll: &str, max_lag: &str) -> std::path::PathBuf {
    let path = dir.join(format!("{name}.toml"));
    let mut text = format!(
        "data_dir = \"{}\"\n[tokens]\nsigning_kid = \"hs-1\"\n[cluster]\nenabled = true\npoll_interval = \"{poll}\"\nmax_lag = \"{max_lag}\"\nnode_name = \"{name}\"\n",
        dir.join(name).display()
    );
    for k in &keys.entries {
        text.push_str(&format!(
            "[[keys]]\nkid = \"{}\"\nalg = \"{}\"\npath = \"{}\"\n",
            k.kid,
            k.alg,
            k.path.display()
        ));
    }
    std::fs::write(&path, text).unwrap();
    path
}

pub fn spawn(db_url: &str, dir: &Path, keys: &Keys, name: &str) -> Node {
    spawn_with_lag(db_url, dir, keys, name, "1s", "30s")
}

/// A node with its own feed poll interval and staleness bound.
pub fn spawn_with_lag(
    db_url: &str,
    dir: &Path,
    keys: &Keys,
    name: &str,
    poll: &str,
    max_lag: &str,
) -> Node {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tokenwarden"))
        .arg("--config")
        .arg(config(dir, keys, name, poll, max_lag))
        .arg("serve")
        .env("TOKENWARDEN_DATABASE_URL", db_url)
        .env("TOKENWARDEN_LISTEN", "127.0.0.1:0")
        .env("TOKENWARDEN_ADMIN_LISTEN", "127.0.0.1:0")
        .env("TOKENWARDEN_APP_KEYS", format!("web:{APP_KEY}"))
        .env("TOKENWARDEN_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start tokenwarden");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    // Keep draining the log so the node never blocks on a full pipe.
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if !sent && line.contains("tokenwarden listening") {
                let _ = tx.send(line.clone());
                sent = true;
            }
        }
    });
    let line = rx
        .recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| panic!("{name} did not start"));
    let public = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("public="))
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_owned();
    Node {
        child,
        base: format!("http://{public}"),
        name: name.to_owned(),
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap(),
    }
}

impl Node {
    pub async fn post(&self, path: &str, body: Value) -> reqwest::Response {
        self.http
            .post(format!("{}{path}", self.base))
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
        assert_eq!(r.status(), 201);
        r.json().await.unwrap()
    }
    pub async fn decision(&self, token: &str) -> String {
        let r = self
            .post(
                "/v1/verify",
                json!({"token": token, "request": {"ip": "203.0.113.7", "user_agent": USER_AGENT}}),
            )
            .await;
        assert_eq!(r.status(), 200, "{}", self.name);
        let v: Value = r.json().await.unwrap();
        v["decision"].as_str().unwrap().to_owned()
    }
    pub async fn logout(&self, session_id: &str) {
        let r = self
            .http
            .delete(format!("{}/v1/sessions/{session_id}", self.base))
            .bearer_auth(APP_KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 204);
    }
    pub async fn ready(&self) -> Value {
        self.http
            .get(format!("{}/readyz", self.base))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }
    /// Polls until the token is refused; returns how long that took.
    pub async fn refused_within(&self, token: &str, limit: Duration) -> Duration {
        let start = Instant::now();
        loop {
            if self.decision(token).await == "revoke" {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < limit,
                "{} still accepts a revoked token after {limit:?}",
                self.name
            );
            tokio::task::yield_now().await;
        }
    }
}
