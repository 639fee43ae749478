//! `quiver.v1.Ingest/Push` (`proto/quiver/v1/ingest.proto`): client-streaming ingest for
//! producers. Each message is a `POST /v1/events` body and goes through the same
//! `quiver_serving::ingest` calls (validated whole, appended, acknowledged at its ack level).
//!
//! Flow control: a message is admitted to the log as soon as it is read, and its ack is awaited
//! later, so a stream keeps the group-commit writer busy without waiting an fsync per message;
//! at most [`PUSH_IN_FLIGHT_MAX`] admitted messages wait for their ack, and past that the
//! stream is not read, so HTTP/2 flow control holds the producer back. A refused message ends
//! the stream with its status (`INVALID_ARGUMENT`, `UNAVAILABLE` for a full queue, …) after
//! the messages before it are acknowledged; the trailers `quiver-accepted` and
//! `quiver-token` then say what was.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;
use quiver_core::token::Token;
use quiver_serving::ingest::{self, Pending};
use quiver_serving::ServingError;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};

use crate::ingest_proto as pb;
use crate::AppState;

/// Admitted messages awaiting their ack, per stream.
pub const PUSH_IN_FLIGHT_MAX: usize = 8;

pub struct IngestService {
    pub state: Arc<AppState>,
}

/// What a stream has had acknowledged so far.
#[derive(Default)]
struct Progress {
    accepted: u64,
    messages: u64,
    token: Token,
}

impl Progress {
    fn add(&mut self, done: ingest::Appended) {
        self.accepted += done.accepted as u64;
        for &(p, next) in done.token.positions() {
            self.token.advance(p, next);
        }
    }

    /// `status`, with what was acknowledged before it in its metadata.
    fn refuse(&self, mut status: Status) -> Status {
        let m = status.metadata_mut();
        if let Ok(v) = self.accepted.to_string().parse() {
            m.insert("quiver-accepted", v);
        }
        if let Ok(v) = self.token.to_string().parse() {
            m.insert("quiver-token", v);
        }
        status
    }
}

impl IngestService {
    /// Validates and admits one message; returns its pending ack.
    async fn admit(
        &self,
        msg: pb::PushRequest,
        identity: Option<&quiver_auth::Identity>,
    ) -> Result<Pending, ServingError> {
        let node = &self.state.node;
        let ack = ingest::parse_ack((!msg.ack.is_empty()).then_some(msg.ack.as_str()))?;
        let key = (!msg.idempotency_key.is_empty()).then_some(msg.idempotency_key.as_str());
        if let Some(k) = key {
            let max = node.config.limits.idempotency_key_bytes_max;
            if k.len() > max {
                return Err(ServingError::bad_request(format!(
                    "idempotency_key must be 1..={max} bytes"
                )));
            }
        }
        let prepared = crate::ingest::prepare(node, &Bytes::from(msg.events), key).await?;
        if let Err(e) =
            crate::security::require(identity, quiver_auth::Role::Producer, &prepared.views)
        {
            return Err(ServingError::new(
                quiver_serving::Code::Forbidden,
                e.message,
            ));
        }
        ingest::submit(node, prepared, ack)
    }
}

#[tonic::async_trait]
impl pb::ingest_server::Ingest for IngestService {
    async fn push(
        &self,
        req: Request<tonic::Streaming<pb::PushRequest>>,
    ) -> Result<Response<pb::PushResponse>, Status> {
        let identity = req.extensions().get::<quiver_auth::Identity>().cloned();
        let mut incoming = req.into_inner();
        let mut progress = Progress::default();
        let mut waiting: VecDeque<Pending> = VecDeque::with_capacity(PUSH_IN_FLIGHT_MAX);
        let mut refused: Option<Status> = None;
        while let Some(next) = incoming.next().await {
            let msg = match next {
                Ok(m) => m,
                Err(e) => {
                    refused = Some(e);
                    break;
                }
            };
            let index = progress.messages;
            progress.messages += 1;
            match self.admit(msg, identity.as_ref()).await {
                Ok(p) => waiting.push_back(p),
                Err(e) => {
                    let status = crate::grpc::status(e);
                    let message = format!("message {index}: {}", status.message());
                    refused = Some(Status::new(status.code(), message));
                    break;
                }
            }
            if waiting.len() >= PUSH_IN_FLIGHT_MAX {
                let oldest = waiting.pop_front().expect("non-empty");
                match oldest.wait().await {
                    Ok(done) => progress.add(done),
                    Err(e) => {
                        refused = Some(crate::grpc::status(e));
                        break;
                    }
                }
            }
        }
        for p in waiting {
            match p.wait().await {
                Ok(done) => progress.add(done),
                Err(e) => refused = refused.or(Some(crate::grpc::status(e))),
            }
        }
        if let Some(status) = refused {
            return Err(progress.refuse(status));
        }
        Ok(Response::new(pb::PushResponse {
            accepted: progress.accepted,
            token: progress.token.to_string(),
            messages: progress.messages,
        }))
    }
}

/// The gRPC route of the ingest service, message size bounded by the body limit.
pub fn service(state: Arc<AppState>) -> pb::ingest_server::IngestServer<IngestService> {
    let limit = state.node.config.limits.request_body_bytes_max;
    pb::ingest_server::IngestServer::new(IngestService { state }).max_decoding_message_size(limit)
}
