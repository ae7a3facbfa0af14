//! The change feed between nodes on one PostgreSQL. Every durable change that
//! verification depends on is numbered in the database (`changes.seq`, gapless,
//! in commit order) and announced with `NOTIFY`. Each node applies the changes in
//! order to its in-memory view:
//!
//! - woken by a notification (milliseconds), or by a poll every `poll_interval`
//!   (so a lost notification delays nothing longer than that);
//! - on start and after a reconnect it catches up from its last applied number;
//! - if history it needs was pruned (a gap), it rebuilds its view from the store.
//!
//! A node that has not caught up for longer than `max_lag` is stale: `/readyz`
//! says so, and with `fail_closed` it stops answering `allow`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::session::SessionService;
use crate::store::change_listener;

const BATCH: i64 = 1000;

/// How this node follows the feed.
#[derive(Debug, Clone)]
pub struct FeedSettings {
    pub poll_interval: Duration,
    pub max_lag: Duration,
    pub fail_closed: bool,
    /// Shown as the listener's `application_name`.
    pub node_name: String,
}

/// Progress of this node through the feed.
pub struct Feed {
    settings: FeedSettings,
    /// Staleness is measured on the monotonic clock: it is about this process keeping
    /// up in real time (like the poll interval), not about the time of any request.
    started: Instant,
    last_applied: AtomicI64,
    /// When the node last knew it was up to date (ms since `started`).
    synced_at_ms: AtomicI64,
    listener_connected: AtomicBool,
    resyncs: AtomicU64,
    applied: AtomicU64,
    /// One catch-up at a time (notification and poll can race).
    catching_up: tokio::sync::Mutex<()>,
}

#[derive(Debug, Clone, Serialize)]
pub struct FeedStatus {
    pub listener_connected: bool,
    pub last_applied_seq: i64,
    pub lag_ms: i64,
    pub stale: bool,
    pub fail_closed: bool,
    pub changes_applied: u64,
    pub resyncs: u64,
}

impl Feed {
    /// `head` is the newest change already reflected in the snapshot the node loaded.
    pub fn new(settings: FeedSettings, head: i64) -> Self {
        Self {
            settings,
            started: Instant::now(),
            last_applied: AtomicI64::new(head),
            synced_at_ms: AtomicI64::new(0),
            listener_connected: AtomicBool::new(false),
            resyncs: AtomicU64::new(0),
            applied: AtomicU64::new(0),
            catching_up: tokio::sync::Mutex::new(()),
        }
    }

    fn now_ms(&self) -> i64 {
        i64::try_from(self.started.elapsed().as_millis()).unwrap_or(i64::MAX)
    }

    fn lag_ms(&self) -> i64 {
        (self.now_ms() - self.synced_at_ms.load(Ordering::SeqCst)).max(0)
    }

    pub fn status(&self) -> FeedStatus {
        let lag_ms = self.lag_ms();
        FeedStatus {
            listener_connected: self.listener_connected.load(Ordering::SeqCst),
            last_applied_seq: self.last_applied.load(Ordering::SeqCst),
            lag_ms,
            stale: self.stale_reason().is_some(),
            fail_closed: self.settings.fail_closed,
            changes_applied: self.applied.load(Ordering::SeqCst),
            resyncs: self.resyncs.load(Ordering::SeqCst),
        }
    }

    /// Why this node cannot vouch for revocations right now, if it cannot.
    pub fn stale_reason(&self) -> Option<String> {
        let lag = self.lag_ms();
        let max = i64::try_from(self.settings.max_lag.as_millis()).unwrap_or(i64::MAX);
        (lag > max).then(|| {
            format!(
                "the change feed has not been read for {} ms (limit {} ms): revocations made on other nodes may be missing",
                lag, max
            )
        })
    }

    /// Applies every change after the last applied one, in order.
    pub async fn catch_up(
        &self,
        sessions: &SessionService,
    ) -> Result<usize, crate::session::SessionError> {
        let _one = self.catching_up.lock().await;
        let started_ms = self.now_ms();
        let mut applied = 0;
        loop {
            let last = self.last_applied.load(Ordering::SeqCst);
            let batch = sessions.store().changes_since(last, BATCH).await?;
            let Some((first, _)) = batch.first() else {
                break;
            };
            if *first != last + 1 {
                // The history between was pruned: rebuild from the store instead.
                let head = sessions.store().head_change().await?;
                sessions.resync().await?;
                self.last_applied.store(head, Ordering::SeqCst);
                self.resyncs.fetch_add(1, Ordering::SeqCst);
                tracing::warn!(
                    from = last,
                    to = head,
                    "change feed gap: view rebuilt from the store"
                );
                continue;
            }
            for (seq, change) in batch {
                // Any hole (pruning by writer clocks is not monotone in seq) means the
                // history is incomplete: stop and let the next round resync.
                if seq != self.last_applied.load(Ordering::SeqCst) + 1 {
                    break;
                }
                sessions.apply_remote(change);
                self.last_applied.store(seq, Ordering::SeqCst);
                applied += 1;
            }
        }
        self.synced_at_ms.store(started_ms, Ordering::SeqCst);
        self.applied.fetch_add(applied as u64, Ordering::SeqCst);
        Ok(applied)
    }

    /// Follows the feed until the task is aborted.
    pub fn spawn(
        self: Arc<Self>,
        sessions: Arc<SessionService>,
        url: String,
    ) -> tokio::task::JoinHandle<()> {
        let poller = {
            let feed = self.clone();
            let sessions = sessions.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(feed.settings.poll_interval);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    if let Err(e) = feed.catch_up(&sessions).await {
                        tracing::warn!(error = %e, "change feed poll failed");
                    }
                }
            })
        };
        tokio::spawn(async move {
            let _poller = AbortOnDrop(poller);
            let mut backoff = Duration::from_millis(100);
            loop {
                match change_listener(&url, &self.settings.node_name).await {
                    Ok(mut listener) => {
                        self.listener_connected.store(true, Ordering::SeqCst);
                        backoff = Duration::from_millis(100);
                        // Whatever happened while we were not listening.
                        if let Err(e) = self.catch_up(&sessions).await {
                            tracing::warn!(error = %e, "change feed catch-up failed");
                        }
                        // `Ok(None)` or an error: the connection dropped, notifications may be lost.
                        while let Ok(Some(_)) = listener.try_recv().await {
                            if let Err(e) = self.catch_up(&sessions).await {
                                tracing::warn!(error = %e, "change feed catch-up failed");
                            }
                        }
                        self.listener_connected.store(false, Ordering::SeqCst);
                        tracing::warn!("change feed listener disconnected; reconnecting");
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot listen for changes; polling meanwhile");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            }
        })
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
