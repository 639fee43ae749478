//! JWT bearer tokens, verified against a JWKS file: the signature (RS256 or ES256) by the key
//! the token's `kid` names (or the set's only key), `exp` and `nbf` (with `LEEWAY_S` of clock
//! skew), `aud` (must contain `auth.jwt_audience`) and, when configured, `iss`. Grants come
//! from a claim (`roles` by default: an array of `role:resource` strings), the rate tier from
//! another (`tier`). The JWKS file is re-read when it changes, so keys rotate without a
//! restart.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use parking_lot::{Mutex, RwLock};
use serde_json::{Map, Value};

use crate::{AuthError, Grants, Identity, Kind};

/// Clock skew tolerated on `exp` and `nbf`.
const LEEWAY_S: u64 = 30;
const RECHECK_EVERY: Duration = Duration::from_secs(1);

/// What a deployment's tokens look like.
#[derive(Debug, Clone)]
pub struct JwtOptions {
    pub jwks_file: PathBuf,
    pub audience: String,
    pub issuer: Option<String>,
    pub roles_claim: String,
    pub tier_claim: String,
}

pub struct JwtVerifier {
    opts: JwtOptions,
    keys: RwLock<(Option<SystemTime>, JwkSet)>,
    checked: Mutex<Instant>,
}

fn load(path: &Path) -> Result<JwkSet, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{}: not a JWKS: {e}", path.display()))
}

impl JwtVerifier {
    pub fn open(opts: JwtOptions) -> Result<JwtVerifier, String> {
        let modified = std::fs::metadata(&opts.jwks_file)
            .and_then(|m| m.modified())
            .ok();
        let set = load(&opts.jwks_file)?;
        Ok(JwtVerifier {
            keys: RwLock::new((modified, set)),
            checked: Mutex::new(Instant::now()),
            opts,
        })
    }

    fn refresh(&self) {
        {
            let mut checked = self.checked.lock();
            if checked.elapsed() < RECHECK_EVERY {
                return;
            }
            *checked = Instant::now();
        }
        let modified = std::fs::metadata(&self.opts.jwks_file)
            .and_then(|m| m.modified())
            .ok();
        if modified == self.keys.read().0 {
            return;
        }
        match load(&self.opts.jwks_file) {
            Ok(set) => {
                tracing::info!(keys = set.keys.len(), "JWKS reloaded");
                *self.keys.write() = (modified, set);
            }
            Err(e) => tracing::error!(
                error = e,
                "JWKS changed but does not load; keeping the last good one"
            ),
        }
    }

    /// The identity a token carries, or why it is refused.
    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        self.refresh();
        let header =
            jsonwebtoken::decode_header(token).map_err(|_| AuthError::Invalid("malformed JWT"))?;
        if !matches!(header.alg, Algorithm::RS256 | Algorithm::ES256) {
            return Err(AuthError::Invalid("JWT algorithm must be RS256 or ES256"));
        }
        let key = {
            let keys = self.keys.read();
            let jwk = match &header.kid {
                Some(kid) => keys.1.find(kid),
                None if keys.1.keys.len() == 1 => keys.1.keys.first(),
                None => None,
            }
            .ok_or(AuthError::Invalid("JWT signed by an unknown key"))?;
            DecodingKey::from_jwk(jwk).map_err(|_| AuthError::Invalid("unusable JWKS key"))?
        };
        let mut v = Validation::new(header.alg);
        v.leeway = LEEWAY_S;
        v.validate_nbf = true;
        v.set_audience(&[&self.opts.audience]);
        v.required_spec_claims = ["exp", "aud"].into_iter().map(String::from).collect();
        if let Some(iss) = &self.opts.issuer {
            // Configured, `iss` is required: a token that names no issuer is refused too.
            v.set_issuer(&[iss]);
            v.required_spec_claims.insert("iss".into());
        }
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, &key, &v).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind as K;
            AuthError::Invalid(match e.kind() {
                K::ExpiredSignature => "JWT expired",
                K::ImmatureSignature => "JWT not valid yet (nbf)",
                K::InvalidAudience => "JWT for another audience",
                K::InvalidIssuer => "JWT from another issuer",
                K::InvalidSignature => "JWT signature does not verify",
                K::MissingRequiredClaim(c) if c == "iss" => "JWT names no issuer",
                K::MissingRequiredClaim(_) => "JWT lacks exp or aud",
                _ => "JWT refused",
            })
        })?;
        self.identity(&data.claims)
    }

    fn identity(&self, claims: &Map<String, Value>) -> Result<Identity, AuthError> {
        let roles: Vec<&str> = match claims.get(&self.opts.roles_claim) {
            Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
            Some(Value::String(s)) => s.split_whitespace().collect(),
            _ => Vec::new(),
        };
        let grants =
            Grants::parse(roles).map_err(|_| AuthError::Invalid("JWT roles do not parse"))?;
        let sub = claims.get("sub").and_then(Value::as_str).unwrap_or("?");
        Ok(Identity {
            name: format!("jwt:{sub}"),
            kind: Kind::Jwt,
            grants,
            tier: claims
                .get(&self.opts.tier_claim)
                .and_then(Value::as_str)
                .map(str::to_string),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;
    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::json;

    /// A P-256 key: its signer and its JWK (`kid`).
    fn key(kid: &str) -> (EncodingKey, Value) {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let raw = pair.public_key_raw();
        assert_eq!((raw.len(), raw[0]), (65, 4), "an uncompressed point");
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let jwk = json!({"kty": "EC", "crv": "P-256", "kid": kid, "alg": "ES256", "use": "sig",
                         "x": b64(&raw[1..33]), "y": b64(&raw[33..])});
        (
            EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).unwrap(),
            jwk,
        )
    }

    fn sign(k: &EncodingKey, kid: &str, claims: Value) -> String {
        let mut h = Header::new(Algorithm::ES256);
        h.kid = Some(kid.into());
        jsonwebtoken::encode(&h, &claims, k).unwrap()
    }

    /// A verifier of `jwks_file` for audience `quiver`, no issuer.
    fn verifier(jwks_file: std::path::PathBuf) -> JwtVerifier {
        JwtVerifier::open(JwtOptions {
            jwks_file,
            audience: "quiver".into(),
            issuer: None,
            roles_claim: "roles".into(),
            tier_claim: "tier".into(),
        })
        .unwrap()
    }

    fn now() -> i64 {
        SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    }

    /// RS256 with a fixed RSA key (ring, behind rcgen, cannot generate RSA keys): generated
    /// once with `openssl genrsa 2048` for this test and used nowhere else; its JWK holds the
    /// modulus and exponent.
    #[test]
    fn an_rs256_token_verifies_beside_es256_keys_and_no_key_verifies_another_algorithm() {
        let dir = tempfile::tempdir().unwrap();
        let rsa_jwk: Value =
            serde_json::from_str(include_str!("testdata/rs256-test-key.jwk.json")).unwrap();
        let rsa = EncodingKey::from_rsa_pem(include_bytes!("testdata/rs256-test-key.pem")).unwrap();
        let (ec, ec_jwk) = key("e1");
        let path = dir.path().join("jwks.json");
        std::fs::write(&path, json!({"keys": [rsa_jwk, ec_jwk]}).to_string()).unwrap();
        let v = verifier(path);
        let claims =
            json!({"sub": "svc", "aud": "quiver", "exp": now() + 60, "roles": ["predictor:m"]});
        let rs256 = |kid: &str, claims: &Value| {
            let mut h = Header::new(Algorithm::RS256);
            h.kid = Some(kid.into());
            jsonwebtoken::encode(&h, claims, &rsa).unwrap()
        };
        let id = v.verify(&rs256("r1", &claims)).unwrap();
        assert_eq!(id.name, "jwt:svc");
        assert!(id.allows(crate::Role::Predictor, Some("m")));
        assert!(
            v.verify(&sign(&ec, "e1", claims.clone())).is_ok(),
            "ES256 beside it"
        );
        // An RS256 token naming the EC key, and an ES256 token naming the RSA key: refused.
        assert!(v.verify(&rs256("e1", &claims)).is_err());
        assert!(v.verify(&sign(&ec, "r1", claims.clone())).is_err());
        let mut expired = claims.clone();
        expired["exp"] = json!(now() - 3600);
        assert!(matches!(
            v.verify(&rs256("r1", &expired)),
            Err(AuthError::Invalid("JWT expired"))
        ));
        let mut forged = rs256("r1", &claims);
        let sig = forged.split_off(forged.rfind('.').unwrap() + 1);
        forged.push_str(&sig.chars().rev().collect::<String>());
        assert!(v.verify(&forged).is_err(), "a signature not of this key");
    }

    #[test]
    fn only_a_current_token_for_this_audience_signed_by_a_known_key_passes() {
        let dir = tempfile::tempdir().unwrap();
        let (signer, jwk) = key("k1");
        let (forger, _) = key("k1");
        let (stranger, _) = key("k9");
        let path = dir.path().join("jwks.json");
        std::fs::write(&path, json!({"keys": [jwk]}).to_string()).unwrap();
        let v = verifier(path);
        let t = now();
        let good = json!({"sub": "svc", "aud": "quiver", "exp": t + 60, "roles": ["reader:txn"], "tier": "gold"});
        let id = v.verify(&sign(&signer, "k1", good.clone())).unwrap();
        assert_eq!(
            (id.name.as_str(), id.tier.as_deref()),
            ("jwt:svc", Some("gold"))
        );
        assert!(
            id.allows(crate::Role::Reader, Some("txn"))
                && !id.allows(crate::Role::Reader, Some("x"))
        );
        let refused =
            |claims: Value, k: &EncodingKey, kid: &str| match v.verify(&sign(k, kid, claims)) {
                Err(AuthError::Invalid(why)) => why,
                other => panic!("accepted: {other:?}"),
            };
        let mut expired = good.clone();
        expired["exp"] = json!(t - 3600);
        assert_eq!(refused(expired, &signer, "k1"), "JWT expired");
        let mut early = good.clone();
        early["nbf"] = json!(t + 3600);
        assert_eq!(refused(early, &signer, "k1"), "JWT not valid yet (nbf)");
        let mut other = good.clone();
        other["aud"] = json!("someone-else");
        assert_eq!(refused(other, &signer, "k1"), "JWT for another audience");
        assert_eq!(
            refused(good.clone(), &forger, "k1"),
            "JWT signature does not verify"
        );
        assert_eq!(
            refused(good.clone(), &stranger, "k9"),
            "JWT signed by an unknown key"
        );
        let mut no_exp = good.clone();
        no_exp.as_object_mut().unwrap().remove("exp");
        assert_eq!(refused(no_exp, &signer, "k1"), "JWT lacks exp or aud");
        let hs = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &good,
            &EncodingKey::from_secret(b"guess").unwrap(),
        )
        .unwrap();
        assert!(
            v.verify(&hs).is_err(),
            "a symmetric token is never accepted"
        );
    }

    #[test]
    fn the_issuer_is_checked_only_when_configured() {
        let dir = tempfile::tempdir().unwrap();
        let (signer, jwk) = key("k1");
        let path = dir.path().join("jwks.json");
        std::fs::write(&path, json!({"keys": [jwk]}).to_string()).unwrap();
        let verifier = |issuer: Option<&str>| {
            JwtVerifier::open(JwtOptions {
                jwks_file: path.clone(),
                audience: "quiver".into(),
                issuer: issuer.map(String::from),
                roles_claim: "roles".into(),
                tier_claim: "tier".into(),
            })
            .unwrap()
        };
        let t = now();
        let claims = |iss: Option<&str>| {
            let mut c = json!({"sub": "svc", "aud": "quiver", "exp": t + 60, "roles": ["reader"]});
            if let Some(i) = iss {
                c["iss"] = json!(i);
            }
            sign(&signer, "k1", c)
        };
        let strict = verifier(Some("https://idp.example"));
        assert!(strict.verify(&claims(Some("https://idp.example"))).is_ok());
        let why = |r: Result<Identity, AuthError>| match r {
            Err(AuthError::Invalid(why)) => why,
            other => panic!("accepted: {other:?}"),
        };
        assert_eq!(
            why(strict.verify(&claims(Some("https://evil.example")))),
            "JWT from another issuer"
        );
        assert_eq!(why(strict.verify(&claims(None))), "JWT names no issuer");
        // Not configured: any issuer, or none.
        let lax = verifier(None);
        assert!(lax.verify(&claims(Some("https://evil.example"))).is_ok());
        assert!(lax.verify(&claims(None)).is_ok());
    }
}
