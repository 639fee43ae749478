//! Quiver's connectors to other systems: the only crate that knows PostgreSQL (and, later,
//! Kafka). Each connector is an ordinary consumer of the log with its own committed offset;
//! nothing upstream ever waits for one.

#[cfg(feature = "postgres")]
pub mod history;
