use std::path::Path;
use std::sync::Arc;

use proptest::prelude::*;
use quiver_core::record::Record;
use quiver_core::schema::FeatureIdx;
use quiver_core::value::Value;
use quiver_core::{Config, Schema};
use quiver_fsutil::seal::KeyRing;

use super::*;
use crate::{LateCounts, Store};

const P: u32 = 2;

const CONFIG: &str = r#"
[[entity]]
name = "user"
key = "user_id"
[[view]]
name = "profile"
entity = "user"
features = [
  { name = "score", type = "f64" }, { name = "visits", type = "i64" }, { name = "vip", type = "bool" },
  { name = "city", type = "string" }, { name = "emb", type = "f32[2]" }, { name = "gone", type = "f64" },
]
[[view]]
name = "txn"
entity = "user"
allowed_lateness = "1h"
features = [{ name = "amount", type = "f64" }]
aggregations = [{ name = "amount_sum_1h", of = "amount", fn = "sum", window = "1h" }]
"#;

fn store_of(config: &str) -> Store {
    let config = Config::from_toml_with_env(config, Vec::new()).unwrap();
    Store::new(Arc::new(Schema::compile(&config).unwrap()), P)
}

fn put(s: &Store, view: &str, key: &str, ts: i64, offset: u64, values: Vec<(&str, Value)>) {
    let rec = Record {
        ts_ms: ts,
        view,
        key,
        event_id: None,
        dedup: None,
        values,
    };
    let mut dedup = DedupWindow::new(0);
    s.apply(
        s.partition_of(key),
        offset,
        &rec,
        &mut dedup,
        &mut LateCounts::default(),
    );
}

/// Rows of every shape: dense, several event times, explicit nulls, never-set features,
/// heap values, aggregation rings.
fn filled(rows: usize) -> Store {
    let s = store_of(CONFIG);
    for i in 0..rows {
        let key = format!("u{i}");
        let t = 1_700_000_000_000 + i as i64;
        let all = vec![
            ("score", Value::F64(i as f64 * 0.5)),
            ("visits", Value::I64(i as i64)),
            ("vip", Value::Bool(i % 2 == 0)),
            ("city", Value::Str(format!("c{i}").into())),
            ("emb", Value::F32s(vec![i as f32, 1.5].into())),
            ("gone", Value::F64(-1.0)),
        ];
        let values = match i % 4 {
            0 => all,
            1 => all.into_iter().take(2).collect(),
            2 => vec![("score", Value::Null), ("city", Value::Str("x".into()))],
            _ => vec![("emb", Value::Null)],
        };
        put(&s, "profile", &key, t, 2 * i as u64, values);
        if i % 3 == 0 {
            put(
                &s,
                "profile",
                &key,
                t + 7,
                2 * i as u64 + 1,
                vec![("vip", Value::Null)],
            );
        }
        put(
            &s,
            "txn",
            &key,
            t,
            2 * i as u64,
            vec![("amount", Value::F64(i as f64))],
        );
    }
    s
}

/// Every row of `s` as (view, key, version, cells, rings), sorted.
type Dump = Vec<(String, String, u64, Vec<Cell>, Vec<Vec<u64>>)>;

fn dump(s: &Store) -> Dump {
    let mut out = Vec::new();
    for view in &s.schema().views {
        for p in 0..s.partitions() {
            s.for_each_row(p, view.id, |key, row| {
                let layout = s.layout(view.id);
                let cells = (0..view.features.len())
                    .map(|f| row.get(layout, f as FeatureIdx))
                    .collect();
                let rings = match (row.aggs(), s.agg_layout(view.id)) {
                    (Some(cell), Some(al)) => (0..view.aggregations.len())
                        .map(|a| {
                            let values = cell.ring_values(view, al, a);
                            values.iter().map(|x| x.to_bits()).collect()
                        })
                        .collect(),
                    _ => Vec::new(),
                };
                out.push((
                    view.name.clone(),
                    key.to_string(),
                    row.version(),
                    cells,
                    rings,
                ));
            });
        }
    }
    out.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
    out
}

fn offsets(p: u32) -> Vec<(String, u64)> {
    vec![("log-a".into(), 1000 + u64::from(p)), ("log-b".into(), 7)]
}

fn dedup() -> DedupWindow {
    let mut d = DedupWindow::new(100);
    for id in [3u128, 1 << 100, 42] {
        d.insert(id);
    }
    d
}

fn write_all(dir: &Path, s: &Store, ring: Option<&Arc<KeyRing>>) {
    for p in 0..P {
        write(dir, s, p, &offsets(p), &dedup(), ring).unwrap();
    }
}

fn load_all(dir: &Path, s: &Store, ring: Option<&Arc<KeyRing>>) -> Result<Vec<Loaded>> {
    (0..P)
        .map(|p| load(dir, s, p, 100, ring.map(|r| &**r)).map(|l| l.expect("a snapshot")))
        .collect()
}

fn key_ring(dir: &Path) -> Arc<KeyRing> {
    let path = dir.join("keys");
    quiver_fsutil::seal::add_key(&path).unwrap();
    Arc::new(KeyRing::load(&path).unwrap())
}

#[test]
fn a_snapshot_loads_back_every_row_offset_and_dedup_id() {
    let dir = tempfile::tempdir().unwrap();
    // Enough rows for several frames per partition.
    let s = filled(6000);
    write_all(dir.path(), &s, None);
    let back = store_of(CONFIG);
    let loaded = load_all(dir.path(), &back, None).unwrap();
    assert_eq!(dump(&back), dump(&s));
    assert_eq!(back.rows(), s.rows());
    for (p, l) in loaded.iter().enumerate() {
        assert_eq!(l.offset_of("log-a"), Some(1000 + p as u64));
        assert_eq!(l.offset_of("log-b"), Some(7));
        assert_eq!(l.offset_of("log-c"), None);
        // Written standing still: it ends where it starts.
        assert_eq!(l.covered_below("log-a"), 1000 + p as u64);
        assert_eq!(l.covered_below("log-c"), 0);
        assert_eq!(
            l.dedup.iter().collect::<Vec<_>>(),
            dedup().iter().collect::<Vec<_>>()
        );
    }
    assert!(load(dir.path(), &back, P + 5, 100, None).unwrap().is_none());
}

#[test]
fn a_dedup_window_larger_than_any_frame_of_rows_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let s = filled(10);
    // 5M ids: an 80 MB end frame.
    let mut big = DedupWindow::new(5_000_000);
    for id in 0..5_000_000u128 {
        big.insert(id << 64 | id);
    }
    write(dir.path(), &s, 0, &offsets(0), &big, None).unwrap();
    let back = load(dir.path(), &store_of(CONFIG), 0, 5_000_000, None)
        .unwrap()
        .unwrap();
    assert_eq!(back.dedup.len(), 5_000_000);
    assert!(back.dedup.iter().eq(big.iter()));
}

#[test]
fn a_snapshot_is_about_the_size_of_the_rows_it_holds() {
    let dir = tempfile::tempdir().unwrap();
    let features: Vec<String> = (0..32)
        .map(|f| format!("{{ name = \"f{f}\", type = \"f64\" }}"))
        .collect();
    let config = format!(
        "[[entity]]\nname = \"u\"\nkey = \"id\"\n[[view]]\nname = \"v\"\nentity = \"u\"\nfeatures = [{}]\n",
        features.join(", ")
    );
    let s = store_of(&config);
    let names: Vec<String> = (0..32).map(|f| format!("f{f}")).collect();
    for i in 0..4000u64 {
        let values = names
            .iter()
            .map(|n| (n.as_str(), Value::F64(i as f64)))
            .collect();
        put(&s, "v", &format!("user-{i:08}"), 1, i, values);
    }
    let bytes: u64 = (0..P)
        .map(|p| write(dir.path(), &s, p, &offsets(p), &dedup(), None).unwrap())
        .sum();
    // Raw: 32 × 8 bytes and a 13-byte key per entity.
    let raw = 4000 * (32 * 8 + 13);
    let ratio = bytes as f64 / raw as f64;
    assert!(ratio < 1.08, "{bytes} bytes for {raw} raw: {ratio:.3}×");
    let on_disk: u64 = (0..P)
        .map(|p| {
            std::fs::metadata(snapshot_path(dir.path(), p))
                .unwrap()
                .len()
        })
        .sum();
    assert_eq!(on_disk, bytes, "write reports the bytes it wrote");
}

#[test]
fn a_sealed_snapshot_needs_its_key_and_keeps_its_frames_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let ring = key_ring(dir.path());
    let s = filled(3000);
    write_all(dir.path(), &s, Some(&ring));
    let plain_text = std::fs::read(snapshot_path(dir.path(), 0)).unwrap();
    assert!(
        !plain_text
            .windows(5)
            .any(|w| w == b"c2998" || w == b"c2999"),
        "no value in the clear"
    );
    let back = store_of(CONFIG);
    load_all(dir.path(), &back, Some(&ring)).unwrap();
    assert_eq!(dump(&back), dump(&s));

    let err = load(dir.path(), &store_of(CONFIG), 0, 100, None).unwrap_err();
    assert!(err.to_string().contains("encryption_key_file"), "{err}");
    // Partition 1's file under partition 0's name: its frames are bound to partition 1.
    std::fs::copy(snapshot_path(dir.path(), 1), snapshot_path(dir.path(), 0)).unwrap();
    let err = load(dir.path(), &store_of(CONFIG), 0, 100, Some(&ring)).unwrap_err();
    assert!(err.to_string().contains("does not open"), "{err}");
}

/// (start, end) of each frame's body in a plain snapshot file.
fn frames_of(bytes: &[u8]) -> Vec<(usize, usize)> {
    let mut at = MAGIC.len();
    let mut out = Vec::new();
    while at < bytes.len() {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        out.push((at + 8, at + 8 + len));
        at += 8 + len;
    }
    out
}

fn fix_crc(bytes: &mut [u8], (start, end): (usize, usize)) {
    let crc = crc32c::crc32c(&bytes[start..end]);
    bytes[start - 4..start].copy_from_slice(&crc.to_le_bytes());
}

#[test]
fn a_damaged_truncated_or_shortened_snapshot_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let s = filled(6000);
    write_all(dir.path(), &s, None);
    let path = snapshot_path(dir.path(), 0);
    let good = std::fs::read(&path).unwrap();
    let frames = frames_of(&good);
    assert!(frames.len() >= 4, "head, several rows frames, end");
    let refused = |bytes: &[u8], what: &str| {
        std::fs::write(&path, bytes).unwrap();
        let err = load(dir.path(), &store_of(CONFIG), 0, 100, None).unwrap_err();
        assert!(
            matches!(err, StoreError::CorruptSnapshot { .. }),
            "{what}: {err}"
        );
        err.to_string()
    };
    let mut flipped = good.clone();
    flipped[frames[1].0 + 100] ^= 1;
    assert!(refused(&flipped, "a flipped bit").contains("checksum"));
    assert!(refused(&good[..good.len() - 3], "a torn end").contains("are left"));
    let end = frames.last().unwrap();
    refused(&good[..end.0 - 8], "no end frame");
    // A whole rows frame cut out: every frame left is intact, the end's counts are not.
    let (start, stop) = frames[2];
    let mut shortened = good[..start - 8].to_vec();
    shortened.extend_from_slice(&good[stop..]);
    assert!(refused(&shortened, "a frame removed").contains("the end counts"));
    // Partition 1's plain snapshot under partition 0's name.
    let other = std::fs::read(snapshot_path(dir.path(), 1)).unwrap();
    assert!(refused(&other, "another partition's").contains("a snapshot of partition 1"));
    let mut extra = good.clone();
    extra.extend_from_slice(&good[frames[1].0 - 8..frames[1].1]);
    assert!(refused(&extra, "a frame after the end").contains("after the end"));
    // A row that does not fit its layout, behind a valid checksum.
    let mut bad_row = good.clone();
    let (start, _) = frames[1];
    let first_row = start + 1 + 4 + 4;
    let key_len = u16::from_le_bytes(bad_row[first_row..first_row + 2].try_into().unwrap());
    let header_at = first_row + 2 + usize::from(key_len) + 2;
    bad_row[header_at + 7] = 100; // claims 100 event times, holds one
    fix_crc(&mut bad_row, frames[1]);
    assert!(refused(&bad_row, "a header of another row").contains("does not fit"));
}

#[test]
fn a_snapshot_of_another_config_loads_what_still_fits() {
    let dir = tempfile::tempdir().unwrap();
    let s = filled(500);
    write_all(dir.path(), &s, None);
    // `gone` dropped, `visits` retyped, `vip` moved to the front, `new` added; the
    // aggregation's tiling changed; `txn` keeps its rows.
    let changed = CONFIG
        .replace(
            "{ name = \"score\", type = \"f64\" }, { name = \"visits\", type = \"i64\" }, { name = \"vip\", type = \"bool\" },",
            "{ name = \"vip\", type = \"bool\" }, { name = \"score\", type = \"f64\" }, { name = \"visits\", type = \"f64\" }, { name = \"new\", type = \"i64\" },",
        )
        .replace(", { name = \"gone\", type = \"f64\" }", "")
        .replace("window = \"1h\" }", "window = \"1h\", tile = \"5m\" }");
    assert_ne!(changed, CONFIG);
    let back = store_of(&changed);
    load_all(dir.path(), &back, None).unwrap();
    let (old, new) = (dump(&s), dump(&back));
    assert_eq!(old.len(), new.len());
    for (o, n) in old.iter().zip(&new) {
        assert_eq!((&o.0, &o.1, o.2), (&n.0, &n.1, n.2));
        if o.0 == "profile" {
            // New order: vip, score, visits (f64 now), new, city, emb.
            assert_eq!(n.3[0], o.3[2], "vip");
            assert_eq!(n.3[1], o.3[0], "score");
            assert_eq!(n.3[2], Cell::Absent, "retyped: left out");
            assert_eq!(n.3[3], Cell::Absent, "added");
            assert_eq!(n.3[4..], o.3[3..5], "city, emb");
        } else {
            assert_eq!(n.3, o.3);
            let view = back.schema().view_by_name("txn").unwrap();
            let al = back.agg_layout(view.id).unwrap();
            let empty: Vec<u64> = crate::AggCell::new(view, al)
                .ring_values(view, al, 0)
                .iter()
                .map(|x| x.to_bits())
                .collect();
            assert_eq!(n.4, vec![empty], "another tiling starts empty");
        }
    }
}

#[test]
fn snapshots_of_the_previous_format_still_load() {
    let dir = tempfile::tempdir().unwrap();
    let ring = key_ring(dir.path());
    let s = filled(800);
    for sealer in [None, Some(&ring)] {
        for p in 0..P {
            legacy::write_v3(
                dir.path(),
                &s,
                p,
                &offsets(p),
                &dedup(),
                sealer.map(|r| &**r),
            )
            .unwrap();
        }
        let back = store_of(CONFIG);
        let loaded = load_all(dir.path(), &back, Some(&ring)).unwrap();
        assert_eq!(dump(&back), dump(&s));
        assert_eq!(loaded[1].offset_of("log-a"), Some(1001));
    }
    // QVSNAP04, taken offline: no end positions (nothing below S is replayed: none covered).
    for sealer in [None, Some(&ring)] {
        for p in 0..P {
            let o = offsets(p);
            let mut snap = Snapshot::begin_as(MAGIC_V4, dir.path(), &s, p, &o, sealer.cloned());
            snap.as_mut().unwrap().capture(&s, || {}).unwrap();
            let ends: Vec<u64> = o.iter().map(|(_, o)| *o).collect();
            snap.unwrap()
                .finish(&ends, dedup().iter())
                .unwrap()
                .commit()
                .unwrap();
        }
        let back = store_of(CONFIG);
        let loaded = load_all(dir.path(), &back, Some(&ring)).unwrap();
        assert_eq!(dump(&back), dump(&s));
        assert_eq!(loaded[1].offset_of("log-a"), Some(1001));
        assert_eq!(loaded[1].covered_below("log-a"), 0);
        assert_eq!(
            loaded[1].dedup.iter().collect::<Vec<_>>(),
            dedup().iter().collect::<Vec<_>>()
        );
    }
    // A plain old snapshot under another partition's name is refused too.
    legacy::write_v3(dir.path(), &s, 1, &offsets(1), &dedup(), None).unwrap();
    std::fs::copy(snapshot_path(dir.path(), 1), snapshot_path(dir.path(), 0)).unwrap();
    let err = load(dir.path(), &store_of(CONFIG), 0, 100, None).unwrap_err();
    assert!(
        err.to_string().contains("a snapshot of partition 1"),
        "{err}"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    /// Whatever a frame holds behind a valid checksum, loading returns or refuses, and what
    /// it loaded reads back without a panic.
    #[test]
    fn no_frame_content_makes_a_load_panic(frame in 0usize..4, at in any::<prop::sample::Index>(), byte in any::<u8>(), cut in any::<bool>()) {
        let dir = tempfile::tempdir().unwrap();
        let s = filled(40);
        write(dir.path(), &s, 0, &offsets(0), &dedup(), None).unwrap();
        let path = snapshot_path(dir.path(), 0);
        let mut bytes = std::fs::read(&path).unwrap();
        let frames = frames_of(&bytes);
        let (start, end) = frames[frame % frames.len()];
        let i = start + at.index(end - start);
        bytes[i] = byte;
        if cut {
            // Shorten the frame at `i`, its length word and checksum kept consistent.
            let mut shorter = bytes[..i].to_vec();
            shorter.extend_from_slice(&bytes[end..]);
            let len = (i - start) as u32;
            shorter[start - 8..start - 4].copy_from_slice(&len.to_le_bytes());
            bytes = shorter;
            fix_crc(&mut bytes, (start, i));
        } else {
            fix_crc(&mut bytes, (start, end));
        }
        std::fs::write(&path, &bytes).unwrap();
        let back = store_of(CONFIG);
        let _ = load(dir.path(), &back, 0, 100, None);
        for view in &back.schema().views {
            back.for_each_row(0, view.id, |_, row| {
                let layout = back.layout(view.id);
                for f in 0..view.features.len() {
                    let _ = row.get(layout, f as FeatureIdx);
                }
            });
        }
    }
}

/// Views whose rows change in every way a record can change them: a dense numeric row
/// overwritten in place, a row with a string replaced whole, aggregation rings folded in
/// place (with late values refused by LWW and by the lateness rule).
const ONLINE: &str = r#"
[[entity]]
name = "user"
key = "user_id"
[[view]]
name = "dense"
entity = "user"
features = [{ name = "a", type = "f64" }, { name = "b", type = "i64" }]
[[view]]
name = "profile"
entity = "user"
features = [{ name = "score", type = "f64" }, { name = "city", type = "string" }]
[[view]]
name = "txn"
entity = "user"
allowed_lateness = "2m"
features = [{ name = "amount", type = "f64" }]
aggregations = [{ name = "amount_sum_1h", of = "amount", fn = "sum", window = "1h" }]
"#;

/// One generated event: (key, view — 0 dense, 1 profile, 2 txn, 3 half of dense —, minutes
/// from a base time, value, dedup: 0 none, 1 a new id, 2 an earlier event's id).
type Event = (u8, u8, i8, i16, u8);

fn online_records(events: &[Event]) -> Vec<OnlineRecord> {
    online_records_keys(events, 12)
}

type OnlineRecord = (
    String,
    &'static str,
    i64,
    Vec<(&'static str, Value)>,
    Option<u128>,
);

/// [`online_records`] over `keys` keys.
fn online_records_keys(events: &[Event], keys: usize) -> Vec<OnlineRecord> {
    let mut ids: Vec<u128> = Vec::new();
    events
        .iter()
        .enumerate()
        .map(|(i, &(key, view, minutes, v, dedup))| {
            let (view, values) = match view % 4 {
                0 => (
                    "dense",
                    vec![
                        ("a", Value::F64(f64::from(v))),
                        ("b", Value::I64(i64::from(v))),
                    ],
                ),
                1 => (
                    "profile",
                    vec![
                        ("score", Value::F64(f64::from(v))),
                        ("city", Value::Str(format!("c{v}").into())),
                    ],
                ),
                2 => ("txn", vec![("amount", Value::F64(f64::from(v)))]),
                // Half a row: it leaves the row map's slot for its side map (rowmap.rs).
                _ => ("dense", vec![("a", Value::F64(f64::from(v)))]),
            };
            let id = match (dedup % 3, ids.len()) {
                (0, _) => None,
                (2, n) if n > 0 => Some(ids[usize::from(key) % n]),
                _ => Some(i as u128 + 1),
            };
            ids.extend(id);
            let ts = 1_700_000_000_000 + i64::from(minutes) * 60_000;
            (
                format!("u{}", usize::from(key) % keys),
                view,
                ts,
                values,
                id,
            )
        })
        .collect()
}

/// Applies record `i` of `recs` to partition 0 of `s` (offset = index).
fn apply_at(
    s: &Store,
    recs: &[OnlineRecord],
    i: usize,
    dedup: &mut DedupWindow,
    covered_below: u64,
) {
    let (key, view, ts, values, id) = &recs[i];
    let rec = Record {
        ts_ms: *ts,
        view,
        key,
        event_id: None,
        dedup: *id,
        values: values.clone(),
    };
    s.apply_from(
        0,
        i as u64,
        &rec,
        dedup,
        &mut LateCounts::default(),
        covered_below,
    );
}

fn online_store() -> Store {
    let config = Config::from_toml_with_env(ONLINE, Vec::new()).unwrap();
    Store::new(Arc::new(Schema::compile(&config).unwrap()), 1)
}

/// The window of the dedup tests: small, so that ids leave it during a run.
const WINDOW: usize = 8;

/// A store's rows and dedup window, to compare.
type State = (Dump, Vec<u128>);

/// Recovers as the materializer does: partition 0's snapshot in `dir` loaded, `recs` replayed
/// from its start with its end covering; the state, and the snapshot's (start, end).
fn recover_online(dir: &Path, recs: &[OnlineRecord]) -> (State, (u64, u64)) {
    let back = online_store();
    let loaded = load(dir, &back, 0, WINDOW, None)
        .unwrap()
        .expect("a snapshot");
    let start = loaded.offset_of("log").unwrap();
    let covered_below = loaded.covered_below("log");
    let mut replayed = loaded.dedup;
    for i in start as usize..recs.len() {
        apply_at(&back, recs, i, &mut replayed, covered_below);
    }
    let state = (dump(&back), replayed.iter().collect());
    (state, (start, covered_below))
}

/// Every record of `recs` applied once, from the start.
fn apply_whole(recs: &[OnlineRecord]) -> State {
    let full = online_store();
    let mut all = DedupWindow::new(WINDOW);
    for i in 0..recs.len() {
        apply_at(&full, recs, i, &mut all, 0);
    }
    (dump(&full), all.iter().collect())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    /// The online snapshot's contract: rows copied while records keep being applied — each
    /// at its own moment between S and E — loaded and replayed from S (leaving out of a row
    /// what its version says it holds) give exactly the store and dedup window of applying
    /// every record once, from the start.
    #[test]
    fn an_online_snapshot_replayed_from_its_start_equals_applying_everything(
        events in prop::collection::vec((0u8..12, 0u8..4, -3i8..6, -50i16..50, 0u8..3), 1..160),
        start in any::<prop::sample::Index>(),
        per_row in 0usize..6,
    ) {
        let recs = online_records(&events);
        let n = recs.len();
        let start = start.index(n + 1);
        let dir = tempfile::tempdir().unwrap();
        let live = online_store();
        let mut dedup = DedupWindow::new(WINDOW);
        for i in 0..start {
            apply_at(&live, &recs, i, &mut dedup, 0);
        }
        let at_start: Vec<u128> = dedup.iter().collect();
        let offsets = vec![("log".to_string(), start as u64)];
        let mut snap = Snapshot::begin(dir.path(), &live, 0, &offsets, None).unwrap();
        let mut next = start;
        snap.capture(&live, || {
            for _ in 0..per_row {
                if next < n {
                    apply_at(&live, &recs, next, &mut dedup, 0);
                    next += 1;
                }
            }
        })
        .unwrap();
        let end = next;
        for i in end..n {
            apply_at(&live, &recs, i, &mut dedup, 0);
        }
        snap.finish(&[end as u64], at_start.into_iter()).unwrap().commit().unwrap();

        let (recovered, ends) = recover_online(dir.path(), &recs);
        prop_assert_eq!(ends, (start as u64, end as u64));
        let whole = apply_whole(&recs);
        prop_assert_eq!(&dump(&live), &whole.0);
        prop_assert_eq!(recovered, whole);
    }
}

/// The same contract under real races: a writer thread applies records while the snapshot
/// copies rows on this one (rows overwritten in place mid-copy, rings moved past a row's
/// words, rows replaced and the map resized under the walk).
#[test]
fn an_online_snapshot_taken_beside_a_writer_thread_replays_to_the_same_store() {
    // A fixed pseudo-random sequence: (key, view, minutes, value, dedup), as the property.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for round in 0..8 {
        let events: Vec<Event> = (0..20_000)
            .map(|_| {
                let r = next();
                let key = (r % 251) as u8;
                (
                    key,
                    (r >> 8) as u8 % 4,
                    ((r >> 16) % 9) as i8 - 3,
                    (r >> 24) as i16 % 50,
                    (r >> 40) as u8 % 3,
                )
            })
            .collect();
        let recs = online_records_keys(&events, 250);
        let n = recs.len();
        let start = n / 4;
        let dir = tempfile::tempdir().unwrap();
        let live = online_store();
        let mut dedup = DedupWindow::new(WINDOW);
        for i in 0..start {
            apply_at(&live, &recs, i, &mut dedup, 0);
        }
        let at_start: Vec<u128> = dedup.iter().collect();
        let applied = std::sync::atomic::AtomicUsize::new(start);
        let offsets = vec![("log".to_string(), start as u64)];
        let end = std::thread::scope(|scope| {
            let writer = scope.spawn(|| {
                for i in start..n {
                    apply_at(&live, &recs, i, &mut dedup, 0);
                    applied.store(i + 1, std::sync::atomic::Ordering::Release);
                }
            });
            let mut snap = Snapshot::begin(dir.path(), &live, 0, &offsets, None).unwrap();
            snap.capture(&live, || {}).unwrap();
            // The copy may have seen the record being applied before its count was stored: one
            // past the count (an end too far is harmless — a row past a record holds it).
            let end = (applied.load(std::sync::atomic::Ordering::Acquire) + 1).min(n);
            snap.finish(&[end as u64], at_start.iter().copied())
                .unwrap()
                .commit()
                .unwrap();
            writer.join().unwrap();
            end
        });
        let (recovered, ends) = recover_online(dir.path(), &recs);
        assert_eq!(ends, (start as u64, end as u64));
        assert!(
            recovered == apply_whole(&recs),
            "round {round}: end {end} of {n}"
        );
    }
}

/// The writer folds an event into the rings before it writes the row's words: a copy that
/// finds the rings past the row's version met an event half applied, and must be made again.
#[test]
fn a_row_copied_between_its_rings_and_its_words_is_copied_again() {
    let s = online_store();
    let recs = online_records(&[(0, 2, 0, 5, 0)]);
    apply_at(&s, &recs, 0, &mut DedupWindow::new(0), 0);
    let view = s.schema().view_by_name("txn").unwrap();
    let al = s.agg_layout(view.id).unwrap();
    let mut out = Vec::new();
    let mut rings = Vec::new();
    s.for_each_row(0, view.id, |key, row| {
        assert!(put_row(&mut out, view, Some(al), key, row, &mut rings));
        let cell = row.aggs().unwrap();
        let later = [(0, Value::F64(1.0))];
        assert!(cell.apply(view, al, 1_700_000_000_000, 7, &later, &mut 0));
        assert!(
            !put_row(&mut out, view, Some(al), key, row, &mut rings),
            "rings at version 8, words at 1"
        );
        row.set_version(8);
        assert!(put_row(&mut out, view, Some(al), key, row, &mut rings));
    });
    assert!(!out.is_empty());
}

/// A row that never settles (here: rings left past its words, as a writer that died between
/// the two halves of an event would) abandons the snapshot with an error of its own, which
/// the materializer logs and gets over (the next snapshot is taken when due), instead of
/// stopping the partition.
#[test]
fn a_row_that_never_settles_abandons_the_snapshot() {
    let s = online_store();
    let recs = online_records(&[(0, 2, 0, 5, 0), (1, 2, 0, 6, 0)]);
    for i in 0..2 {
        apply_at(&s, &recs, i, &mut DedupWindow::new(0), 0);
    }
    let view = s.schema().view_by_name("txn").unwrap();
    let al = s.agg_layout(view.id).unwrap();
    s.for_each_row(0, view.id, |key, row| {
        if key == "u1" {
            let later = [(0, Value::F64(1.0))];
            let cell = row.aggs().unwrap();
            assert!(cell.apply(view, al, 1_700_000_000_000, 99, &later, &mut 0));
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let offsets = vec![("log".to_string(), 2)];
    let mut snap = Snapshot::begin(dir.path(), &s, 0, &offsets, None).unwrap();
    let err = snap.capture(&s, || {}).unwrap_err();
    assert!(matches!(err, StoreError::SnapshotAbandoned(_)), "{err}");
    assert!(err.to_string().contains("view txn"), "{err}");
}
