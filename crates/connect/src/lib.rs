//! Quiver's connectors to other systems: the only crate that knows PostgreSQL, Kafka and
//! RabbitMQ. Kafka is a backend of the log (`quiver_log::EventLog`); the history sink is an
//! ordinary consumer of the log with its own committed offsets; the RabbitMQ source is an
//! upstream that appends to the log through a callback. Nothing upstream ever waits for a
//! consumer.

#[cfg(feature = "postgres")]
pub mod history;
#[cfg(feature = "kafka")]
pub mod kafka;
#[cfg(feature = "rabbitmq")]
pub mod rabbitmq;
