// The generated code is built from the .proto at compile time with a vendored protoc, so a
// fresh machine needs no system protoc and the generated code can never go stale.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let include = protoc_bin_vendored::include_path()?;
    // SAFETY: build scripts are single-threaded; prost-build reads PROTOC from the environment.
    unsafe { std::env::set_var("PROTOC", protoc) };
    println!("cargo:rerun-if-changed=vipsec/v1/agent.proto");
    // The descriptor set feeds the agent's server reflection (grpcurl list/describe).
    let descriptors =
        std::path::PathBuf::from(std::env::var("OUT_DIR")?).join("vipsec_descriptor.bin");
    tonic_prost_build::configure()
        .file_descriptor_set_path(&descriptors)
        .build_server(true)
        .build_client(true)
        .compile_protos(
            &[std::path::PathBuf::from("vipsec/v1/agent.proto")],
            &[std::path::PathBuf::from("."), include],
        )?;
    Ok(())
}
