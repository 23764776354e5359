//! Generated protobuf and tonic code for the vipsec agent API (`vipsec.v1`).
//! Hand-written code lives in the `vipsec` crate; this crate only holds what protoc emits.

pub mod v1 {
    #![allow(clippy::all, clippy::pedantic)]
    tonic::include_proto!("vipsec.v1");

    /// The encoded `FileDescriptorSet` of `vipsec.v1` (and the well-known types it imports),
    /// for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("vipsec_descriptor");
}
