//! Hot reload of the rule file: on any change in its directory (editors and
//! ConfigMaps replace files by rename, so the directory is watched, not the file)
//! and on `SIGHUP`. An invalid file is refused and logged with its position; the
//! previous rules keep serving.

use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};

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

/// How long a burst of changes to the rule file settles before it is read: an
/// editor's save is often a write, a rename and a metadata change in a few
/// milliseconds. Counted from the burst's first change, so a file written without
/// pause is still read every `SETTLE`.
const SETTLE: Duration = Duration::from_millis(250);

/// Whether a watcher's event in the rules directory may have changed the rules:
/// the file itself created, written, renamed or removed, or (a Kubernetes
/// ConfigMap) the `..data` link swapped that the file reaches through. Reading
/// the file is no change: reloading reads it, and an open counted as a change
/// made every reload schedule the next one.
fn changes_the_rules(event: &notify::Event, file_name: Option<&std::ffi::OsStr>) -> bool {
    use notify::EventKind;
    use notify::event::{AccessKind, AccessMode};
    let changes = match event.kind {
        EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_) | EventKind::Any => true,
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) | EventKind::Other => false,
    };
    changes
        && event.paths.iter().any(|p| {
            let name = p.file_name();
            name == file_name || name == Some(std::ffi::OsStr::new("..data"))
        })
}

/// Starts watching; the task ends when aborted. Without a rule file it only waits.
///
/// The watcher's own thread sleeps on inotify (or the platform's equivalent) and
/// the bursts are settled here, on the runtime's timer: nothing wakes while no file
/// changes. (A debouncer thread that ticks four times per settling period woke the
/// process 16 times a second, idle or not.)
pub fn spawn(monitor: Arc<Monitor>, metrics: Arc<Metrics>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let Some(path) = monitor.rules_path().map(|p| p.to_owned()) else {
            return;
        };
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        // Kept so the channel stays open (and SIGHUP keeps working) even without a watcher.
        let _sender = tx.clone();
        let file_name = path.file_name().map(|n| n.to_owned());
        let watcher = notify::recommended_watcher(move |result: notify::Result<notify::Event>| {
            // An error of the watcher itself is no change of the file; SIGHUP still works.
            if let Ok(event) = result
                && changes_the_rules(&event, file_name.as_deref())
            {
                let _ = tx.send(());
            }
        });
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(std::path::Path::new("."))
            .to_owned();
        let _watcher = match watcher {
            Ok(mut w) => match w.watch(&dir, RecursiveMode::NonRecursive) {
                Ok(()) => Some(w),
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
        // When the burst of changes seen settles, if one is seen.
        let mut settled_at: Option<tokio::time::Instant> = None;
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
            let settled = async {
                match settled_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                changed = rx.recv() => {
                    if changed.is_none() { break; }
                    settled_at.get_or_insert_with(|| tokio::time::Instant::now() + SETTLE);
                }
                () = settled => {
                    settled_at = None;
                    reload(&monitor, &metrics, "file change");
                }
                _ = sighup => reload(&monitor, &metrics, "SIGHUP"),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use std::ffi::OsStr;
    use std::path::PathBuf;

    use notify::event::{
        AccessKind, AccessMode, CreateKind, DataChange, EventKind, ModifyKind, RemoveKind,
        RenameMode,
    };

    use super::changes_the_rules;

    fn event(kind: EventKind, path: &str) -> notify::Event {
        notify::Event::new(kind).add_path(PathBuf::from(path))
    }

    #[test]
    fn a_change_to_the_file_counts_and_reading_it_does_not() {
        let name = Some(OsStr::new("rules.toml"));
        for kind in [
            EventKind::Create(CreateKind::File),
            EventKind::Modify(ModifyKind::Data(DataChange::Any)),
            EventKind::Modify(ModifyKind::Name(RenameMode::To)),
            EventKind::Remove(RemoveKind::File),
            EventKind::Access(AccessKind::Close(AccessMode::Write)),
        ] {
            assert!(
                changes_the_rules(&event(kind, "/etc/tw/rules.toml"), name),
                "{kind:?}"
            );
            assert!(
                !changes_the_rules(&event(kind, "/etc/tw/other.toml"), name),
                "{kind:?} of another file"
            );
        }
        // What the reload itself does to the file: open, read, close.
        for kind in [
            EventKind::Access(AccessKind::Open(AccessMode::Any)),
            EventKind::Access(AccessKind::Read),
            EventKind::Access(AccessKind::Close(AccessMode::Read)),
        ] {
            assert!(
                !changes_the_rules(&event(kind, "/etc/tw/rules.toml"), name),
                "{kind:?}"
            );
        }
    }

    /// kubelet updates a ConfigMap by swapping the `..data` link the file
    /// reaches through; the file's own name sees no event.
    #[test]
    fn a_configmap_swap_counts() {
        let swap = event(
            EventKind::Modify(ModifyKind::Name(RenameMode::To)),
            "/etc/tw/..data",
        );
        assert!(changes_the_rules(&swap, Some(OsStr::new("rules.toml"))));
    }
}
