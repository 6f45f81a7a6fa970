//! Feeds arbitrary bytes to the ClientHello parser: it must never panic, and its answers must hold together.
//! The same invariants run on seeded mutations of the real vectors in `hello.rs`'s unit tests, for CI.
#![no_main]

use crossgate_proxy::tls::hello::{MAX_HELLO_BYTES, Parse, parse};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
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
    // A prefix needs more or already gives the final answer; a few cut points spread over the input keep each run
    // linear rather than quadratic.
    for cut in [
        data.len() / 2,
        data.len() * 7 / 8,
        data.len().saturating_sub(1),
        usize::from(data.first().copied().unwrap_or(0)) % (data.len() + 1),
    ] {
        let prefix = parse(&data[..cut]);
        assert!(prefix == Ok(Parse::NeedMore) || prefix == full, "prefix {cut}: {prefix:?} vs full {full:?}");
    }
});
