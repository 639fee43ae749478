//! Event time: epoch milliseconds inside Quiver, RFC 3339 or epoch ms on the wire.

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// Milliseconds since the Unix epoch, the unit of every timestamp Quiver stores.
pub type EpochMs = i64;

/// Earliest and latest event time accepted: years 1970 to 9999. Anything outside is a typo
/// (seconds sent as ms, or µs sent as ms) more often than a real instant.
pub const EVENT_TIME_MIN_MS: EpochMs = 0;
pub const EVENT_TIME_MAX_MS: EpochMs = 253_402_300_799_999;

pub fn now_ms() -> EpochMs {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("the clock is after 1970");
    now.as_millis() as EpochMs
}

/// Parses RFC 3339 (`2026-11-23T12:00:00.123Z`) into epoch ms.
pub fn parse_rfc3339_ms(text: &str) -> Option<EpochMs> {
    let t = OffsetDateTime::parse(text, &Rfc3339).ok()?;
    let ms = t.unix_timestamp_nanos() / 1_000_000;
    EpochMs::try_from(ms).ok()
}

/// Formats epoch ms as RFC 3339 in UTC with millisecond precision, as Feast's
/// `event_timestamps` are read by clients.
pub fn format_rfc3339_ms(ms: EpochMs) -> String {
    let nanos = i128::from(ms) * 1_000_000;
    match OffsetDateTime::from_unix_timestamp_nanos(nanos) {
        Ok(t) => {
            let (y, mo, d) = (t.year(), u8::from(t.month()), t.day());
            let (h, mi, s, milli) = (t.hour(), t.minute(), t.second(), t.millisecond());
            format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{milli:03}Z")
        }
        Err(_) => ms.to_string(),
    }
}

/// Whether `ms` is an event time Quiver accepts.
pub fn is_valid_event_time(ms: EpochMs) -> bool {
    (EVENT_TIME_MIN_MS..=EVENT_TIME_MAX_MS).contains(&ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_round_trips_at_ms_precision() {
        for ms in [0, 1, 1_732_350_000_123, EVENT_TIME_MAX_MS] {
            let text = format_rfc3339_ms(ms);
            assert_eq!(parse_rfc3339_ms(&text), Some(ms), "{text}");
        }
        assert_eq!(
            parse_rfc3339_ms("2024-11-23T08:20:00.123+00:00"),
            Some(1_732_350_000_123)
        );
        assert_eq!(parse_rfc3339_ms("yesterday"), None);
    }
}
