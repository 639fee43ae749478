//! The hottest read, `GET /v1/features/{view}/{key}`, answered beside the router.
//!
//! Measured (BENCHMARKS.md "A single-entity GET beside the router"): of a routed GET's ~61k
//! instructions, ~11k (18 %) are axum's per-request machinery — matching the path, the
//! matched-path and parameter extensions, the middleware's cloned and boxed services, the body
//! boxed into `axum::body::Body`, the extractors' decoded copies. This service sees
//! every HTTP request first: a plain single-entity GET (no percent-escape, no empty or extra
//! segment, not in a cluster) goes through the same security layer
//! ([`crate::security::guarded`]: authentication, grants, tiers, deadline, audit) and the same
//! handler ([`crate::features::get_entity_of`]) as the routed one, with the route's access from
//! the route table; everything else goes to the router unchanged. So the two ways answer
//! alike (tested: `a_get_beside_the_router_answers_as_the_router_does` and the role matrix,
//! which runs through it).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::http::{Method, Request};
use axum::response::Response;
use futures_util::future::Either;

use crate::security::Access;
use crate::AppState;

/// The route this service answers itself, as the route table names it.
const ENTITY_ROUTE: &str = "/v1/features/{view}/{key}";

/// The HTTP surface: the router, with the single-entity GET taken beside it.
#[derive(Clone)]
pub struct Surface {
    router: axum::Router,
    /// Set when GETs are answered here: a single node (in a cluster the router's layers
    /// forward and stamp the node that served).
    direct: Option<(Arc<AppState>, Option<Access>)>,
}

impl Surface {
    pub fn new(state: Arc<AppState>) -> Surface {
        let router = crate::router(state.clone());
        let access = crate::access_of(&Method::GET, ENTITY_ROUTE);
        assert!(access.is_some(), "the route table holds {ENTITY_ROUTE}");
        let direct = state.peers.is_none().then_some((state, access));
        Surface { router, direct }
    }
}

/// The view and key of a single-entity GET this service answers, or `None` (the router's).
fn entity_get<'a>(method: &Method, path: &'a str) -> Option<(&'a str, &'a str)> {
    if method != Method::GET {
        return None; // HEAD and the rest: the router's
    }
    let (view, key) = path.strip_prefix("/v1/features/")?.split_once('/')?;
    // Escapes are decoded (and refused when not UTF-8) by the router's extractor.
    let plain = |s: &str| !s.is_empty() && !s.contains(['/', '%']);
    (plain(view) && plain(key)).then_some((view, key))
}

type Answer = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

impl<B> tower::Service<Request<B>> for Surface
where
    B: axum::body::HttpBody<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Either<axum::routing::future::RouteFuture<Infallible>, Answer>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        tower::Service::<Request<B>>::poll_ready(&mut self.router, cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let Some((state, access)) = &self.direct else {
            return Either::Left(self.router.call(req));
        };
        if entity_get(req.method(), req.uri().path()).is_none() {
            return Either::Left(self.router.call(req));
        }
        let (state, access) = (state.clone(), *access);
        // The view for the grant check, borrowed from a clone of the URI (a reference count:
        // hyper's URI shares the bytes it was read into).
        let uri = req.uri().clone();
        Either::Right(Box::pin(async move {
            let (view, _) = entity_get(&Method::GET, uri.path()).expect("checked above");
            let handler = state.clone();
            let run = move |req: Request<B>| async move {
                let (view, key) = entity_get(req.method(), req.uri().path()).expect("checked");
                crate::features::get_entity_of(&handler, view, key, req.uri(), req.headers()).await
            };
            let answer =
                crate::security::guarded(&state, req, ENTITY_ROUTE, access, Some(view), run);
            Ok(answer.await)
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_plain_single_entity_get_is_taken_beside_the_router() {
        let get = |p| entity_get(&Method::GET, p);
        assert_eq!(get("/v1/features/txn/u1"), Some(("txn", "u1")));
        assert_eq!(get("/v1/features/txn/a+b:c"), Some(("txn", "a+b:c")));
        for routed in [
            "/v1/features/txn/u%31", // escapes: the router decodes them
            "/v1/features/%74xn/u1",
            "/v1/features/txn/", // empty segments
            "/v1/features//u1",
            "/v1/features/txn/u1/", // more segments
            "/v1/features/txn/u1/x",
            "/v1/features/txn", // fewer
            "/v1/features/historical",
            "/v1/features",
            "/v1/featuresx/txn/u1",
            "/v2/features/txn/u1",
        ] {
            assert_eq!(get(routed), None, "{routed}");
        }
        for method in [Method::HEAD, Method::POST, Method::PUT, Method::DELETE] {
            assert_eq!(entity_get(&method, "/v1/features/txn/u1"), None, "{method}");
        }
        // The route it stands in for is in the table, with its access.
        assert_eq!(
            crate::access_of(&Method::GET, ENTITY_ROUTE),
            Some(Access::Role(quiver_auth::Role::Reader))
        );
    }
}
