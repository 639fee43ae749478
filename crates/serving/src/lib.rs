//! Quiver's serving layer: the pipelines between the surfaces and the data, on plain types.
//! Ingest (validate, encode, append, acknowledge), feature reads (online and point in time),
//! predict (route, cache, gather, evaluate, shadow) and the Open Inference Protocol's calls on
//! decoded tensors. HTTP and gRPC (`quiver-server`) both call these and only these; this crate
//! knows no HTTP, gRPC or JSON (apart from the event batch's JSON, decoded by `quiver-core`).
//! Every failure is a [`ServingError`] with a code from one closed table ([`Code`]).

pub mod cache;
pub mod cluster;
pub mod error;
pub mod features;
pub mod idempotency;
pub mod infer;
pub mod ingest;
pub mod node;
pub mod predict;
pub mod remote;
pub mod sources;

pub use error::{Class, Code, Detail, ServingError};
pub use node::{Node, NodeError};
