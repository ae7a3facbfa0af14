//! The audit log's layout on SQLite: a batch of events to a row, compressed. The
//! writer stores each batch as one row holding its events' JSON lines (NDJSON, in
//! the order they were recorded, as one zstd frame) with the time of its first and
//! last event; a reader takes the rows whose time range meets its window and reads
//! the lines back, filtered and in time order. A row per event cost SQLite a record,
//! a B-tree cell and an index entry per event, and each of its bytes was written
//! twice (to the WAL, then at the checkpoint), on the core that serves requests.
//!
//! An event's position is `(time ms, id)`, its id being its row's id times
//! [`MAX_PER_ROW`] plus its place in the row: what paging resumes after.

use std::borrow::Cow;

use super::{EventFilter, StoreError, StoredEvent};

/// The most events one row holds (the writer's batches hold at most 2,000).
pub(super) const MAX_PER_ROW: usize = 4096;

/// The longest time one row spans, first event to last. A batch whose events lie
/// further apart is split, so that a reader knows how far before its window a row
/// holding one of the window's events can begin.
pub(super) const MAX_SPAN_MS: i64 = 60_000;

/// One row of the audit log.
pub(super) struct Row {
    pub first_ms: i64,
    pub last_ms: i64,
    pub count: i64,
    /// The events' JSON lines, joined by `\n` (a line holds no raw newline).
    pub lines: String,
}

/// A batch of events as rows, in order: one row unless it holds more than
/// [`MAX_PER_ROW`] events or spans more than [`MAX_SPAN_MS`].
pub(super) fn rows(events: &[StoredEvent]) -> Vec<Row> {
    let mut rows = Vec::with_capacity(1);
    let mut start = 0;
    while start < events.len() {
        let (mut lo, mut hi) = (events[start].ts_ms, events[start].ts_ms);
        let mut end = start + 1;
        while end < events.len() && end - start < MAX_PER_ROW {
            let ts = events[end].ts_ms;
            let (l, h) = (lo.min(ts), hi.max(ts));
            if h.saturating_sub(l) > MAX_SPAN_MS {
                break;
            }
            (lo, hi) = (l, h);
            end += 1;
        }
        let part = &events[start..end];
        let mut lines = String::with_capacity(part.iter().map(|e| e.event.len() + 1).sum());
        for (i, e) in part.iter().enumerate() {
            if i > 0 {
                lines.push('\n');
            }
            lines.push_str(&e.event);
        }
        rows.push(Row {
            first_ms: lo,
            last_ms: hi,
            count: part.len() as i64,
            lines,
        });
        start = end;
    }
    rows
}

/// How the writer stores a row's lines: a zstd frame of the NDJSON text.
pub(super) const ENCODING_ZSTD: &str = "ndjson.zst";
/// Plain NDJSON text: events carried over from the row-per-event layout.
const ENCODING_PLAIN: &str = "ndjson";
/// zstd's fastest standard level: audit lines shrink about tenfold at it, and the
/// writer shares a core with request handling.
pub(super) const ZSTD_LEVEL: i32 = 1;

/// A row's lines as stored.
pub(super) fn encode(
    zstd: &mut zstd::bulk::Compressor<'_>,
    lines: &str,
) -> std::io::Result<Vec<u8>> {
    zstd.compress(lines.as_bytes())
}

/// A row's lines as text.
pub(super) fn decode(id: i64, encoding: &str, stored: Vec<u8>) -> Result<String, StoreError> {
    let bad = |why: String| StoreError::AuditRow { id, why };
    let text = match encoding {
        ENCODING_ZSTD => zstd::stream::decode_all(stored.as_slice())
            .map_err(|e| bad(format!("cannot decompress: {e}")))?,
        ENCODING_PLAIN => stored,
        other => return Err(bad(format!("unknown encoding {other:?}"))),
    };
    String::from_utf8(text).map_err(|e| bad(e.to_string()))
}

/// What a filter reads of each line.
#[derive(serde::Deserialize, Default)]
struct Keys<'a> {
    #[serde(borrow)]
    ts: Cow<'a, str>,
    #[serde(borrow, default)]
    session_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    subject: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    decision: Option<Cow<'a, str>>,
}

/// Gathers the events a filter asks for from rows read in `(first_ms, id)` order.
pub(super) struct Collector {
    filter: EventFilter,
    limit: usize,
    /// The earliest time an event may have: the window's start or the paging position's.
    lo: i64,
    found: Vec<(i64, i64, String)>,
    sorted: bool,
    /// The filters' fields as the recorder writes them (`"subject":"alice"`): a row
    /// or a line without each of them cannot match and is not parsed.
    needles: Vec<String>,
    unreadable: u64,
}

/// A filter's field as serde_json writes it in a line, when that is certain: a value
/// holding U+FFFD may have been written as `\ufffd` (in place of a NUL) and is left
/// to the parsed comparison.
fn needle(key: &str, value: Option<&str>) -> Option<String> {
    let value = value.filter(|v| !v.contains('\u{fffd}'))?;
    let encoded = serde_json::to_string(value).ok()?;
    Some(format!("\"{key}\":{encoded}"))
}

impl Collector {
    pub fn new(filter: &EventFilter) -> Self {
        Self {
            filter: filter.clone(),
            limit: usize::try_from(filter.limit).unwrap_or(0),
            lo: filter.since_ms.unwrap_or(i64::MIN).max(filter.after.0),
            found: Vec::new(),
            sorted: true,
            needles: [
                needle("subject", filter.subject.as_deref()),
                needle("session_id", filter.session_id.as_deref()),
                needle("decision", filter.decision.as_deref()),
            ]
            .into_iter()
            .flatten()
            .collect(),
            unreadable: 0,
        }
    }

    /// Where the rows to read start, as `(first_ms, id)` to read after; the earliest
    /// time of an event; the end of the window.
    pub fn bounds(&self) -> ((i64, i64), i64, i64) {
        (
            (self.lo.saturating_sub(MAX_SPAN_MS), i64::MIN),
            self.lo,
            self.filter.until_ms.unwrap_or(i64::MAX),
        )
    }

    fn settle(&mut self) {
        if !self.sorted {
            self.found.sort_unstable_by_key(|e| (e.0, e.1));
            self.sorted = true;
        }
        self.found.truncate(self.limit);
    }

    /// Whether a row starting at `first_ms` (or any row after it) can still hold one
    /// of the events asked for.
    pub fn wants(&mut self, first_ms: i64) -> bool {
        if self.limit == 0 {
            return false;
        }
        if self.found.len() < self.limit {
            return true;
        }
        self.settle();
        // Every event of the row is at `first_ms` or later; one at the same time as
        // the last kept could still come before it by id.
        self.found
            .last()
            .is_none_or(|(last_ts, _, _)| first_ms <= *last_ts)
    }

    /// Reads one row's lines. A line that is not an event's JSON (none the recorder
    /// writes) is still returned, placed at the row's first time, and counted in
    /// [`Collector::unreadable`]; it matches no subject, session or decision filter.
    pub fn add(&mut self, id: i64, first_ms: i64, lines: &str) {
        let f = &self.filter;
        let until = f.until_ms.unwrap_or(i64::MAX);
        let matches = |want: &Option<String>, got: &Option<Cow<'_, str>>| {
            want.as_deref().is_none_or(|w| got.as_deref() == Some(w))
        };
        let holds = |text: &str| self.needles.iter().all(|n| text.contains(n.as_str()));
        if !holds(lines) {
            return;
        }
        for (n, line) in lines.split('\n').enumerate() {
            if !holds(line) {
                continue;
            }
            let read = serde_json::from_str::<Keys<'_>>(line)
                .ok()
                .and_then(|keys| Some((crate::clock::parse_rfc3339_ms(&keys.ts).ok()?, keys)));
            let (ts, keys) = match read {
                Some(read) => read,
                None => {
                    self.unreadable += 1;
                    (first_ms, Keys::default())
                }
            };
            let position = (
                ts,
                id.saturating_mul(MAX_PER_ROW as i64)
                    .saturating_add(n as i64),
            );
            if position <= f.after
                || ts < self.lo
                || ts >= until
                || !matches(&f.subject, &keys.subject)
                || !matches(&f.session_id, &keys.session_id)
                || !matches(&f.decision, &keys.decision)
            {
                continue;
            }
            self.found.push((position.0, position.1, line.to_owned()));
            self.sorted = false;
        }
        // Kept to twice the limit between sorts, however many rows are read.
        if self.found.len() >= self.limit.saturating_mul(2).max(64) {
            self.settle();
        }
    }

    /// Lines read so far that were not an event's JSON.
    pub fn unreadable(&self) -> u64 {
        self.unreadable
    }

    pub fn finish(mut self) -> Vec<(i64, i64, String)> {
        self.settle();
        self.found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(ts_ms: i64, n: usize) -> StoredEvent {
        StoredEvent {
            ts_ms,
            kind: "request".into(),
            session_id: None,
            subject: None,
            decision: None,
            event: format!("{{\"n\":{n}}}"),
        }
    }

    #[test]
    fn a_batch_is_one_row_unless_it_is_too_large_or_spans_too_long() {
        let one = rows(&[event(5, 0), event(3, 1), event(9, 2)]);
        assert_eq!(one.len(), 1);
        assert_eq!((one[0].first_ms, one[0].last_ms, one[0].count), (3, 9, 3));
        assert_eq!(one[0].lines, "{\"n\":0}\n{\"n\":1}\n{\"n\":2}");

        let late = MAX_SPAN_MS + 1;
        let split = rows(&[
            event(0, 0),
            event(MAX_SPAN_MS, 1),
            event(late, 2),
            event(1, 3),
        ]);
        let ranges: Vec<_> = split
            .iter()
            .map(|r| (r.first_ms, r.last_ms, r.count))
            .collect();
        assert_eq!(ranges, [(0, MAX_SPAN_MS, 2), (1, late, 2)]);

        let many: Vec<_> = (0..MAX_PER_ROW + 1).map(|n| event(0, n)).collect();
        let counts: Vec<_> = rows(&many).iter().map(|r| r.count).collect();
        assert_eq!(counts, [MAX_PER_ROW as i64, 1]);
        assert!(rows(&[]).is_empty());
    }

    #[test]
    fn filters_find_their_lines_whatever_the_value_holds() {
        let line = |subject: &str| {
            serde_json::json!({"ts": "2026-01-01T00:00:00.000Z", "subject": subject}).to_string()
        };
        for subject in [
            "alice",
            "a \"quoted\" \\ name",
            "tab\there",
            "Ærøskøbing ☃",
            "\u{fffd}",
        ] {
            let filter = EventFilter {
                subject: Some(subject.into()),
                after: (i64::MIN, 0),
                limit: 10,
                ..Default::default()
            };
            let mut c = Collector::new(&filter);
            c.add(
                1,
                0,
                &[line("bob"), line(subject), line("carol")].join("\n"),
            );
            c.add(2, 0, &line("dave"));
            let found = c.finish();
            assert_eq!(found.len(), 1, "{subject:?}");
            assert_eq!(
                (found[0].1, &found[0].2),
                (MAX_PER_ROW as i64 + 1, &line(subject))
            );
        }
        // As the recorder writes a NUL: the escape `\ufffd`, not the character.
        let filter = EventFilter {
            subject: Some("al\u{fffd}ice".into()),
            after: (i64::MIN, 0),
            limit: 10,
            ..Default::default()
        };
        let mut c = Collector::new(&filter);
        let escaped = r#"{"ts":"2026-01-01T00:00:00.000Z","subject":"al\ufffdice"}"#;
        c.add(1, 0, &[line("alice"), escaped.to_owned()].join("\n"));
        assert_eq!(c.finish().len(), 1);
    }

    #[test]
    fn a_row_reads_back_as_it_was_written_and_much_smaller() {
        let batch: Vec<_> = (0..2_000)
            .map(|n| StoredEvent {
                event: format!(
                    r#"{{"ts":"2026-01-01T00:00:00.000Z","kind":"request","session_id":"ses_{n:022}","ip":"10.0.{}.{}","decision":"allow"}}"#,
                    n / 250,
                    n % 250
                ),
                ..event(0, n)
            })
            .collect();
        let row = rows(&batch).pop().unwrap();
        let mut zstd = zstd::bulk::Compressor::new(ZSTD_LEVEL).unwrap();
        let stored = encode(&mut zstd, &row.lines).unwrap();
        assert!(
            stored.len() * 5 < row.lines.len(),
            "{} of {}",
            stored.len(),
            row.lines.len()
        );
        assert_eq!(decode(1, ENCODING_ZSTD, stored).unwrap(), row.lines);
        assert_eq!(decode(2, ENCODING_PLAIN, b"{}".to_vec()).unwrap(), "{}");
        for (encoding, stored) in [
            (ENCODING_ZSTD, b"{}".to_vec()),
            ("gzip", vec![]),
            (ENCODING_PLAIN, vec![0xff]),
        ] {
            let e = decode(3, encoding, stored).unwrap_err();
            assert!(e.to_string().contains("row 3"), "{e}");
        }
    }

    #[test]
    fn an_unreadable_line_is_still_returned_at_its_rows_time_and_counted() {
        let all = EventFilter {
            after: (i64::MIN, 0),
            limit: 10,
            ..Default::default()
        };
        let line = r#"{"ts":"2026-01-01T00:00:00.000Z","subject":"alice"}"#;
        let lines = [line, r#"{"ts":12,"subject":"alice"}"#, "not json"].join("\n");
        let mut c = Collector::new(&all);
        c.add(7, 5, &lines);
        c.add(8, 6, r#"{"ts":"yesterday"}"#);
        assert_eq!(c.unreadable(), 3);
        let found: Vec<_> = c.finish().into_iter().map(|e| (e.0, e.1, e.2)).collect();
        let id = |row: i64, n: i64| row * MAX_PER_ROW as i64 + n;
        assert_eq!(
            found,
            [
                (5, id(7, 1), r#"{"ts":12,"subject":"alice"}"#.to_owned()),
                (5, id(7, 2), "not json".to_owned()),
                (6, id(8, 0), r#"{"ts":"yesterday"}"#.to_owned()),
                (1_767_225_600_000, id(7, 0), line.to_owned()),
            ]
        );
        // It matches no filter on a field it may not hold.
        let mut c = Collector::new(&EventFilter {
            subject: Some("alice".into()),
            ..all
        });
        c.add(7, 5, &lines);
        assert_eq!(c.finish().len(), 1);
    }
}
