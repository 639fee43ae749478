//! Upstream sources (RabbitMQ queues, `[[rabbitmq_source]]`) feed the log through the same
//! ingest pipeline as `POST /v1/events`: validated whole, admitted under the same bounds,
//! acknowledged upstream only once durable.

use std::sync::{Arc, Weak};

use quiver_connect::rabbitmq::{Appender, Durable, RabbitSource, Refusal};
use quiver_log::Ack;

use crate::error::{Class, ServingError};
use crate::{ingest, Node, NodeError};

/// Appends a source's messages to a node's log. Holds the node weakly: the node owns its
/// sources, and a source must not keep a stopping node alive.
struct NodeAppender(Weak<Node>);

impl Appender for NodeAppender {
    fn submit(&self, body: &[u8], dedup_key: Option<&str>) -> Result<Durable, Refusal> {
        let node = self
            .0
            .upgrade()
            .ok_or_else(|| Refusal::Unavailable("the node is stopping".into()))?;
        let prepared = ingest::prepare_json(&node, body, dedup_key).map_err(refusal)?;
        let pending = ingest::submit(&node, prepared, Ack::Durable).map_err(refusal)?;
        Ok(Box::pin(async move {
            pending.wait().await.map(|_| ()).map_err(refusal)
        }))
    }
}

fn refusal(e: ServingError) -> Refusal {
    match e.code.class() {
        Class::Invalid | Class::TooLarge | Class::NotFound | Class::Conflict | Class::Forbidden => {
            Refusal::Invalid(e.to_string())
        }
        Class::Unavailable | Class::Internal => Refusal::Unavailable(e.to_string()),
    }
}

/// Starts every configured source of `node`.
pub fn start(node: &Arc<Node>) -> Result<Vec<RabbitSource>, NodeError> {
    node.config
        .rabbitmq_sources
        .iter()
        .map(|cfg| {
            let appender = Arc::new(NodeAppender(Arc::downgrade(node)));
            RabbitSource::start(cfg.clone(), appender)
                .map_err(|e| NodeError::Io(format!("RabbitMQ source {}", cfg.queue), e))
        })
        .collect()
}
