//! Little-endian payload encoding: a growable writer and a bounds-checked reader.
//!
//! Strings and byte strings carry a u16 or u32 length; the reader checks every length
//! against the bytes that are actually left, so a lying length can neither panic nor make
//! it allocate more than the payload it was handed.

/// Why a payload could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// The payload ended inside a field.
    #[error("payload truncated: {field} needs {need} bytes, {left} left")]
    Truncated {
        /// Which field.
        field: &'static str,
        /// Bytes it needs.
        need: usize,
        /// Bytes left.
        left: usize,
    },
    /// Bytes left over after the last field.
    #[error("{0} unexpected trailing payload bytes")]
    Trailing(usize),
    /// A string that is not UTF-8.
    #[error("{0} is not valid UTF-8")]
    Utf8(&'static str),
    /// A length or count above its limit.
    #[error("{field} of {len} exceeds the limit of {max}")]
    TooLong {
        /// Which field.
        field: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A value outside its enumeration.
    #[error("bad value {value} for {field}")]
    BadValue {
        /// Which field.
        field: &'static str,
        /// The value.
        value: u64,
    },
}

/// What ends a string [`Writer::str`] had to cut.
pub const CUT_MARK: &str = "…";

/// Appends little-endian fields to a payload.
#[derive(Debug, Default)]
pub struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    /// An empty payload.
    pub fn new() -> Writer {
        Writer::default()
    }
    /// The bytes written.
    pub fn into_bytes(self) -> Vec<u8> {
        self.buf
    }
    /// Appends a u8.
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.buf.push(v);
        self
    }
    /// Appends a u16.
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Appends a u32.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Appends an i32.
    pub fn i32(&mut self, v: i32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Appends a u64.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Appends a string with a u16 length. One longer than `max` bytes is cut at a char
    /// boundary and ends in [`CUT_MARK`], so a reader sees that it was cut: senders check
    /// what they can refuse (the library refuses a long session name), and this keeps what
    /// they cannot (a long path in a status value) from being cut silently.
    pub fn str(&mut self, s: &str, max: usize) -> &mut Self {
        let max = max.min(usize::from(u16::MAX));
        if s.len() <= max {
            self.u16(s.len() as u16);
            self.buf.extend_from_slice(s.as_bytes());
            return self;
        }
        let mark = if max >= 2 * CUT_MARK.len() {
            CUT_MARK
        } else {
            ""
        };
        let mut end = max - mark.len();
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        self.u16((end + mark.len()) as u16);
        self.buf.extend_from_slice(&s.as_bytes()[..end]);
        self.buf.extend_from_slice(mark.as_bytes());
        self
    }
    /// Appends a byte string with a u32 length.
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.u32(b.len() as u32);
        self.buf.extend_from_slice(b);
        self
    }
}

/// Reads little-endian fields from an untrusted payload.
#[derive(Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    /// Reads `buf` from its start.
    pub fn new(buf: &'a [u8]) -> Reader<'a> {
        Reader { buf }
    }

    /// Bytes not yet read.
    pub fn left(&self) -> usize {
        self.buf.len()
    }

    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], CodecError> {
        if self.buf.len() < n {
            return Err(CodecError::Truncated {
                field,
                need: n,
                left: self.buf.len(),
            });
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], CodecError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, field)?);
        Ok(a)
    }

    /// Reads a u8.
    pub fn u8(&mut self, field: &'static str) -> Result<u8, CodecError> {
        Ok(self.array::<1>(field)?[0])
    }
    /// Reads a u16.
    pub fn u16(&mut self, field: &'static str) -> Result<u16, CodecError> {
        Ok(u16::from_le_bytes(self.array(field)?))
    }
    /// Reads a u32.
    pub fn u32(&mut self, field: &'static str) -> Result<u32, CodecError> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }
    /// Reads an i32.
    pub fn i32(&mut self, field: &'static str) -> Result<i32, CodecError> {
        Ok(i32::from_le_bytes(self.array(field)?))
    }
    /// Reads a u64.
    pub fn u64(&mut self, field: &'static str) -> Result<u64, CodecError> {
        Ok(u64::from_le_bytes(self.array(field)?))
    }
    /// Reads a u16-length string of at most `max` bytes.
    pub fn str(&mut self, field: &'static str, max: usize) -> Result<String, CodecError> {
        let len = usize::from(self.u16(field)?);
        if len > max {
            return Err(CodecError::TooLong { field, len, max });
        }
        let b = self.take(len, field)?;
        std::str::from_utf8(b)
            .map(str::to_owned)
            .map_err(|_| CodecError::Utf8(field))
    }
    /// Reads a u32-length byte string of at most `max` bytes.
    pub fn bytes(&mut self, field: &'static str, max: usize) -> Result<Vec<u8>, CodecError> {
        let len = self.u32(field)? as usize;
        if len > max {
            return Err(CodecError::TooLong { field, len, max });
        }
        Ok(self.take(len, field)?.to_vec())
    }
    /// Reads a u32 element count, checked against `max` and against the bytes left given
    /// that each element takes at least `min_elem` bytes, so no lie can over-allocate.
    pub fn count(
        &mut self,
        field: &'static str,
        max: usize,
        min_elem: usize,
    ) -> Result<usize, CodecError> {
        let len = self.u32(field)? as usize;
        if len > max {
            return Err(CodecError::TooLong { field, len, max });
        }
        let need = len.saturating_mul(min_elem.max(1));
        if need > self.left() {
            return Err(CodecError::Truncated {
                field,
                need,
                left: self.left(),
            });
        }
        Ok(len)
    }
    /// Checks that nothing is left.
    pub fn finish(self) -> Result<(), CodecError> {
        match self.buf.len() {
            0 => Ok(()),
            n => Err(CodecError::Trailing(n)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_round_trip() {
        let mut w = Writer::new();
        w.u8(1)
            .u16(2)
            .u32(3)
            .i32(-4)
            .u64(5)
            .str("héllo", 64)
            .bytes(&[9, 8]);
        let b = w.into_bytes();
        let mut r = Reader::new(&b);
        assert_eq!(r.u8("a"), Ok(1));
        assert_eq!(r.u16("b"), Ok(2));
        assert_eq!(r.u32("c"), Ok(3));
        assert_eq!(r.i32("d"), Ok(-4));
        assert_eq!(r.u64("e"), Ok(5));
        assert_eq!(r.str("f", 64).as_deref(), Ok("héllo"));
        assert_eq!(r.bytes("g", 2), Ok(vec![9, 8]));
        assert_eq!(r.finish(), Ok(()));
    }

    #[test]
    fn strings_are_cut_at_char_boundaries_and_say_so() {
        let mut w = Writer::new();
        w.str("aé", 2)
            .str("abcdefgh", 8)
            .str("abcdefghi", 8)
            .str("aaaaaéé", 8);
        let b = w.into_bytes();
        let mut r = Reader::new(&b);
        assert_eq!(r.str("s", 8).as_deref(), Ok("a"), "no room for a mark");
        assert_eq!(r.str("s", 8).as_deref(), Ok("abcdefgh"), "fits: kept whole");
        assert_eq!(r.str("s", 8).as_deref(), Ok("abcde…"));
        assert_eq!(r.str("s", 8).as_deref(), Ok("aaaaa…"));
        assert_eq!(r.finish(), Ok(()));
    }

    #[test]
    fn lying_lengths_are_refused_without_allocating() {
        let mut w = Writer::new();
        w.u32(u32::MAX);
        let b = w.into_bytes();
        assert!(matches!(
            Reader::new(&b).bytes("x", 1 << 16),
            Err(CodecError::TooLong { .. })
        ));
        assert!(matches!(
            Reader::new(&b).count("x", usize::MAX, 8),
            Err(CodecError::Truncated { .. })
        ));
        assert!(matches!(
            Reader::new(&[0xff, 0xff, 0]).str("s", 8),
            Err(CodecError::TooLong { .. })
        ));
        assert!(matches!(
            Reader::new(&[2, 0, 0xff, 0xfe]).str("s", 8),
            Err(CodecError::Utf8("s"))
        ));
        assert_eq!(Reader::new(&[1]).finish(), Err(CodecError::Trailing(1)));
    }
}
