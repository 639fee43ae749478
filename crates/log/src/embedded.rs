//! The embedded log as an [`EventLog`]: one stream per partition (stream `p` is partition
//! `p`), offsets handed out at enqueue, retention Quiver's own.

use std::any::Any;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::api::{Appended, EventLog, ReadPurpose, StreamId, StreamInfo, StreamReader};
use crate::consumers::{Consumer, Retention};
use crate::{Ack, Log, LogError, PartitionReader, ReadBatch, RecordBatch, Result};

impl EventLog for Log {
    fn kind(&self) -> &'static str {
        "embedded"
    }

    fn partitions(&self) -> u32 {
        Log::partitions(self)
    }

    fn streams(&self) -> &[StreamInfo] {
        &self.streams
    }

    fn append(&self, batches: Vec<(u32, RecordBatch)>, ack: Ack) -> Result<Vec<Appended>> {
        Log::append(self, batches, ack)
    }

    fn open_reader(
        &self,
        from: &[(StreamId, u64)],
        _purpose: ReadPurpose,
    ) -> Result<Box<dyn StreamReader>> {
        let readers = from
            .iter()
            .map(|&(s, offset)| self.reader(s, offset))
            .collect::<Result<Vec<_>>>()?;
        Ok(Box::new(EmbeddedReader {
            log_parts: readers.iter().map(PartitionReader::partition).collect(),
            readers,
            next: 0,
            opener: self.reader_opener(),
        }))
    }

    fn low_watermark(&self, stream: StreamId) -> Result<u64> {
        self.check_stream(stream)?;
        Ok(self.first_offset(stream))
    }

    fn high_watermark(&self, stream: StreamId) -> Result<u64> {
        self.check_stream(stream)?;
        Ok(self.durable_offset(stream))
    }

    fn register_consumer(
        &self,
        name: &str,
        retention: Retention,
        initial: &dyn Fn(StreamId) -> u64,
    ) -> Arc<Consumer> {
        Log::register_consumer(self, name, retention, initial)
    }

    fn local_dir(&self) -> &Path {
        self.dir()
    }

    fn queued_records(&self) -> usize {
        Log::queued_records(self)
    }

    fn unavailable(&self) -> Option<String> {
        self.poisoned().map(|p| format!("log poisoned: {p}"))
    }

    fn housekeeping(&self, now_ms: i64) -> Option<u64> {
        if let Err(e) = self.enforce_retention(now_ms) {
            tracing::error!(error = %e, "retention failed");
        }
        Some(self.disk_bytes())
    }

    fn shutdown(&self) {
        Log::shutdown(self)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl Log {
    fn check_stream(&self, stream: StreamId) -> Result<()> {
        if stream < Log::partitions(self) {
            Ok(())
        } else {
            Err(LogError::NoPartition(stream))
        }
    }
}

/// Reads several partitions of the embedded log. One stream waits as `PartitionReader::poll`
/// does; several are polled in turn without waiting, then the reader naps briefly (only
/// point-in-time scans read several streams of the embedded log, and they read to a known end).
struct EmbeddedReader {
    readers: Vec<PartitionReader>,
    log_parts: Vec<u32>,
    /// Which reader goes first next time, so one busy stream cannot starve the others.
    next: usize,
    opener: crate::ReaderOpener,
}

const MULTI_STREAM_NAP: Duration = Duration::from_millis(1);

impl EmbeddedReader {
    fn index(&self, stream: StreamId) -> usize {
        self.log_parts
            .iter()
            .position(|&p| p == stream)
            .unwrap_or_else(|| panic!("stream {stream} is not read by this reader"))
    }
}

impl StreamReader for EmbeddedReader {
    fn poll(&mut self, records_max: usize, wait: Duration, out: &mut ReadBatch) -> Result<()> {
        out.clear();
        if self.readers.len() == 1 {
            return self.readers[0].poll_more(records_max, wait, out);
        }
        let deadline = Instant::now() + wait;
        loop {
            let n = self.readers.len();
            for i in 0..n {
                let r = &mut self.readers[(self.next + i) % n];
                let room = records_max - out.len();
                if room == 0 {
                    break;
                }
                r.poll_more(room, Duration::ZERO, out)?;
            }
            self.next = (self.next + 1) % n.max(1);
            if !out.is_empty() || Instant::now() >= deadline {
                return Ok(());
            }
            std::thread::sleep(MULTI_STREAM_NAP.min(deadline - Instant::now()));
        }
    }

    fn position(&self, stream: StreamId) -> u64 {
        self.readers[self.index(stream)].position()
    }

    fn end(&self, stream: StreamId) -> u64 {
        self.readers[self.index(stream)].durable_offset()
    }

    fn seek(&mut self, stream: StreamId, offset: u64) -> Result<()> {
        let i = self.index(stream);
        self.readers[i] = (self.opener)(stream, offset)?;
        Ok(())
    }

    fn streams(&self) -> Vec<StreamId> {
        self.log_parts.clone()
    }
}
