//! Generated Rust code of Reeve's gRPC contracts, one module per proto package.
//! Nothing but generated code and the descriptor set lives here.

#![allow(clippy::all, missing_docs, unreachable_pub)]

pub mod credits {
    pub mod v1 {
        tonic::include_proto!("reeve.credits.v1");
    }
}

pub mod quota {
    pub mod v1 {
        tonic::include_proto!("reeve.quota.v1");
    }
}

/// Encoded `FileDescriptorSet` of every Reeve proto, for tonic-reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/reeve_descriptor.bin"));
