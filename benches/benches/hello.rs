//! The ClientHello parser on real captured hellos: the small one (OpenSSL), the post-quantum one (rustls, one
//! record, parsed in place) and the same split over four records (reassembled into an owned buffer).

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use crossgate_proxy::tls::hello::{Parse, parse};

const VECTORS: &[(&str, &[u8])] = &[
    ("openssl", include_bytes!("../../proxy/tests/vectors/openssl.bin")),
    ("rustls_pq", include_bytes!("../../proxy/tests/vectors/rustls-pq.bin")),
    ("rustls_pq_4_records", include_bytes!("../../proxy/tests/vectors/rustls-fragmented.bin")),
];

fn hello(c: &mut Criterion) {
    let mut group = c.benchmark_group("hello_parse");
    for &(name, bytes) in VECTORS {
        assert!(matches!(parse(bytes), Ok(Parse::Complete(_))), "{name} must be a complete hello");
        group.throughput(Throughput::Bytes(bytes.len() as u64));
        group.bench_function(name, |b| {
            b.iter(|| match parse(black_box(bytes)) {
                // What the listener reads: the SNI to route on and the ALPN rule.
                Ok(Parse::Complete(hello)) => {
                    black_box((hello.server_name().map(str::len), hello.alpn_protocols().count()))
                }
                _ => (None, 0),
            })
        });
    }
    group.finish();
}

criterion_group!(benches, hello);
criterion_main!(benches);
