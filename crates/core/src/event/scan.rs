//! A scanner of its own for the common shape of an event's JSON text: one flat object of the
//! fields `view`, `key`, `ts`, `event_id` and `values`, each at most once; strings without
//! escapes; numbers, `true`, `false`, `null`; in `values`, arrays of numbers too.
//!
//! Why by hand: serde read every value twice — once to delimit it as a `RawValue`, once more
//! when the value was parsed for its feature's type — and that reading was 63 % of a durable
//! ingest's instructions (`scripts/callgrind-ops.sh … update100`). The scanner delimits each
//! value once and leaves the parsing by type to the one place that does it.
//!
//! It takes only texts it reads exactly as serde reads them, and says `None` for anything
//! else — an escape, an unknown or repeated field, nesting, a malformed number, trailing
//! text — which serde then reads, or refuses with its own message. Nothing it takes can make
//! serde's reading differ: `the_scanner_reads_what_serde_reads` checks both on generated texts.

use std::borrow::Cow;

use super::{Fields, RawValues};

/// The fields of an event in the common shape; `None` if the text is not in it.
pub(super) fn event(text: &str) -> Option<Fields<'_>> {
    let mut s = Scan { text, at: 0 };
    let mut fields = Fields::default();
    let mut seen = 0u8;
    s.expect(b'{')?;
    if !s.take(b'}') {
        loop {
            let name = s.string()?;
            s.expect(b':')?;
            let (bit, slot) = match name {
                "view" => (1, &mut fields.view),
                "key" => (2, &mut fields.key),
                "ts" => (4, &mut fields.ts),
                "event_id" => (8, &mut fields.event_id),
                "values" => (16, &mut None), // not a text: read below
                _ => return None,
            };
            if seen & bit != 0 {
                return None;
            }
            seen |= bit;
            if bit == 16 {
                fields.values = s.values()?;
            } else {
                *slot = Some(s.scalar()?).filter(|v| *v != "null");
            }
            if s.take(b'}') {
                break;
            }
            s.expect(b',')?;
        }
    }
    s.skip_ws();
    (s.at == text.len()).then_some(fields)
}

struct Scan<'a> {
    text: &'a str,
    /// Always at a character boundary: only ASCII bytes are stepped over one at a time.
    at: usize,
}

impl<'a> Scan<'a> {
    fn peek(&self) -> Option<u8> {
        self.text.as_bytes().get(self.at).copied()
    }

    fn skip_ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.at += 1;
        }
    }

    /// Skips whitespace, then takes `b` if it comes next.
    fn take(&mut self, b: u8) -> bool {
        self.skip_ws();
        let next = self.peek() == Some(b);
        self.at += usize::from(next);
        next
    }

    fn expect(&mut self, b: u8) -> Option<()> {
        self.take(b).then_some(())
    }

    /// A string without escapes or control characters: its contents.
    fn string(&mut self) -> Option<&'a str> {
        self.expect(b'"')?;
        let start = self.at;
        let rest = self.text.as_bytes().get(start..)?;
        let len = rest
            .iter()
            .position(|&b| b == b'"' || b == b'\\' || b < 0x20)?;
        if rest[len] != b'"' {
            return None;
        }
        self.at = start + len + 1;
        self.text.get(start..start + len)
    }

    fn digits(&mut self) -> usize {
        let start = self.at;
        while let Some(b'0'..=b'9') = self.peek() {
            self.at += 1;
        }
        self.at - start
    }

    /// A number by JSON's grammar: `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`.
    fn number(&mut self) -> Option<()> {
        self.at += usize::from(self.peek() == Some(b'-'));
        match self.peek()? {
            b'0' => self.at += 1,
            b'1'..=b'9' => {
                self.digits();
            }
            _ => return None,
        }
        if self.peek() == Some(b'.') {
            self.at += 1;
            if self.digits() == 0 {
                return None;
            }
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.at += 1;
            self.at += usize::from(matches!(self.peek(), Some(b'+' | b'-')));
            if self.digits() == 0 {
                return None;
            }
        }
        Some(())
    }

    fn word(&mut self, word: &str) -> Option<()> {
        let rest = self.text.get(self.at..)?;
        rest.starts_with(word).then(|| self.at += word.len())
    }

    /// A string, number, `true`, `false` or `null`: its whole text.
    fn scalar(&mut self) -> Option<&'a str> {
        self.skip_ws();
        let start = self.at;
        match self.peek()? {
            b'"' => {
                self.string()?;
            }
            b'-' | b'0'..=b'9' => self.number()?,
            b't' => self.word("true")?,
            b'f' => self.word("false")?,
            b'n' => self.word("null")?,
            _ => return None,
        }
        self.text.get(start..self.at)
    }

    /// An array of numbers (a vector feature's value): its whole text.
    fn numbers(&mut self) -> Option<&'a str> {
        let start = self.at;
        self.expect(b'[')?;
        if !self.take(b']') {
            loop {
                self.skip_ws();
                self.number()?;
                if self.take(b']') {
                    break;
                }
                self.expect(b',')?;
            }
        }
        self.text.get(start..self.at)
    }

    /// `values`: `null`, or an object of names and scalars or arrays of numbers.
    fn values(&mut self) -> Option<Option<RawValues<'a>>> {
        self.skip_ws();
        if self.peek() == Some(b'n') {
            self.word("null")?;
            return Some(None);
        }
        self.expect(b'{')?;
        // A view's features are usually a few dozen: one allocation for most events.
        let mut out = Vec::with_capacity(32);
        if !self.take(b'}') {
            loop {
                let name = self.string()?;
                self.expect(b':')?;
                self.skip_ws();
                let value = if self.peek() == Some(b'[') {
                    self.numbers()?
                } else {
                    self.scalar()?
                };
                out.push((Cow::Borrowed(name), value));
                if self.take(b'}') {
                    break;
                }
                self.expect(b',')?;
            }
        }
        Some(Some(RawValues(out)))
    }
}
