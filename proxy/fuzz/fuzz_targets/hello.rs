//! Feeds arbitrary bytes to the ClientHello parser: it must never panic, and its answers must hold together
//! (see `check_invariants`; the same checks run on seeded mutations of the real vectors in CI).
#![no_main]

use crossgate_proxy::tls::hello::check_invariants;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // A few cut points spread over the input keep each run linear rather than quadratic.
    let first = usize::from(data.first().copied().unwrap_or(0)) % (data.len() + 1);
    check_invariants(data, [data.len() / 2, data.len() * 7 / 8, data.len().saturating_sub(1), first]);
});
