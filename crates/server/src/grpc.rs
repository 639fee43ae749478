//! KServe V2 over gRPC: Triton's `inference.GRPCInferenceService` (the vendored
//! `proto/grpc_service.proto`), so `tritonclient.grpc` works unchanged. A thin surface over the
//! same typed calls as the HTTP routes (`quiver_serving::infer`):
//! neither surface re-encodes through the other.
//!
//! Inputs come as `raw_input_contents` (what tritonclient sends: one byte string per input, in
//! input order, laid out as the binary tensor extension) or as typed `contents`; outputs go back
//! as `raw_output_contents` (FP64 little-endian), which is all tritonclient reads for numbers.
//! Served: ServerLive/Ready/Metadata, ModelReady/Metadata, ModelInfer, ModelStreamInfer (each
//! request answered on the stream, an error as `error_message` without ending it) and
//! RepositoryIndex; the other RPCs answer UNIMPLEMENTED.

use std::sync::Arc;

use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};

use crate::inference_proto as pb;
use crate::inference_proto::grpc_inference_service_server::GrpcInferenceService;
use crate::AppState;
use quiver_serving::infer::{self, Elements, Tensor};
use quiver_serving::ServingError;

/// Streamed requests waiting for their answer, per stream (bounds a client that sends faster
/// than models answer).
const STREAM_IN_FLIGHT_MAX: usize = 64;

pub struct Inference {
    pub state: Arc<AppState>,
}

/// The gRPC status of a serving error, by its class (as Triton maps its HTTP statuses).
pub(crate) fn status(e: ServingError) -> Status {
    use quiver_serving::Class;
    let msg = e.message;
    match e.code.class() {
        Class::Invalid | Class::TooLarge => Status::invalid_argument(msg),
        Class::NotFound => Status::not_found(msg),
        Class::Conflict => Status::already_exists(msg),
        Class::Forbidden => Status::permission_denied(msg),
        Class::Unavailable => Status::unavailable(msg),
        Class::Internal => Status::internal(msg),
    }
}

fn version(v: &str) -> Option<&str> {
    (!v.is_empty()).then_some(v)
}

fn tensor_meta(t: &infer::TensorMeta) -> pb::model_metadata_response::TensorMetadata {
    pb::model_metadata_response::TensorMetadata {
        name: t.name.clone(),
        datatype: t.datatype.to_string(),
        shape: t.shape.clone(),
    }
}

/// One request's inputs, decoded from raw contents (in input order) or typed contents.
fn decode_inputs(req: &pb::ModelInferRequest) -> Result<Vec<Tensor>, Status> {
    let raw = &req.raw_input_contents;
    if !raw.is_empty() && raw.len() != req.inputs.len() {
        return Err(Status::invalid_argument(format!(
            "{} raw_input_contents for {} inputs",
            raw.len(),
            req.inputs.len()
        )));
    }
    let mut out = Vec::with_capacity(req.inputs.len());
    for (i, t) in req.inputs.iter().enumerate() {
        let count = t
            .shape
            .iter()
            .try_fold(1usize, |acc, &d| {
                usize::try_from(d).ok().and_then(|d| acc.checked_mul(d))
            })
            .ok_or_else(|| Status::invalid_argument(format!("input {:?}: bad shape", t.name)))?;
        let elements = match (raw.get(i), &t.contents) {
            (Some(bytes), _) => crate::v2_binary::decode(&t.name, &t.datatype, bytes, count)
                .map_err(Status::invalid_argument)?,
            (None, Some(c)) => typed(&t.name, &t.datatype, c, count)?,
            (None, None) => {
                return Err(Status::invalid_argument(format!(
                    "input {:?} has no contents",
                    t.name
                )))
            }
        };
        out.push(Tensor {
            name: t.name.clone(),
            shape: t.shape.clone(),
            elements,
        });
    }
    Ok(out)
}

/// Typed `contents`: the field of the datatype, with as many elements as the shape holds.
fn typed(
    name: &str,
    datatype: &str,
    c: &pb::InferTensorContents,
    count: usize,
) -> Result<Elements, Status> {
    let numbers: Vec<f64> = match datatype {
        "BYTES" => {
            let s = c
                .bytes_contents
                .iter()
                .map(|b| String::from_utf8(b.clone()))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|_| {
                    Status::invalid_argument(format!("input {name:?}: BYTES not UTF-8"))
                })?;
            return check(name, s.len(), count).map(|()| Elements::Strings(s));
        }
        "BOOL" => c
            .bool_contents
            .iter()
            .map(|&b| f64::from(u8::from(b)))
            .collect(),
        "INT8" | "INT16" | "INT32" => c.int_contents.iter().map(|&x| f64::from(x)).collect(),
        "INT64" => c.int64_contents.iter().map(|&x| x as f64).collect(),
        "UINT8" | "UINT16" | "UINT32" => c.uint_contents.iter().map(|&x| f64::from(x)).collect(),
        "UINT64" => c.uint64_contents.iter().map(|&x| x as f64).collect(),
        "FP32" => c.fp32_contents.iter().map(|&x| f64::from(x)).collect(),
        "FP64" => c.fp64_contents.clone(),
        other => {
            return Err(Status::invalid_argument(format!(
                "input {name:?}: datatype {other:?} has no typed contents"
            )))
        }
    };
    check(name, numbers.len(), count).map(|()| Elements::Numbers(numbers))
}

fn check(name: &str, got: usize, want: usize) -> Result<(), Status> {
    if got == want {
        Ok(())
    } else {
        Err(Status::invalid_argument(format!(
            "input {name:?}: shape holds {want} elements, contents have {got}"
        )))
    }
}

async fn infer(
    state: &AppState,
    req: pb::ModelInferRequest,
) -> Result<pb::ModelInferResponse, Status> {
    let inputs = decode_inputs(&req)?;
    let outputs: Vec<&str> = req.outputs.iter().map(|o| o.name.as_str()).collect();
    let done = infer::infer_tensors(
        &state.node,
        &req.model_name,
        version(&req.model_version),
        inputs,
        &outputs,
    )
    .await
    .map_err(status)?;
    let k = done.rows.first().map_or(1, Vec::len);
    let shape = if k == 1 {
        vec![done.rows.len() as i64]
    } else {
        vec![done.rows.len() as i64, k as i64]
    };
    let raw: Vec<u8> = done
        .rows
        .iter()
        .flatten()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    Ok(pb::ModelInferResponse {
        model_name: req.model_name,
        model_version: done.version.to_string(),
        id: req.id,
        parameters: Default::default(),
        outputs: vec![pb::model_infer_response::InferOutputTensor {
            name: done.output,
            datatype: "FP64".into(),
            shape,
            parameters: Default::default(),
            contents: None,
        }],
        raw_output_contents: vec![raw],
    })
}

#[tonic::async_trait]
impl GrpcInferenceService for Inference {
    async fn server_live(
        &self,
        _: Request<pb::ServerLiveRequest>,
    ) -> Result<Response<pb::ServerLiveResponse>, Status> {
        Ok(Response::new(pb::ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _: Request<pb::ServerReadyRequest>,
    ) -> Result<Response<pb::ServerReadyResponse>, Status> {
        let ready = self.state.node.not_ready_reason().is_none();
        Ok(Response::new(pb::ServerReadyResponse { ready }))
    }

    async fn model_ready(
        &self,
        req: Request<pb::ModelReadyRequest>,
    ) -> Result<Response<pb::ModelReadyResponse>, Status> {
        crate::security::require_grpc(&req, quiver_auth::Role::Predictor, [&req.get_ref().name])?;
        let r = req.into_inner();
        let ready =
            infer::is_ready(&self.state.node, &r.name, version(&r.version)).map_err(status)?;
        Ok(Response::new(pb::ModelReadyResponse { ready }))
    }

    async fn server_metadata(
        &self,
        _: Request<pb::ServerMetadataRequest>,
    ) -> Result<Response<pb::ServerMetadataResponse>, Status> {
        Ok(Response::new(pb::ServerMetadataResponse {
            name: "quiver".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            extensions: vec!["quiver_feature_join".into()],
        }))
    }

    async fn model_metadata(
        &self,
        req: Request<pb::ModelMetadataRequest>,
    ) -> Result<Response<pb::ModelMetadataResponse>, Status> {
        crate::security::require_grpc(&req, quiver_auth::Role::Predictor, [&req.get_ref().name])?;
        let r = req.into_inner();
        let m =
            infer::model_meta(&self.state.node, &r.name, version(&r.version)).map_err(status)?;
        Ok(Response::new(pb::ModelMetadataResponse {
            name: m.name,
            versions: m.versions,
            platform: m.platform,
            inputs: m.inputs.iter().map(tensor_meta).collect(),
            outputs: m.outputs.iter().map(tensor_meta).collect(),
        }))
    }

    async fn model_infer(
        &self,
        req: Request<pb::ModelInferRequest>,
    ) -> Result<Response<pb::ModelInferResponse>, Status> {
        crate::security::require_grpc(
            &req,
            quiver_auth::Role::Predictor,
            [&req.get_ref().model_name],
        )?;
        infer(&self.state, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn model_stream_infer(
        &self,
        req: Request<tonic::Streaming<pb::ModelInferRequest>>,
    ) -> Result<Response<tonic::codegen::BoxStream<pb::ModelStreamInferResponse>>, Status> {
        let identity = req.extensions().get::<quiver_auth::Identity>().cloned();
        let mut incoming = req.into_inner();
        let state = self.state.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(STREAM_IN_FLIGHT_MAX);
        tokio::spawn(async move {
            while let Some(next) = incoming.next().await {
                let allowed = |r: &pb::ModelInferRequest| {
                    crate::security::require(
                        identity.as_ref(),
                        quiver_auth::Role::Predictor,
                        [&r.model_name],
                    )
                    .map_err(|e| Status::permission_denied(e.message))
                };
                let reply = match next {
                    Err(e) => Err(e),
                    Ok(r) => Ok(
                        match async {
                            allowed(&r)?;
                            infer(&state, r).await
                        }
                        .await
                        {
                            Ok(resp) => pb::ModelStreamInferResponse {
                                error_message: String::new(),
                                infer_response: Some(resp),
                            },
                            Err(e) => pb::ModelStreamInferResponse {
                                error_message: e.message().to_string(),
                                infer_response: None,
                            },
                        },
                    ),
                };
                let end = reply.is_err();
                if tx.send(reply).await.is_err() || end {
                    return;
                }
            }
        });
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn repository_index(
        &self,
        _: Request<pb::RepositoryIndexRequest>,
    ) -> Result<Response<pb::RepositoryIndexResponse>, Status> {
        let snap = self.state.node.models.snapshot();
        let mut models = Vec::new();
        for m in snap.values() {
            for v in m.versions.values() {
                models.push(pb::repository_index_response::ModelIndex {
                    name: m.name.clone(),
                    version: v.version.to_string(),
                    state: if v.loaded.is_some() {
                        "READY"
                    } else {
                        "UNAVAILABLE"
                    }
                    .into(),
                    reason: v.error.clone().unwrap_or_default(),
                });
            }
        }
        Ok(Response::new(pb::RepositoryIndexResponse { models }))
    }
}

/// The gRPC router: the inference service and `quiver.v1.Ingest`, message sizes bounded by
/// the body limit.
pub fn service(state: Arc<AppState>) -> tonic::service::Routes {
    let limit = state.node.config.limits.request_body_bytes_max;
    let ingest = crate::grpc_ingest::service(state.clone());
    let svc =
        pb::grpc_inference_service_server::GrpcInferenceServiceServer::new(Inference { state })
            .max_decoding_message_size(limit)
            .max_encoding_message_size(usize::MAX);
    tonic::service::Routes::new(svc).add_service(ingest)
}
