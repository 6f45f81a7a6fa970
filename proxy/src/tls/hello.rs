// STAND-IN: a single-record ClientHello reader so the gateway builds; replaced by the full parser (multi-record, validated, fuzzed).
pub const MAX_HELLO_BYTES: usize = 16 * 1024;
pub enum Parse<'a> {
    Complete(ClientHello<'a>),
    NeedMore,
}
pub struct ClientHello<'a> {
    sni: Option<&'a str>,
    alpn: Vec<&'a [u8]>,
    consumed: usize,
}
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum HelloError {
    #[error("not tls")]
    NotTls,
    #[error("not ch")]
    NotClientHello,
    #[error("malformed {0}")]
    Malformed(&'static str),
}
impl<'a> ClientHello<'a> {
    pub fn server_name(&self) -> Option<&str> {
        self.sni
    }
    pub fn alpn_protocols(&self) -> impl Iterator<Item = &[u8]> + '_ {
        self.alpn.iter().copied()
    }
    pub fn consumed(&self) -> usize {
        self.consumed
    }
}
fn u16at(b: &[u8], i: usize) -> Option<usize> {
    Some(((*b.get(i)? as usize) << 8) | *b.get(i + 1)? as usize)
}
pub fn parse(buf: &[u8]) -> Result<Parse<'_>, HelloError> {
    if buf.is_empty() {
        return Ok(Parse::NeedMore);
    }
    if buf[0] != 22 {
        return Err(HelloError::NotTls);
    }
    if buf.len() < 5 {
        return Ok(Parse::NeedMore);
    }
    let len = u16at(buf, 3).unwrap();
    if buf.len() < 5 + len {
        return Ok(Parse::NeedMore);
    }
    let b = &buf[5..5 + len];
    if b[0] != 1 {
        return Err(HelloError::NotClientHello);
    }
    let m = HelloError::Malformed("x");
    let mut i = 4 + 2 + 32;
    i += 1 + *b.get(i).ok_or(m.clone())? as usize;
    i += 2 + u16at(b, i).ok_or(m.clone())?;
    i += 1 + *b.get(i).ok_or(m.clone())? as usize;
    let end = i + 2 + u16at(b, i).ok_or(m.clone())?;
    i += 2;
    let (mut sni, mut alpn) = (None, Vec::new());
    while i + 4 <= end {
        let t = u16at(b, i).unwrap();
        let l = u16at(b, i + 2).unwrap();
        let d = b.get(i + 4..i + 4 + l).ok_or(m.clone())?;
        if t == 0 {
            let nl = u16at(d, 3).ok_or(m.clone())?;
            sni = std::str::from_utf8(d.get(5..5 + nl).ok_or(m.clone())?).ok();
        }
        if t == 16 {
            let mut j = 2;
            while j < d.len() {
                let pl = d[j] as usize;
                alpn.push(&d[j + 1..j + 1 + pl]);
                j += 1 + pl;
            }
        }
        i += 4 + l;
    }
    Ok(Parse::Complete(ClientHello { sni, alpn, consumed: 5 + len }))
}
