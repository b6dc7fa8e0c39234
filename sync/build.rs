//! Generates the CapacitySync server and client with tonic-build's manual
//! builder: no protoc, and the messages are the hand-written ones in
//! `sluice_core::sync_api`, shared with the wasm filter. The names here
//! follow `proto/sluice/sync/v1/sync.proto`; `tests/proto.rs` checks both.

use tonic_build::manual::{Builder, Method, Service};

fn main() {
    let codec = "tonic_prost::ProstCodec";
    let api = "::sluice_core::sync_api";
    let service = Service::builder()
        .name("CapacitySync")
        .package("sluice.sync.v1")
        .method(
            Method::builder()
                .name("watch")
                .route_name("Watch")
                .input_type(format!("{api}::WatchRequest"))
                .output_type(format!("{api}::Snapshot"))
                .codec_path(codec)
                .server_streaming()
                .build(),
        )
        .method(
            Method::builder()
                .name("fetch")
                .route_name("Fetch")
                .input_type(format!("{api}::FetchRequest"))
                .output_type(format!("{api}::Snapshot"))
                .codec_path(codec)
                .build(),
        )
        .method(
            Method::builder()
                .name("share")
                .route_name("Share")
                .input_type(format!("{api}::ShareReport"))
                .output_type(format!("{api}::ShareGrant"))
                .codec_path(codec)
                .client_streaming()
                .server_streaming()
                .build(),
        )
        .build();
    Builder::new().compile(&[service]);

    // The same API as a FileDescriptorSet, for gRPC reflection: compiled
    // from the .proto in pure Rust (protox), so no protoc is needed either.
    let descriptors = protox::compile(["sluice/sync/v1/sync.proto"], ["proto"])
        .expect("proto/sluice/sync/v1/sync.proto compiles");
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    std::fs::write(
        out.join("sluice_sync_descriptor.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )
    .expect("writing the descriptor set");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=proto");
}
