//! JWT verification for the `jwt` identity source.
//!
//! Owns: the key set (HS256 secrets, RSA/EC public keys, JWKS files), choosing the keys a
//! token may be verified with (by `kid`, then by algorithm family — an RSA public key is
//! never used as an HMAC secret, so algorithm confusion is impossible), signature and claim
//! checks (`exp`, `nbf` with leeway, `iss`, `aud`), and the claim that becomes the identity.
//!
//! Must not touch: where the header comes from or what a failure answers (identity, answer).

use crate::config::authz::{JwtConfig, JwtInvalid, JwtKey};
use crate::config::jwks::{EC, HMAC, KeyWithAlgorithms, RSA, parse_jwks};
use jsonwebtoken::{Algorithm, DecodingKey, Validation, errors::ErrorKind};

/// Why a token was not accepted. `Display` is the public reason code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    #[error("invalid_token")]
    Malformed,
    #[error("invalid_token")]
    BadSignature,
    #[error("expired_token")]
    Expired,
    #[error("invalid_token")]
    NotYetValid,
    #[error("invalid_token")]
    BadIssuer,
    #[error("invalid_token")]
    BadAudience,
    #[error("invalid_token")]
    NoKey,
    #[error("invalid_token")]
    MissingClaim,
    /// No `exp` claim, and the source requires one (`require_exp`, the default).
    #[error("invalid_token")]
    NoExpiry,
    /// The identity claim holds control characters (CR LF would inject headers upstream).
    #[error("invalid_token")]
    UnsafeClaim,
}

impl JwtError {
    /// A short label for metrics and logs.
    pub fn label(self) -> &'static str {
        match self {
            JwtError::Malformed => "malformed",
            JwtError::BadSignature => "bad_signature",
            JwtError::Expired => "expired",
            JwtError::NotYetValid => "not_yet_valid",
            JwtError::BadIssuer => "bad_issuer",
            JwtError::BadAudience => "bad_audience",
            JwtError::NoKey => "no_key",
            JwtError::MissingClaim => "missing_claim",
            JwtError::NoExpiry => "no_exp",
            JwtError::UnsafeClaim => "unsafe_claim",
        }
    }
}

struct Key {
    kid: Option<String>,
    key: DecodingKey,
    validation: Validation,
}

/// A compiled JWT source.
pub struct JwtVerifier {
    pub name: String,
    pub header: String,
    claim: String,
    keys: Vec<Key>,
    /// Keys of the config that could not be built (logged; counted in a metric).
    skipped_keys: usize,
    unverified: Option<Validation>,
    pub on_invalid: JwtInvalid,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtVerifier")
            .field("name", &self.name)
            .field("keys", &self.keys.len())
            .finish_non_exhaustive()
    }
}

impl JwtVerifier {
    /// Keys of its config that could not be used (an `hs256_secret_env` unset at a reload,
    /// key material that stopped parsing): tokens signed with them are refused.
    pub fn skipped_keys(&self) -> usize {
        self.skipped_keys
    }

    /// Builds the verifier; key material was checked when the config loaded, so a key that
    /// fails here is skipped (and logged) rather than failing the reload.
    pub fn new(c: &JwtConfig) -> JwtVerifier {
        let validation = |algs: &[Algorithm]| {
            let mut v = Validation::new(algs[0]);
            v.algorithms = algs.to_vec();
            v.required_spec_claims.clear();
            if c.require_exp {
                v.required_spec_claims.insert("exp".into());
            }
            v.leeway = c.leeway;
            v.validate_nbf = true;
            if let Some(iss) = &c.issuer {
                v.set_issuer(&[iss]);
                v.required_spec_claims.insert("iss".into());
            }
            if c.audiences.is_empty() {
                v.validate_aud = false;
            } else {
                v.set_audience(&c.audiences);
                v.required_spec_claims.insert("aud".into());
            }
            v
        };
        let mut keys = Vec::new();
        let mut skipped_keys = 0;
        for k in &c.keys {
            let built: Result<Vec<KeyWithAlgorithms>, String> = match k {
                JwtKey::Hs256 { secret } => {
                    Ok(vec![(None, DecodingKey::from_secret(secret), HMAC)])
                }
                JwtKey::Hs256Env { var } => env_secret(var)
                    .map(|s| vec![(None, DecodingKey::from_secret(s.as_bytes()), HMAC)]),
                JwtKey::RsaPem { pem, .. } => DecodingKey::from_rsa_pem(pem)
                    .map(|key| vec![(None, key, RSA)])
                    .map_err(|e| e.to_string()),
                JwtKey::EcPem { pem, .. } => DecodingKey::from_ec_pem(pem)
                    .map(|key| vec![(None, key, EC)])
                    .map_err(|e| e.to_string()),
                JwtKey::Jwks { json, .. } => parse_jwks(json),
            };
            match built {
                Ok(list) => {
                    for (kid, key, algs) in list {
                        keys.push(Key {
                            kid,
                            key,
                            validation: validation(algs),
                        });
                    }
                }
                Err(e) => {
                    skipped_keys += 1;
                    tracing::error!(source = %c.name, "skipping JWT key: {e}");
                }
            }
        }
        let unverified = c.allow_unverified.then(|| {
            let mut v = validation(HMAC);
            v.insecure_disable_signature_validation();
            v
        });
        JwtVerifier {
            name: c.name.clone(),
            skipped_keys,
            header: c.header.clone(),
            claim: c.claim.clone(),
            keys,
            unverified,
            on_invalid: c.on_invalid,
        }
    }

    /// The token in a header value: `Bearer <token>` for `authorization`, the value itself
    /// for any other header (a `Bearer ` prefix is dropped there too).
    pub fn token<'a>(&self, value: &'a str) -> Option<&'a str> {
        let v = value.trim();
        let token = match v.get(..7) {
            Some(p) if p.eq_ignore_ascii_case("bearer ") => v[7..].trim(),
            _ if self.header == "authorization" => return None,
            _ => v,
        };
        (!token.is_empty()).then_some(token)
    }

    /// Verifies `token` and returns the identity claim.
    pub fn verify(&self, token: &str) -> Result<String, JwtError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| JwtError::Malformed)?;
        let by_kid = header
            .kid
            .as_deref()
            .filter(|kid| self.keys.iter().any(|k| k.kid.as_deref() == Some(kid)));
        let mut best = None;
        for k in &self.keys {
            if by_kid.is_some() && k.kid.as_deref() != by_kid {
                continue;
            }
            if !k.validation.algorithms.contains(&header.alg) {
                continue;
            }
            match jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
                token,
                &k.key,
                &k.validation,
            ) {
                Ok(data) => return self.claim_of(&data.claims),
                Err(e) => {
                    let err = classify(e.kind());
                    // A signature that verified but whose claims failed says more than a
                    // signature that did not: report that one.
                    if best.is_none() || err != JwtError::BadSignature {
                        best = Some(err);
                    }
                }
            }
        }
        if let Some(v) = &self.unverified
            && self.keys.is_empty()
        {
            let key = DecodingKey::from_secret(&[]);
            return match jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
                token, &key, v,
            ) {
                Ok(data) => self.claim_of(&data.claims),
                Err(e) => Err(classify(e.kind())),
            };
        }
        Err(best.unwrap_or(JwtError::NoKey))
    }

    fn claim_of(
        &self,
        claims: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<String, JwtError> {
        match claims.get(&self.claim) {
            // The identity becomes a header upstream: a claim with CR LF (or any control
            // character) would inject headers, so the token is refused, never escaped.
            Some(serde_json::Value::String(s)) if s.chars().any(char::is_control) => {
                Err(JwtError::UnsafeClaim)
            }
            Some(serde_json::Value::String(s)) if !s.is_empty() => Ok(s.clone()),
            Some(serde_json::Value::Number(n)) => Ok(n.to_string()),
            _ => Err(JwtError::MissingClaim),
        }
    }
}

fn classify(kind: &ErrorKind) -> JwtError {
    match kind {
        ErrorKind::ExpiredSignature => JwtError::Expired,
        ErrorKind::ImmatureSignature => JwtError::NotYetValid,
        ErrorKind::InvalidIssuer => JwtError::BadIssuer,
        ErrorKind::InvalidAudience => JwtError::BadAudience,
        ErrorKind::MissingRequiredClaim(c) if c == "aud" => JwtError::BadAudience,
        ErrorKind::MissingRequiredClaim(c) if c == "iss" => JwtError::BadIssuer,
        ErrorKind::MissingRequiredClaim(c) if c == "exp" => JwtError::NoExpiry,
        ErrorKind::InvalidSignature | ErrorKind::InvalidAlgorithm | ErrorKind::Crypto(_) => {
            JwtError::BadSignature
        }
        _ => JwtError::Malformed,
    }
}

/// The value of `var`, the secret of an `hs256_secret_env` key; unset or empty is an error
/// naming the variable (never a value).
#[expect(
    clippy::disallowed_methods,
    reason = "a key given as hs256_secret_env is read when its verifier is built; serve checks them all before it starts"
)]
pub fn env_secret(var: &str) -> Result<String, String> {
    match std::env::var(var) {
        Ok(s) if !s.is_empty() => Ok(s),
        _ => Err(format!("environment variable {var} is not set")),
    }
}

/// Every `hs256_secret_env` variable `config` names that is unset, as
/// `authz.identity.sources[i].hs256_secret_env: environment variable X is not set`: `serve`
/// refuses to start on them rather than run a JWT source that verifies no token.
pub fn unset_env_secrets(config: &crate::config::authz::AuthzConfig) -> Vec<String> {
    use crate::config::authz::IdentitySource;
    let mut out = Vec::new();
    for (i, s) in config.identity.sources.iter().enumerate() {
        let IdentitySource::Jwt(j) = s else { continue };
        for k in &j.keys {
            if let JwtKey::Hs256Env { var } = k
                && let Err(e) = env_secret(var)
            {
                out.push(format!("authz.identity.sources[{i}].hs256_secret_env: {e}"));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header, encode};

    fn config(keys: Vec<JwtKey>) -> JwtConfig {
        JwtConfig {
            name: "user".into(),
            header: "authorization".into(),
            claim: "sub".into(),
            keys,
            issuer: Some("https://issuer.test".into()),
            audiences: vec!["api".into()],
            leeway: 0,
            allow_unverified: false,
            require_exp: true,
            on_invalid: JwtInvalid::Deny,
        }
    }

    fn now() -> u64 {
        jsonwebtoken::get_current_timestamp()
    }

    fn hs(secret: &[u8], claims: serde_json::Value) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret),
        )
        .unwrap()
    }

    #[test]
    fn hs256_good_bad_expired() {
        let v = JwtVerifier::new(&config(vec![JwtKey::Hs256 {
            secret: b"s3cret".to_vec(),
        }]));
        let good = serde_json::json!({"sub": "alice", "iss": "https://issuer.test", "aud": "api", "exp": now() + 60});
        assert_eq!(v.verify(&hs(b"s3cret", good.clone())), Ok("alice".into()));
        assert_eq!(
            v.verify(&hs(b"other", good.clone())),
            Err(JwtError::BadSignature)
        );
        let expired = serde_json::json!({"sub": "alice", "iss": "https://issuer.test", "aud": "api", "exp": now() - 120});
        assert_eq!(v.verify(&hs(b"s3cret", expired)), Err(JwtError::Expired));
        let wrong_aud = serde_json::json!({"sub": "alice", "iss": "https://issuer.test", "aud": "web", "exp": now() + 60});
        assert_eq!(
            v.verify(&hs(b"s3cret", wrong_aud)),
            Err(JwtError::BadAudience)
        );
        let no_iss = serde_json::json!({"sub": "alice", "aud": "api", "exp": now() + 60});
        assert_eq!(v.verify(&hs(b"s3cret", no_iss)), Err(JwtError::BadIssuer));
        let no_sub =
            serde_json::json!({"iss": "https://issuer.test", "aud": "api", "exp": now() + 60});
        assert_eq!(
            v.verify(&hs(b"s3cret", no_sub)),
            Err(JwtError::MissingClaim)
        );
        let future = serde_json::json!({"sub": "a", "iss": "https://issuer.test", "aud": "api", "nbf": now() + 600, "exp": now() + 900});
        assert_eq!(v.verify(&hs(b"s3cret", future)), Err(JwtError::NotYetValid));
        let forever = serde_json::json!({"sub": "a", "iss": "https://issuer.test", "aud": "api"});
        assert_eq!(
            v.verify(&hs(b"s3cret", forever.clone())),
            Err(JwtError::NoExpiry)
        );
        let mut lax = config(vec![JwtKey::Hs256 {
            secret: b"s3cret".to_vec(),
        }]);
        lax.require_exp = false;
        let lax = JwtVerifier::new(&lax);
        assert_eq!(lax.verify(&hs(b"s3cret", forever)), Ok("a".into()));
        let crlf = serde_json::json!({"sub": "a\r\nx: 1", "iss": "https://issuer.test", "aud": "api", "exp": now() + 60});
        assert_eq!(v.verify(&hs(b"s3cret", crlf)), Err(JwtError::UnsafeClaim));
        assert_eq!(v.verify("not.a.jwt"), Err(JwtError::Malformed));
        assert_eq!(v.verify(""), Err(JwtError::Malformed));
        assert_eq!(v.verify("a.b"), Err(JwtError::Malformed));
        assert_eq!(v.token("Bearer abc"), Some("abc"));
        assert_eq!(v.token("bearer   abc "), Some("abc"));
        assert_eq!(v.token("Basic abc"), None);
        assert_eq!(v.token("Bearer "), None);
    }

    #[test]
    fn unverified_decoding_only_when_enabled() {
        let mut c = config(vec![]);
        c.issuer = None;
        c.audiences.clear();
        c.allow_unverified = true;
        let v = JwtVerifier::new(&c);
        let t = hs(
            b"whatever",
            serde_json::json!({"sub": 42, "exp": now() + 60}),
        );
        assert_eq!(v.verify(&t), Ok("42".into()));
        c.allow_unverified = false;
        let v = JwtVerifier::new(&c);
        assert_eq!(v.verify(&t), Err(JwtError::NoKey));
    }
}
