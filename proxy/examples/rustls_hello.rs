//! Sends the ClientHello of a default rustls client (aws-lc-rs, post-quantum key share first) to a capture listener.
//! Used by `proxy/tests/vectors/capture.sh`; the handshake is never meant to complete.
//!
//! Usage: rustls_hello ADDR SNI ALPN[,ALPN...] [MAX_FRAGMENT_SIZE]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;

use anyhow::Context;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [addr, sni, alpn, rest @ ..] = args.as_slice() else {
        anyhow::bail!("usage: rustls_hello ADDR SNI ALPN[,ALPN...] [MAX_FRAGMENT_SIZE]");
    };
    let mut config =
        rustls::ClientConfig::builder().with_root_certificates(rustls::RootCertStore::empty()).with_no_client_auth();
    config.alpn_protocols = alpn.split(',').map(|p| p.as_bytes().to_vec()).collect();
    // rustls counts the 5-byte record header in this size, so records carry at most size - 5 handshake bytes.
    config.max_fragment_size = rest.first().map(|s| s.parse()).transpose().context("MAX_FRAGMENT_SIZE")?;

    let name = rustls::pki_types::ServerName::try_from(sni.clone()).context("SNI")?;
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name)?;
    let mut sock = TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
    while conn.wants_write() {
        conn.write_tls(&mut sock)?;
    }
    sock.flush()?;
    // The listener closes once it has the hello; wait for that so the capture is never cut short.
    let _ = sock.read(&mut [0u8; 1]);
    Ok(())
}
