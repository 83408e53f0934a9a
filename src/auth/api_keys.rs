//! The API keys of `POST /notify`.
//!
//! Keys are compared as SHA-256 digests in constant time, against every
//! configured key without stopping at the first match, so neither the
//! position nor the length of a key leaks through timing.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::Secret;

/// The accepted keys, as digests (the keys themselves are not kept).
#[derive(Clone)]
pub struct ApiKeys {
    digests: Vec<[u8; 32]>,
}

impl ApiKeys {
    pub fn new(keys: &[Secret]) -> Self {
        Self {
            digests: keys.iter().map(|k| digest(k.expose())).collect(),
        }
    }

    /// Whether `candidate` is one of the accepted keys.
    pub fn accepts(&self, candidate: &str) -> bool {
        let candidate = digest(candidate);
        self.digests
            .iter()
            .fold(subtle::Choice::from(0), |found, key| {
                found | key.ct_eq(&candidate)
            })
            .into()
    }
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_configured_key_is_accepted_and_nothing_else() {
        let keys = ApiKeys::new(&[Secret::new("old-key"), Secret::new("new-key")]);
        assert!(keys.accepts("old-key"));
        assert!(keys.accepts("new-key"));
        assert!(!keys.accepts("new-ke"));
        assert!(!keys.accepts(""));
        assert!(!keys.accepts("new-key "));
    }
}
