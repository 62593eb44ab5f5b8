//! JSON Web Key Sets and the algorithm families a key may verify: key material is read and
//! checked when the config loads, and the verifier (authz::jwt) is built from the result.
//!
//! Must not touch: verifying tokens.

use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey};

/// HMAC algorithms an `hs256_secret` or an `oct` key may verify.
pub const HMAC: &[Algorithm] = &[Algorithm::HS256, Algorithm::HS384, Algorithm::HS512];
pub const RSA: &[Algorithm] = &[
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
];
pub const EC: &[Algorithm] = &[Algorithm::ES256, Algorithm::ES384];

/// A key with its `kid` and the algorithms it may verify.
pub type KeyWithAlgorithms = (Option<String>, DecodingKey, &'static [Algorithm]);

/// The keys of a JWKS document with the algorithms each may verify.
pub fn parse_jwks(json: &str) -> Result<Vec<KeyWithAlgorithms>, String> {
    let set: JwkSet = serde_json::from_str(json).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for jwk in &set.keys {
        let family = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => RSA,
            AlgorithmParameters::EllipticCurve(_) => EC,
            AlgorithmParameters::OctetKey(_) => HMAC,
            // EdDSA and others: not offered.
            AlgorithmParameters::OctetKeyPair(_) => continue,
        };
        let key = DecodingKey::from_jwk(jwk).map_err(|e| e.to_string())?;
        out.push((jwk.common.key_id.clone(), key, family));
    }
    if out.is_empty() {
        return Err("no RSA, EC or HMAC key in the set".into());
    }
    Ok(out)
}
