//! Quiver's domain: configuration, schemas, events, the log record codec, partitioning and
//! tokens. Pure functions over bytes and values; nothing here does IO or knows HTTP.

pub mod config;
pub mod event;
pub mod partition;
pub mod record;
pub mod schema;
pub mod telemetry;
pub mod time;
pub mod token;
pub mod value;
pub mod window;

pub use config::Config;
pub use schema::Schema;
