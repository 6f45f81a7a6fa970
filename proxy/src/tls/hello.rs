//! The TLS ClientHello parser: a pure function over the first bytes of a connection that yields the SNI and ALPN
//! without terminating TLS, or says that more bytes are needed.
//!
//! The listener calls [`parse`] on everything peeked so far, again each time more arrives. The answer is stable
//! as bytes are added: a prefix either gives [`Parse::NeedMore`] or exactly the answer of the longer input, so a
//! hello dribbled one byte at a time parses the same as one read whole. Bytes that are already invalid are an error
//! at once, never a `NeedMore`.
//!
//! Decisions worth knowing:
//! - Records are checked as TLSPlaintext, which a ClientHello always is: content type 22, version 3.x, length
//!   1..=2^14. RFC 8446 §5.1 gives no leeway above 2^14 for plaintext (the +2048 is for ciphertext), so neither do we.
//! - A hello split over several handshake records (big post-quantum hellos, deliberate fragmentation) is
//!   reassembled; no other record type may be interleaved, and the hello must end at a record boundary (§5.1).
//! - A hello is parsed only within [`MAX_HELLO_BYTES`] of records: one that cannot fit is [`HelloError::TooLarge`]
//!   as soon as that is known, so `NeedMore` always means a buffer of `MAX_HELLO_BYTES` can still complete it.
//! - The single-record hello, by far the usual one, is parsed in place; a fragmented one is copied once into an
//!   owned buffer held by the [`ClientHello`].

use std::borrow::Cow;
use std::fmt;
use std::ops::Range;

/// The most bytes of records the gateway peeks for one hello: 16 KiB holds every real ClientHello, post-quantum
/// key shares included, several times over. The listener sizes its peek buffer to this; [`parse`] enforces it.
pub const MAX_HELLO_BYTES: usize = 16 * 1024;

const RECORD_HEADER: usize = 5;
const MAX_RECORD_PAYLOAD: usize = 1 << 14;
const CONTENT_HANDSHAKE: u8 = 22;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const HANDSHAKE_HEADER: usize = 4;
const EXT_SERVER_NAME: u16 = 0;
const EXT_ALPN: u16 = 16;
const NAME_TYPE_HOST_NAME: u8 = 0;
/// BoringSSL's (so Envoy's) limit for a host_name.
const MAX_HOST_NAME: usize = 255;

/// The result of parsing the bytes peeked so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parse<'a> {
    Complete(ClientHello<'a>),
    /// The bytes so far are a valid beginning of a ClientHello: read more and parse again.
    NeedMore,
}

/// Why the first bytes of a connection are not a ClientHello the gateway can route. Every variant is the client's
/// fault (or not a TLS client at all); the gateway's only move is to close the connection.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum HelloError {
    #[error("client did not start with a TLS handshake record (plaintext or another protocol on a TLS port?)")]
    NotTls,
    #[error("client's first TLS handshake message is not a ClientHello")]
    NotClientHello,
    #[error("client sent a malformed TLS ClientHello: {0}")]
    Malformed(&'static str),
    #[error("client's TLS ClientHello does not fit in the gateway's {MAX_HELLO_BYTES}-byte peek cap")]
    TooLarge,
}

/// A complete, validated ClientHello.
#[derive(Clone, PartialEq, Eq)]
pub struct ClientHello<'a> {
    /// The handshake message, header included: borrowed from the input when it came in one record.
    msg: Cow<'a, [u8]>,
    consumed: usize,
    records: usize,
    /// Where the host_name is in `msg`.
    server_name: Option<Range<usize>>,
    /// Where the ALPN protocol_name_list's entries are in `msg`.
    alpn: Option<Range<usize>>,
}

impl<'a> ClientHello<'a> {
    /// The host_name of the server_name extension: printable ASCII, 1 to 255 bytes, case as the client sent it.
    pub fn server_name(&self) -> Option<&str> {
        // Validated as ASCII when parsed, so this never fails.
        self.server_name.clone().and_then(|r| std::str::from_utf8(&self.msg[r]).ok())
    }

    /// The ALPN protocols in the client's order of preference; none when the extension is absent.
    // `use<'_>`: the iterator borrows only `self`, not the input `'a`, so a temporary input can be dropped after.
    pub fn alpn_protocols(&self) -> impl Iterator<Item = &[u8]> + use<'_> {
        let mut rest = self.alpn.clone().map_or(&[][..], |r| &self.msg[r]);
        std::iter::from_fn(move || {
            let (&len, tail) = rest.split_first()?;
            let (name, tail) = tail.split_at_checked(usize::from(len))?;
            rest = tail;
            Some(name)
        })
    }

    /// How many bytes of the input the hello's records took: the bytes to forward before anything read after them.
    pub fn consumed(&self) -> usize {
        self.consumed
    }

    /// How many TLS records the hello came in.
    pub fn records(&self) -> usize {
        self.records
    }
}

impl fmt::Debug for ClientHello<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let alpn: Vec<_> = self.alpn_protocols().map(String::from_utf8_lossy).collect();
        f.debug_struct("ClientHello")
            .field("server_name", &self.server_name())
            .field("alpn", &alpn)
            .field("consumed", &self.consumed)
            .field("records", &self.records)
            .finish()
    }
}

/// Parses the first bytes of a connection. Call it again with all the bytes so far whenever it says `NeedMore`.
pub fn parse(buf: &[u8]) -> Result<Parse<'_>, HelloError> {
    let walk = walk_records(buf);
    // The body's bytes come before whatever stopped the walk, so the body's own error wins: that keeps the answer
    // the same however the bytes were split.
    match parse_message(&walk.msg) {
        Err(Stop::Invalid(e)) => Err(e),
        Err(Stop::NeedMore) => match walk.stop {
            Some(Stop::Invalid(e)) => Err(e),
            _ => Ok(Parse::NeedMore),
        },
        Ok(found) if walk.declared > found.len => {
            Err(HelloError::Malformed("the ClientHello does not end at a record boundary"))
        }
        Ok(found) => Ok(Parse::Complete(ClientHello {
            msg: walk.msg,
            consumed: walk.consumed,
            records: walk.records,
            server_name: found.server_name,
            alpn: found.alpn,
        })),
    }
}

/// Why parsing stopped short of a ClientHello.
enum Stop {
    NeedMore,
    Invalid(HelloError),
}

impl From<HelloError> for Stop {
    fn from(e: HelloError) -> Self {
        Stop::Invalid(e)
    }
}

fn malformed(why: &'static str) -> Stop {
    Stop::Invalid(HelloError::Malformed(why))
}

/// The handshake bytes gathered from the records, and why the walk stopped before the message was whole, if it did.
struct Walk<'a> {
    msg: Cow<'a, [u8]>,
    /// Bytes the records carrying `msg` declared, which can exceed `msg.len()` while the last one is partial.
    declared: usize,
    consumed: usize,
    records: usize,
    stop: Option<Stop>,
}

/// Gathers handshake records until they hold the whole handshake message its header announces.
fn walk_records(buf: &[u8]) -> Walk<'_> {
    let mut walk = Walk { msg: Cow::Borrowed(&[]), declared: 0, consumed: 0, records: 0, stop: None };
    loop {
        if let Some(total) = message_len(&walk.msg)
            && walk.msg.len() >= total
        {
            return walk;
        }
        let off = walk.consumed;
        // Another record is needed: it takes a header and at least one byte, which must fit under the cap.
        if off + RECORD_HEADER + 1 > MAX_HELLO_BYTES {
            walk.stop = Some(Stop::Invalid(HelloError::TooLarge));
            return walk;
        }
        let len = match record_header(&buf[off..], walk.records == 0) {
            Ok(len) => len,
            Err(stop) => {
                walk.stop = Some(stop);
                return walk;
            }
        };
        if off + RECORD_HEADER + len > MAX_HELLO_BYTES {
            walk.stop = Some(Stop::Invalid(HelloError::TooLarge));
            return walk;
        }
        let start = off + RECORD_HEADER;
        let end = start + len;
        let fragment = &buf[start..end.min(buf.len())];
        if walk.msg.is_empty() {
            walk.msg = Cow::Borrowed(fragment);
        } else {
            walk.msg.to_mut().extend_from_slice(fragment);
        }
        walk.declared += len;
        walk.records += 1;
        if end > buf.len() {
            walk.stop = Some(Stop::NeedMore);
            return walk;
        }
        walk.consumed = end;
    }
}

/// The length of the whole handshake message, once its header is there.
fn message_len(msg: &[u8]) -> Option<usize> {
    match msg {
        [_, a, b, c, ..] => Some(HANDSHAKE_HEADER + u24([*a, *b, *c])),
        _ => None,
    }
}

fn u24(b: [u8; 3]) -> usize {
    usize::from(b[0]) << 16 | usize::from(b[1]) << 8 | usize::from(b[2])
}

/// Checks a record header, as much of it as there is, and returns the record's payload length.
fn record_header(h: &[u8], first: bool) -> Result<usize, Stop> {
    // On the first record a wrong type or version means another protocol; later, a broken TLS client.
    let not_tls = |why| if first { Stop::Invalid(HelloError::NotTls) } else { malformed(why) };
    match h.first() {
        None => return Err(Stop::NeedMore),
        Some(&t) if t != CONTENT_HANDSHAKE => return Err(not_tls("a record of another type inside the ClientHello")),
        _ => {}
    }
    match h.get(1) {
        None => return Err(Stop::NeedMore),
        Some(&major) if major != 3 => return Err(not_tls("a record version other than 3.x")),
        _ => {}
    }
    // The high byte alone can already tell an oversized record.
    match h.get(3) {
        None => return Err(Stop::NeedMore),
        Some(&hi) if usize::from(hi) << 8 > MAX_RECORD_PAYLOAD => {
            return Err(malformed("a record longer than 2^14 bytes"));
        }
        _ => {}
    }
    let len = match h.get(3..5) {
        Some(&[hi, lo]) => usize::from(u16::from_be_bytes([hi, lo])),
        _ => return Err(Stop::NeedMore),
    };
    if len == 0 {
        return Err(malformed("an empty handshake record"));
    }
    if len > MAX_RECORD_PAYLOAD {
        return Err(malformed("a record longer than 2^14 bytes"));
    }
    Ok(len)
}

/// What the message parse found, as ranges into the message.
struct Found {
    len: usize,
    server_name: Option<Range<usize>>,
    alpn: Option<Range<usize>>,
}

/// Parses the (possibly still partial) handshake message: RFC 8446 §4.1.2 for the hello, RFC 6066 §3 for SNI,
/// RFC 7301 §3.1 for ALPN.
fn parse_message(msg: &[u8]) -> Result<Found, Stop> {
    let mut r = Reader { buf: msg, pos: 0, end: HANDSHAKE_HEADER };
    if r.u8("a truncated handshake header")? != HANDSHAKE_CLIENT_HELLO {
        return Err(Stop::Invalid(HelloError::NotClientHello));
    }
    let body_len = r.u24("a truncated handshake header")?;
    let len = HANDSHAKE_HEADER + body_len;
    // At least one record header comes with the message.
    if RECORD_HEADER + len > MAX_HELLO_BYTES {
        return Err(Stop::Invalid(HelloError::TooLarge));
    }
    r.end = len;
    r.buf = &msg[..msg.len().min(len)];

    // The major version alone is enough to refuse.
    if r.u8("a truncated legacy_version")? != 3 {
        return Err(malformed("a legacy_version other than 3.x"));
    }
    r.take(1, "a truncated legacy_version")?;
    r.take(32, "a truncated random")?;
    let session_id = r.u8("a truncated session id")?;
    if session_id > 32 {
        return Err(malformed("a session id longer than 32 bytes"));
    }
    r.take(usize::from(session_id), "a session id longer than the hello")?;
    let suites = r.len16("truncated cipher suites")?;
    if suites < 2 || suites % 2 != 0 {
        return Err(malformed("a cipher suite list that is empty or of odd length"));
    }
    r.take(suites, "cipher suites longer than the hello")?;
    let compression = r.u8("truncated compression methods")?;
    if compression == 0 {
        return Err(malformed("an empty compression method list"));
    }
    r.take(usize::from(compression), "compression methods longer than the hello")?;

    let mut found = Found { len, server_name: None, alpn: None };
    // Extensions are optional before TLS 1.3: a hello may end right after the compression methods.
    if r.pos == r.end {
        return Ok(found);
    }
    let ext_len = r.len16("a truncated extensions length")?;
    if r.pos + ext_len != r.end {
        return Err(malformed("an extensions length that does not match the hello length"));
    }
    let mut seen = SeenTypes::default();
    while r.pos < r.end {
        let ext_type = r.u16("a truncated extension header")?;
        if !seen.insert(ext_type) {
            return Err(malformed("a duplicate extension"));
        }
        let len = r.len16("a truncated extension header")?;
        let mut data = r.nested(len, "an extension longer than the extensions block")?;
        match ext_type {
            EXT_SERVER_NAME => found.server_name = Some(parse_server_name(&mut data)?),
            EXT_ALPN => found.alpn = Some(parse_alpn(&mut data)?),
            _ => {
                // Only needs to be there: `nested` already checked it fits.
                data.take(len, "")?;
            }
        }
    }
    Ok(found)
}

/// Returns where the host_name is. RFC 6066 allows one name per type and defines only host_name; other types
/// share its shape, so they are skipped rather than refused.
fn parse_server_name(r: &mut Reader<'_>) -> Result<Range<usize>, Stop> {
    let list = r.len16("a truncated server_name extension")?;
    if list == 0 {
        return Err(malformed("an empty server_name list"));
    }
    if r.pos + list != r.end {
        return Err(malformed("a server_name list length that does not match its extension"));
    }
    let mut host_name = None;
    while r.pos < r.end {
        let name_type = r.u8("a truncated server_name entry")?;
        let len = r.len16("a truncated server_name entry")?;
        if len == 0 {
            return Err(malformed("an empty server name"));
        }
        if name_type != NAME_TYPE_HOST_NAME {
            r.take(len, "a server name longer than its list")?;
            continue;
        }
        if host_name.is_some() {
            return Err(malformed("two host_name entries in server_name"));
        }
        if len > MAX_HOST_NAME {
            return Err(malformed("a host_name longer than 255 bytes"));
        }
        // Checked on what is there before asking for the rest, so a bad byte is refused at once.
        if r.available(len, "a host_name longer than its list")?.iter().any(|b| !b.is_ascii_graphic()) {
            return Err(malformed("a host_name with bytes other than printable ASCII"));
        }
        let start = r.pos;
        // Bounds checked by `available` above.
        r.take(len, "")?;
        host_name = Some(start..r.pos);
    }
    host_name.ok_or_else(|| malformed("a server_name extension with no host_name"))
}

/// Returns where the protocol names are.
fn parse_alpn(r: &mut Reader<'_>) -> Result<Range<usize>, Stop> {
    let list = r.len16("a truncated ALPN extension")?;
    if list == 0 {
        return Err(malformed("an empty ALPN protocol list"));
    }
    if r.pos + list != r.end {
        return Err(malformed("an ALPN list length that does not match its extension"));
    }
    let start = r.pos;
    while r.pos < r.end {
        let len = r.u8("a truncated ALPN protocol name")?;
        if len == 0 {
            return Err(malformed("an empty ALPN protocol name"));
        }
        r.take(usize::from(len), "an ALPN protocol name longer than its list")?;
    }
    Ok(start..r.end)
}

/// Reads a length-prefixed structure of which `buf` may hold only a prefix. Positions are offsets into the message.
/// Reading past `end` (what the enclosing lengths allow) is malformed; reading past the bytes there is `NeedMore`.
struct Reader<'m> {
    buf: &'m [u8],
    pos: usize,
    end: usize,
}

impl<'m> Reader<'m> {
    /// The next `n` bytes, or as many of them as have arrived, without moving on.
    fn available(&self, n: usize, overrun: &'static str) -> Result<&'m [u8], Stop> {
        let stop = self.pos + n;
        if stop > self.end {
            return Err(malformed(overrun));
        }
        Ok(self.buf.get(self.pos..stop.min(self.buf.len())).unwrap_or_default())
    }

    fn take(&mut self, n: usize, overrun: &'static str) -> Result<&'m [u8], Stop> {
        let bytes = self.available(n, overrun)?;
        if bytes.len() < n {
            return Err(Stop::NeedMore);
        }
        self.pos += n;
        Ok(bytes)
    }

    fn u8(&mut self, overrun: &'static str) -> Result<u8, Stop> {
        Ok(self.take(1, overrun)?[0])
    }

    fn u16(&mut self, overrun: &'static str) -> Result<u16, Stop> {
        let b = self.take(2, overrun)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    /// A 16-bit length.
    fn len16(&mut self, overrun: &'static str) -> Result<usize, Stop> {
        self.u16(overrun).map(usize::from)
    }

    fn u24(&mut self, overrun: &'static str) -> Result<usize, Stop> {
        let b = self.take(3, overrun)?;
        Ok(u24([b[0], b[1], b[2]]))
    }

    /// A reader over the next `n` bytes, which this one skips: the nested one must be read to its end.
    fn nested(&mut self, n: usize, overrun: &'static str) -> Result<Reader<'m>, Stop> {
        self.available(n, overrun)?;
        let nested = Reader { buf: self.buf, pos: self.pos, end: self.pos + n };
        self.pos += n;
        Ok(nested)
    }
}

/// The extension types met so far, to refuse duplicates (RFC 8446 §4.2). Real clients send fewer than 32
/// extensions, checked in a short list; past that a bitmap over all 2^16 types keeps a hostile hello with
/// thousands of extensions linear. Both live on the stack: the bitmap is only written when it is needed.
#[derive(Default)]
struct SeenTypes {
    few: [u16; 32],
    len: usize,
    all: Option<[u64; 1024]>,
}

impl SeenTypes {
    /// Records `t`; false if it was already there.
    fn insert(&mut self, t: u16) -> bool {
        let (word, bit) = (usize::from(t / 64), 1u64 << (t % 64));
        if let Some(all) = &mut self.all {
            let new = all[word] & bit == 0;
            all[word] |= bit;
            return new;
        }
        if self.few[..self.len].contains(&t) {
            return false;
        }
        if self.len < self.few.len() {
            self.few[self.len] = t;
            self.len += 1;
            return true;
        }
        let mut all = [0u64; 1024];
        for &seen in self.few.iter().chain([&t]) {
            all[usize::from(seen / 64)] |= 1 << (seen % 64);
        }
        self.all = Some(all);
        true
    }
}

/// Panics unless `parse`'s answers on `data` hold together: a complete hello lies within the input and the
/// cap and parses the same from its own bytes; its SNI and ALPN are well formed; "need more" only below the
/// cap; and each prefix at `cuts` needs more or already gives the final answer. Shared by the fuzz target
/// (`proxy/fuzz`) and the seeded mutation test that stands in for it in CI.
#[doc(hidden)]
pub fn check_invariants(data: &[u8], cuts: impl IntoIterator<Item = usize>) {
    let full = parse(data);
    match &full {
        Ok(Parse::Complete(hello)) => {
            assert!(hello.consumed() <= data.len().min(MAX_HELLO_BYTES));
            assert_eq!(parse(&data[..hello.consumed()]), full, "the hello's own bytes give the same hello");
            if let Some(name) = hello.server_name() {
                assert!(!name.is_empty() && name.bytes().all(|b| b.is_ascii_graphic()));
            }
            assert!(hello.alpn_protocols().all(|p| !p.is_empty()));
        }
        Ok(Parse::NeedMore) => assert!(data.len() < MAX_HELLO_BYTES, "NeedMore past the cap"),
        Err(_) => {}
    }
    for cut in cuts {
        let cut = cut.min(data.len());
        let prefix = parse(&data[..cut]);
        assert!(prefix == Ok(Parse::NeedMore) || prefix == full, "prefix {cut}: {prefix:?} vs full {full:?}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};

    const ISTIO_SNI: &str = "outbound_.9080_._.reviews.default.svc.cluster.local";
    const ISTIO_ALPN: &[&[u8]] = &[b"istio-peer-exchange", b"istio"];

    /// A hello captured from a real client by `tests/vectors/capture.sh`, and what it must parse to.
    struct Vector {
        name: &'static str,
        bytes: &'static [u8],
        sni: Option<&'static str>,
        alpn: &'static [&'static [u8]],
        records: usize,
    }

    macro_rules! vector {
        ($name:literal, $sni:expr, $alpn:expr, $records:expr) => {
            Vector {
                name: $name,
                bytes: include_bytes!(concat!("../../tests/vectors/", $name, ".bin")),
                sni: $sni,
                alpn: $alpn,
                records: $records,
            }
        };
    }

    const VECTORS: &[Vector] = &[
        vector!("openssl", Some(ISTIO_SNI), ISTIO_ALPN, 1),
        vector!("openssl-nosni", None, ISTIO_ALPN, 1),
        vector!("openssl-noalpn", Some(ISTIO_SNI), &[], 1),
        vector!("openssl-tls12", Some(ISTIO_SNI), ISTIO_ALPN, 1),
        vector!("curl", Some("reviews.default.svc.cluster.local"), &[b"h2", b"http/1.1"], 1),
        vector!("envoy", Some(ISTIO_SNI), ISTIO_ALPN, 1),
        vector!("rustls-pq", Some(ISTIO_SNI), ISTIO_ALPN, 1),
        vector!("rustls-fragmented", Some(ISTIO_SNI), ISTIO_ALPN, 4),
        vector!("rustls-tiny-records", Some(ISTIO_SNI), ISTIO_ALPN, 27),
    ];

    fn complete(buf: &[u8]) -> ClientHello<'_> {
        match parse(buf) {
            Ok(Parse::Complete(hello)) => hello,
            other => panic!("expected a complete hello, got {other:?}"),
        }
    }

    fn malformed(buf: &[u8]) -> &'static str {
        match parse(buf) {
            Err(HelloError::Malformed(why)) => why,
            other => panic!("expected Malformed, got {other:?}"),
        }
    }

    #[test]
    fn real_clients_parse_to_their_sni_and_alpn() {
        for v in VECTORS {
            let hello = complete(v.bytes);
            assert_eq!(hello.server_name(), v.sni, "{}", v.name);
            assert_eq!(hello.alpn_protocols().collect::<Vec<_>>(), v.alpn, "{}", v.name);
            assert_eq!(hello.consumed(), v.bytes.len(), "{}", v.name);
            assert_eq!(hello.records(), v.records, "{}", v.name);
        }
    }

    #[test]
    fn post_quantum_hellos_are_big_and_fragmented_ones_reassemble_to_the_same() {
        let by_name = |name| VECTORS.iter().find(|v| v.name == name).unwrap().bytes;
        // X25519MLKEM768's 1216-byte key share makes rustls' and Envoy's hellos exceed 1.5 KB.
        assert!(by_name("rustls-pq").len() > 1536);
        assert!(by_name("envoy").len() > 1400);
        assert!(matches!(complete(by_name("rustls-pq")).msg, Cow::Borrowed(_)), "one record is parsed in place");
        for name in ["rustls-fragmented", "rustls-tiny-records"] {
            let hello = complete(by_name(name));
            // Same handshake message length as the one-record hello, spread over several records.
            assert_eq!(hello.msg.len(), complete(by_name("rustls-pq")).msg.len(), "{name}");
            assert!(matches!(hello.msg, Cow::Owned(_)), "{name}");
        }
    }

    #[test]
    fn every_prefix_needs_more_until_the_hello_is_complete() {
        for v in VECTORS {
            for cut in 0..v.bytes.len() {
                assert_eq!(parse(&v.bytes[..cut]), Ok(Parse::NeedMore), "{} cut at {cut}", v.name);
            }
            // Whatever follows the hello (early data, a client that does not wait) is not part of it.
            let mut more = v.bytes.to_vec();
            more.extend_from_slice(b"\x17\x03\x03\x00\x05hello");
            assert_eq!(parse(&more), parse(v.bytes), "{}", v.name);
        }
    }

    #[test]
    fn a_hello_dribbled_byte_by_byte_completes_on_its_last_byte() {
        for v in VECTORS {
            let mut peeked = Vec::new();
            let mut bytes = v.bytes.iter();
            let hello = loop {
                peeked.push(*bytes.next().unwrap());
                if let Parse::Complete(hello) = parse(&peeked).unwrap() {
                    break hello.consumed();
                }
            };
            assert_eq!(hello, v.bytes.len(), "{}", v.name);
        }
    }

    /// Re-splits a whole hello's handshake message into records of at most `size` bytes.
    fn refragment(hello: &[u8], size: usize) -> Vec<u8> {
        let msg = complete(hello).msg.into_owned();
        let mut out = Vec::new();
        for chunk in msg.chunks(size) {
            out.extend_from_slice(&[22, 3, 1]);
            out.extend_from_slice(&u16::try_from(chunk.len()).unwrap().to_be_bytes());
            out.extend_from_slice(chunk);
        }
        out
    }

    #[test]
    fn any_record_split_gives_the_same_hello() {
        // Sizes below 4 split the handshake header itself across records.
        for v in VECTORS {
            for size in [1, 2, 3, 5, 64, 511, 1000, 1 << 14] {
                let bytes = refragment(v.bytes, size);
                if bytes.len() > MAX_HELLO_BYTES {
                    assert_eq!(parse(&bytes), Err(HelloError::TooLarge), "{} in {size}-byte records", v.name);
                    continue;
                }
                let hello = complete(&bytes);
                assert_eq!(hello.server_name(), v.sni, "{} in {size}-byte records", v.name);
                assert_eq!(hello.alpn_protocols().collect::<Vec<_>>(), v.alpn, "{} in {size}-byte records", v.name);
                assert_eq!(hello.consumed(), bytes.len());
            }
        }
    }

    /// A ClientHello body built field by field, so that each field can be broken on its own.
    struct Hello {
        version: [u8; 2],
        session_id: Vec<u8>,
        suites: Vec<u8>,
        compression: Vec<u8>,
        extensions: Option<Vec<(u16, Vec<u8>)>>,
    }

    impl Default for Hello {
        fn default() -> Self {
            Hello {
                version: [3, 3],
                session_id: vec![7; 32],
                suites: vec![0x13, 0x01, 0x13, 0x02],
                compression: vec![0],
                extensions: Some(vec![sni(b"a.example"), alpn(&[b"istio"])]),
            }
        }
    }

    impl Hello {
        fn body(&self) -> Vec<u8> {
            let mut b = self.version.to_vec();
            b.extend_from_slice(&[0x42; 32]);
            b.push(u8::try_from(self.session_id.len()).unwrap());
            b.extend_from_slice(&self.session_id);
            b.extend_from_slice(&u16::try_from(self.suites.len()).unwrap().to_be_bytes());
            b.extend_from_slice(&self.suites);
            b.push(u8::try_from(self.compression.len()).unwrap());
            b.extend_from_slice(&self.compression);
            if let Some(exts) = &self.extensions {
                let block: Vec<u8> = exts
                    .iter()
                    .flat_map(|(t, data)| {
                        [&t.to_be_bytes()[..], &u16::try_from(data.len()).unwrap().to_be_bytes(), data].concat()
                    })
                    .collect();
                b.extend_from_slice(&u16::try_from(block.len()).unwrap().to_be_bytes());
                b.extend_from_slice(&block);
            }
            b
        }

        /// The hello as one record.
        fn wire(&self) -> Vec<u8> {
            record(&handshake(1, &self.body()))
        }
    }

    fn handshake(msg_type: u8, body: &[u8]) -> Vec<u8> {
        let len = u32::try_from(body.len()).unwrap().to_be_bytes();
        [&[msg_type][..], &len[1..], body].concat()
    }

    fn record(payload: &[u8]) -> Vec<u8> {
        [&[22, 3, 1][..], &u16::try_from(payload.len()).unwrap().to_be_bytes(), payload].concat()
    }

    fn sni(name: &[u8]) -> (u16, Vec<u8>) {
        let entry = [&[0][..], &u16::try_from(name.len()).unwrap().to_be_bytes(), name].concat();
        (0, [&u16::try_from(entry.len()).unwrap().to_be_bytes()[..], &entry].concat())
    }

    fn alpn(protocols: &[&[u8]]) -> (u16, Vec<u8>) {
        let list: Vec<u8> =
            protocols.iter().flat_map(|p| [&[u8::try_from(p.len()).unwrap()][..], p].concat()).collect();
        (16, [&u16::try_from(list.len()).unwrap().to_be_bytes()[..], &list].concat())
    }

    fn with_extensions(exts: Vec<(u16, Vec<u8>)>) -> Vec<u8> {
        Hello { extensions: Some(exts), ..Hello::default() }.wire()
    }

    #[test]
    fn the_built_hello_is_valid() {
        let wire = Hello::default().wire();
        let hello = complete(&wire);
        assert_eq!(hello.server_name(), Some("a.example"));
        assert_eq!(hello.alpn_protocols().collect::<Vec<_>>(), [b"istio"]);
    }

    #[test]
    fn other_protocols_are_not_tls() {
        for bytes in [
            &b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"[..],
            b"PRI * HTTP/2.0\r\n",
            b"SSH-2.0-OpenSSH_9.2\r\n",
            // An SSLv2-compatible ClientHello: two-byte header with the high bit set.
            b"\x80\x2e\x01\x03\x01\x00\x15\x00\x00\x00\x10",
            // A handshake content type with a version major other than 3.
            b"\x16\x02\x00",
            b"\x16\xfe\xfd",
            // TLS records, but not handshakes: application data, alert.
            b"\x17\x03\x03\x00\x01x",
            b"\x15\x03\x01\x00\x02\x02\x28",
        ] {
            assert_eq!(parse(bytes), Err(HelloError::NotTls), "{bytes:?}");
        }
    }

    #[test]
    fn other_handshake_messages_are_not_client_hellos() {
        let server_hello = record(&handshake(2, &Hello::default().body()));
        assert_eq!(parse(&server_hello), Err(HelloError::NotClientHello));
        // Known from the type byte alone.
        assert_eq!(parse(&server_hello[..6]), Err(HelloError::NotClientHello));
    }

    #[test]
    fn record_layer_errors() {
        assert_eq!(malformed(b"\x16\x03\x01\x00\x00"), "an empty handshake record");
        assert_eq!(malformed(b"\x16\x03\x01\x40\x01"), "a record longer than 2^14 bytes");
        // The high byte of the length is enough.
        assert_eq!(malformed(b"\x16\x03\x01\x41"), "a record longer than 2^14 bytes");
        assert_eq!(malformed(b"\x16\x03\x01\xff"), "a record longer than 2^14 bytes");

        let msg = handshake(1, &Hello::default().body());
        let (a, b) = msg.split_at(20);
        let mut two = [record(a), record(b)].concat();
        assert!(matches!(parse(&two), Ok(Parse::Complete(_))));
        // An alert between the fragments, or a second record that is not 3.x.
        two[5 + 20] = 21;
        assert_eq!(malformed(&two), "a record of another type inside the ClientHello");
        two[5 + 20] = 22;
        two[5 + 20 + 1] = 2;
        assert_eq!(malformed(&two), "a record version other than 3.x");

        // The hello's last record carries more handshake bytes after it.
        let mut long = msg.clone();
        long.extend_from_slice(&[20, 0, 0, 0]);
        assert_eq!(malformed(&record(&long)), "the ClientHello does not end at a record boundary");
        // Known as soon as the hello is there, even while the rest of that record is not.
        let long = record(&long);
        assert_eq!(malformed(&long[..long.len() - 2]), "the ClientHello does not end at a record boundary");
    }

    #[test]
    fn body_errors() {
        let cases: &[(Hello, &str)] = &[
            (Hello { version: [2, 0], ..Hello::default() }, "a legacy_version other than 3.x"),
            (Hello { session_id: vec![1; 33], ..Hello::default() }, "a session id longer than 32 bytes"),
            (Hello { suites: vec![], ..Hello::default() }, "a cipher suite list that is empty or of odd length"),
            (
                Hello { suites: vec![0x13, 0x01, 0x13], ..Hello::default() },
                "a cipher suite list that is empty or of odd length",
            ),
            (Hello { compression: vec![], ..Hello::default() }, "an empty compression method list"),
        ];
        for (hello, why) in cases {
            assert_eq!(malformed(&hello.wire()), *why);
        }
    }

    #[test]
    fn lengths_that_disagree_are_malformed() {
        let body = Hello::default().body();
        // Garbage after the extensions, inside the handshake message.
        let mut trailing = body.clone();
        trailing.extend_from_slice(&[0, 0]);
        assert_eq!(
            malformed(&record(&handshake(1, &trailing))),
            "an extensions length that does not match the hello length"
        );
        // A handshake message too short for the fields it must have.
        assert_eq!(malformed(&record(&handshake(1, &body[..20]))), "a truncated random");
        // No extensions, then one stray byte: half an extensions length.
        let bare = Hello { extensions: None, ..Hello::default() }.body();
        assert_eq!(malformed(&record(&handshake(1, &[&bare[..], &[0]].concat()))), "a truncated extensions length");
        // An extension whose length runs past the block.
        let mut wire = with_extensions(vec![(0xff01, vec![0])]);
        let n = wire.len();
        wire[n - 2] = 2;
        assert_eq!(malformed(&wire), "an extension longer than the extensions block");
    }

    #[test]
    fn a_hello_without_extensions_has_no_sni_or_alpn() {
        let hello = Hello { extensions: None, ..Hello::default() }.wire();
        let hello = complete(&hello);
        assert_eq!(hello.server_name(), None);
        assert_eq!(hello.alpn_protocols().count(), 0);
        // An empty extensions block is legal before TLS 1.3 too.
        assert_eq!(complete(&with_extensions(vec![])).server_name(), None);
    }

    #[test]
    fn duplicate_extensions_are_malformed() {
        assert_eq!(malformed(&with_extensions(vec![sni(b"a"), sni(b"b")])), "a duplicate extension");
        assert_eq!(
            malformed(&with_extensions(vec![alpn(&[b"h2"]), (5, vec![]), alpn(&[b"h2"])])),
            "a duplicate extension"
        );
        // Past the short list, the bitmap takes over: many distinct types are fine, a repeat still is not.
        let many: Vec<_> = (100..400).map(|t| (t, vec![])).collect();
        assert!(matches!(parse(&with_extensions(many.clone())), Ok(Parse::Complete(_))));
        for repeat in [100, 131, 132, 399] {
            let mut dup = many.clone();
            dup.push((repeat, vec![]));
            assert_eq!(malformed(&with_extensions(dup)), "a duplicate extension", "{repeat}");
        }
    }

    #[test]
    fn server_name_errors() {
        let cases: &[(Vec<u8>, &str)] = &[
            (vec![], "a truncated server_name extension"),
            (vec![0, 0], "an empty server_name list"),
            (vec![0, 3, 0, 0, 0], "an empty server name"),
            (vec![0, 9, 0, 0, 1, b'a'], "a server_name list length that does not match its extension"),
            (vec![0, 4, 0, 0, 2, b'a'], "a host_name longer than its list"),
            (
                sni(b"a").1.into_iter().chain([0, 0, 1, b'b']).collect(),
                "a server_name list length that does not match its extension",
            ),
            (vec![0, 8, 0, 0, 1, b'a', 0, 0, 1, b'b'], "two host_name entries in server_name"),
            (vec![0, 4, 1, 0, 1, b'a'], "a server_name extension with no host_name"),
        ];
        for (data, why) in cases {
            assert_eq!(malformed(&with_extensions(vec![(0, data.clone())])), *why, "{data:?}");
        }
        for name in [&b"a\0b"[..], b"caf\xc3\xa9.example", b"a b", b"a\x7f", b"tab\t"] {
            assert_eq!(
                malformed(&with_extensions(vec![sni(name)])),
                "a host_name with bytes other than printable ASCII",
                "{name:?}"
            );
        }
        assert_eq!(malformed(&with_extensions(vec![sni(&[b'a'; 256])])), "a host_name longer than 255 bytes");
        let longest = [b'a'; 255];
        assert_eq!(complete(&with_extensions(vec![sni(&longest)])).server_name().map(str::len), Some(255));
        // Another name type beside host_name is skipped.
        let both = vec![0, 8, 7, 0, 1, b'x', 0, 0, 1, b'h'];
        assert_eq!(complete(&with_extensions(vec![(0, both)])).server_name(), Some("h"));
        // Case is the client's: the router compares case-insensitively.
        assert_eq!(complete(&with_extensions(vec![sni(b"Reviews.Default")])).server_name(), Some("Reviews.Default"));
    }

    #[test]
    fn alpn_errors() {
        let cases: &[(Vec<u8>, &str)] = &[
            (vec![], "a truncated ALPN extension"),
            (vec![0, 0], "an empty ALPN protocol list"),
            (vec![0, 1, 0], "an empty ALPN protocol name"),
            (vec![0, 3, 2, b'h', b'2', 0], "an ALPN list length that does not match its extension"),
            (vec![0, 3, 3, b'h', b'2'], "an ALPN protocol name longer than its list"),
        ];
        for (data, why) in cases {
            assert_eq!(malformed(&with_extensions(vec![(16, data.clone())])), *why, "{data:?}");
        }
        let hello = with_extensions(vec![alpn(&[b"h2", &[0xff; 255], b"\0"])]);
        let protocols: Vec<_> = complete(&hello).alpn_protocols().map(<[u8]>::len).collect();
        assert_eq!(protocols, [2, 255, 1], "names are opaque bytes");
    }

    #[test]
    fn bad_bytes_fail_before_the_rest_arrives() {
        // Each of these is refused while the hello is still incomplete.
        let wire = Hello { session_id: vec![1; 33], ..Hello::default() }.wire();
        let at = 5 + 4 + 2 + 32 + 1;
        assert_eq!(malformed(&wire[..at]), "a session id longer than 32 bytes");

        let wire = with_extensions(vec![sni(b"bad\0name.example.com")]);
        let nul = wire.windows(4).position(|w| w == b"bad\0").unwrap() + 3;
        assert_eq!(malformed(&wire[..=nul]), "a host_name with bytes other than printable ASCII");

        let wire = with_extensions(vec![(5, vec![]), (5, vec![1, 2, 3])]);
        assert_eq!(malformed(&wire[..wire.len() - 4]), "a duplicate extension");

        let mut huge = record(&handshake(1, &[0; 100]));
        huge[6..9].copy_from_slice(&[0, 0x40, 0]);
        assert_eq!(parse(&huge[..9]), Err(HelloError::TooLarge));
        assert_eq!(parse(&huge[..8]), Ok(Parse::NeedMore));
    }

    #[test]
    fn the_peek_cap_bounds_every_hello() {
        // A handshake message of the most that fits under the cap with one record header ...
        let pad = MAX_HELLO_BYTES - RECORD_HEADER - HANDSHAKE_HEADER - Hello::default().body().len() - 4;
        let mut fits = Hello::default();
        fits.extensions.as_mut().unwrap().push((21, vec![0; pad]));
        let msg = handshake(1, &fits.body());
        assert_eq!(RECORD_HEADER + msg.len(), MAX_HELLO_BYTES);
        // ... can't come in one record (2^14 at most), but two make it exceed the cap by their second header.
        let (a, b) = msg.split_at(1 << 13);
        assert_eq!(parse(&[record(a), record(b)].concat()), Err(HelloError::TooLarge));
        // One byte less of padding fits in two records exactly.
        let mut fits = Hello::default();
        fits.extensions.as_mut().unwrap().push((21, vec![0; pad - RECORD_HEADER]));
        let msg = handshake(1, &fits.body());
        let (a, b) = msg.split_at(1 << 13);
        let wire = [record(a), record(b)].concat();
        assert_eq!(wire.len(), MAX_HELLO_BYTES);
        assert_eq!(complete(&wire).consumed(), MAX_HELLO_BYTES);
        // A handshake length that can't fit is refused from the header.
        let mut big = handshake(1, &fits.body());
        big[1..4].copy_from_slice(&[0, 0x40, 0]);
        assert_eq!(parse(&record(&big[..100])), Err(HelloError::TooLarge));
        // In 1-byte records a hello takes six bytes per byte: 3 KB of hello no longer fits.
        let mut padded = Hello::default();
        padded.extensions.as_mut().unwrap().push((21, vec![0; 3000]));
        let tiny = refragment(&padded.wire(), 1);
        assert!(tiny.len() > MAX_HELLO_BYTES);
        assert_eq!(parse(&tiny), Err(HelloError::TooLarge));
        assert_eq!(parse(&tiny[..MAX_HELLO_BYTES - 1]), Err(HelloError::TooLarge));
    }

    /// Runs in CI in place of the fuzzer, which needs nightly: seeded mutations of the real vectors.
    #[test]
    fn mutated_vectors_never_panic_and_keep_the_invariants() {
        const INTERESTING: [u8; 8] = [0, 1, 2, 0x10, 0x16, 0x20, 0x40, 0xff];
        let mut rng = SmallRng::seed_from_u64(0x5eed_c0de);
        for _ in 0..50_000 {
            let mut data = VECTORS[rng.random_range(0..VECTORS.len())].bytes.to_vec();
            for _ in 0..rng.random_range(1..=4) {
                let at = rng.random_range(0..data.len().max(1));
                match rng.random_range(0..7) {
                    0 if !data.is_empty() => data[at] ^= 1 << rng.random_range(0..8),
                    1 if !data.is_empty() => data[at] = INTERESTING[rng.random_range(0..INTERESTING.len())],
                    2 if !data.is_empty() => data[at] = rng.random(),
                    3 => data.truncate(at),
                    4 => {
                        let end = rng.random_range(at..=data.len().min(at + 64));
                        data.drain(at..end);
                    }
                    5 => {
                        let end = rng.random_range(at..=data.len().min(at + 64));
                        let chunk = data[at.min(data.len())..end].to_vec();
                        let to = rng.random_range(0..=data.len());
                        data.splice(to..to, chunk);
                    }
                    _ => {
                        // A plausible length: the bytes after `at` to the end.
                        let len = u16::try_from(data.len().saturating_sub(at + 2)).unwrap_or(u16::MAX);
                        if at + 2 <= data.len() {
                            data[at..at + 2].copy_from_slice(&len.to_be_bytes());
                        }
                    }
                }
            }
            let cuts: Vec<usize> = (0..3).map(|_| rng.random_range(0..=data.len())).collect();
            check_invariants(&data, cuts);
        }
    }
}
