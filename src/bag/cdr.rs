//! OMG CDR (XCDR1), as ROS 2 serializes messages: a 4-byte encapsulation header (`00 01 00 00`
//! little-endian, `00 00 00 00` big-endian), then the fields, each primitive aligned to its own
//! size counted from the end of the header; strings as a `u32` length including the NUL, the
//! bytes and the NUL; sequences as a `u32` count and the elements.
//!
//! Our own small codec rather than the serde `cdr` crate: that crate allocates whatever length a
//! (corrupt) sequence header claims before checking it against the input, and copies every byte
//! buffer; here every length is checked against the bytes that remain, errors name the field and
//! the offset, and image data is borrowed from the bag's memory map.

/// A message that does not decode.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CdrError {
    #[error("message is {0} bytes, shorter than the 4-byte CDR encapsulation header")]
    NoHeader(usize),
    #[error("unsupported CDR encapsulation {0:#04x}{1:02x} (expected CDR little- or big-endian)")]
    Encapsulation(u8, u8),
    #[error("field `{field}` at byte {offset}: needs {needed} bytes, {left} left")]
    Truncated {
        field: &'static str,
        offset: usize,
        needed: usize,
        left: usize,
    },
    #[error("field `{field}` at byte {offset}: {reason}")]
    Invalid {
        field: &'static str,
        offset: usize,
        reason: String,
    },
}

/// Reads one message's fields in declaration order.
pub struct CdrReader<'a> {
    body: &'a [u8],
    pos: usize,
    big_endian: bool,
}

macro_rules! read_prim {
    ($name:ident, $t:ty) => {
        pub fn $name(&mut self, field: &'static str) -> Result<$t, CdrError> {
            const N: usize = std::mem::size_of::<$t>();
            let bytes: [u8; N] =
                self.take_aligned(N, N, field)?
                    .try_into()
                    .map_err(|_| CdrError::Invalid {
                        field,
                        offset: self.pos,
                        reason: "internal length".into(),
                    })?;
            Ok(if self.big_endian {
                <$t>::from_be_bytes(bytes)
            } else {
                <$t>::from_le_bytes(bytes)
            })
        }
    };
}

impl<'a> CdrReader<'a> {
    /// Checks the encapsulation header of serialized message bytes (as stored in bags).
    pub fn new(data: &'a [u8]) -> Result<Self, CdrError> {
        if data.len() < 4 {
            return Err(CdrError::NoHeader(data.len()));
        }
        let big_endian = match (data[0], data[1]) {
            (0, 1) => false,
            (0, 0) => true,
            (a, b) => return Err(CdrError::Encapsulation(a, b)),
        };
        Ok(Self {
            body: &data[4..],
            pos: 0,
            big_endian,
        })
    }

    /// Bytes after the last field read. Fast-CDR may leave up to 3 bytes of padding at the end.
    pub fn remaining(&self) -> usize {
        self.body.len() - self.pos
    }

    fn take_aligned(
        &mut self,
        align: usize,
        len: usize,
        field: &'static str,
    ) -> Result<&'a [u8], CdrError> {
        let start = self.pos.next_multiple_of(align);
        let end = start.checked_add(len).filter(|&e| e <= self.body.len());
        match end {
            Some(end) => {
                self.pos = end;
                Ok(&self.body[start..end])
            }
            None => Err(CdrError::Truncated {
                field,
                offset: start + 4,
                needed: len,
                left: self.body.len().saturating_sub(start),
            }),
        }
    }

    read_prim!(u8, u8);
    read_prim!(i8, i8);
    read_prim!(u16, u16);
    read_prim!(i16, i16);
    read_prim!(u32, u32);
    read_prim!(i32, i32);
    read_prim!(u64, u64);
    read_prim!(i64, i64);
    read_prim!(f32, f32);
    read_prim!(f64, f64);

    pub fn bool(&mut self, field: &'static str) -> Result<bool, CdrError> {
        match self.u8(field)? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(CdrError::Invalid {
                field,
                offset: self.pos + 3,
                reason: format!("boolean byte {v} (expected 0 or 1)"),
            }),
        }
    }

    /// A sequence length whose elements (at least `min_elem` bytes each) fit in what is left.
    pub fn seq_len(&mut self, field: &'static str, min_elem: usize) -> Result<usize, CdrError> {
        let n = self.u32(field)? as usize;
        let fits = n
            .checked_mul(min_elem.max(1))
            .is_some_and(|b| b <= self.remaining());
        if fits {
            Ok(n)
        } else {
            Err(CdrError::Invalid {
                field,
                offset: self.pos,
                reason: format!(
                    "sequence claims {n} elements, only {} bytes left",
                    self.remaining()
                ),
            })
        }
    }

    /// A `uint8[]`, borrowed.
    pub fn bytes(&mut self, field: &'static str) -> Result<&'a [u8], CdrError> {
        let n = self.seq_len(field, 1)?;
        self.take_aligned(1, n, field)
    }

    /// A `string` (UTF-8, NUL-terminated on the wire).
    pub fn string(&mut self, field: &'static str) -> Result<String, CdrError> {
        let n = self.seq_len(field, 1)?;
        let offset = self.pos + 4;
        let raw = self.take_aligned(1, n, field)?;
        // Length 0 (no NUL) is tolerated, as some writers emit it for empty strings.
        let text = match raw.split_last() {
            Some((0, text)) => text,
            Some(_) => {
                return Err(CdrError::Invalid {
                    field,
                    offset,
                    reason: "string is not NUL-terminated".into(),
                });
            }
            None => raw,
        };
        String::from_utf8(text.to_vec()).map_err(|e| CdrError::Invalid {
            field,
            offset,
            reason: format!("string is not UTF-8: {e}"),
        })
    }

    pub fn string_seq(&mut self, field: &'static str) -> Result<Vec<String>, CdrError> {
        let n = self.seq_len(field, 4)?;
        (0..n).map(|_| self.string(field)).collect()
    }

    pub fn f64_seq(&mut self, field: &'static str) -> Result<Vec<f64>, CdrError> {
        let n = self.seq_len(field, 8)?;
        (0..n).map(|_| self.f64(field)).collect()
    }

    pub fn f32_seq(&mut self, field: &'static str) -> Result<Vec<f32>, CdrError> {
        let n = self.seq_len(field, 4)?;
        (0..n).map(|_| self.f32(field)).collect()
    }

    /// The message ended early or has more than padding after its last field.
    pub fn finish(&self, message: &'static str) -> Result<(), CdrError> {
        if self.remaining() > 7 {
            return Err(CdrError::Invalid {
                field: message,
                offset: self.pos + 4,
                reason: format!(
                    "{} bytes after the last field (wrong message type?)",
                    self.remaining()
                ),
            });
        }
        Ok(())
    }
}

/// Writes little-endian CDR with the encapsulation header; padding bytes are zero.
pub struct CdrWriter {
    buf: Vec<u8>,
}

impl Default for CdrWriter {
    fn default() -> Self {
        Self::new()
    }
}

macro_rules! write_prim {
    ($name:ident, $t:ty) => {
        pub fn $name(&mut self, v: $t) -> &mut Self {
            self.align(std::mem::size_of::<$t>());
            self.buf.extend_from_slice(&v.to_le_bytes());
            self
        }
    };
}

impl CdrWriter {
    pub fn new() -> Self {
        Self {
            buf: vec![0, 1, 0, 0],
        }
    }

    fn align(&mut self, n: usize) {
        let body = self.buf.len() - 4;
        self.buf.resize(4 + body.next_multiple_of(n), 0);
    }

    write_prim!(u8, u8);
    write_prim!(i8, i8);
    write_prim!(u16, u16);
    write_prim!(i16, i16);
    write_prim!(u32, u32);
    write_prim!(i32, i32);
    write_prim!(u64, u64);
    write_prim!(i64, i64);
    write_prim!(f32, f32);
    write_prim!(f64, f64);

    pub fn bool(&mut self, v: bool) -> &mut Self {
        self.u8(u8::from(v))
    }

    fn len(&mut self, n: usize) -> &mut Self {
        // Messages over 4 GiB cannot be expressed in CDR; saturate (the reader rejects them).
        self.u32(u32::try_from(n).unwrap_or(u32::MAX))
    }

    pub fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.len(v.len());
        self.buf.extend_from_slice(v);
        self
    }

    pub fn string(&mut self, v: &str) -> &mut Self {
        self.len(v.len() + 1);
        self.buf.extend_from_slice(v.as_bytes());
        self.buf.push(0);
        self
    }

    pub fn string_seq(&mut self, v: &[String]) -> &mut Self {
        self.len(v.len());
        for s in v {
            self.string(s);
        }
        self
    }

    pub fn f64_seq(&mut self, v: &[f64]) -> &mut Self {
        self.len(v.len());
        for &x in v {
            self.f64(x);
        }
        self
    }

    pub fn f32_seq(&mut self, v: &[f32]) -> &mut Self {
        self.len(v.len());
        for &x in v {
            self.f32(x);
        }
        self
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alignment_counts_from_the_body_and_strings_carry_their_nul() {
        let mut w = CdrWriter::new();
        w.u8(7).f64(1.5).string("ab").u32(9);
        let b = w.into_bytes();
        assert_eq!(&b[..4], &[0, 1, 0, 0]);
        // u8 at 0, f64 aligned to 8, string length 3 at 16, "ab\0", u32 aligned to 24.
        assert_eq!(b.len(), 4 + 28);
        assert_eq!(&b[4 + 16..4 + 23], &[3, 0, 0, 0, b'a', b'b', 0]);
        let mut r = CdrReader::new(&b).unwrap();
        assert_eq!(r.u8("a").unwrap(), 7);
        assert_eq!(r.f64("b").unwrap(), 1.5);
        assert_eq!(r.string("c").unwrap(), "ab");
        assert_eq!(r.u32("d").unwrap(), 9);
        assert_eq!(r.remaining(), 0);
    }

    #[test]
    fn big_endian_bodies_decode() {
        let mut b = vec![0u8, 0, 0, 0];
        b.extend_from_slice(&258u32.to_be_bytes());
        b.extend_from_slice(&0u32.to_be_bytes());
        b.extend_from_slice(&2.0f64.to_be_bytes());
        let mut r = CdrReader::new(&b).unwrap();
        assert_eq!(r.u32("x").unwrap(), 258);
        assert_eq!(r.f64("y").unwrap(), 2.0);
    }

    #[test]
    fn lying_lengths_are_errors_not_allocations() {
        let mut w = CdrWriter::new();
        w.u32(u32::MAX);
        let b = w.into_bytes();
        let e = CdrReader::new(&b).unwrap().bytes("data").unwrap_err();
        assert!(e.to_string().contains("data"), "{e}");
        let e = CdrReader::new(&b).unwrap().f64_seq("position").unwrap_err();
        assert!(e.to_string().contains("4294967295"), "{e}");
        assert!(CdrReader::new(&[0, 1]).is_err());
        assert!(CdrReader::new(&[0, 7, 0, 0]).is_err());
        let mut w = CdrWriter::new();
        w.bytes(b"ab");
        assert!(
            CdrReader::new(&w.into_bytes())
                .unwrap()
                .string("s")
                .is_err()
        );
    }
}
