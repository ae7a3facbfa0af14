//! One storage conformance suite, run against SQLite and against PostgreSQL.

use std::sync::Arc;

use tokenwarden::revocation::Change;
use tokenwarden::store::{
    self, NewRefresh, ReauthRequest, RefreshRejection, RevokedJti, RotateOutcome, RotateRequest,
    STATE_ACTIVE, Seen, SessionRecord, SharedStore,
};

use crate::support::{Backend, T0, TestDb, database};

async fn open_store(backend: Backend) -> Option<(TestDb, SharedStore)> {
    let db = database(backend).await?;
    let store = store::connect(&db.url).await.expect("connect");
    store.migrate().await.expect("migrate");
    // Migrations are idempotent.
    store.migrate().await.expect("migrate twice");
    Some((db, store))
}

fn session(id: &str, subject: &str, created_at: i64, generation: i64) -> SessionRecord {
    SessionRecord {
        session_id: id.into(),
        subject: subject.into(),
        created_at,
        last_seen_at: created_at,
        auth_time: created_at,
        ip: "203.0.113.7".into(),
        user_agent: "ua".into(),
        binding: "bnd".into(),
        acr: Some("urn:mfa".into()),
        amr: Some("[\"pwd\",\"otp\"]".into()),
        claims: None,
        state: STATE_ACTIVE.into(),
        revoked_at: None,
        revoked_reason: None,
        epoch: 0,
        epoch_until: 0,
        user_generation: generation,
        access_exp_max: created_at + 300,
        binding_info: Some("{}".into()),
        risk: 0.0,
        risk_at: created_at * 1000,
        last_seen_info: None,
        step_up_message: None,
    }
}

fn refresh(hash: &str, at: i64) -> NewRefresh {
    NewRefresh {
        token_hash: hash.into(),
        issued_at: at,
        expires_at: at + 3600,
    }
}

fn rotate(presented: &str, next: &str, at: i64, grace: i64) -> RotateRequest {
    RotateRequest {
        presented_hash: presented.into(),
        next: refresh(next, at),
        grace_secs: grace,
        seen: Seen {
            at,
            ip: "203.0.113.7".into(),
            user_agent: "ua".into(),
        },
        access_exp: at + 300,
    }
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test] async fn $name() { super::$name(super::Backend::Sqlite).await })*
        }
        mod postgres {
            $(#[tokio::test] async fn $name() { super::$name(super::Backend::Postgres).await })*
        }
    };
}

conformance!(
    sessions_round_trip_and_list_newest_first,
    rotation_retires_the_presented_token_and_stores_its_child,
    the_immediate_predecessor_is_forgiven_only_inside_the_grace_window,
    reuse_outside_the_grace_window_revokes_the_session,
    a_token_two_steps_back_is_reuse_even_inside_the_grace_window,
    unknown_and_expired_refresh_tokens_are_rejected_without_alarm,
    reauth_bumps_the_epoch_and_supersedes_old_refresh_tokens,
    revoking_a_session_is_idempotent_and_unknown_sessions_are_none,
    logout_everywhere_bumps_the_generation_and_kills_older_sessions,
    revocation_snapshot_holds_exactly_what_can_still_matter,
    concurrent_presentations_of_one_token_rotate_it_exactly_once,
    last_seen_is_written_behind_and_never_goes_backwards,
    every_revocation_is_numbered_in_the_change_feed,
    events_are_filtered_paged_in_time_order_and_pruned,
    events_of_overlapping_batches_come_back_in_time_order,
    a_first_sighting_creates_the_session_once_whoever_comes_second,
    large_write_behind_and_event_batches_land_whole,
);

/// An audit event as the recorder stores it: its columns and its JSON line agree.
fn stored_event(ts_ms: i64, session_id: &str, subject: &str, decision: &str) -> store::StoredEvent {
    let ts = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ts_ms) * 1_000_000)
        .unwrap()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    store::StoredEvent {
        ts_ms,
        kind: "request".into(),
        session_id: Some(session_id.into()),
        subject: Some(subject.into()),
        decision: Some(decision.to_owned().into()),
        event: serde_json::json!({
            "ts": ts,
            "kind": "request",
            "session_id": session_id,
            "subject": subject,
            "decision": decision,
        })
        .to_string(),
    }
}

/// Every event after `filter.after`, a page of `filter.limit` at a time: their times.
async fn all_pages(store: &SharedStore, mut filter: store::EventFilter) -> Vec<i64> {
    let mut seen = Vec::new();
    let mut positions = Vec::new();
    loop {
        let page = store.events(&filter).await.unwrap();
        assert!(page.len() as i64 <= filter.limit);
        let Some((ts, id, _)) = page.last() else {
            break;
        };
        filter.after = (*ts, *id);
        positions.extend(page.iter().map(|(ts, id, _)| (*ts, *id)));
        seen.extend(page.into_iter().map(|(ts, _, _)| ts));
    }
    let mut sorted = positions.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(positions, sorted, "positions strictly increase: none twice");
    seen
}

async fn events_are_filtered_paged_in_time_order_and_pruned(backend: Backend) {
    let Some((_db, store)) = open_store(backend).await else {
        return;
    };
    let ev = |ts_ms: i64, subject: &str, decision: &str| {
        stored_event(ts_ms, &format!("s-{subject}"), subject, decision)
    };
    // Written out of time order, as batches from several writers can be.
    store
        .insert_events(vec![ev(300, "alice", "allow"), ev(100, "bob", "deny")].into())
        .await
        .unwrap();
    store
        .insert_events(vec![ev(200, "alice", "step_up"), ev(100, "alice", "allow")].into())
        .await
        .unwrap();
    store
        .insert_events(vec![ev(40, "carol", "allow"), ev(60, "carol", "allow")].into())
        .await
        .unwrap();
    let base = store::EventFilter {
        after: (i64::MIN, 0),
        limit: 100,
        ..Default::default()
    };
    for limit in [1, 2, 3, 100] {
        assert_eq!(
            all_pages(
                &store,
                store::EventFilter {
                    limit,
                    ..base.clone()
                }
            )
            .await,
            [40, 60, 100, 100, 200, 300],
            "keyset paging in time order misses nothing (pages of {limit})"
        );
    }
    let page = store.events(&base).await.unwrap();
    assert_eq!(
        page[2].2,
        ev(100, "bob", "deny").event,
        "each line exactly as given"
    );
    assert_eq!(page[3].2, ev(100, "alice", "allow").event);
    let only = |f: store::EventFilter| {
        let store = store.clone();
        async move { store.events(&f).await.unwrap().len() }
    };
    assert_eq!(
        only(store::EventFilter {
            subject: Some("alice".into()),
            ..base.clone()
        })
        .await,
        3
    );
    assert_eq!(
        only(store::EventFilter {
            decision: Some("deny".into()),
            ..base.clone()
        })
        .await,
        1
    );
    assert_eq!(
        only(store::EventFilter {
            session_id: Some("s-bob".into()),
            ..base.clone()
        })
        .await,
        1
    );
    assert_eq!(
        only(store::EventFilter {
            since_ms: Some(150),
            until_ms: Some(300),
            ..base.clone()
        })
        .await,
        1
    );
    assert_eq!(
        only(store::EventFilter {
            since_ms: Some(100),
            subject: Some("alice".into()),
            limit: 2,
            ..base.clone()
        })
        .await,
        2
    );
    // Nothing older than 100 but the third batch, whole.
    assert_eq!(store.prune_events(100).await.unwrap(), 2);
    assert_eq!(only(base.clone()).await, 4);
    // PostgreSQL deletes each event past the cutoff; SQLite keeps a batch to a row and
    // deletes it once all of its events are past it (the first batch holds one at 300).
    let pruned = store.prune_events(250).await.unwrap();
    let left = all_pages(&store, base.clone()).await;
    match backend {
        Backend::Sqlite => {
            assert_eq!(pruned, 2);
            assert_eq!(left, [100, 300]);
        }
        Backend::Postgres => {
            assert_eq!(pruned, 3);
            assert_eq!(left, [300]);
        }
    }
}

/// Batches whose times overlap: a page holds the earliest events of all of them, and
/// a window finds its events in a batch that began before it.
async fn events_of_overlapping_batches_come_back_in_time_order(backend: Backend) {
    let Some((_db, store)) = open_store(backend).await else {
        return;
    };
    let t = T0 * 1000;
    let ev = |ms: i64| stored_event(t + ms, "s", "alice", "allow");
    // One batch a minute long (its first and last event), then a short one inside it.
    store
        .insert_events(vec![ev(0), ev(59_000), ev(60_000)].into())
        .await
        .unwrap();
    store
        .insert_events(vec![ev(30_000), ev(31_000)].into())
        .await
        .unwrap();
    let base = store::EventFilter {
        after: (i64::MIN, 0),
        limit: 2,
        ..Default::default()
    };
    let times = |page: Vec<(i64, i64, String)>| page.iter().map(|e| e.0 - t).collect::<Vec<_>>();
    assert_eq!(times(store.events(&base).await.unwrap()), [0, 30_000]);
    assert_eq!(
        times(
            store
                .events(&store::EventFilter {
                    since_ms: Some(t + 45_000),
                    ..base.clone()
                })
                .await
                .unwrap()
        ),
        [59_000, 60_000]
    );
    assert_eq!(
        all_pages(
            &store,
            store::EventFilter {
                limit: 1,
                ..base.clone()
            }
        )
        .await
        .iter()
        .map(|ms| ms - t)
        .collect::<Vec<_>>(),
        [0, 30_000, 31_000, 59_000, 60_000]
    );
    // A batch that spans more than a minute is still found from any of its events.
    store
        .insert_events(vec![ev(100_000), ev(400_000), ev(100_500)].into())
        .await
        .unwrap();
    assert_eq!(
        times(
            store
                .events(&store::EventFilter {
                    since_ms: Some(t + 300_000),
                    ..base.clone()
                })
                .await
                .unwrap()
        ),
        [400_000]
    );
    assert_eq!(
        times(
            store
                .events(&store::EventFilter {
                    since_ms: Some(t + 100_200),
                    ..base
                })
                .await
                .unwrap()
        ),
        [100_500, 400_000]
    );
}

/// SQLite's audit log, recorded a row per event before it kept a batch to a row, is
/// carried over by the migration: every event, in order, still found by its filters.
#[tokio::test]
async fn sqlite_events_recorded_a_row_each_are_kept_by_the_migration_to_batches() {
    use std::str::FromStr;
    let db = database(Backend::Sqlite).await.expect("a SQLite file");
    let options = sqlx::sqlite::SqliteConnectOptions::from_str(&db.url)
        .unwrap()
        .create_if_missing(true);
    let pool = sqlx::SqlitePool::connect_with(options).await.unwrap();
    let migrations = sqlx::migrate::Migrator::new(std::path::Path::new("migrations/sqlite"))
        .await
        .unwrap();
    migrations.run_to(7, &pool).await.unwrap();
    let old = [
        stored_event(200, "s-a", "alice", "allow"),
        stored_event(100, "s-b", "bob", "deny"),
        stored_event(100, "s-a", "alice", "step_up"),
    ];
    for e in &old {
        sqlx::query("INSERT INTO events (ts_ms, kind, session_id, subject, decision, event) VALUES (?, ?, ?, ?, ?, ?)")
            .bind(e.ts_ms)
            .bind(e.kind.as_ref())
            .bind(e.session_id.as_deref())
            .bind(e.subject.as_deref())
            .bind(e.decision.as_deref())
            .bind(&e.event)
            .execute(&pool)
            .await
            .unwrap();
    }
    pool.close().await;
    let store = store::connect(&db.url).await.unwrap();
    store.migrate().await.unwrap();
    let all = store::EventFilter {
        after: (i64::MIN, 0),
        limit: 10,
        ..Default::default()
    };
    let lines = |page: Vec<(i64, i64, String)>| page.into_iter().map(|e| e.2).collect::<Vec<_>>();
    assert_eq!(
        lines(store.events(&all).await.unwrap()),
        [
            old[1].event.clone(),
            old[2].event.clone(),
            old[0].event.clone()
        ]
    );
    assert_eq!(
        lines(
            store
                .events(&store::EventFilter {
                    subject: Some("alice".into()),
                    ..all.clone()
                })
                .await
                .unwrap()
        ),
        [old[2].event.clone(), old[0].event.clone()]
    );
    // And new batches go on after them.
    store
        .insert_events(vec![stored_event(150, "s-c", "carol", "allow")].into())
        .await
        .unwrap();
    assert_eq!(all_pages(&store, all).await, [100, 100, 150, 200]);
}

async fn last_seen_is_written_behind_and_never_goes_backwards(backend: Backend) {
    let Some((_db, store)) = open_store(backend).await else {
        return;
    };
    store
        .create_session(&session("s", "alice", T0, 0), &refresh("h0", T0))
        .await
        .unwrap();
    let seen = |at: i64, obs: &str| tokenwarden::store::LastSeen {
        session_id: "s".into(),
        at,
        observation: obs.into(),
        risk: 12.5,
        risk_at_ms: at * 1000,
    };
    store
        .save_last_seen(&[seen(T0 + 10, "later")])
        .await
        .unwrap();
    store
        .save_last_seen(&[seen(T0 + 5, "earlier")])
        .await
        .unwrap();
    let s = store.session("s").await.unwrap().unwrap();
    assert_eq!(
        (s.last_seen_info.as_deref(), s.last_seen_at, s.risk),
        (Some("later"), T0 + 10, 12.5)
    );
}

async fn a_first_sighting_creates_the_session_once_whoever_comes_second(backend: Backend) {
    let Some((_db, store)) = open_store(backend).await else {
        return;
    };
    let mut first = session("ext", "carol", T0, 0);
    first.claims = Some(r#"{"iss":"https://idp.example.test"}"#.into());
    let mut second = first.clone();
    second.ip = "198.51.100.9".into();
    second.created_at = T0 + 1;
    let (a, b) = tokio::join!(
        store.create_session_if_absent(&first),
        store.create_session_if_absent(&second)
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a, b, "both see the one stored session");
    assert!(a == first || a == second);
    assert_eq!(
        a.foreign_issuer().as_deref(),
        Some("https://idp.example.test")
    );
    assert_eq!(store.sessions_of("carol").await.unwrap().len(), 1);
    assert_eq!(session("own", "dave", T0, 0).foreign_issuer(), None);
}

async fn large_write_behind_and_event_batches_land_whole(backend: Backend) {
    let Some((_db, store)) = open_store(backend).await else {
        return;
    };
    // More rows than one bulk statement holds (1,000 last sightings per statement).
    let n = 1_100;
    for i in 0..n {
        store
            .create_session(
                &session(&format!("s{i}"), "alice", T0, 0),
                &refresh(&format!("h{i}"), T0),
            )
            .await
            .unwrap();
    }
    let batch: Vec<tokenwarden::store::LastSeen> = (0..n)
        .map(|i| tokenwarden::store::LastSeen {
            session_id: format!("s{i}"),
            at: T0 + 10 + i as i64,
            observation: format!("obs-{i}"),
            risk: i as f64,
            risk_at_ms: (T0 + 10) * 1000,
        })
        .collect();
    store.save_last_seen(&batch).await.unwrap();
    for i in [0, 999, 1_000, 1_099] {
        let s = store.session(&format!("s{i}")).await.unwrap().unwrap();
        assert_eq!(
            (s.last_seen_at, s.last_seen_info.as_deref(), s.risk),
            (
                T0 + 10 + i as i64,
                Some(format!("obs-{i}").as_str()),
                i as f64
            )
        );
    }
    // More events than one of SQLite's audit rows holds (4,096).
    let m = 4_200;
    let events: Vec<store::StoredEvent> = (0..m)
        .map(|i| stored_event(T0 * 1000 + i as i64, &format!("s{i}"), "alice", "allow"))
        .collect();
    store.insert_events(events.clone().into()).await.unwrap();
    let stored = store
        .events(&store::EventFilter {
            after: (i64::MIN, 0),
            limit: 5_000,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(stored.len(), m);
    for (i, (ts, _, line)) in stored.iter().enumerate() {
        assert_eq!(
            (*ts, line.as_str()),
            (T0 * 1000 + i as i64, events[i].event.as_str()),
            "in order, exactly as given"
        );
    }
    // Each event's own session, in the first row and the second.
    for i in [0, 49, 50, 4_095, 4_096, m - 1] {
        let found = store
            .events(&store::EventFilter {
                after: (i64::MIN, 0),
                limit: 10,
                session_id: Some(format!("s{i}")),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(found.len(), 1, "s{i}");
        assert_eq!(found[0].2, events[i].event);
    }
}

async fn every_revocation_is_numbered_in_the_change_feed(backend: Backend) {
    let Some((_db, store)) = open_store(backend).await else {
        return;
    };
    assert_eq!(store.head_change().await.unwrap(), 0);
    store
        .create_session(&session("s1", "alice", T0, 0), &refresh("h1", T0))
        .await
        .unwrap();
    store
        .create_session(&session("s2", "bob", T0, 0), &refresh("h2", T0))
        .await
        .unwrap();
    store.revoke_session("s1", "logout", T0 + 1).await.unwrap();
    store.revoke_session("s1", "logout", T0 + 2).await.unwrap(); // idempotent: no second change
    store.revoke_user("bob", T0 + 3, T0 + 303).await.unwrap();
    store
        .set_step_up("s2", 50.0, (T0 + 4) * 1000, Some("why"))
        .await
        .unwrap(); // revoked: nothing to flag
    let changes = store.changes_since(0, 100).await.unwrap();
    let seqs: Vec<i64> = changes.iter().map(|c| c.0).collect();
    assert_eq!(seqs, [1, 2], "gapless, in commit order");
    assert_eq!(
        changes[0].1,
        Change::SessionRevoked {
            session_id: "s1".into(),
            until: T0 + 300
        }
    );
    assert_eq!(
        changes[1].1,
        Change::UserGeneration {
            subject: "bob".into(),
            generation: 1,
            until: T0 + 303
        }
    );
    assert_eq!(store.changes_since(1, 100).await.unwrap().len(), 1);
    assert_eq!(store.head_change().await.unwrap(), 2);
    // Pruning keeps the newest change, so the head never goes back.
    assert_eq!(store.prune_changes(T0 + 100).await.unwrap(), 1);
    assert_eq!(store.head_change().await.unwrap(), 2);
}

async fn sessions_round_trip_and_list_newest_first(backend: Backend) {
    let Some((_db, store)) = open_store(backend).await else {
        return;
    };
    let a = session("s-a", "alice", T0, 0);
    let b = session("s-b", "alice", T0 + 10, 0);
    store.create_session(&a, &refresh("h-a", T0)).await.unwrap();
    store
        .create_session(&b, &refresh("h-b", T0 + 10))
        .await
        .unwrap();
    store
        .create_session(&session("s-c", "bob", T0, 0), &refresh("h-c", T0))
        .await
        .unwrap();
    assert_eq!(store.session("s-a").await.unwrap(), Some(a));
    assert_eq!(store.session("nope").await.unwrap(), None);
    let listed: Vec<String> = store
        .sessions_of("alice")
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.session_id)
        .collect();
    assert_eq!(listed, ["s-b", "s-a"]);
    let token = store.refresh_token("h-a").await.unwrap().unwrap();
    assert_eq!((token.session_id.as_str(), token.retired_at), ("s-a", None));
    // Refresh token hashes are unique: a second session cannot reuse one.
    assert!(
        store
            .create_session(&session("s-d", "dan", T0, 0), &refresh("h-a", T0))
            .await
            .is_err()
    );
    assert_eq!(
        store.session("s-d").await.unwrap(),
        None,
        "the failed insert left nothing behind"
    );
}

async fn rotation_retires_the_presented_token_and_stores_its_child(backend: Backend) {
    let Some((_db, store)) = open_store(backend).await else {
        return;
    };
    store
        .create_session(&session("s", "alice", T0, 0), &refresh("h0", T0))
        .await
        .unwrap();
    let out = store
        .rotate_refresh(&rotate("h0", "h1", T0 + 60, 10))
        .await
        .unwrap();
    let RotateOutcome::Rotated(s) = out else {
        panic!("{out:?}")
    };
    assert_eq!((s.last_seen_at, s.access_exp_max), (T0 + 60, T0 + 360));
    let old = store.refresh_token("h0").await.unwrap().unwrap();
    assert_eq!(
        (old.retired_at, old.retired_reason.as_deref()),
        (Some(T0 + 60), Some("rotated"))
    );
    let new = store.refresh_token("h1").await.unwrap().unwrap();
    assert_eq!(
        (new.parent_hash.as_deref(), new.retired_at),
        (Some("h0"), None)
    );
}

async fn the_immediate_predecessor_is_forgiven_only_inside_the_grace_window(backend: Backend) {
    let Some((_db, store)) = open_store(backend).await else {
        return;
    };
    store
        .create_session(&session("s", "alice", T0, 0), &refresh("h0", T0))
        .await
        .unwrap();
    store
        .rotate_refresh(&rotate("h0", "h1", T0 + 60, 10))
        .await
        .unwrap();
    // A racing request with the old token 9 s later gets a sibling of h1.
    let out = store
        .rotate_refresh(&rotate("h0", "h1b", T0 + 69, 10))
        .await
        .unwrap();
    assert!(matches!(out, RotateOutcome::Rotated(_)), "{out:?}");
    assert_eq!(
        store.refresh_token("h1").await.unwrap().unwrap().retired_at,
        None
    );
    assert_eq!(
        store
            .refresh_token("h1b")
            .await
            .unwrap()
            .unwrap()
            .retired_at,
        None
    );
    // Using one sibling retires the other.
    store
        .rotate_refresh(&rotate("h1b", "h2", T0 + 80, 10))
        .await
        .unwrap();
    assert!(
        store
            .refresh_token("h1")
            .await
            .unwrap()
            .unwrap()
            .retired_at
            .is_some()
    );
}

async fn reuse_outside_the_grace_window_revokes_the_session(backend: Backend) {
    let Some((_db, store)) = open_store(backend).await else {
        return;
    };
    store
        .create_session(&session("s", "alice", T0, 0), &refresh("h0", T0))
        .await
        .unwrap();
    store
        .rotate_refresh(&rotate("h0", "h1", T0 + 60, 10))
        .await
        .unwrap();
    let out = store
        .rotate_refresh(&rotate("h0", "hx", T0 + 70, 10))
        .await
        .unwrap();
    let RotateOutcome::Reused(s) = out else {
        panic!("{out:?}")
    };
    assert_eq!(
        (s.state.as_str(), s.revoked_reason.as_deref()),
        ("revoked", Some("refresh_reuse"))
    );
    assert_eq!(
        store.refresh_token("hx").await.unwrap(),
        None,
        "no token issued on reuse"
    );
    // The legitimate holder's current token is dead too.
    let out = store
        .rotate_refresh(&rotate("h1", "h2", T0 + 71, 10))
        .await
        .unwrap();
    assert_eq!(
        out,
        RotateOutcome::Rejected(RefreshRejection::SessionRevoked)
    );
}

async fn a_token_two_steps_back_is_reuse_even_inside_the_grace_window(backend: Backend) {
    let Some((_db, store)) = open_store(backend).await else {
        return;
    };
    store
        .create_session(&session("s", "alice", T0, 0), &refresh("h0", T0))
        .await
        .unwrap();
    store
        .rotate_refresh(&rotate("h0", "h1", T0 + 1, 10))
        .await
        .unwrap();
    store
        .rotate_refresh(&rotate("h1", "h2", T0 + 2, 10))
        .await
        .unwrap();
    let out = store
        .rotate_refresh(&rotate("h0", "hx", T0 + 3, 10))
        .await
        .unwrap();
    assert!(matches!(out, RotateOutcome::Reused(_)), "{out:?}");
}

async fn unknown_and_expired_refresh_tokens_are_rejected_without_alarm(backend: Backend) {
    let Some((_db, store)) = open_store(backend).await else {
        return;
    };
    store
        .create_session(&session("s", "alice", T0, 0), &refresh("h0", T0))
        .await
        .unwrap();
    let out = store
        .rotate_refresh(&rotate("nope", "h1", T0 + 1, 10))
        .await
        .unwrap();
    assert_eq!(out, RotateOutcome::Rejected(RefreshRejection::Unknown));
    let out = store
        .rotate_refresh(&rotate("h0", "h1", T0 + 3600, 10))
        .await
        .unwrap();
    assert_eq!(out, RotateOutcome::Rejected(RefreshRejection::Expired));
    assert!(!store.session("s").await.unwrap().unwrap().is_revoked());
    assert_eq!(store.refresh_token("h1").await.unwrap(), None);
}

async fn reauth_bumps_the_epoch_and_supersedes_old_refresh_tokens(backend: Backend) {
    let Some((_db, store)) = open_store(backend).await else {
        return;
    };
    store
        .create_session(&session("s", "alice", T0, 0), &refresh("h0", T0))
        .await
        .unwrap();
    let request = ReauthRequest {
        session_id: "s".into(),
        seen: Seen {
            at: T0 + 100,
            ip: "198.51.100.9".into(),
            user_agent: "new-ua".into(),
        },
        binding: "bnd2".into(),
        binding_info: Some("{\"new\":1}".into()),
        next: refresh("r1", T0 + 100),
        access_exp: T0 + 400,
    };
    let s = store.reauth(&request).await.unwrap().unwrap();
    assert_eq!(
        (s.epoch, s.epoch_until, s.access_exp_max),
        (1, T0 + 300, T0 + 400)
    );
    assert_eq!(
        (s.ip.as_str(), s.binding.as_str(), s.auth_time),
        ("198.51.100.9", "bnd2", T0 + 100)
    );
    let out = store
        .rotate_refresh(&rotate("h0", "hx", T0 + 101, 10))
        .await
        .unwrap();
    assert_eq!(out, RotateOutcome::Rejected(RefreshRejection::Superseded));
    assert!(
        !store.session("s").await.unwrap().unwrap().is_revoked(),
        "superseded is not theft evidence"
    );
    assert!(matches!(
        store
            .rotate_refresh(&rotate("r1", "r2", T0 + 102, 10))
            .await
            .unwrap(),
        RotateOutcome::Rotated(_)
    ));
    let unknown = ReauthRequest {
        session_id: "nope".into(),
        ..request
    };
    assert_eq!(store.reauth(&unknown).await.unwrap(), None);
}

async fn revoking_a_session_is_idempotent_and_unknown_sessions_are_none(backend: Backend) {
    let Some((_db, store)) = open_store(backend).await else {
        return;
    };
    store
        .create_session(&session("s", "alice", T0, 0), &refresh("h0", T0))
        .await
        .unwrap();
    let first = store
        .revoke_session("s", "logout", T0 + 5)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (first.revoked_at, first.revoked_reason.as_deref()),
        (Some(T0 + 5), Some("logout"))
    );
    let second = store
        .revoke_session("s", "other", T0 + 9)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        second.revoked_at,
        Some(T0 + 5),
        "the first revocation stands"
    );
    assert_eq!(
        store.revoke_session("nope", "logout", T0).await.unwrap(),
        None
    );
    let out = store
        .rotate_refresh(&rotate("h0", "h1", T0 + 10, 10))
        .await
        .unwrap();
    assert_eq!(
        out,
        RotateOutcome::Rejected(RefreshRejection::SessionRevoked)
    );
}

async fn logout_everywhere_bumps_the_generation_and_kills_older_sessions(backend: Backend) {
    let Some((_db, store)) = open_store(backend).await else {
        return;
    };
    assert_eq!(store.user_generation("alice").await.unwrap(), 0);
    store
        .create_session(&session("s1", "alice", T0, 0), &refresh("h1", T0))
        .await
        .unwrap();
    store
        .create_session(&session("s2", "alice", T0, 0), &refresh("h2", T0))
        .await
        .unwrap();
    store
        .create_session(&session("s3", "bob", T0, 0), &refresh("h3", T0))
        .await
        .unwrap();
    assert_eq!(
        store.revoke_user("alice", T0 + 1, T0 + 301).await.unwrap(),
        (2, 1, T0 + 301)
    );
    assert_eq!(
        store.revoke_user("alice", T0 + 2, T0 + 302).await.unwrap(),
        (0, 2, T0 + 302)
    );
    // The horizon covers the latest exp issued to the user, even past now + ttl.
    let long = SessionRecord {
        access_exp_max: T0 + 900,
        ..session("s9", "zed", T0, 0)
    };
    store
        .create_session(&long, &refresh("h9", T0))
        .await
        .unwrap();
    assert_eq!(
        store.revoke_user("zed", T0 + 1, T0 + 301).await.unwrap(),
        (1, 1, T0 + 900)
    );
    assert_eq!(store.user_generation("alice").await.unwrap(), 2);
    assert!(store.session("s1").await.unwrap().unwrap().is_revoked());
    assert!(!store.session("s3").await.unwrap().unwrap().is_revoked());
    // A session opened with a generation read before the bump cannot refresh.
    store
        .create_session(&session("s4", "alice", T0, 1), &refresh("h4", T0))
        .await
        .unwrap();
    let out = store
        .rotate_refresh(&rotate("h4", "h5", T0 + 3, 10))
        .await
        .unwrap();
    assert_eq!(
        out,
        RotateOutcome::Rejected(RefreshRejection::SessionRevoked)
    );
}

async fn revocation_snapshot_holds_exactly_what_can_still_matter(backend: Backend) {
    let Some((_db, store)) = open_store(backend).await else {
        return;
    };
    store
        .create_session(&session("s1", "alice", T0, 0), &refresh("h1", T0))
        .await
        .unwrap();
    store
        .create_session(&session("s2", "bob", T0, 0), &refresh("h2", T0))
        .await
        .unwrap();
    store.revoke_session("s1", "logout", T0 + 1).await.unwrap();
    store.revoke_user("carol", T0 + 1, T0 + 301).await.unwrap();
    for (jti, exp) in [("j-live", T0 + 200), ("j-dead", T0 + 50)] {
        let j = RevokedJti {
            jti: jti.into(),
            session_id: "s2".into(),
            subject: "bob".into(),
            exp,
            revoked_at: T0 + 1,
            reason: "rfc7009".into(),
        };
        store.revoke_jti(&j).await.unwrap();
        store.revoke_jti(&j).await.unwrap();
    }
    let mut got = store.revocations(T0 + 100).await.unwrap();
    got.sort_by_key(|c| format!("{c:?}"));
    let mut want = vec![
        Change::JtiRevoked {
            jti: "j-live".into(),
            until: T0 + 200,
        },
        Change::SessionRevoked {
            session_id: "s1".into(),
            until: T0 + 300,
        },
        Change::UserGeneration {
            subject: "carol".into(),
            generation: 1,
            until: T0 + 301,
        },
    ];
    want.sort_by_key(|c| format!("{c:?}"));
    assert_eq!(got, want);
    assert!(store.revocations(T0 + 1000).await.unwrap().is_empty());
}

async fn concurrent_presentations_of_one_token_rotate_it_exactly_once(backend: Backend) {
    let Some((_db, store)) = open_store(backend).await else {
        return;
    };
    store
        .create_session(&session("s", "alice", T0, 0), &refresh("h0", T0))
        .await
        .unwrap();
    let store: Arc<dyn store::Store> = store;
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .rotate_refresh(&rotate("h0", &format!("n{i}"), T0 + 1, 0))
                    .await
            })
        })
        .collect();
    let mut rotated = 0;
    for t in tasks {
        // No "database is locked": every attempt gets an answer.
        match t
            .await
            .unwrap()
            .expect("no database error under contention")
        {
            RotateOutcome::Rotated(_) => rotated += 1,
            RotateOutcome::Reused(_)
            | RotateOutcome::Rejected(RefreshRejection::SessionRevoked) => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(rotated, 1);
    assert!(
        store.session("s").await.unwrap().unwrap().is_revoked(),
        "with no grace, the replays are theft"
    );
}
