//! Generated protobuf and tonic code for the vipsec agent API (`vipsec.v1`).
//! Hand-written code lives in the `vipsec` crate; this crate only holds what protoc emits.

pub mod v1 {
    #![allow(clippy::all, clippy::pedantic)]
    tonic::include_proto!("vipsec.v1");
}
