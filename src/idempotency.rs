//! `Idempotency-Key` on `/notify` (docs/protocol.md, "`POST /notify`"):
//! a repeat of a key within `CHANNELS_IDEMPOTENCY_WINDOW`, on any node,
//! answers the first call's answer and delivers nothing again.
//!
//! A key is **claimed** before the publish, atomically, so of two calls
//! with one key (on one node or two) exactly one publishes: the other is
//! told the call is in progress (`409`) or, once it is done, gets its
//! answer. A claim records the call's fingerprint (its target and message,
//! not its API key), so the same key with another body is refused (`422`).
//! The claim is **completed** with the answer: on a Redis bus with
//! recovery on by the publish script, in the same step as the publish (the
//! notification carries its claim, [`Claimed`]), so a node that dies after
//! publishing leaves the answer; otherwise after the publish. A publish
//! that failed **releases** the claim, so a `503` is never kept and a retry
//! is a first call (unless Redis executed the script: then it has the
//! answer).
//!
//! Where claims live: in Redis on a cluster (`bus::redis`: one `SET NX GET`
//! per claim, the answer kept for the window), in this process standalone
//! ([`LocalStore`], bounded by the window and by
//! `CHANNELS_IDEMPOTENCY_MAX_KEYS`).
//!
//! Only calls that passed validation claim a key: a refused call is refused
//! again on its repeat, without a record.

use std::{
    collections::{HashMap, VecDeque},
    sync::Mutex,
    time::{Duration, Instant},
};

use sha2::{Digest, Sha256};

use crate::{bus::Gathered, notification::Target};

/// How long a claim stays "in progress" in Redis without being completed or
/// released: the node that holds it died before it completed it. A retry
/// after it is a first call: with recovery on the node had not published
/// (the script completes the claim as it publishes); with recovery off it
/// may have, and the retry then delivers a second time.
pub const PENDING_TTL: Duration = Duration::from_secs(10);

/// An `Idempotency-Key` header: 1 to 200 visible ASCII characters.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    pub fn parse(raw: &[u8]) -> Result<Self, String> {
        if raw.is_empty() || raw.len() > 200 || !raw.iter().all(|b| b.is_ascii_graphic()) {
            return Err("Idempotency-Key must be 1 to 200 visible ASCII characters".into());
        }
        Ok(Self(String::from_utf8_lossy(raw).into_owned()))
    }

    /// The key of a batch's item: each item is deduplicated on its own.
    pub fn item(&self, index: usize) -> Self {
        Self(format!("{}#{index}", self.0))
    }

    /// SHA-256 of the key, hex: the name it is stored under, so a stored
    /// key costs the same whatever its length.
    pub fn digest(&self) -> String {
        hex(&Sha256::digest(self.0.as_bytes()))
    }
}

/// What identifies a call's content: its target and message, not its API
/// key (a repeat may come with another key). 128 bits of SHA-256, hex.
pub fn fingerprint(target: &Target, msg: &str) -> String {
    let (keycloak, channel) = match target {
        Target::Channel { channel } => ("", channel.as_str()),
        Target::User { keycloak } => (keycloak.as_str(), ""),
        Target::UserChannel { keycloak, channel } => (keycloak.as_str(), channel.as_str()),
    };
    let mut hasher = Sha256::new();
    for part in [keycloak, channel, msg] {
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part.as_bytes());
    }
    hex(&hasher.finalize()[..16])
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A key claimed by a first call, carried with its notification to the bus
/// (`Notification::claimed`).
#[derive(Clone, Debug)]
pub struct Claimed {
    pub key: IdempotencyKey,
    pub fingerprint: String,
}

/// The answer of a first call, as a repeat gets it back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    pub id: String,
    pub variant: &'static str,
    /// The first call's delivery receipt, when it asked for one
    /// (`?receipt=true`): a repeat answers the same counts.
    pub receipt: Option<Gathered>,
}

impl Answer {
    /// `"<id> <variant>"`, then `" <sockets> <complete: 1 or 0>"` with a
    /// receipt, as stored.
    pub fn encode(&self) -> String {
        match self.receipt {
            None => format!("{} {}", self.id, self.variant),
            Some(Gathered { count, complete }) => {
                format!(
                    "{} {} {count} {}",
                    self.id,
                    self.variant,
                    u8::from(complete)
                )
            }
        }
    }

    pub fn decode(text: &str) -> Option<Self> {
        let mut parts = text.split(' ');
        let (id, variant) = (parts.next()?, parts.next()?);
        let variant = Target::VARIANTS.into_iter().find(|v| *v == variant)?;
        let receipt = match (parts.next(), parts.next(), parts.next()) {
            (None, _, _) => None,
            (Some(count), Some(complete @ ("0" | "1")), None) => Some(Gathered {
                count: count.parse().ok()?,
                complete: complete == "1",
            }),
            _ => return None,
        };
        Some(Self {
            id: id.to_string(),
            variant,
            receipt,
        })
    }
}

/// What a claim found.
#[derive(Debug, PartialEq, Eq)]
pub enum Claim {
    /// Nobody had the key: this call publishes, then completes or releases.
    First,
    /// The first call is done: its answer.
    Replay(Answer),
    /// The first call is still in progress.
    InProgress,
    /// The key was used with another body.
    Reused,
}

/// A stored claim's value: `"p <fingerprint>"` while in progress, `"d
/// <fingerprint> <id> <variant>"` once done. Reads a value of either kind
/// against `fingerprint`.
pub fn judge(stored: &str, fingerprint: &str) -> Claim {
    let mut parts = stored.splitn(3, ' ');
    let (state, stored_fingerprint, rest) = (parts.next(), parts.next(), parts.next());
    if stored_fingerprint != Some(fingerprint) {
        return Claim::Reused;
    }
    match (state, rest.and_then(Answer::decode)) {
        (Some("d"), Some(answer)) => Claim::Replay(answer),
        _ => Claim::InProgress,
    }
}

/// The claims of a standalone node, kept for the window and at most
/// `max_keys` of them (the oldest go first).
pub struct LocalStore {
    window: Duration,
    max_keys: usize,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<IdempotencyKey, Entry>,
    /// Keys in the order they were claimed, each with the generation it was
    /// claimed at (a key released and claimed again is a new generation).
    order: VecDeque<(Instant, u64, IdempotencyKey)>,
    generation: u64,
}

struct Entry {
    /// `"p <fingerprint>"` or `"d <fingerprint> <id> <variant>"`, as in Redis.
    value: String,
    generation: u64,
}

impl LocalStore {
    pub fn new(window: Duration, max_keys: usize) -> Self {
        Self {
            window,
            max_keys,
            inner: Mutex::default(),
        }
    }

    pub fn claim(&self, key: &IdempotencyKey, fingerprint: &str) -> Claim {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.evict(Instant::now(), self.window, self.max_keys);
        if let Some(entry) = inner.entries.get(key) {
            return judge(&entry.value, fingerprint);
        }
        inner.generation += 1;
        let generation = inner.generation;
        inner.entries.insert(
            key.clone(),
            Entry {
                value: format!("p {fingerprint}"),
                generation,
            },
        );
        inner
            .order
            .push_back((Instant::now(), generation, key.clone()));
        inner.evict(Instant::now(), self.window, self.max_keys);
        Claim::First
    }

    pub fn complete(&self, key: &IdempotencyKey, fingerprint: &str, answer: &Answer) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(entry) = inner.entries.get_mut(key) {
            entry.value = format!("d {fingerprint} {}", answer.encode());
        }
    }

    pub fn release(&self, key: &IdempotencyKey) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.entries.remove(key);
    }

    /// Keys held now (tests, diagnostics).
    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entries
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Inner {
    /// Drops the keys older than the window, then the oldest beyond
    /// `max_keys`.
    fn evict(&mut self, now: Instant, window: Duration, max_keys: usize) {
        while let Some((claimed, generation, key)) = self.order.front() {
            let expired = now.duration_since(*claimed) >= window;
            let current = self
                .entries
                .get(key)
                .is_some_and(|e| e.generation == *generation);
            if current && !expired && self.entries.len() <= max_keys {
                break;
            }
            if current {
                self.entries.remove(key);
            }
            self.order.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::notification::{Channel, KeycloakId};

    fn key(k: &str) -> IdempotencyKey {
        IdempotencyKey::parse(k.as_bytes()).unwrap()
    }

    fn answer(id: &str) -> Answer {
        Answer {
            id: id.into(),
            variant: "user",
            receipt: None,
        }
    }

    #[test]
    fn an_answer_is_stored_with_its_receipt_and_read_back() {
        let plain = answer("n1");
        assert_eq!(Answer::decode(&plain.encode()), Some(plain));
        let receipted = Answer {
            receipt: Some(Gathered {
                count: 3,
                complete: false,
            }),
            ..answer("n2")
        };
        assert_eq!(receipted.encode(), "n2 user 3 0");
        assert_eq!(Answer::decode(&receipted.encode()), Some(receipted));
        for bad in [
            "n3",
            "n3 users",
            "n3 user 3",
            "n3 user x 1",
            "n3 user 3 2",
            "n3 user 3 1 9",
        ] {
            assert_eq!(Answer::decode(bad), None, "{bad}");
        }
    }

    #[test]
    fn keys_are_one_to_two_hundred_visible_ascii_characters() {
        assert!(IdempotencyKey::parse(b"order-42/retry").is_ok());
        assert!(IdempotencyKey::parse(&[b'a'; 200]).is_ok());
        for bad in [
            &b""[..],
            &[b'a'; 201],
            b"with space",
            b"tab\t",
            "é".as_bytes(),
        ] {
            assert!(IdempotencyKey::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_fingerprint_tells_targets_and_messages_apart() {
        let alice = KeycloakId::parse("alice").unwrap();
        let admin = Channel::parse("admin").unwrap();
        let user = Target::User {
            keycloak: alice.clone(),
        };
        let pair = Target::UserChannel {
            keycloak: alice,
            channel: admin.clone(),
        };
        let channel = Target::Channel { channel: admin };
        let all = [
            fingerprint(&user, "1"),
            fingerprint(&user, "2"),
            fingerprint(&pair, "1"),
            fingerprint(&channel, "1"),
        ];
        for (i, a) in all.iter().enumerate() {
            for b in &all[i + 1..] {
                assert_ne!(a, b);
            }
        }
        assert_eq!(fingerprint(&user, "1"), all[0]);
    }

    #[test]
    fn a_claim_is_first_once_then_in_progress_then_replayed() {
        let store = LocalStore::new(Duration::from_secs(60), 10);
        let k = key("k");
        assert_eq!(store.claim(&k, "f"), Claim::First);
        assert_eq!(store.claim(&k, "f"), Claim::InProgress);
        assert_eq!(store.claim(&k, "g"), Claim::Reused);
        store.complete(&k, "f", &answer("id1"));
        assert_eq!(store.claim(&k, "f"), Claim::Replay(answer("id1")));
        assert_eq!(store.claim(&k, "g"), Claim::Reused);
    }

    #[test]
    fn a_released_claim_is_a_first_call_again() {
        let store = LocalStore::new(Duration::from_secs(60), 10);
        let k = key("k");
        assert_eq!(store.claim(&k, "f"), Claim::First);
        store.release(&k);
        assert_eq!(store.claim(&k, "f"), Claim::First);
    }

    #[test]
    fn keys_go_after_the_window_and_beyond_the_count() {
        let store = LocalStore::new(Duration::from_millis(50), 3);
        for k in ["a", "b", "c", "d"] {
            assert_eq!(store.claim(&key(k), "f"), Claim::First);
        }
        assert_eq!(store.len(), 3, "the oldest went beyond the count");
        assert_eq!(store.claim(&key("a"), "f"), Claim::First);
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(store.claim(&key("e"), "f"), Claim::First);
        assert_eq!(store.len(), 1, "the others expired with the window");
    }

    #[test]
    fn stored_values_are_judged_against_the_fingerprint() {
        assert_eq!(judge("p f", "f"), Claim::InProgress);
        assert_eq!(judge("d f id1 user", "f"), Claim::Replay(answer("id1")));
        assert_eq!(judge("d f id1 user", "g"), Claim::Reused);
        assert_eq!(judge("garbage", "f"), Claim::Reused);
    }
}
