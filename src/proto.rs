//! Our own protobuf API (`proto/ratethrottle/...`, compiled by build.rs with protox) and the
//! descriptor sets gRPC reflection serves.
//!
//! Owns: generated types and clients/servers, nothing hand-written. Must not touch: any other
//! module (generated code imports none).

/// `ratethrottle.admin.v1`: the admin gRPC API.
pub mod admin {
    #[allow(clippy::all, clippy::pedantic)]
    pub mod v1 {
        tonic::include_proto!("ratethrottle.admin.v1");
    }
}

/// The descriptors of `proto/ratethrottle/admin/v1/admin.proto` (reflection on the admin port).
pub const ADMIN_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/admin_descriptor.bin"));

/// The descriptors of Envoy's services we serve on the gRPC port and their imports, taken
/// from envoy-types by `scripts/regen-descriptors.sh` (kept equal by `tests/descriptors.rs`).
pub const ENVOY_DESCRIPTOR_SET: &[u8] = include_bytes!("../proto/envoy-reflection.bin");

/// The codec the generated clients and servers encode with. Only generated code (in
/// `OUT_DIR`) names tonic-prost otherwise, so this alias is what ties the dependency to `src/`
/// for `tests/dependencies.rs`.
pub type Codec<T, U> = tonic_prost::ProstCodec<T, U>;
