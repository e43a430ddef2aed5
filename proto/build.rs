//! Compiles `proto/flotilla/v1/*.proto` with a vendored protoc, so nobody installs protoc.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let files = [
        "proto/flotilla/v1/agent.proto",
        "proto/flotilla/v1/node.proto",
        "proto/flotilla/v1/admin.proto",
        "proto/flotilla/v1/raft.proto",
    ];
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("flotilla_descriptor.bin"))
        .compile_protos(&files, &["proto"])?;
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    Ok(())
}
