//! The fixed message header and the protocol's limits.

/// `"MSHD"` read as a little-endian u32: the first four bytes of every message.
pub const MAGIC: u32 = u32::from_le_bytes(*b"MSHD");
/// The newest protocol version this build speaks. Version 2's `Bind` carries the client's
/// `/proc/self/maps` third (then pagemap and, new, `clear_refs`: up to 5 fds), and it adds
/// error codes 18 (`ShadowFull`) and 19 (`OutOfResources`). A version 1 peer sends 2 to 4
/// fds (a fourth is taken as `clear_refs`) and may also receive codes 18 and 19, which an
/// older library reads as `Other(n)`. Version 3 adds external engines (`Grant`,
/// `EngineAttach`, `EngineFault`, `EngineWrite`, `ListEngines`, answers `Granted`,
/// `EngineAttached`, `Written` and `Engines`) and error codes 20
/// (`NoSuchGrant`) and 21 (`Evicted`), and `TraceAck` stream records; version 4 adds
/// monitors (`MonitorSetup`, `Monitor`, `Unmonitor`, answers `MonitorReady`, `Monitored`,
/// `Unmonitored`). Both encode every message as before.
pub const VERSION: u16 = 4;
/// The oldest protocol version this build speaks.
pub const MIN_VERSION: u16 = 1;
/// What this build writes in the header's version field: the version whose encoding its
/// messages use. Protocol 2 encodes every message as protocol 1 did, so it writes 1, which
/// a peer of either version reads; the version a session speaks is settled by `Hello`.
pub const ENCODING_VERSION: u16 = 1;
/// Size of the header on the wire.
pub const HEADER_LEN: usize = 24;
/// Largest payload of one message; a bigger one is refused before it is read into memory.
pub const MAX_PAYLOAD: usize = 64 * 1024;
/// Most file descriptors one message may carry.
pub const MAX_FDS: usize = 5;
/// Header flag: more messages answering the same request follow (streams).
pub const FLAG_MORE: u16 = 1 << 0;
/// Flags this version defines; others are refused.
const KNOWN_FLAGS: u16 = FLAG_MORE;

/// The fixed little-endian header of every message.
///
/// | offset | field | type |
/// |---|---|---|
/// | 0 | magic (`"MSHD"`) | u32 |
/// | 4 | version | u16 |
/// | 6 | msg_type | u16 |
/// | 8 | flags | u16 |
/// | 10 | fd_count | u16 |
/// | 12 | payload_len | u32 |
/// | 16 | request_id | u64 |
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Protocol version the message is encoded in.
    pub version: u16,
    /// Which message this is (see [`crate::message`]).
    pub msg_type: u16,
    /// [`FLAG_MORE`] or 0.
    pub flags: u16,
    /// How many fds ride along as `SCM_RIGHTS`.
    pub fd_count: u16,
    /// Bytes of payload after the header.
    pub payload_len: u32,
    /// Chosen by the requester, echoed in every response to that request.
    pub request_id: u64,
}

/// Why a header was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// Fewer than [`HEADER_LEN`] bytes.
    #[error("message of {0} bytes is shorter than the {HEADER_LEN}-byte header")]
    Short(usize),
    /// Not a memshadow message.
    #[error("bad magic {0:#010x}")]
    Magic(u32),
    /// A version outside `MIN_VERSION..=VERSION`.
    #[error("protocol version {0} is not spoken (this side speaks {MIN_VERSION}..={VERSION})")]
    Version(u16),
    /// Unknown flag bits.
    #[error("unknown header flags {0:#06x}")]
    Flags(u16),
    /// More fds than [`MAX_FDS`].
    #[error("{0} fds exceed the limit of {MAX_FDS}")]
    TooManyFds(u16),
    /// Payload larger than [`MAX_PAYLOAD`].
    #[error("payload of {0} bytes exceeds the limit of {MAX_PAYLOAD}")]
    TooLarge(u32),
    /// `payload_len` disagrees with the bytes that arrived.
    #[error("header says {said} payload bytes, {got} arrived")]
    Length {
        /// What the header claimed.
        said: u32,
        /// What was received.
        got: usize,
    },
}

impl Header {
    /// Encodes the header into its 24 wire bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4..6].copy_from_slice(&self.version.to_le_bytes());
        b[6..8].copy_from_slice(&self.msg_type.to_le_bytes());
        b[8..10].copy_from_slice(&self.flags.to_le_bytes());
        b[10..12].copy_from_slice(&self.fd_count.to_le_bytes());
        b[12..16].copy_from_slice(&self.payload_len.to_le_bytes());
        b[16..24].copy_from_slice(&self.request_id.to_le_bytes());
        b
    }

    /// Decodes and checks a header from the front of `bytes` (a whole received message):
    /// magic, version, flags, limits, and that the payload length matches what arrived.
    pub fn decode(bytes: &[u8]) -> Result<Header, HeaderError> {
        let Some(b) = bytes.first_chunk::<HEADER_LEN>() else {
            return Err(HeaderError::Short(bytes.len()));
        };
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let magic = u32_at(0);
        if magic != MAGIC {
            return Err(HeaderError::Magic(magic));
        }
        let mut id = [0u8; 8];
        id.copy_from_slice(&b[16..24]);
        let h = Header {
            version: u16_at(4),
            msg_type: u16_at(6),
            flags: u16_at(8),
            fd_count: u16_at(10),
            payload_len: u32_at(12),
            request_id: u64::from_le_bytes(id),
        };
        if !(MIN_VERSION..=VERSION).contains(&h.version) {
            return Err(HeaderError::Version(h.version));
        }
        if h.flags & !KNOWN_FLAGS != 0 {
            return Err(HeaderError::Flags(h.flags));
        }
        if usize::from(h.fd_count) > MAX_FDS {
            return Err(HeaderError::TooManyFds(h.fd_count));
        }
        if h.payload_len as usize > MAX_PAYLOAD {
            return Err(HeaderError::TooLarge(h.payload_len));
        }
        let got = bytes.len() - HEADER_LEN;
        if h.payload_len as usize != got {
            return Err(HeaderError::Length {
                said: h.payload_len,
                got,
            });
        }
        Ok(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        Header {
            version: VERSION,
            msg_type: 7,
            flags: FLAG_MORE,
            fd_count: 2,
            payload_len: 3,
            request_id: 0x1122_3344_5566_7788,
        }
    }

    #[test]
    fn round_trips_and_is_little_endian() {
        let h = sample();
        let mut bytes = h.encode().to_vec();
        assert_eq!(&bytes[0..4], b"MSHD");
        assert_eq!(bytes[16], 0x88, "request id is little-endian");
        bytes.extend_from_slice(&[1, 2, 3]);
        assert_eq!(Header::decode(&bytes), Ok(h));
    }

    #[test]
    fn refuses_every_bad_field() {
        let good = {
            let mut b = sample().encode().to_vec();
            b.extend_from_slice(&[0; 3]);
            b
        };
        assert_eq!(Header::decode(&good[..10]), Err(HeaderError::Short(10)));
        let mut b = good.clone();
        b[0] = b'X';
        assert!(matches!(Header::decode(&b), Err(HeaderError::Magic(_))));
        let mut b = good.clone();
        b[4..6].copy_from_slice(&(VERSION + 1).to_le_bytes());
        assert_eq!(Header::decode(&b), Err(HeaderError::Version(VERSION + 1)));
        let mut b = good.clone();
        b[8] = 0x80;
        assert!(matches!(Header::decode(&b), Err(HeaderError::Flags(_))));
        let mut b = good.clone();
        b[10] = MAX_FDS as u8 + 1;
        assert!(matches!(
            Header::decode(&b),
            Err(HeaderError::TooManyFds(_))
        ));
        let mut b = good.clone();
        b[12..16].copy_from_slice(&(MAX_PAYLOAD as u32 + 1).to_le_bytes());
        assert!(matches!(Header::decode(&b), Err(HeaderError::TooLarge(_))));
        let mut b = good.clone();
        b.push(0);
        assert_eq!(
            Header::decode(&b),
            Err(HeaderError::Length { said: 3, got: 4 })
        );
    }
}
