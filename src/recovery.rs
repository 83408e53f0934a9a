//! Connection state recovery, the parts every node shares: the private
//! session id (`pid`) a socket is given in its CONNECT acknowledgement, the
//! stream position (offset) carried by every notification, and the rule that
//! says whether a returning session may be replayed what it missed.
//!
//! The wire is socket.io 4.8's, so the stock client needs no option: the
//! acknowledgement is `40{"sid":…,"pid":…}`, each event ends with its offset
//! as a string, and a reconnecting client sends `pid` and `offset` (the last
//! one it received) merged into its `auth`.
//!
//! A pid holds everything a node needs to judge it, so any node can, even
//! when the node that issued it is gone: the session's random id, the node
//! that issued it, and the position the session started at. It is signed
//! with a key derived from `CHANNELS_WS_TOKEN_SECRET` over those and the
//! socket's user and channel, so it cannot be forged nor moved to another
//! user or channel. It is never logged (its `Debug` shows the session id
//! only, which grants nothing without the MAC).
//!
//! Where the missed notifications come from (the history) and where a
//! session's end is recorded are the bus's (`bus::history` in the process,
//! `bus::redis::history` in Redis); this module decides.

use std::time::Duration;

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::{
    config::Secret,
    notification::{Channel, KeycloakId},
};

/// A position in the cluster's notification stream: the sequence number the
/// bus gave a notification when it was published. Sent to clients in
/// decimal, as the trailing argument of every `notification` event.
pub type Offset = u64;

/// A node's identity, random at every start: a pid names the node that
/// issued it, so that a session whose node died without a word can be told
/// from one that is still connected there.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NodeId(pub u64);

impl NodeId {
    pub fn random() -> Self {
        Self(fastrand::u64(..))
    }
}

/// One recoverable session, as carried (signed) in its pid.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Session {
    /// Random, unique per session: the key of its records.
    pub id: u128,
    /// The node that issued the pid.
    pub origin: NodeId,
    /// The bus position when the session began: a client that received
    /// nothing before it dropped is replayed everything after it.
    pub start: Offset,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The id alone: without the MAC it cannot be presented.
        write!(f, "Session({:032x})", self.id)
    }
}

/// Bytes of the MAC kept in a pid: 128 bits, beyond guessing.
const MAC_BYTES: usize = 16;
/// Bytes of a pid before base64: id, origin, start, MAC.
const PID_BYTES: usize = 16 + 8 + 8 + MAC_BYTES;

/// Mints and verifies pids. Cheap to clone.
#[derive(Clone)]
pub struct Pids {
    key: Hmac<Sha256>,
}

impl Pids {
    /// The MAC key is derived from the ws-token secret, which every node
    /// shares, under a label of its own, so a pid MAC is never a valid ws
    /// token signature nor the other way round.
    pub fn new(ws_token_secret: &Secret) -> Self {
        let mut derive = Hmac::<Sha256>::new_from_slice(ws_token_secret.expose().as_bytes())
            .expect("HMAC takes a key of any length");
        derive.update(b"channels recovery pid v1");
        let key = derive.finalize().into_bytes();
        Self {
            key: Hmac::new_from_slice(&key).expect("HMAC takes a key of any length"),
        }
    }

    /// A new session for a socket of `user` in `channel`, and its pid.
    pub fn mint(
        &self,
        origin: NodeId,
        start: Offset,
        user: &KeycloakId,
        channel: &Channel,
    ) -> (Session, String) {
        let session = Session {
            id: fastrand::u128(..),
            origin,
            start,
        };
        let mut bytes = [0u8; PID_BYTES];
        bytes[..16].copy_from_slice(&session.id.to_be_bytes());
        bytes[16..24].copy_from_slice(&origin.0.to_be_bytes());
        bytes[24..32].copy_from_slice(&start.to_be_bytes());
        let mac = self.mac(&bytes[..32], user, channel);
        bytes[32..].copy_from_slice(&mac);
        (session, URL_SAFE_NO_PAD.encode(bytes))
    }

    /// The session of a pid presented by a socket of `user` in `channel`;
    /// `None` when it is malformed, forged, or another user's or channel's.
    pub fn verify(&self, pid: &str, user: &KeycloakId, channel: &Channel) -> Option<Session> {
        if pid.len() != (PID_BYTES * 4).div_ceil(3) {
            return None;
        }
        let bytes: [u8; PID_BYTES] = URL_SAFE_NO_PAD.decode(pid).ok()?.try_into().ok()?;
        let mut mac = self.key.clone();
        feed(&mut mac, &bytes[..32], user, channel);
        mac.verify_truncated_left(&bytes[32..]).ok()?;
        let word = |range: std::ops::Range<usize>| -> [u8; 8] { bytes[range].try_into().unwrap() };
        Some(Session {
            id: u128::from_be_bytes(bytes[..16].try_into().unwrap()),
            origin: NodeId(u64::from_be_bytes(word(16..24))),
            start: u64::from_be_bytes(word(24..32)),
        })
    }

    fn mac(&self, body: &[u8], user: &KeycloakId, channel: &Channel) -> [u8; MAC_BYTES] {
        let mut mac = self.key.clone();
        feed(&mut mac, body, user, channel);
        let full = mac.finalize().into_bytes();
        full[..MAC_BYTES].try_into().unwrap()
    }
}

/// What a pid's MAC covers; lengths first so no two inputs run together.
fn feed(mac: &mut Hmac<Sha256>, body: &[u8], user: &KeycloakId, channel: &Channel) {
    mac.update(body);
    for part in [user.as_str(), channel.as_str()] {
        mac.update(&(part.len() as u32).to_be_bytes());
        mac.update(part.as_bytes());
    }
}

/// Parses the `offset` a client sent: the decimal a notification carried.
pub fn parse_offset(raw: &str) -> Option<Offset> {
    if raw.is_empty() || raw.len() > 20 || !raw.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    raw.parse().ok()
}

/// How a session ended, as recorded by the node that held it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ended {
    /// Its socket left (client gone, network, eviction, node shutdown) at
    /// this wall-clock time, in milliseconds since the epoch.
    At(u64),
    /// The server closed it on purpose: never recoverable.
    Closed,
}

/// What the node that issued a pid was doing, from its heartbeat record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// No record: the node stopped longer ago than the window, or never was.
    Unknown,
    /// Its last heartbeat, in ms since the epoch, and whether it said it was
    /// stopping (a graceful shutdown writes that last).
    Seen { at_ms: u64, stopped: bool },
}

/// A node whose heartbeat is older than this is dead (it beats every second).
pub const NODE_DEAD_AFTER: Duration = Duration::from_secs(3);

/// Why a session cannot be recovered. Only counted and logged at debug: the
/// client just gets a fresh session.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NotRecoverable {
    #[error("the pid is malformed or forged")]
    BadPid,
    #[error("the session was closed by the server")]
    Closed,
    #[error("the session ended longer ago than the window")]
    WindowPassed,
    #[error("no record of how the session ended")]
    NoRecord,
    #[error("the history no longer holds everything after the offset")]
    Trimmed,
    #[error("more notifications were missed than CHANNELS_RECOVERY_MAX_MISSED")]
    TooMany,
    #[error("the history is unreachable")]
    Unavailable,
}

impl NotRecoverable {
    pub const ALL: [NotRecoverable; 7] = [
        NotRecoverable::BadPid,
        NotRecoverable::Closed,
        NotRecoverable::WindowPassed,
        NotRecoverable::NoRecord,
        NotRecoverable::Trimmed,
        NotRecoverable::TooMany,
        NotRecoverable::Unavailable,
    ];

    /// The metric label of this reason.
    pub fn label(self) -> &'static str {
        match self {
            NotRecoverable::BadPid => "bad_pid",
            NotRecoverable::Closed => "closed",
            NotRecoverable::WindowPassed => "window_passed",
            NotRecoverable::NoRecord => "no_record",
            NotRecoverable::Trimmed => "trimmed",
            NotRecoverable::TooMany => "too_many",
            NotRecoverable::Unavailable => "unavailable",
        }
    }
}

/// When the session ended, from its own record or, when its node died
/// without writing one, from the node's last heartbeat; then whether that
/// is within the window. A node that is alive and wrote no record either
/// still holds the socket or wrote its record longer ago than the window
/// (records expire with it): neither can be told apart, so neither recovers.
pub fn check_window(
    ended: Option<Ended>,
    origin: Origin,
    now_ms: u64,
    window: Duration,
) -> Result<(), NotRecoverable> {
    let ended_at = match (ended, origin) {
        (Some(Ended::Closed), _) => return Err(NotRecoverable::Closed),
        (Some(Ended::At(at)), _) => at,
        (None, Origin::Seen { at_ms, stopped })
            if stopped || now_ms.saturating_sub(at_ms) > NODE_DEAD_AFTER.as_millis() as u64 =>
        {
            at_ms
        }
        (None, _) => return Err(NotRecoverable::NoRecord),
    };
    if now_ms.saturating_sub(ended_at) > window.as_millis() as u64 {
        return Err(NotRecoverable::WindowPassed);
    }
    Ok(())
}

/// Wall-clock milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    crate::notification::now_us() / 1000
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids() -> (KeycloakId, Channel) {
        (
            KeycloakId::parse("alice").unwrap(),
            Channel::parse("admin").unwrap(),
        )
    }

    fn pids() -> Pids {
        Pids::new(&Secret::new("s".repeat(40)))
    }

    #[test]
    fn a_pid_verifies_to_its_session_for_its_user_and_channel_only() {
        let (user, channel) = ids();
        let (session, pid) = pids().mint(NodeId(7), 42, &user, &channel);
        assert_eq!(pids().verify(&pid, &user, &channel), Some(session));
        assert_eq!(session.start, 42);
        assert_eq!(session.origin, NodeId(7));
        let bob = KeycloakId::parse("bob").unwrap();
        assert_eq!(pids().verify(&pid, &bob, &channel), None);
        let other = Channel::parse("b2b").unwrap();
        assert_eq!(pids().verify(&pid, &user, &other), None);
        let stranger = Pids::new(&Secret::new("t".repeat(40)));
        assert_eq!(stranger.verify(&pid, &user, &channel), None);
    }

    #[test]
    fn a_pid_with_any_byte_changed_is_refused() {
        let (user, channel) = ids();
        let (_, pid) = pids().mint(NodeId(1), 5, &user, &channel);
        let mut bytes = URL_SAFE_NO_PAD.decode(&pid).unwrap();
        for i in 0..bytes.len() {
            bytes[i] ^= 1;
            let forged = URL_SAFE_NO_PAD.encode(&bytes);
            assert_eq!(pids().verify(&forged, &user, &channel), None, "byte {i}");
            bytes[i] ^= 1;
        }
        for junk in [
            "",
            "x",
            &"A".repeat(64),
            &"A".repeat(65),
            "not base64 at all !!",
        ] {
            assert_eq!(pids().verify(junk, &user, &channel), None);
        }
    }

    #[test]
    fn two_sessions_never_share_an_id() {
        let (user, channel) = ids();
        let (a, pa) = pids().mint(NodeId(1), 0, &user, &channel);
        let (b, pb) = pids().mint(NodeId(1), 0, &user, &channel);
        assert_ne!(a.id, b.id);
        assert_ne!(pa, pb);
    }

    #[test]
    fn offsets_are_plain_decimals() {
        assert_eq!(parse_offset("0"), Some(0));
        assert_eq!(parse_offset("18446744073709551615"), Some(u64::MAX));
        for bad in ["", "-1", "1.5", " 1", "18446744073709551616", "0x10", "1e3"] {
            assert_eq!(parse_offset(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_window_runs_from_the_recorded_end_or_the_dead_nodes_last_beat() {
        let window = Duration::from_secs(10);
        let now = 1_000_000;
        let alive = Origin::Seen {
            at_ms: now - 500,
            stopped: false,
        };
        assert_eq!(
            check_window(Some(Ended::At(now - 9_000)), alive, now, window),
            Ok(())
        );
        assert_eq!(
            check_window(Some(Ended::At(now - 11_000)), alive, now, window),
            Err(NotRecoverable::WindowPassed)
        );
        assert_eq!(
            check_window(Some(Ended::Closed), alive, now, window),
            Err(NotRecoverable::Closed)
        );
        // No record, and the node still beats: nothing can be concluded.
        assert_eq!(
            check_window(None, alive, now, window),
            Err(NotRecoverable::NoRecord)
        );
        assert_eq!(
            check_window(None, Origin::Unknown, now, window),
            Err(NotRecoverable::NoRecord)
        );
        // Killed: its last beat is when the session ended.
        let killed = Origin::Seen {
            at_ms: now - 4_000,
            stopped: false,
        };
        assert_eq!(check_window(None, killed, now, window), Ok(()));
        let long_dead = Origin::Seen {
            at_ms: now - 12_000,
            stopped: false,
        };
        assert_eq!(
            check_window(None, long_dead, now, window),
            Err(NotRecoverable::WindowPassed)
        );
        // Stopped gracefully: dead at once.
        let stopped = Origin::Seen {
            at_ms: now - 100,
            stopped: true,
        };
        assert_eq!(check_window(None, stopped, now, window), Ok(()));
    }
}
