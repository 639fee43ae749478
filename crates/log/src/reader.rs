//! Sequential readers of one partition, for the materializer and any later consumer. A reader
//! only returns records below the partition's durable offset, so it never sees a frame that a
//! crash could still take back, and it verifies every frame's checksum as it reads.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::sync::Arc;
use std::time::Duration;

use crate::error::{io, LogError, Result};
use crate::frame::{FrameHeader, FRAME_HEADER_BYTES, SEGMENT_HEADER_BYTES};
use crate::partition::PartitionShared;
use crate::segment::segment_name;

/// Records read in one call, payloads packed into one buffer.
#[derive(Debug, Default)]
pub struct ReadBatch {
    buf: Vec<u8>,
    /// (stream, offset, append_ms, end of payload in `buf`)
    entries: Vec<(u32, u64, i64, usize)>,
}

#[derive(Debug, Clone, Copy)]
pub struct LogRecord<'a> {
    pub stream: u32,
    pub offset: u64,
    pub append_ms: i64,
    pub payload: &'a [u8],
}

impl ReadBatch {
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = LogRecord<'_>> {
        let mut start = 0;
        self.entries
            .iter()
            .map(move |&(stream, offset, append_ms, end)| {
                let payload = &self.buf[start..end];
                start = end;
                LogRecord {
                    stream,
                    offset,
                    append_ms,
                    payload,
                }
            })
    }

    pub fn clear(&mut self) {
        self.buf.clear();
        self.entries.clear();
    }

    /// Appends one record whose payload `write` puts into the shared buffer (for backends
    /// outside this crate). Returning false from `write` drops the record.
    pub fn push_with(
        &mut self,
        stream: u32,
        offset: u64,
        append_ms: i64,
        write: impl FnOnce(&mut Vec<u8>) -> bool,
    ) -> bool {
        let start = self.buf.len();
        if !write(&mut self.buf) {
            self.buf.truncate(start);
            return false;
        }
        self.entries
            .push((stream, offset, append_ms, self.buf.len()));
        true
    }

    /// Moves every record of `other` to the end of this batch.
    pub fn append(&mut self, other: &mut ReadBatch) {
        let base = self.buf.len();
        self.buf.extend_from_slice(&other.buf);
        self.entries.extend(
            other
                .entries
                .iter()
                .map(|&(s, o, a, end)| (s, o, a, base + end)),
        );
        other.clear();
    }
}

pub struct PartitionReader {
    part: Arc<PartitionShared>,
    next: u64,
    file: Option<(BufReader<File>, String)>,
}

impl PartitionReader {
    pub(crate) fn new(part: Arc<PartitionShared>, from: u64) -> Result<PartitionReader> {
        let first = part.first_offset();
        let next = part.queue.lock().next_offset;
        if from < first || from > next {
            return Err(LogError::OffsetOutOfRange {
                partition: part.id,
                offset: from,
                first,
                next,
            });
        }
        Ok(PartitionReader {
            part,
            next: from,
            file: None,
        })
    }

    pub fn partition(&self) -> u32 {
        self.part.id
    }

    /// Offset of the next record this reader returns.
    pub fn position(&self) -> u64 {
        self.next
    }

    pub fn durable_offset(&self) -> u64 {
        self.part.durable_offset()
    }

    /// Reads up to `records_max` durable records, waiting up to `wait` for the first.
    pub fn poll(&mut self, records_max: usize, wait: Duration, out: &mut ReadBatch) -> Result<()> {
        out.clear();
        self.poll_more(records_max, wait, out)
    }

    /// As [`poll`](Self::poll), adding to what `out` holds (`records_max` counts only what
    /// this call adds).
    pub fn poll_more(
        &mut self,
        records_max: usize,
        wait: Duration,
        out: &mut ReadBatch,
    ) -> Result<()> {
        let records_max = out.len() + records_max;
        let durable = self.part.wait_durable_beyond(self.next, wait);
        while self.next < durable && out.len() < records_max {
            self.read_one(out)?;
        }
        Ok(())
    }

    fn corrupt(&self, reason: impl Into<String>) -> LogError {
        LogError::Corrupt {
            partition: self.part.id,
            segment: self.file.as_ref().map(|f| f.1.clone()).unwrap_or_default(),
            reason: reason.into(),
        }
    }

    fn read_one(&mut self, out: &mut ReadBatch) -> Result<()> {
        let mut head = [0u8; FRAME_HEADER_BYTES];
        loop {
            if self.file.is_none() {
                self.open_at(self.next)?;
            }
            let (reader, name) = self.file.as_mut().expect("opened above");
            match reader.read_exact(&mut head) {
                Ok(()) => break,
                // The segment was sealed and the next record starts the next segment.
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    let sealed_next = self.next;
                    let has_next = self
                        .part
                        .segments
                        .read()
                        .iter()
                        .any(|s| s.base_offset == sealed_next);
                    if !has_next {
                        let reason = format!("segment {name} ends before the durable offset");
                        return Err(self.corrupt(reason));
                    }
                    self.file = None;
                }
                Err(e) => return Err(io(name.as_str())(e)),
            }
        }
        let header = FrameHeader::parse(&head);
        if header.offset != self.next {
            return Err(self.corrupt(format!(
                "expected offset {}, found {}",
                self.next, header.offset
            )));
        }
        if header.len > crate::frame::FRAME_PAYLOAD_BYTES_MAX {
            return Err(self.corrupt("frame length over bound"));
        }
        let start = out.buf.len();
        out.buf.resize(start + header.len, 0);
        let (reader, name) = self.file.as_mut().expect("open");
        reader
            .read_exact(&mut out.buf[start..])
            .map_err(io(name.as_str()))?;
        if !header.verify(&out.buf[start..]) {
            out.buf.truncate(start);
            return Err(self.corrupt(format!("checksum mismatch at offset {}", self.next)));
        }
        if header.sealed {
            self.open_sealed(out, start)?;
        }
        out.entries
            .push((self.part.id, header.offset, header.append_ms, out.buf.len()));
        self.next += 1;
        Ok(())
    }

    /// Replaces the sealed payload at `out.buf[start..]` with its plain text.
    fn open_sealed(&self, out: &mut ReadBatch, start: usize) -> Result<()> {
        let Some(ring) = &self.part.sealer else {
            out.buf.truncate(start);
            return Err(self.corrupt(format!(
                "record {} is encrypted and [storage] encryption_key_file is not set",
                self.next
            )));
        };
        let aad = crate::frame::seal_aad(self.part.id, self.next);
        match ring.open(&aad, &out.buf[start..]) {
            Ok(plain) => {
                out.buf.truncate(start);
                out.buf.extend_from_slice(&plain);
                Ok(())
            }
            Err(e) => {
                out.buf.truncate(start);
                Err(self.corrupt(format!("record {}: {e}", self.next)))
            }
        }
    }

    /// Opens the segment holding `offset` and skips to it (headers only; payloads are seeked over).
    fn open_at(&mut self, offset: u64) -> Result<()> {
        let base = {
            let segs = self.part.segments.read();
            let seg = segs.iter().rev().find(|s| s.base_offset <= offset);
            match seg {
                Some(s) => s.base_offset,
                None => {
                    return Err(LogError::OffsetOutOfRange {
                        partition: self.part.id,
                        offset,
                        first: segs.first().map(|s| s.base_offset).unwrap_or(0),
                        next: segs.last().map(|s| s.next_offset).unwrap_or(0),
                    })
                }
            }
        };
        let path = self.part.dir.join(segment_name(base));
        let file = File::open(&path).map_err(io(&path))?;
        let mut reader = BufReader::with_capacity(256 * 1024, file);
        reader
            .seek(SeekFrom::Start(SEGMENT_HEADER_BYTES as u64))
            .map_err(io(&path))?;
        let mut at = base;
        let mut head = [0u8; FRAME_HEADER_BYTES];
        while at < offset {
            reader.read_exact(&mut head).map_err(io(&path))?;
            let h = FrameHeader::parse(&head);
            if h.offset != at {
                return Err(LogError::Corrupt {
                    partition: self.part.id,
                    segment: path.display().to_string(),
                    reason: format!("expected offset {at}, found {}", h.offset),
                });
            }
            reader.seek_relative(h.len as i64).map_err(io(&path))?;
            at += 1;
        }
        self.file = Some((reader, path.display().to_string()));
        Ok(())
    }
}
