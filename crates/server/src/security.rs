//! The security layer over every surface: who a request is (`quiver_auth::Authenticator`), what
//! it may do (each route's [`Access`]), how fast (rate tiers), how long (deadlines), and what
//! is written to the audit trail. HTTP goes through [`guarded`] — from the router's middleware
//! [`guard`], or from `crate::direct` for the requests answered beside the router; gRPC through
//! `grpc_guard::GuardLayer`, which calls the same [`Security::check`].
//!
//! # Design constraints
//! - Every route is declared once, with its access, in [`crate::routes`]; the router is built
//!   from that table and the endpoint × role test reads it, so no route escapes either.
//! - A route's access is checked before its body is read: the role, and the view or model
//!   the path names. Views and models a body names are checked by the handler once decoded
//!   ([`require`]), before anything is written or computed.
//! - 401 for missing or invalid credentials, 403 for a known identity without the grant,
//!   429 over the rate tier, 503 when the node is at the tier's share of in-flight requests or
//!   the deadline passed; all structured, and every refusal of credentials or grants is an
//!   audit entry.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{MatchedPath, RawPathParams, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::RequestExt;
use quiver_auth::audit::AuditLog;
use quiver_auth::keys::KeyStore;
use quiver_auth::tiers::{Allowance, Limits, Permit, Refused, TierConfig};
use quiver_auth::{AuthError, Authenticator, Credentials, Identity, Modes, Role};
use quiver_core::telemetry as t;

use crate::error::ApiError;
use crate::listen::Peer;
use crate::AppState;

/// What a route needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Needs no credentials unless removed from `auth.public`; else `ops`.
    Health,
    /// A role; on the path's `{view}` or `{model}` if it has one.
    Role(Role),
}

/// Header a client sets to bound how long its request may run.
pub const TIMEOUT_HEADER: &str = "quiver-timeout-ms";

pub struct Security {
    pub auth: Authenticator,
    pub limits: Limits,
    pub audit: Option<Arc<AuditLog>>,
    public: Vec<String>,
    timeout_max: Duration,
}

impl Security {
    /// From the config: keys file, JWKS, tiers (paths relative to `data_dir`), and the node's
    /// audit trail.
    pub fn from_config(c: &quiver_core::Config, audit: Arc<AuditLog>) -> Result<Security, String> {
        let modes = Modes::parse(&c.auth.mode)?;
        let rel = |p: &std::path::Path| {
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                c.server.data_dir.join(p)
            }
        };
        let keys = if modes.api_key || modes.mtls {
            Some(Arc::new(
                KeyStore::open(&rel(&c.auth.keys_file), Some(audit.clone()))
                    .map_err(|e| e.to_string())?,
            ))
        } else {
            None
        };
        let jwt = match (&c.auth.jwks_file, modes.jwt) {
            (Some(f), true) => Some(quiver_auth::jwt::JwtVerifier::open(
                quiver_auth::jwt::JwtOptions {
                    jwks_file: rel(f),
                    audience: c.auth.jwt_audience.clone(),
                    issuer: c.auth.jwt_issuer.clone(),
                    roles_claim: c.auth.roles_claim.clone(),
                    tier_claim: c.auth.tier_claim.clone(),
                },
            )?),
            _ => None,
        };
        let tiers: Vec<TierConfig> = c
            .rate_tiers
            .iter()
            .map(|t| TierConfig {
                name: t.name.clone(),
                priority: t.priority,
                rate_per_s: t.rate_per_s,
                burst: t.burst,
            })
            .collect();
        let audit = Some(audit);
        Ok(Security {
            auth: Authenticator::new(modes, keys, jwt),
            limits: Limits::new(&tiers, c.server.inflight_max)?,
            audit,
            public: c.auth.public.clone(),
            timeout_max: c.server.request_timeout_max.0,
        })
    }

    /// Records an admin action (or any event) in the audit trail, if there is one.
    pub fn record(&self, id: &Identity, action: &str, target: &str, outcome: &str, detail: &str) {
        if let Some(a) = &self.audit {
            a.record(&id.name, action, target, outcome, detail);
        }
    }

    /// Whether a route (its path template) or gRPC method path needs no credentials.
    pub fn public_path(&self, path: &str) -> bool {
        self.public.iter().any(|p| p == path)
    }

    /// Authenticates and authorizes a call of a route needing `role` (on `resource` if the
    /// route names one), then takes its rate token. The in-flight slot is [`admit`](Self::admit).
    pub fn check(
        &self,
        what: &dyn std::fmt::Display,
        cred: &Credentials<'_>,
        role: Role,
        resource: Option<&str>,
    ) -> Result<(Identity, Option<Allowance>), Denial> {
        let id = self.auth.authenticate(cred).map_err(|e| {
            self.denied("anonymous", what, "401", &e.to_string());
            Denial::Unauthenticated(e)
        })?;
        if !id.allows(role, resource) {
            let need = format!("{role}:{}", resource.unwrap_or("*"));
            self.denied(&id.name, what, "403", &format!("lacks {need}"));
            return Err(Denial::Forbidden {
                identity: id.name,
                need,
            });
        }
        let allowance = self
            .limits
            .check_rate(&id.name, id.tier.as_deref())
            .map_err(limited)?;
        Ok((id, allowance))
    }

    /// An in-flight slot for a request of `tier`, waiting in its priority's queue if the node
    /// is busy (the caller bounds the wait by the request's deadline).
    pub async fn admit(&self, tier: Option<&str>) -> Result<Permit, Denial> {
        self.limits.admit(tier).await.map_err(limited)
    }

    fn denied(&self, who: &str, what: &dyn std::fmt::Display, status: &str, why: &str) {
        let what = what.to_string();
        let what = what.as_str();
        metrics::counter!(t::REQUESTS_REFUSED_TOTAL, "status" => status.to_string()).increment(1);
        tracing::warn!(
            identity = who,
            request = what,
            status,
            reason = why,
            "request refused"
        );
        if let Some(a) = &self.audit {
            a.record(who, "denied", what, status, why);
        }
    }

    /// A request's deadline: the client's (`Quiver-Timeout-Ms`), at most `request_timeout_max`.
    pub fn deadline(&self, headers: &HeaderMap) -> Duration {
        headers
            .get(TIMEOUT_HEADER)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
            .map_or(self.timeout_max, |ms| {
                Duration::from_millis(ms).min(self.timeout_max)
            })
    }
}

/// A refusal by rate or load: counted (not audited — a flood would fill the trail).
fn limited(r: Refused) -> Denial {
    let status = match r {
        Refused::RateLimited { .. } => "429",
        Refused::Saturated { .. } => "503",
    };
    metrics::counter!(t::REQUESTS_REFUSED_TOTAL, "status" => status).increment(1);
    Denial::Limited(r)
}

/// Why a request was refused before it ran.
#[derive(Debug)]
pub enum Denial {
    Unauthenticated(AuthError),
    Forbidden { identity: String, need: String },
    Limited(Refused),
}

impl Denial {
    fn into_response(self) -> Response {
        match self {
            Denial::Unauthenticated(e) => {
                let mut r = ApiError::new(StatusCode::UNAUTHORIZED, "UNAUTHENTICATED", e.to_string()).into_response();
                r.headers_mut().insert("www-authenticate", HeaderValue::from_static("Bearer realm=\"quiver\""));
                r
            }
            Denial::Forbidden { identity, need } => ApiError::new(StatusCode::FORBIDDEN, "FORBIDDEN", format!("{identity} lacks the grant {need}"))
                .detail("need", need)
                .into_response(),
            Denial::Limited(Refused::RateLimited { tier, limit, retry_after }) => {
                let secs = retry_after.as_secs_f64().ceil().max(1.0) as u32;
                let mut r = ApiError::new(StatusCode::TOO_MANY_REQUESTS, "RATE_LIMITED", format!("over the {tier} tier's {limit} requests/s"))
                    .retry_after(secs)
                    .into_response();
                let h = r.headers_mut();
                h.insert("ratelimit-limit", HeaderValue::from(limit));
                h.insert("ratelimit-remaining", HeaderValue::from(0));
                h.insert("ratelimit-reset", HeaderValue::from(secs));
                r
            }
            Denial::Limited(Refused::Saturated { tier, inflight, share }) => ApiError::unavailable(
                "SATURATED",
                format!("the node is busy: {inflight} requests running, the {tier} tier's share is {share}"),
            )
            .into_response(),
        }
    }
}

/// The span a request runs in, naming who sent it: every line it logs carries the identity.
/// Without authentication every caller is `anonymous` and the span would say nothing, so
/// none is made (a span costs the read path allocations and formatting per request).
pub(crate) fn request_span(identity: &Identity, method: &str, path: &str) -> tracing::Span {
    if identity.kind == quiver_auth::Kind::Anonymous {
        return tracing::Span::none();
    }
    tracing::info_span!("request", identity = %identity.name, method = %method, path = %path)
}

/// Credentials of an HTTP request: `Authorization: Bearer`, `X-Api-Key`, the mTLS peer.
fn credentials<'a>(headers: &'a HeaderMap, peer: Option<&'a Peer>) -> Credentials<'a> {
    let bearer = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()));
    Credentials {
        bearer: bearer.map(str::trim),
        certificate_sans: peer.and_then(|p| p.sans.as_deref()),
    }
}

/// The HTTP middleware: 413 before an oversized body is read, then [`Security::check`] for the
/// matched route, the deadline, and the identity attached to the request and its span.
pub async fn guard(State(state): State<Arc<AppState>>, mut req: Request, next: Next) -> Response {
    // A clone of the matched path is a reference count, not a copy of the text.
    let Some(matched) = req.extensions().get::<MatchedPath>().cloned() else {
        return next.run(req).await; // no route: the fallback answers 404
    };
    let path = matched.as_str();
    let access = crate::access_of(req.method(), path);
    let params = req.extract_parts::<RawPathParams>().await.ok();
    let resource = params.as_ref().and_then(|params| {
        params
            .iter()
            .find(|(k, _)| *k == "view" || *k == "model")
            .map(|(_, v)| v)
    });
    guarded(&state, req, path, access, resource, |req| next.run(req)).await
}

/// The guard's work on a request to the route `path` (its pattern) with `access`, naming
/// `resource` (its `{view}` or `{model}`): refusals answered here, `run` called with the
/// request once admitted. For the router's routes ([`guard`]) and for the requests answered
/// beside the router (`crate::direct`): one layer, whichever way a request arrives.
pub(crate) async fn guarded<B, F, Fut>(
    state: &Arc<AppState>,
    mut req: axum::http::Request<B>,
    path: &str,
    access: Option<Access>,
    resource: Option<&str>,
    run: F,
) -> Response
where
    F: FnOnce(axum::http::Request<B>) -> Fut,
    Fut: std::future::Future<Output = Response> + Send + 'static,
{
    let limit = state.node.config.limits.request_body_bytes_max;
    let declared = req
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        if access == Some(Access::Role(Role::Producer)) {
            quiver_serving::ingest::reject("body_too_large", 1);
        }
        return crate::body::too_large(limit).into_response();
    }
    // The handler's future is boxed where it is made: it is several kilobytes, and this
    // function moves it (into the span, the task-local scope, the admission, the timeout) —
    // one copy each: ~1.2k instructions of `memcpy` a GET (callgrind), for one allocation.
    let sec = &state.security;
    if sec.public_path(path) {
        return Box::pin(run(req)).await;
    }
    let role = match access {
        Some(Access::Health) => Role::Ops,
        Some(Access::Role(r)) => r,
        None => return Box::pin(run(req)).await,
    };
    let checked = sec.check(
        // Formatted only if the request is refused.
        &format_args!("{} {}", req.method(), req.uri().path()),
        &credentials(req.headers(), req.extensions().get::<Peer>()),
        role,
        resource,
    );
    let (identity, allowance) = match checked {
        Ok(ok) => ok,
        Err(d) => return d.into_response(),
    };
    let deadline = sec.deadline(req.headers());
    let tier = identity.tier.clone();
    let span = request_span(&identity, req.method().as_str(), path);
    req.extensions_mut().insert(identity);
    // In a cluster, rows read on other nodes for this request go with its credentials.
    let caller = match &state.peers {
        Some(_) => crate::peer_rows::caller_credentials(req.headers()),
        None => HeaderMap::new(),
    };
    let run = crate::peer_rows::CALLER.scope(
        caller,
        tracing::Instrument::instrument(Box::pin(run(req)), span.clone()),
    );
    // The deadline covers the wait for a slot as well as the work.
    let admitted = async {
        let permit = sec.admit(tier.as_deref()).await?; // held until the handler is done
        Ok::<_, Denial>(match &state.lower {
            Some(pool) if permit.lowered() => pool.run(run).await,
            _ => run.await,
        })
    };
    let mut resp = match tokio::time::timeout(deadline, admitted).await {
        Ok(Ok(r)) => r,
        Ok(Err(d)) => return d.into_response(),
        Err(_) => ApiError::unavailable(
            "DEADLINE_EXCEEDED",
            format!("the request ran past its {deadline:?} deadline; its work was dropped"),
        )
        .into_response(),
    };
    // The access log (at debug): one line per admitted request, with who sent it.
    tracing::debug!(parent: &span, status = resp.status().as_u16(), "answered");
    if let Some(a) = allowance {
        let h = resp.headers_mut();
        h.insert("ratelimit-limit", HeaderValue::from(a.limit));
        h.insert("ratelimit-remaining", HeaderValue::from(a.remaining));
    }
    resp
}

/// A handler's check of the views or models its body names (the route's guard checked the
/// role). Without an identity (auth off) everything is allowed.
pub fn require(
    identity: Option<&Identity>,
    role: Role,
    resources: impl IntoIterator<Item = impl AsRef<str>>,
) -> Result<(), ApiError> {
    let Some(id) = identity else { return Ok(()) };
    for r in resources {
        let r = r.as_ref();
        if !id.allows(role, Some(r)) {
            let need = format!("{role}:{r}");
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "FORBIDDEN",
                format!("{} lacks the grant {need}", id.name),
            )
            .detail("need", need));
        }
    }
    Ok(())
}

/// [`require`] for gRPC handlers: the identity from the call's extensions (set by the guard).
pub fn require_grpc<T>(
    req: &tonic::Request<T>,
    role: Role,
    resources: impl IntoIterator<Item = impl AsRef<str>>,
) -> Result<(), tonic::Status> {
    require(req.extensions().get::<Identity>(), role, resources)
        .map_err(|e| tonic::Status::permission_denied(e.message))
}
