//! The hottest requests — `GET /v1/features/{view}/{key}`, `POST /v1/models/{model}/predict`
//! and the batch reads `POST /v1/features` and Feast's `POST /get-online-features` — answered
//! beside the router.
//!
//! Measured (BENCHMARKS.md "A single-entity GET beside the router"): of a routed GET's ~61k
//! instructions, ~11k (18 %) are axum's per-request machinery — matching the path, the
//! matched-path and parameter extensions, the middleware's cloned and boxed services, the body
//! boxed into `axum::body::Body`, the extractors' decoded copies. This service sees
//! every HTTP request first: one of those (a plain path: no percent-escape, no empty or extra
//! segment; not in a cluster) goes through the same security layer
//! ([`crate::security::guarded`]: body limit, authentication, grants, tiers, deadline, audit)
//! and the same handler ([`crate::features::get_entity_of`], [`crate::predict::predict_of`],
//! [`crate::features::online_read_of`]) as
//! the routed one, with the route's access from the route table; everything else goes to the
//! router unchanged. So the two ways answer alike (tested:
//! `reads_and_predicts_beside_the_router_answer_as_the_router_does` and the role matrix, which
//! runs through it; the batch reads' paths have no escaped form, so on a single node they are
//! always taken here, and their routed twins serve only a cluster).

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

/// The routes this service answers itself, as the route table names them, in the order of
/// [`Taken::index`].
const ROUTES: [(Method, &str); 4] = [
    (Method::GET, "/v1/features/{view}/{key}"),
    (Method::POST, "/v1/models/{model}/predict"),
    (Method::POST, "/v1/features"),
    (Method::POST, "/get-online-features"),
];

/// A request taken beside the router.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Taken<'a> {
    Entity {
        view: &'a str,
        key: &'a str,
    },
    Predict {
        model: &'a str,
    },
    /// A batch read: `/v1/features` (strict) or Feast's route (lenient).
    Batch {
        feast: bool,
    },
}

impl<'a> Taken<'a> {
    /// Its route in [`ROUTES`].
    fn index(&self) -> usize {
        match self {
            Taken::Entity { .. } => 0,
            Taken::Predict { .. } => 1,
            Taken::Batch { feast: false } => 2,
            Taken::Batch { feast: true } => 3,
        }
    }

    /// What the route's grant is checked on: the view or the model its path names (a batch
    /// read's handler checks the views its body names).
    fn resource(&self) -> Option<&'a str> {
        match *self {
            Taken::Entity { view, .. } => Some(view),
            Taken::Predict { model } => Some(model),
            Taken::Batch { .. } => None,
        }
    }
}

/// The HTTP surface: the router, with the hottest requests taken beside it.
#[derive(Clone)]
pub struct Surface {
    router: axum::Router,
    /// Set when requests are answered here: a single node (in a cluster the router's layers
    /// forward and stamp the node that served). The access of each of [`ROUTES`].
    direct: Option<(Arc<AppState>, [Option<Access>; 4])>,
}

impl Surface {
    pub fn new(state: Arc<AppState>) -> Surface {
        let router = crate::router(state.clone());
        let access = ROUTES.map(|(method, path)| crate::access_of(&method, path));
        assert!(
            access.iter().all(Option::is_some),
            "the route table holds every route taken here"
        );
        let direct = state.peers.is_none().then_some((state, access));
        Surface { router, direct }
    }
}

/// The request this service answers, or `None` (the router's).
fn taken<'a>(method: &Method, path: &'a str) -> Option<Taken<'a>> {
    // Escapes are decoded (and refused when not UTF-8) by the router's extractor.
    let plain = |s: &str| !s.is_empty() && !s.contains(['/', '%']);
    if method == Method::GET {
        let (view, key) = path.strip_prefix("/v1/features/")?.split_once('/')?;
        return (plain(view) && plain(key)).then_some(Taken::Entity { view, key });
    }
    if method == Method::POST {
        match path {
            "/v1/features" => return Some(Taken::Batch { feast: false }),
            "/get-online-features" => return Some(Taken::Batch { feast: true }),
            _ => {}
        }
        let model = path.strip_prefix("/v1/models/")?.strip_suffix("/predict")?;
        return plain(model).then_some(Taken::Predict { model });
    }
    None // HEAD and the rest: the router's
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
        let Some(index) = taken(req.method(), req.uri().path()).map(|t| t.index()) else {
            return Either::Left(self.router.call(req));
        };
        let (route, access) = (ROUTES[index].1, access[index]);
        let state = state.clone();
        // Names are borrowed from clones of the method and URI (reference counts: hyper's URI
        // shares the bytes it was read into), so the request itself can move on.
        let (method, uri) = (req.method().clone(), req.uri().clone());
        Either::Right(Box::pin(async move {
            let resource = taken(&method, uri.path()).expect("taken above").resource();
            let handler = state.clone();
            let run = move |req: Request<B>| async move {
                let uri = req.uri().clone();
                match taken(req.method(), uri.path()).expect("taken above") {
                    Taken::Entity { view, key } => {
                        let headers = req.headers();
                        crate::features::get_entity_of(&handler, view, key, &uri, headers).await
                    }
                    Taken::Predict { model } => {
                        crate::predict::predict_of(&handler, model, req).await
                    }
                    Taken::Batch { feast } => {
                        use crate::features::Mode;
                        let mode = if feast { Mode::Feast } else { Mode::Online };
                        crate::features::online_read_of(&handler, req, mode).await
                    }
                }
            };
            let answer = crate::security::guarded(&state, req, route, access, resource, run);
            Ok(answer.await)
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_single_entity_gets_and_predicts_are_taken_beside_the_router() {
        let get = |p| taken(&Method::GET, p);
        let entity = |view, key| Some(Taken::Entity { view, key });
        assert_eq!(get("/v1/features/txn/u1"), entity("txn", "u1"));
        assert_eq!(get("/v1/features/txn/a+b:c"), entity("txn", "a+b:c"));
        let post = |p| taken(&Method::POST, p);
        assert_eq!(
            post("/v1/models/m/predict"),
            Some(Taken::Predict { model: "m" })
        );
        for routed in [
            "/v1/models/%6D/predict",
            "/v1/models//predict",
            "/v1/models/a/b/predict",
            "/v1/models/m/predict/",
            "/v1/models/m/promote",
            "/v1/models/m",
            "/v2/models/m/infer",
            "/v1/features/txn/u1",
            "/v1/features/",
            "/v1/features/historical",
            "/get-online-features/",
            "/get%2Donline-features",
        ] {
            assert_eq!(post(routed), None, "{routed}");
        }
        assert_eq!(post("/v1/features"), Some(Taken::Batch { feast: false }));
        assert_eq!(
            post("/get-online-features"),
            Some(Taken::Batch { feast: true })
        );
        assert_eq!(get("/get-online-features"), None);
        assert_eq!(get("/v1/models/m/predict"), None);
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
        for method in [Method::HEAD, Method::PUT, Method::DELETE] {
            assert_eq!(taken(&method, "/v1/features/txn/u1"), None, "{method}");
            assert_eq!(taken(&method, "/v1/models/m/predict"), None, "{method}");
        }
        // The routes it stands in for are in the table, with their access.
        use quiver_auth::Role::{Predictor, Reader};
        let roles = ROUTES.map(|(m, p)| crate::access_of(&m, p));
        let want = [Reader, Predictor, Reader, Reader].map(|r| Some(Access::Role(r)));
        assert_eq!(roles, want);
    }
}
