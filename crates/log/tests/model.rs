//! The log against a model: random appends across partitions and segment rolls, a simulated
//! power loss that tears the segments' unsynced tails at a random byte, then recovery. Exactly
//! the acknowledged records must survive (the commit journal holds what the segments lost) —
//! never a damaged or reordered one.

use std::path::Path;
use std::time::Duration;

use proptest::prelude::*;
use quiver_log::{
    segment, Ack, FsyncPolicy, Log, LogError, LogOptions, ReadBatch, RecordBatch, Retention,
};

fn opts(fsync: FsyncPolicy) -> LogOptions {
    LogOptions {
        partitions: 2,
        fsync,
        segment_bytes: 512,
        queue_records_max: 1000,
        group_commit_records_max: 64,
        retention_ms: i64::MAX,
        retention_bytes: None,
        disk_bytes_max: None,
        sealer: None,
    }
}

fn read_all(log: &Log, partition: u32) -> Vec<Vec<u8>> {
    let mut reader = log.reader(partition, log.first_offset(partition)).unwrap();
    let mut out = Vec::new();
    let mut batch = ReadBatch::default();
    while reader.position() < log.durable_offset(partition) {
        reader
            .poll(100, Duration::from_millis(10), &mut batch)
            .unwrap();
        out.extend(batch.iter().map(|r| r.payload.to_vec()));
    }
    out
}

fn batch(payloads: &[Vec<u8>]) -> RecordBatch {
    let mut b = RecordBatch::new();
    for p in payloads {
        b.push(p);
    }
    b
}

/// A power loss tears the last segment of `partition` somewhere after `keep_min` bytes, and
/// may leave garbage where a frame was being written, or a hole of zeros (a block the OS had
/// not written back) with valid frames after it.
fn tear(
    dir: &Path,
    partition: u32,
    keep_min: usize,
    cut: prop::sample::Index,
    garbage: &[u8],
    hole: bool,
) {
    let pdir = segment::partition_dir(dir, partition);
    let last = *segment::list_segments(&pdir).unwrap().last().unwrap();
    let path = pdir.join(segment::segment_name(last));
    let mut bytes = std::fs::read(&path).unwrap();
    let keep = keep_min + cut.index(bytes.len() - keep_min + 1);
    if hole {
        let end = (keep + 40).min(bytes.len());
        bytes[keep..end].fill(0);
    } else {
        bytes.truncate(keep);
        bytes.extend_from_slice(garbage);
    }
    std::fs::write(&path, bytes).unwrap();
}

/// What a power loss leaves: a copy of the log's files taken while it runs (the writer never
/// fsyncs the segments between checkpoints, so the copy holds what the OS had). Copying is
/// not atomic, so it is retried until no journal file came or went meanwhile (a checkpoint
/// may still be finishing after the last acknowledgement).
fn crash_copy(from: &Path, to: &Path) {
    loop {
        let before = quiver_log::journal::list(from).unwrap();
        if copy_tree(from, to) && quiver_log::journal::list(from).unwrap() == before {
            return;
        }
        std::fs::remove_dir_all(to).unwrap();
        std::fs::create_dir_all(to).unwrap();
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Copies `from` into `to`; false if a file vanished while it was being copied.
fn copy_tree(from: &Path, to: &Path) -> bool {
    let mut whole = true;
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            std::fs::create_dir_all(&target).unwrap();
            whole &= copy_tree(&entry.path(), &target);
        } else if let Err(e) = std::fs::copy(entry.path(), &target) {
            assert_eq!(e.kind(), std::io::ErrorKind::NotFound, "{e}");
            whole = false;
        }
    }
    whole
}

/// Bytes of `partition`'s last segment that a power loss cannot take: through the offset the
/// oldest journal file names as synced (the segment's header at least).
fn synced_bytes(dir: &Path, partition: u32) -> usize {
    let journals = quiver_log::journal::read_all(dir, 2).unwrap();
    let synced = journals[0].decoded.checkpoints[partition as usize];
    let pdir = segment::partition_dir(dir, partition);
    let last = *segment::list_segments(&pdir).unwrap().last().unwrap();
    let bytes = std::fs::read(pdir.join(segment::segment_name(last))).unwrap();
    let mut pos = quiver_log::frame::SEGMENT_HEADER_BYTES;
    for offset in last..synced {
        let (_, len) = quiver_log::frame::check_frame(&bytes[pos..], offset).unwrap();
        pos += len;
    }
    pos
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn every_acked_record_survives_a_torn_or_holed_tail(
        acked in prop::collection::vec((0u32..2, prop::collection::vec(prop::collection::vec(any::<u8>(), 0..40), 1..5)), 1..12),
        unacked in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..40), 1..6),
        cut in any::<prop::sample::Index>(),
        garbage in prop::collection::vec(any::<u8>(), 0..30),
        always in any::<bool>(),
        hole in any::<bool>(),
    ) {
        let live = tempfile::tempdir().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let fsync = if always { FsyncPolicy::Always } else { FsyncPolicy::Batch };
        let mut model: [Vec<Vec<u8>>; 2] = [Vec::new(), Vec::new()];
        {
            let log = Log::open(live.path(), opts(fsync)).unwrap();
            for (p, payloads) in &acked {
                for a in log.append(vec![(*p, batch(payloads))], Ack::Durable).unwrap() {
                    a.wait_blocking().unwrap();
                }
                model[*p as usize].extend(payloads.iter().cloned());
            }
            // The records a crash may take: appended to partition 1 and torn below (written,
            // not waited for durability). A roll fsyncs the segment it seals, so a power loss
            // can only tear the last segment, after what the oldest journal file names as
            // synced (segments of 512 bytes make the journal checkpoint every 512 bytes too).
            for a in log.append(vec![(1, batch(&unacked))], Ack::Written).unwrap() {
                a.wait_blocking().unwrap();
            }
            crash_copy(live.path(), dir.path());
            tear(dir.path(), 1, synced_bytes(dir.path(), 1), cut, &garbage, hole);
            tear(dir.path(), 0, synced_bytes(dir.path(), 0), cut, &garbage, !hole);
        }

        let reports = quiver_log::tools::verify(dir.path(), None).unwrap();
        prop_assert!(reports.iter().all(|r| r.errors().next().is_none()), "what recovery repairs is no error");
        let log = Log::open(dir.path(), opts(fsync)).unwrap();
        prop_assert_eq!(read_all(&log, 0), model[0].clone());
        let got = read_all(&log, 1);
        prop_assert!(got.len() >= model[1].len());
        prop_assert_eq!(&got[..model[1].len()], &model[1][..]);
        let extra = &got[model[1].len()..];
        prop_assert_eq!(extra, &unacked[..extra.len()], "survivors after the acked prefix are whole, in order");
        // And the log goes on: appends after recovery continue the offsets.
        let next = log.next_offset(1);
        let a = log.append(vec![(1, batch(&[b"after".to_vec()]))], Ack::Durable).unwrap();
        prop_assert_eq!(a[0].first_offset, Some(next));
        a.into_iter().for_each(|a| {
            a.wait_blocking().unwrap();
        });
        let all = read_all(&log, 1);
        prop_assert_eq!(all.last().unwrap().as_slice(), b"after");
    }
}

/// A log whose partition 0 holds five acknowledged records, shut down cleanly.
fn five_records_then_shutdown() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), opts(FsyncPolicy::Batch)).unwrap();
    let payloads: Vec<Vec<u8>> = (0..5).map(|i| vec![i; 10]).collect();
    for a in log
        .append(vec![(0, batch(&payloads))], Ack::Durable)
        .unwrap()
    {
        a.wait_blocking().unwrap();
    }
    drop(log);
    dir
}

#[test]
fn damage_inside_synced_data_refuses_to_open() {
    let dir = five_records_then_shutdown();
    let path = segment::partition_dir(dir.path(), 0).join(segment::segment_name(0));
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[quiver_log::frame::SEGMENT_HEADER_BYTES + 30] ^= 0x40;
    std::fs::write(&path, bytes).unwrap();
    match Log::open(dir.path(), opts(FsyncPolicy::Batch)) {
        Err(LogError::Corrupt { reason, .. }) => {
            assert!(reason.contains("valid records after it"), "{reason}")
        }
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("a damaged segment must not open silently"),
    }
    let reports = quiver_log::tools::verify(dir.path(), None).unwrap();
    assert_eq!(reports[0].errors().count(), 1);
}

#[test]
fn a_synced_tail_that_went_missing_refuses_to_open() {
    let dir = five_records_then_shutdown(); // shutdown checkpoints: synced through offset 5
    let path = segment::partition_dir(dir.path(), 0).join(segment::segment_name(0));
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 34]).unwrap();
    match Log::open(dir.path(), opts(FsyncPolicy::Batch)) {
        Err(LogError::Corrupt { reason, .. }) => {
            assert!(reason.contains("synced to 5"), "{reason}")
        }
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("synced records that went missing must not be dropped silently"),
    }
}

#[test]
fn a_round_over_every_partition_costs_one_fsync() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = opts(FsyncPolicy::Batch);
    o.partitions = 8;
    o.segment_bytes = 1 << 20;
    let log = Log::open(dir.path(), o).unwrap();
    for round in 1..=10u64 {
        let batches = (0..8)
            .map(|p| (p, batch(&[format!("r{round}p{p}").into_bytes()])))
            .collect();
        for a in log.append(batches, Ack::Durable).unwrap() {
            a.wait_blocking().unwrap();
        }
        // The writer sleeps until the whole request is queued: one round, one fsync (with a
        // file per partition it was eight).
        assert_eq!(log.durable_syncs(), round);
    }
    assert!((0..8).all(|p| log.durable_offset(p) == 10));
}

#[test]
fn the_journal_stays_within_four_segments_of_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), opts(FsyncPolicy::Batch)).unwrap();
    let payloads: Vec<Vec<u8>> = (0..3).map(|i| vec![i; 20]).collect();
    let (mut most, mut files_seen) = (0, 0);
    for i in 0..300u32 {
        for a in log
            .append(vec![(i % 2, batch(&payloads))], Ack::Durable)
            .unwrap()
        {
            a.wait_blocking().unwrap();
        }
        let files = quiver_log::journal::list(dir.path()).unwrap();
        files_seen = files_seen.max(files.last().unwrap().0);
        let bytes: u64 = files
            .iter()
            .filter_map(|(_, path)| std::fs::metadata(path).ok())
            .map(|m| m.len())
            .sum();
        most = most.max(bytes);
    }
    // 4 × segment_bytes (512), plus a round written past each file's threshold.
    assert!(
        most <= 4 * 512 + 2 * 200,
        "journal files reached {most} bytes"
    );
    assert!(
        files_seen > 10,
        "the journal was checkpointed ({files_seen} generations)"
    );
}

#[test]
fn fsync_never_keeps_no_journal_and_batch_starts_one_again() {
    let dir = tempfile::tempdir().unwrap();
    let journal = |d: &Path| !quiver_log::journal::list(d).unwrap().is_empty();
    for (fsync, kept) in [
        (FsyncPolicy::Batch, true),
        (FsyncPolicy::Never, false),
        (FsyncPolicy::Batch, true),
    ] {
        let log = Log::open(dir.path(), opts(fsync)).unwrap();
        assert_eq!(journal(dir.path()), kept, "{fsync:?}");
        for a in log
            .append(vec![(1, batch(&[b"r".to_vec()]))], Ack::Durable)
            .unwrap()
        {
            a.wait_blocking().unwrap();
        }
    }
    let log = Log::open(dir.path(), opts(FsyncPolicy::Batch)).unwrap();
    assert_eq!(read_all(&log, 1).len(), 3);
}

#[test]
fn a_failed_fsync_poisons_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), opts(FsyncPolicy::Batch)).unwrap();
    log.inject_fsync_failure();
    let appended = log
        .append(vec![(0, batch(&[b"x".to_vec()]))], Ack::Durable)
        .unwrap();
    let err = appended
        .into_iter()
        .next()
        .unwrap()
        .wait_blocking()
        .unwrap_err();
    assert!(matches!(err, LogError::Poisoned(_)), "{err}");
    assert!(log.poisoned().is_some());
    let err = log
        .append(vec![(1, batch(&[b"y".to_vec()]))], Ack::Durable)
        .unwrap_err();
    assert!(matches!(err, LogError::Poisoned(_)), "{err}");
    assert_eq!(
        log.durable_offset(0),
        0,
        "nothing unsynced is ever made visible to readers"
    );
}

#[test]
fn an_append_refused_at_shutdown_holds_no_admission() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), opts(FsyncPolicy::Batch)).unwrap();
    log.shutdown();
    let two = vec![
        (0, batch(&[b"a".to_vec()])),
        (1, batch(&[b"b".to_vec(), b"c".to_vec()])),
    ];
    let err = log.append(two, Ack::Durable).unwrap_err();
    assert!(matches!(err, LogError::ShuttingDown), "{err}");
    assert_eq!(
        log.queued_records(),
        0,
        "every batch of the refused append is released"
    );
}

#[test]
fn a_full_queue_refuses_instead_of_growing() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = opts(FsyncPolicy::Batch);
    o.queue_records_max = 3;
    let log = Log::open(dir.path(), o).unwrap();
    let four: Vec<Vec<u8>> = (0..4).map(|i| vec![i]).collect();
    let err = log
        .append(vec![(0, batch(&four))], Ack::Durable)
        .unwrap_err();
    assert!(matches!(err, LogError::Full { max: 3, .. }), "{err}");
    assert_eq!(log.next_offset(0), 0, "a refused append reserves nothing");
    for a in log
        .append(vec![(0, batch(&four[..3]))], Ack::Durable)
        .unwrap()
    {
        a.wait_blocking().unwrap();
    }
    assert_eq!(
        log.queued_records(),
        0,
        "completed appends release their admission"
    );
}

#[test]
fn retention_deletes_old_sealed_segments_but_not_unapplied_ones() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = opts(FsyncPolicy::Never);
    o.retention_bytes = Some(600);
    let log = Log::open(dir.path(), o).unwrap();
    let payloads: Vec<Vec<u8>> = (0..60).map(|i| vec![i; 30]).collect();
    for a in log
        .append(vec![(0, batch(&payloads))], Ack::Durable)
        .unwrap()
    {
        a.wait_blocking().unwrap();
    }
    let before = log.segments(0).len();
    assert!(before > 3);
    let consumer = log.register_consumer("test", Retention::Protect, |_| 0);
    let lossy = log.register_consumer("lossy", Retention::Lossy, |_| 0);
    assert_eq!(
        log.enforce_retention(quiver_core::time::now_ms()).unwrap(),
        0,
        "offset 0 unconsumed: keep all"
    );
    let disk_before = log.disk_bytes();
    consumer.commit(0, u64::MAX);
    let deleted = log.enforce_retention(quiver_core::time::now_ms()).unwrap();
    assert!(
        log.disk_bytes() < disk_before,
        "deleted segments leave the disk count"
    );
    assert_eq!(lossy.committed(0), 0, "a lossy consumer was not waited for");
    assert!(deleted > 0);
    let total: u64 = log.segments(0).iter().map(|s| s.bytes).sum();
    assert!(total <= 600 || log.segments(0).len() == 1);
    assert!(log.first_offset(0) > 0);
    assert!(matches!(
        log.reader(0, 0),
        Err(LogError::OffsetOutOfRange { .. })
    ));
    let last = read_all(&log, 0);
    assert_eq!(last.last().unwrap(), &payloads[59]);
}

#[test]
fn a_second_opener_of_the_same_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), opts(FsyncPolicy::Batch)).unwrap();
    assert!(matches!(
        Log::open(dir.path(), opts(FsyncPolicy::Batch)),
        Err(LogError::Locked(_))
    ));
    let id = log.id().to_string();
    assert_eq!(id.len(), 32);
    drop(log);
    let again = Log::open(dir.path(), opts(FsyncPolicy::Batch)).unwrap();
    assert_eq!(again.id(), id, "the identity is kept across opens");
    let other = tempfile::tempdir().unwrap();
    assert_ne!(
        Log::open(other.path(), opts(FsyncPolicy::Batch))
            .unwrap()
            .id(),
        id
    );
}

#[test]
fn the_disk_bound_refuses_appends_until_retention_may_free_space() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = opts(FsyncPolicy::Never);
    o.retention_ms = 0;
    o.disk_bytes_max = Some(2_000);
    let log = Log::open(dir.path(), o).unwrap();
    let sink = log.register_consumer("sink", Retention::Protect, |_| 0);
    let one: Vec<Vec<u8>> = vec![vec![7; 30]];
    let mut appended = 0;
    let err = loop {
        match log.append(vec![(0, batch(&one))], Ack::Durable) {
            Ok(done) => {
                for a in done {
                    a.wait_blocking().unwrap();
                }
                appended += 1;
            }
            Err(e) => break e,
        }
        assert!(appended < 1_000, "the bound must bite");
    };
    let LogError::DiskFull { used, max, held_by } = err else {
        panic!("expected DiskFull, got {err:?}");
    };
    assert_eq!(max, 2_000);
    let framed = 30 + quiver_log::frame::FRAME_HEADER_BYTES as u64;
    assert!(
        used + framed > max && used <= max + quiver_log::frame::SEGMENT_HEADER_BYTES as u64,
        "refused at the bound, passed by no more than a segment header ({used})"
    );
    assert_eq!(
        held_by.as_deref(),
        Some("sink"),
        "the error names who holds retention"
    );
    let on_disk: u64 = (0..2).flat_map(|p| log.segments(p)).map(|s| s.bytes).sum();
    assert_eq!(log.disk_bytes(), on_disk, "the count matches the segments");
    assert_eq!(
        log.enforce_retention(quiver_core::time::now_ms()).unwrap(),
        0
    );
    assert!(
        log.append(vec![(0, batch(&one))], Ack::Durable).is_err(),
        "still full"
    );

    sink.commit(0, log.durable_offset(0));
    std::thread::sleep(Duration::from_millis(5)); // older than retention_ms = 0
    assert!(log.enforce_retention(quiver_core::time::now_ms()).unwrap() > 0);
    for a in log.append(vec![(0, batch(&one))], Ack::Durable).unwrap() {
        a.wait_blocking().unwrap();
    }
    assert_eq!(
        read_all(&log, 0).len() as u64,
        log.durable_offset(0) - log.first_offset(0)
    );
}
