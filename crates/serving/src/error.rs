//! The serving layer's one error type and its closed table of codes. Every pipeline failure is
//! a [`Code`] (the stable string a client sees), a message for humans, and plain details; the
//! surfaces map a code's [`Class`] to their status (HTTP 400/404/409/413/500/503, gRPC
//! `INVALID_ARGUMENT`/`NOT_FOUND`/…) and write details in their own encoding.

use std::fmt;

/// What kind of failure a code is: the surfaces choose their status from this alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// The request is wrong (HTTP 400).
    Invalid,
    /// The request is over a configured bound (HTTP 413).
    TooLarge,
    /// It names something that does not exist (HTTP 404).
    NotFound,
    /// It conflicts with the state of the resource (HTTP 409).
    Conflict,
    /// Try again later (HTTP 503 + `Retry-After`).
    Unavailable,
    /// The caller may not do this (HTTP 403).
    Forbidden,
    /// Quiver failed (HTTP 500).
    Internal,
}

macro_rules! codes {
    ($($variant:ident = $text:literal, $class:ident;)*) => {
        /// Every code the serving layer returns. Closed: a new failure gets a row here, so the
        /// set clients may see is this table.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Code { $($variant,)* }

        impl Code {
            pub const ALL: &'static [Code] = &[$(Code::$variant,)*];

            /// The code as clients see it (`UNKNOWN_MODEL`).
            pub fn as_str(self) -> &'static str {
                match self { $(Code::$variant => $text,)* }
            }

            pub fn class(self) -> Class {
                match self { $(Code::$variant => Class::$class,)* }
            }
        }
    };
}

codes! {
    BadRequest = "BAD_REQUEST", Invalid;
    BadParameter = "BAD_PARAMETER", Invalid;
    InvalidEvent = "INVALID_EVENT", Invalid;
    BatchTooLarge = "INVALID_EVENT", TooLarge;
    MissingEntity = "MISSING_ENTITY", Invalid;
    BadFeature = "BAD_FEATURE", Invalid;
    MissingFeature = "MISSING_FEATURE", Invalid;
    UnknownFeature = "UNKNOWN_FEATURE", Invalid;
    BadTimestamp = "BAD_TIMESTAMP", Invalid;
    TooManyEntities = "TOO_MANY_ENTITIES", TooLarge;
    BadInstances = "BAD_INSTANCES", TooLarge;
    UnknownView = "UNKNOWN_VIEW", NotFound;
    EntityNotFound = "ENTITY_NOT_FOUND", NotFound;
    UnknownFeatureService = "UNKNOWN_FEATURE_SERVICE", NotFound;
    UnknownModel = "UNKNOWN_MODEL", NotFound;
    UnknownVersion = "UNKNOWN_VERSION", NotFound;
    ModelNotReady = "MODEL_NOT_READY", Unavailable;
    QueueFull = "QUEUE_FULL", Unavailable;
    DiskFull = "DISK_FULL", Unavailable;
    LogPoisoned = "LOG_POISONED", Unavailable;
    LogUnavailable = "LOG_UNAVAILABLE", Unavailable;
    ShuttingDown = "SHUTTING_DOWN", Unavailable;
    ReadAfterTimeout = "READ_AFTER_TIMEOUT", Unavailable;
    HistoryUnavailable = "HISTORY_UNAVAILABLE", Unavailable;
    PartitionUnavailable = "PARTITION_UNAVAILABLE", Unavailable;
    ReplicaLagging = "REPLICA_LAGGING", Unavailable;
    ForwardLoop = "FORWARD_LOOP", Unavailable;
    PeerFailed = "PEER_FAILED", Unavailable;
    Forbidden = "FORBIDDEN", Forbidden;
    ModelError = "MODEL_ERROR", Internal;
    LogError = "LOG_ERROR", Internal;
    Internal = "INTERNAL", Internal;
}

/// A detail's value: what a surface writes under `details`.
#[derive(Clone, Debug, PartialEq)]
pub enum Detail {
    Str(String),
    U64(u64),
    Null,
}

impl From<&str> for Detail {
    fn from(s: &str) -> Detail {
        Detail::Str(s.to_string())
    }
}

impl From<String> for Detail {
    fn from(s: String) -> Detail {
        Detail::Str(s)
    }
}

impl From<u64> for Detail {
    fn from(n: u64) -> Detail {
        Detail::U64(n)
    }
}

impl From<usize> for Detail {
    fn from(n: usize) -> Detail {
        Detail::U64(n as u64)
    }
}

impl<T: Into<Detail>> From<Option<T>> for Detail {
    fn from(v: Option<T>) -> Detail {
        v.map_or(Detail::Null, Into::into)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct ServingError {
    pub code: Code,
    pub message: String,
    pub details: Vec<(&'static str, Detail)>,
    /// For `Unavailable`: when to retry (seconds).
    pub retry_after_s: Option<u32>,
}

pub type Result<T, E = ServingError> = std::result::Result<T, E>;

impl ServingError {
    pub fn new(code: Code, message: impl Into<String>) -> ServingError {
        ServingError {
            code,
            message: message.into(),
            details: Vec::new(),
            retry_after_s: (code.class() == Class::Unavailable).then_some(1),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> ServingError {
        ServingError::new(Code::BadRequest, message)
    }

    pub fn detail(mut self, name: &'static str, value: impl Into<Detail>) -> ServingError {
        self.details.push((name, value.into()));
        self
    }

    pub fn retry_after(mut self, seconds: u32) -> ServingError {
        self.retry_after_s = Some(seconds);
        self
    }

    /// Prefixes the message with the instance it is about (batches of more than one only).
    pub fn at_instance(mut self, i: usize, n: usize) -> ServingError {
        if n > 1 {
            self.message = format!("instance {i}: {}", self.message);
        }
        self
    }
}

impl fmt::Display for ServingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code.as_str(), self.message)
    }
}

impl std::error::Error for ServingError {}

impl From<quiver_log::LogError> for ServingError {
    fn from(e: quiver_log::LogError) -> ServingError {
        use quiver_log::LogError as L;
        let message = e.to_string();
        match e {
            L::Full { .. } => ServingError::new(Code::QueueFull, message),
            L::Poisoned(_) => ServingError::new(Code::LogPoisoned, message).retry_after(30),
            L::ShuttingDown => ServingError::new(Code::ShuttingDown, message),
            L::Unavailable(_) => ServingError::new(Code::LogUnavailable, message),
            L::DiskFull { used, max, held_by } => ServingError::new(Code::DiskFull, message)
                .detail("disk_bytes", used)
                .detail("disk_bytes_max", max)
                .detail("held_by", held_by),
            _ => ServingError::new(Code::LogError, message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unavailable_codes_carry_a_retry_and_no_other_does() {
        for &c in Code::ALL {
            let e = ServingError::new(c, "x");
            assert_eq!(
                e.retry_after_s.is_some(),
                c.class() == Class::Unavailable,
                "{c:?}"
            );
            assert!(
                c.as_str()
                    .bytes()
                    .all(|b| b.is_ascii_uppercase() || b == b'_'),
                "{c:?}"
            );
        }
    }

    #[test]
    fn codes_name_one_failure_each_except_the_batch_bound() {
        // INVALID_EVENT is the one code text with two classes: a bad event (400) and a batch
        // over its bound (413), as DESIGN.md's ingest reply has it.
        let mut texts: Vec<&str> = Code::ALL.iter().map(|c| c.as_str()).collect();
        texts.sort_unstable();
        let before = texts.len();
        texts.dedup();
        assert_eq!(before - texts.len(), 1);
    }

    #[test]
    fn disk_full_names_its_bound_and_holder() {
        let e = ServingError::from(quiver_log::LogError::DiskFull {
            used: 10,
            max: 5,
            held_by: Some("history".into()),
        });
        assert_eq!(e.code, Code::DiskFull);
        assert_eq!(e.details[2], ("held_by", Detail::Str("history".into())));
    }
}
