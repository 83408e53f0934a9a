//! The API keys of `POST /notify`.
//!
//! Keys are compared as SHA-256 digests in constant time, against every
//! configured key without stopping at the first match, so neither the
//! position nor the length of a key leaks through timing.

use sha2::{Digest, Sha256};
use subtle::{ConditionallySelectable, ConstantTimeEq};

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

    /// The position of `candidate` among the accepted keys, if it is one:
    /// rate limits are kept per key without keeping the key.
    pub fn find(&self, candidate: &str) -> Option<usize> {
        let candidate = digest(candidate);
        let mut found = subtle::Choice::from(0);
        let mut index = 0u32;
        for (i, key) in self.digests.iter().enumerate() {
            let equal = key.ct_eq(&candidate);
            index.conditional_assign(&(i as u32), equal);
            found |= equal;
        }
        bool::from(found).then_some(index as usize)
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
        assert_eq!(keys.find("old-key"), Some(0));
        assert_eq!(keys.find("new-key"), Some(1));
        assert_eq!(keys.find("new-ke"), None);
        assert_eq!(keys.find(""), None);
        assert_eq!(keys.find("new-key "), None);
    }
}
