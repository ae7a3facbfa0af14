//! Hot reload of the rule file: on any change in its directory (editors and
//! ConfigMaps replace files by rename, so the directory is watched, not the file)
//! and on `SIGHUP`. An invalid file is refused and logged with its position; the
//! previous rules keep serving.

use std::sync::Arc;
use std::time::Duration;

use notify_debouncer_full::new_debouncer;
use notify_debouncer_full::notify::RecursiveMode;

use crate::metrics::Metrics;
use crate::monitor::Monitor;

fn reload(monitor: &Monitor, metrics: &Metrics, why: &str) {
    let result = match monitor.reload_rules() {
        Ok(Some(hash)) => {
            tracing::info!(%hash, trigger = why, "rules reloaded");
            metrics.preset(&monitor.rules());
            "loaded"
        }
        Ok(None) => {
            tracing::debug!(trigger = why, "rule file unchanged");
            "unchanged"
        }
        Err(e) => {
            tracing::error!(error = %e, trigger = why, "rule file refused; the previous rules stay active");
            "refused"
        }
    };
    metrics
        .rule_reloads
        .get_or_create(&crate::metrics::ResultLabels { result })
        .inc();
}

/// Starts watching; the task ends when aborted. Without a rule file it only waits.
pub fn spawn(monitor: Arc<Monitor>, metrics: Arc<Metrics>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let Some(path) = monitor.rules_path().map(|p| p.to_owned()) else {
            return;
        };
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        // Kept so the channel stays open (and SIGHUP keeps working) even without a watcher.
        let _sender = tx.clone();
        let file_name = path.file_name().map(|n| n.to_owned());
        let debouncer = new_debouncer(
            Duration::from_millis(250),
            None,
            move |result: notify_debouncer_full::DebounceEventResult| {
                if let Ok(events) = result
                    && events.iter().any(|e| {
                        e.paths
                            .iter()
                            .any(|p| p.file_name() == file_name.as_deref())
                    })
                {
                    let _ = tx.send(());
                }
            },
        );
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(std::path::Path::new("."))
            .to_owned();
        let _watcher = match debouncer {
            Ok(mut d) => match d.watch(&dir, RecursiveMode::NonRecursive) {
                Ok(()) => Some(d),
                Err(e) => {
                    tracing::warn!(error = %e, dir = %dir.display(), "cannot watch the rules directory; reload with SIGHUP");
                    None
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch files; reload rules with SIGHUP");
                None
            }
        };
        #[cfg(unix)]
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        loop {
            #[cfg(unix)]
            let sighup = async {
                match hup.as_mut() {
                    Some(s) => s.recv().await,
                    None => std::future::pending().await,
                }
            };
            #[cfg(not(unix))]
            let sighup = std::future::pending::<Option<()>>();
            tokio::select! {
                changed = rx.recv() => {
                    if changed.is_none() { break; }
                    reload(&monitor, &metrics, "file change");
                }
                _ = sighup => reload(&monitor, &metrics, "SIGHUP"),
            }
        }
    })
}
