//! Compiles the protos with protox (pure Rust: no system protoc), then generates the tonic/prost code and
//! the pbjson serde impls that give the resources their YAML/JSON form.
use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let files = ["crossgate/discovery/v1/cluster.proto"];
    let descriptors = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        .build_server(false)
        .build_client(false)
        // Well-known types from pbjson-types, which carry the proto3 JSON mapping ("10s" durations, bare
        // wrapper values).
        .compile_well_known_types(true)
        .extern_path(".google.protobuf", "::pbjson_types")
        // Durations accept Go's syntax too (300ms, 5m), as Istio's YAML does.
        .extern_path(".google.protobuf.Duration", "crate::duration::Duration")
        // Ordered maps encode deterministically, so equal resources have equal bytes (the control service
        // versions clusters by a hash of their encoding).
        .btree_map(".")
        .compile_fds(descriptors.clone())?;
    pbjson_build::Builder::new()
        .register_descriptors(&descriptors.encode_to_vec())?
        .btree_map(["."])
        .build(&[".crossgate"])?;
    Ok(())
}
