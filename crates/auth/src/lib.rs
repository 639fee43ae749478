//! Quiver's security layer on plain types (no HTTP, gRPC or TLS): who a request is
//! ([`Identity`], from an API key, a JWT or a client certificate), what it may do
//! ([`Grants`]), how fast ([`tiers`]), and the tamper-evident record of what was done
//! ([`audit`]). The surfaces (`quiver-server`) extract credentials from HTTP headers, gRPC
//! metadata and TLS sessions, and call [`Authenticator::authenticate`] and
//! [`Grants::allows`] — one layer over every surface.

pub mod audit;
pub mod grants;
pub mod jwt;
pub mod keys;
pub mod tiers;

use std::sync::Arc;

pub use grants::{Grant, Grants, Role};

/// How an identity was established.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `auth.mode = "none"`: every request, with every grant.
    Anonymous,
    ApiKey,
    Jwt,
    Certificate,
}

/// Who a request is and what it may do; attached to the request, its logs and its traces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// `key:<name>`, `jwt:<sub>`, `cert:<san>`, `anonymous`.
    pub name: String,
    pub kind: Kind,
    pub grants: Grants,
    /// Rate tier (`[[rate_tier]]` name).
    pub tier: Option<String>,
}

impl Identity {
    pub fn anonymous() -> Identity {
        Identity {
            name: "anonymous".into(),
            kind: Kind::Anonymous,
            grants: Grants::everything(),
            tier: None,
        }
    }

    pub fn allows(&self, role: Role, resource: Option<&str>) -> bool {
        self.grants.allows(role, resource)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No credentials where some are required (401).
    #[error("credentials required: an API key, a bearer JWT or a client certificate")]
    Missing,
    /// Credentials that do not check out (401).
    #[error("{0}")]
    Invalid(&'static str),
}

/// What a request presented.
#[derive(Debug, Default)]
pub struct Credentials<'a> {
    /// `Authorization: Bearer …` (an API key or a JWT) or `X-Api-Key`.
    pub bearer: Option<&'a str>,
    /// SANs of the verified client certificate (mTLS), if any.
    pub certificate_sans: Option<&'a [String]>,
}

/// `auth.mode`: which credentials are accepted (several may be).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Modes {
    pub api_key: bool,
    pub jwt: bool,
    pub mtls: bool,
}

impl Modes {
    /// `none`, or a comma-separated list of `api_key`, `jwt`, `mtls`.
    pub fn parse(text: &str) -> Result<Modes, String> {
        let mut m = Modes::default();
        for part in text.split(',').map(str::trim) {
            match part {
                "none" if text.trim() == "none" => {}
                "api_key" => m.api_key = true,
                "jwt" => m.jwt = true,
                "mtls" => m.mtls = true,
                other => {
                    return Err(format!(
                        "auth.mode: unknown mode {other:?} (none, api_key, jwt, mtls)"
                    ))
                }
            }
        }
        Ok(m)
    }

    pub fn none(&self) -> bool {
        !(self.api_key || self.jwt || self.mtls)
    }
}

/// The configured ways to establish an identity.
pub struct Authenticator {
    pub modes: Modes,
    keys: Option<Arc<keys::KeyStore>>,
    jwt: Option<jwt::JwtVerifier>,
}

impl Authenticator {
    pub fn new(
        modes: Modes,
        keys: Option<Arc<keys::KeyStore>>,
        jwt: Option<jwt::JwtVerifier>,
    ) -> Authenticator {
        Authenticator { modes, keys, jwt }
    }

    pub fn open() -> Authenticator {
        Authenticator::new(Modes::default(), None, None)
    }

    /// The identity of a request: anonymous when auth is off; else the first credential that
    /// checks out (a client certificate the keys file maps, then a bearer token — an API key
    /// if it looks like one, else a JWT).
    pub fn authenticate(&self, c: &Credentials<'_>) -> Result<Identity, AuthError> {
        if self.modes.none() {
            return Ok(Identity::anonymous());
        }
        if self.modes.mtls {
            if let (Some(sans), Some(keys)) = (c.certificate_sans, &self.keys) {
                if let Some(id) = keys.certificate(sans) {
                    return Ok(id);
                }
            }
        }
        let Some(token) = c.bearer else {
            return Err(AuthError::Missing);
        };
        if token.starts_with(keys::TOKEN_PREFIX) {
            return match (&self.keys, self.modes.api_key) {
                (Some(k), true) => k.verify(token),
                _ => Err(AuthError::Invalid("API keys are not accepted here")),
            };
        }
        match (&self.jwt, self.modes.jwt) {
            (Some(j), true) => j.verify(token),
            _ => Err(AuthError::Invalid(
                "bearer tokens other than API keys are not accepted here",
            )),
        }
    }
}
