//! The security layer on gRPC: the same [`Security::check`] as HTTP, before a call's messages
//! are read. Credentials come from metadata (`authorization: Bearer …`, `x-api-key`) and the
//! connection (mTLS); each method needs a role; the identity travels in the request's
//! extensions, where the handlers check the models and views their messages name. Deadlines
//! are tonic's (`grpc-timeout`, bounded by `server.request_timeout_max`).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use quiver_auth::{Credentials, Role};

use crate::listen::Peer;
use crate::security::Denial;
use crate::AppState;

/// The role each gRPC method needs (health is public unless `auth.public` drops it).
pub fn method_role(path: &str) -> Option<Role> {
    let method = path.rsplit('/').next().unwrap_or("");
    match method {
        "ServerLive" | "ServerReady" => None,
        "ServerMetadata" | "ModelReady" | "ModelMetadata" | "ModelInfer" | "ModelStreamInfer"
        | "RepositoryIndex" => Some(Role::Predictor),
        "Push" => Some(Role::Producer),
        _ => Some(Role::Admin),
    }
}

#[derive(Clone)]
pub struct GuardLayer {
    state: Arc<AppState>,
}

impl GuardLayer {
    pub fn new(state: Arc<AppState>) -> GuardLayer {
        GuardLayer { state }
    }
}

impl<S> tower::Layer<S> for GuardLayer {
    type Service = Guard<S>;
    fn layer(&self, inner: S) -> Guard<S> {
        Guard {
            inner,
            state: self.state.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Guard<S> {
    inner: S,
    state: Arc<AppState>,
}

fn status(d: Denial) -> tonic::Status {
    use quiver_auth::tiers::Refused;
    match d {
        Denial::Unauthenticated(e) => tonic::Status::unauthenticated(e.to_string()),
        Denial::Forbidden { identity, need } => {
            tonic::Status::permission_denied(format!("{identity} lacks the grant {need}"))
        }
        Denial::Limited(Refused::RateLimited { tier, limit, .. }) => {
            tonic::Status::resource_exhausted(format!("over the {tier} tier's {limit} requests/s"))
        }
        Denial::Limited(Refused::Saturated { tier, .. }) => {
            tonic::Status::unavailable(format!("the node is busy; the {tier} tier's share is full"))
        }
    }
}

impl<S, B, R> tower::Service<axum::http::Request<B>> for Guard<S>
where
    S: tower::Service<axum::http::Request<B>, Response = axum::http::Response<R>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
    R: Default + Send + 'static,
{
    type Response = axum::http::Response<R>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<axum::http::Response<R>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: axum::http::Request<B>) -> Self::Future {
        let path = req.uri().path().to_string();
        let sec = &self.state.security;
        let mut span = tracing::Span::none();
        // `Some(tier)`: the call needs an in-flight slot of that tier's priority.
        let admission: Option<Option<String>> = match method_role(&path) {
            None => None,
            Some(_) if sec_is_public(sec, &path) => None,
            Some(role) => {
                let bearer = req
                    .headers()
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| {
                        v.strip_prefix("Bearer ")
                            .or_else(|| v.strip_prefix("bearer "))
                    })
                    .or_else(|| req.headers().get("x-api-key").and_then(|v| v.to_str().ok()));
                let sans = req.extensions().get::<Peer>().and_then(|p| p.sans.clone());
                let cred = Credentials {
                    bearer: bearer.map(str::trim),
                    certificate_sans: sans.as_deref(),
                };
                match sec.check(&format_args!("gRPC {path}"), &cred, role, None) {
                    Ok((identity, _allowance)) => {
                        let tier = identity.tier.clone();
                        span = crate::security::request_span(&identity, "gRPC", &path);
                        req.extensions_mut().insert(identity);
                        Some(tier)
                    }
                    Err(d) => {
                        let resp = status(d).into_http();
                        return Box::pin(async move { Ok(resp) });
                    }
                }
            }
        };
        let fut = self.inner.call(req);
        let state = self.state.clone();
        let call = async move {
            // The slot is held until the call is answered; the wait for it is bounded by the
            // call's deadline (tonic's timeout around this service).
            let permit = match admission {
                None => None,
                Some(tier) => match state.security.admit(tier.as_deref()).await {
                    Ok(p) => Some(p),
                    Err(d) => return Ok(status(d).into_http()),
                },
            };
            let answered = match (&state.lower, permit.as_ref().is_some_and(|p| p.lowered())) {
                // A tier below a better one that is active: on the idle-priority threads.
                (Some(pool), true) => pool.run(fut).await,
                _ => fut.await,
            };
            // The access log (at debug), in the call's span as HTTP's is: a refusal by the
            // handler comes back as a trailers-only answer carrying its `grpc-status` here;
            // a call answered with a stream says 0, its own status coming at the stream's end.
            if let Ok(resp) = &answered {
                let code = resp
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok());
                tracing::debug!(grpc_status = code.unwrap_or("0"), "answered");
            }
            answered
        };
        Box::pin(tracing::Instrument::instrument(call, span))
    }
}

fn sec_is_public(sec: &crate::Security, path: &str) -> bool {
    sec.public_path(path)
}
