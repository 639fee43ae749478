//! Read-your-writes tokens: the log positions an ingest wrote, as a short header-safe string.
//!
//! Form: `p:next_offset` pairs joined by `,`, e.g. `0:124,3:457` means "partition 0 up to
//! (excluding) offset 124 and partition 3 up to offset 457". A reader holding the token waits
//! until each named partition's materializer has applied everything below those offsets.

use std::fmt;

/// Longest token accepted from a client, so that parsing a header is bounded work.
pub const TOKEN_BYTES_MAX: usize = 16 * 1024;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Token {
    /// (partition, next offset), sorted by partition, at most one entry per partition.
    positions: Vec<(u32, u64)>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("malformed token: {0}")]
pub struct TokenError(&'static str);

impl Token {
    pub fn new() -> Token {
        Token::default()
    }

    /// Records that `partition` was written up to (excluding) `next_offset`; keeps the maximum.
    pub fn advance(&mut self, partition: u32, next_offset: u64) {
        match self.positions.binary_search_by_key(&partition, |(p, _)| *p) {
            Ok(i) => self.positions[i].1 = self.positions[i].1.max(next_offset),
            Err(i) => self.positions.insert(i, (partition, next_offset)),
        }
    }

    pub fn positions(&self) -> &[(u32, u64)] {
        &self.positions
    }

    pub fn parse(text: &str) -> Result<Token, TokenError> {
        if text.len() > TOKEN_BYTES_MAX {
            return Err(TokenError("too long"));
        }
        let mut token = Token::new();
        if text.is_empty() {
            return Ok(token);
        }
        for pair in text.split(',') {
            let (p, o) = pair
                .split_once(':')
                .ok_or(TokenError("expected partition:offset"))?;
            let p: u32 = p.trim().parse().map_err(|_| TokenError("bad partition"))?;
            let o: u64 = o.trim().parse().map_err(|_| TokenError("bad offset"))?;
            token.advance(p, o);
        }
        Ok(token)
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (p, o)) in self.positions.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{p}:{o}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn round_trips(pairs in proptest::collection::vec((0u32..64, any::<u64>()), 0..20)) {
            let mut t = Token::new();
            for (p, o) in &pairs { t.advance(*p, *o); }
            let back = Token::parse(&t.to_string()).unwrap();
            prop_assert_eq!(back, t);
        }

        #[test]
        fn parse_never_panics(s in ".{0,64}") {
            let _ = Token::parse(&s);
        }
    }

    #[test]
    fn keeps_the_maximum_per_partition() {
        let t = Token::parse("1:5,0:3,1:2").unwrap();
        assert_eq!(t.positions(), &[(0, 3), (1, 5)]);
        assert!(Token::parse("1-5").is_err());
        assert!(Token::parse("x:1").is_err());
    }
}
