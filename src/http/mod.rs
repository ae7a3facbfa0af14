//! The HTTP layer: thin handlers that extract, call one domain function and map
//! the result. Only this layer knows status codes. [`Application`] builds the
//! whole service from [`Settings`], binds both listeners and runs them.

mod admin;
mod deadline;
mod error;
mod extract;
mod forward_auth;
mod health;
mod oauth;
mod reload;
mod sessions;
mod verify;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::extract::DefaultBodyLimit;
use tokio::net::TcpListener;

pub use error::ApiError;
pub use verify::{Claim, Decision, decide};

use crate::clock::SharedClock;
use crate::config::{AppCredential, Secret, Settings, sha256, to_hex};
use crate::enrich::{EnrichConfig, Enricher, UaParser};
use crate::events::EventSink;
use crate::feed::{Feed, FeedSettings};
use crate::metrics::Metrics;
use crate::monitor::Monitor;
use crate::session::SessionService;
use crate::store;
use crate::token::{KeySet, TokenCodec, random_bytes, write_private};

/// What every handler can reach: built services, not raw settings. One `Arc`, so
/// that the clone axum makes for every request is one reference count, not one per
/// service.
#[derive(Clone)]
pub struct AppState(Arc<Services>);

impl std::ops::Deref for AppState {
    type Target = Services;

    fn deref(&self) -> &Services {
        &self.0
    }
}

/// The services behind [`AppState`].
pub struct Services {
    pub sessions: Arc<SessionService>,
    pub metrics: Arc<Metrics>,
    /// `/metrics` answers without the admin token.
    pub metrics_open: bool,
    /// The change feed this node follows (PostgreSQL only).
    pub feed: Option<Arc<Feed>>,
    /// Peers whose forwarding headers are believed; when set, the only forward-auth callers.
    pub trusted_proxies: Arc<Vec<ipnet::IpNet>>,
    /// How forward-auth reads the token and names its answers.
    pub forward_auth: Arc<forward_auth::ForwardAuth>,
    pub apps: Arc<Vec<AppCredential>>,
    pub admin_token: Option<Arc<Secret>>,
}

const MAX_BODY_BYTES: usize = 64 * 1024;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The public API (session, verify and OAuth), with the body limit and the
/// timeout wrapped around the router once. Added with `Router::layer`, each layer
/// wraps every route on its own: a boxed service cloned and a boxed future on
/// every request, for each layer.
pub fn app(state: AppState) -> impl HttpService {
    let router = Router::new()
        .merge(sessions::router())
        .merge(verify::router())
        .merge(oauth::router())
        .merge(health::router())
        .with_state(state);
    tower::ServiceBuilder::new()
        .layer(deadline::DeadlineLayer::new(REQUEST_TIMEOUT))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .service(router)
}

/// The admin API, on its own listener with its own credential.
pub fn admin_app(state: AppState) -> impl HttpService {
    let router = Router::new()
        .merge(admin::router(state.clone()))
        .merge(health::router())
        .with_state(state);
    tower::ServiceBuilder::new()
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .service(router)
}

/// What [`app`] and [`admin_app`] serve: a router with its layers around it.
pub trait HttpService:
    tower::Service<
        axum::extract::Request,
        Response = axum::response::Response,
        Error = std::convert::Infallible,
        Future: Send,
    > + Clone
    + Send
    + Sync
    + 'static
{
}

impl<S> HttpService for S where
    S: tower::Service<
            axum::extract::Request,
            Response = axum::response::Response,
            Error = std::convert::Infallible,
            Future: Send,
        > + Clone
        + Send
        + Sync
        + 'static
{
}

/// The running service: both listeners bound, state built.
pub struct Application {
    public: TcpListener,
    admin: TcpListener,
    state: AppState,
    database_url: String,
    change_retention: Duration,
    event_rx: Option<tokio::sync::mpsc::Receiver<crate::store::StoredEvent>>,
    event_retention: Duration,
}

impl Application {
    /// Connects and migrates the database, loads keys and revocations, binds the listeners.
    pub async fn build(settings: &Settings, clock: SharedClock) -> anyhow::Result<Self> {
        let store = store::connect(&settings.database_url)
            .await
            .with_context(|| {
                format!(
                    "cannot open the database {}",
                    redact_url(&settings.database_url)
                )
            })?;
        store.migrate().await.context("database migration failed")?;

        let keys = if settings.keys.is_empty() {
            let (keys, created) = KeySet::load_or_create_dev(&settings.data_dir)?;
            if created {
                tracing::warn!(
                    kid = keys.signing_kid(),
                    dir = %settings.data_dir.display(),
                    "no keys configured: generated a development EdDSA signing key"
                );
            }
            keys
        } else {
            KeySet::load(&settings.keys, settings.tokens.signing_kid.as_deref())?
        };
        let external = crate::token::ExternalIssuers::load(&settings.issuers, clock.clone())
            .await
            .context("cannot load the keys of a configured issuer")?;
        let codec = TokenCodec::new(keys, &settings.tokens).with_external(Arc::new(external));

        let apps = if settings.apps.is_empty() {
            vec![dev_app_key(&settings.data_dir)?]
        } else {
            settings.apps.clone()
        };
        if settings.admin_token.is_none() {
            tracing::warn!(
                "no admin token configured (TOKENWARDEN_ADMIN_TOKEN): the admin API refuses every request"
            );
        }

        let enricher = Enricher::new(
            EnrichConfig {
                geoip_city: settings.geoip_city.clone(),
                geoip_asn: settings.geoip_asn.clone(),
                default_radius_km: settings.geoip_default_radius_km,
                prefix_v4: settings.ip_prefix_v4,
                prefix_v6: settings.ip_prefix_v6,
            },
            Arc::new(UaParser::new()?),
        )?;
        let geo = enricher.geoip().status();
        if geo.active {
            tracing::info!(summary = %geo.summary, "GeoIP");
        } else {
            tracing::warn!(summary = %geo.summary, "GeoIP");
        }
        let monitor = Monitor::new(settings.rules.clone(), Arc::new(enricher), clock.clone())
            .map_err(|e| anyhow::anyhow!("rule file refused: {e}"))?;
        let rules = monitor.rules_status();
        tracing::info!(source = %rules.source, hash = %rules.hash, rules = rules.rules, "rules loaded");
        // The feed position is read before the snapshot, so nothing falls between them.
        let head = store
            .head_change()
            .await
            .context("cannot read the change feed")?;
        let postgres = store.backend() == "postgres";
        let sessions = SessionService::start(
            store,
            codec,
            Arc::new(monitor),
            clock.clone(),
            settings.tokens.clone(),
        )
        .await
        .context("cannot load revocations")?;
        let feed = postgres.then(|| {
            let c = &settings.cluster;
            Arc::new(Feed::new(
                FeedSettings {
                    poll_interval: c.poll_interval,
                    max_lag: c.max_lag,
                    fail_closed: c.fail_closed,
                    node_name: c.node_name.clone(),
                },
                head,
            ))
        });
        if let Some(feed) = feed.as_ref().filter(|_| settings.cluster.fail_closed) {
            let feed = feed.clone();
            sessions.set_freshness_guard(Arc::new(move || feed.stale_reason()));
        }
        let metrics = Arc::new(Metrics::new());
        metrics.preset(&sessions.monitor().rules());
        let (event_sink, event_rx) = EventSink::new(settings.events.queue, Some(metrics.clone()));
        sessions.set_event_sink(event_sink);
        let state = AppState(Arc::new(Services {
            metrics,
            metrics_open: settings.metrics_open,
            feed,
            trusted_proxies: Arc::new(settings.trusted_proxies.clone()),
            forward_auth: Arc::new(
                forward_auth::ForwardAuth::new(settings.forward_auth.clone())
                    .map_err(anyhow::Error::msg)?,
            ),
            sessions: Arc::new(sessions),
            apps: Arc::new(apps),
            admin_token: settings.admin_token.clone().map(Arc::new),
        }));
        let public = TcpListener::bind(settings.listen)
            .await
            .with_context(|| format!("cannot listen on {}", settings.listen))?;
        let admin = TcpListener::bind(settings.admin_listen)
            .await
            .with_context(|| format!("cannot listen on {} (admin)", settings.admin_listen))?;
        Ok(Self {
            public,
            admin,
            state,
            database_url: settings.database_url.clone(),
            change_retention: settings.cluster.change_retention,
            event_rx: Some(event_rx),
            event_retention: settings.events.retention,
        })
    }

    pub fn public_addr(&self) -> std::io::Result<SocketAddr> {
        self.public.local_addr()
    }

    pub fn admin_addr(&self) -> std::io::Result<SocketAddr> {
        self.admin.local_addr()
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves both listeners until `shutdown` resolves, then drains in-flight requests.
    pub async fn run_until_stopped(
        mut self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let wait = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|stopped| *stopped).await;
        };
        let event_writer = match (self.event_rx.take(), self.state.sessions.event_sink()) {
            (Some(rx), Some(sink)) => Some(tokio::spawn(
                sink.clone()
                    .run_writer(rx, self.state.sessions.store().clone()),
            )),
            _ => None,
        };
        let event_retention_ms =
            i64::try_from(self.event_retention.as_millis()).unwrap_or(i64::MAX);
        let sessions = self.state.sessions.clone();
        let self_sessions = self.state.sessions.clone();
        let retention = i64::try_from(self.change_retention.as_secs()).unwrap_or(i64::MAX);
        let follower = self
            .state
            .feed
            .clone()
            .map(|feed| feed.spawn(self.state.sessions.clone(), self.database_url.clone()));
        let pruner = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(60));
            loop {
                tick.tick().await;
                sessions.prune();
                sessions.maintain();
                for issuer in sessions.codec().external().iter() {
                    if issuer.stale() {
                        issuer.refresh().await;
                    }
                }
                let cutoff = sessions.now().saturating_sub(retention);
                if let Err(e) = sessions.store().prune_changes(cutoff).await {
                    tracing::warn!(error = %e, "cannot prune the change feed");
                }
                let events_cutoff = sessions
                    .now()
                    .saturating_mul(1000)
                    .saturating_sub(event_retention_ms);
                if let Err(e) = sessions.store().prune_events(events_cutoff).await {
                    tracing::warn!(error = %e, "cannot prune audit events");
                }
                match sessions.monitor().enricher().geoip().reload() {
                    Ok(true) => tracing::info!("GeoIP databases reloaded"),
                    Ok(false) => {}
                    Err(e) => {
                        tracing::error!(error = %e, "GeoIP reload failed; the previous databases stay")
                    }
                }
            }
        });
        let reloader = reload::spawn(
            self.state.sessions.monitor().clone(),
            self.state.metrics.clone(),
        );
        // Write-behind of last-seen observations: off the request path, about once a
        // second. It stops between flushes, never in the middle of one (a batch taken
        // from the monitor exists only in that flush).
        let writer = {
            let sessions = self.state.sessions.clone();
            let mut stop = stop_rx.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tokio::select! {
                        _ = tick.tick() => flush_last_seen(&sessions, false).await,
                        _ = stop.changed() => break,
                    }
                }
            })
        };
        let public = axum::serve(
            self.public,
            axum::ServiceExt::<axum::extract::Request>::into_make_service_with_connect_info::<
                SocketAddr,
            >(app(self.state.clone())),
        )
        .with_graceful_shutdown(wait(stop_rx.clone()));
        let admin = axum::serve(
            self.admin,
            axum::ServiceExt::<axum::extract::Request>::into_make_service_with_connect_info::<
                SocketAddr,
            >(admin_app(self.state)),
        )
        .with_graceful_shutdown(wait(stop_rx));
        let public = tokio::spawn(async move { public.await });
        let admin = tokio::spawn(async move { admin.await });
        shutdown.await;
        let _ = stop_tx.send(true);
        let (p, a) = tokio::join!(public, admin);
        pruner.abort();
        reloader.abort();
        let _ = writer.await;
        flush_last_seen(&self_sessions, true).await;
        // Let the event writer drain what is queued (bounded), then stop it.
        if let (Some(task), Some(sink)) = (event_writer, self_sessions.event_sink()) {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
            while !sink.settled() && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            task.abort();
            // Never silently: what the drain did not store is said, with its count.
            let lost = sink.depth();
            if lost > 0 {
                tracing::warn!(
                    events = lost,
                    "stopping: audit events not confirmed stored after 3 s (queued or in a batch being written)"
                );
            }
        }
        if let Some(f) = follower {
            f.abort();
        }
        p??;
        a??;
        Ok(())
    }
}

async fn flush_last_seen(sessions: &SessionService, all: bool) {
    let batch = sessions.monitor().take_dirty(all);
    if let Err(e) = sessions.store().save_last_seen(&batch).await {
        tracing::warn!(error = %e, sessions = batch.len(), "cannot save last-seen observations; will retry");
        sessions
            .monitor()
            .mark_dirty(batch.into_iter().map(|l| l.session_id));
    }
}

/// In development (no app configured) one app key is generated, printed once, and
/// only its hash is kept in `data_dir/dev-app-key.sha256`.
fn dev_app_key(data_dir: &Path) -> anyhow::Result<AppCredential> {
    let path = data_dir.join("dev-app-key.sha256");
    let hex = if path.exists() {
        std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?
            .trim()
            .to_owned()
    } else {
        let key = format!("twk_dev_{}", to_hex(&random_bytes::<24>()?));
        let hex = to_hex(&sha256(key.as_bytes()));
        write_private(&path, hex.as_bytes())?;
        // Printed, not logged: this is the only time the key exists outside the caller's hands.
        println!(
            "\nDevelopment app key (shown once, only its hash is stored in {}):\n\n    {key}\n\nUse it as `Authorization: Bearer {key}`. Configure real app keys with TOKENWARDEN_APP_KEYS.\n",
            path.display()
        );
        hex
    };
    let mut key_sha256 = [0u8; 32];
    let bytes = (0..32)
        .map(|i| {
            hex.get(2 * i..2 * i + 2)
                .and_then(|b| u8::from_str_radix(b, 16).ok())
        })
        .collect::<Option<Vec<u8>>>()
        .filter(|b| b.len() == 32)
        .with_context(|| {
            format!(
                "{} is corrupt: delete it to generate a new key",
                path.display()
            )
        })?;
    key_sha256.copy_from_slice(&bytes);
    Ok(AppCredential {
        id: "dev".into(),
        key_sha256,
    })
}

/// The database URL without its password, for messages.
fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &url[scheme + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn database_passwords_never_reach_messages() {
        assert_eq!(
            super::redact_url("postgres://tw:hunter2@db:5432/tw"),
            "postgres://tw:***@db:5432/tw"
        );
        assert_eq!(
            super::redact_url("sqlite://data/x.db"),
            "sqlite://data/x.db"
        );
    }
}
