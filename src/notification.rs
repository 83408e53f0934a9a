//! The domain: who a notification is for ([`Target`]) and what it carries
//! ([`Notification`]). Parsed at the edge (HTTP, socket auth), so the rest of
//! the gateway only ever sees valid values.
//!
//! Ids are `Arc<str>` newtypes: one socket's channel and user are shared by
//! every index that holds them instead of being copied per index.

use std::{fmt, sync::Arc};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// Longest channel name (docs/protocol.md).
pub const MAX_CHANNEL_CHARS: usize = 64;
/// Longest keycloak id (docs/protocol.md).
pub const MAX_KEYCLOAK_ID_CHARS: usize = 256;

/// Why an id was refused. The text is shown to callers as is.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdError {
    #[error("must be a non-empty string")]
    Empty,
    #[error("must be at most {0} characters")]
    TooLong(usize),
    #[error("may only contain A-Z a-z 0-9 _ . : -")]
    Charset,
}

/// A frontend application (admin, b2b, msf, ...): `[A-Za-z0-9_.:-]{1,64}`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Channel(Arc<str>);

/// A user's keycloak id (the `sub` of their tokens): 1 to 256 characters.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct KeycloakId(Arc<str>);

impl Channel {
    pub fn parse(raw: &str) -> Result<Self, IdError> {
        if raw.is_empty() {
            return Err(IdError::Empty);
        }
        if raw.len() > MAX_CHANNEL_CHARS {
            return Err(IdError::TooLong(MAX_CHANNEL_CHARS));
        }
        if !raw
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.:-".contains(&b))
        {
            return Err(IdError::Charset);
        }
        Ok(Self(raw.into()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl KeycloakId {
    pub fn parse(raw: &str) -> Result<Self, IdError> {
        if raw.is_empty() {
            return Err(IdError::Empty);
        }
        if raw.chars().count() > MAX_KEYCLOAK_ID_CHARS {
            return Err(IdError::TooLong(MAX_KEYCLOAK_ID_CHARS));
        }
        Ok(Self(raw.into()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

macro_rules! string_newtype_impls {
    ($t:ty) => {
        impl TryFrom<String> for $t {
            type Error = IdError;
            fn try_from(raw: String) -> Result<Self, IdError> {
                Self::parse(&raw)
            }
        }
        impl From<$t> for String {
            fn from(id: $t) -> String {
                id.0.to_string()
            }
        }
        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&*self.0, f)
            }
        }
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}
string_newtype_impls!(Channel);
string_newtype_impls!(KeycloakId);

/// Which sockets a notification is for: docs/protocol.md's three variants.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "variant", rename_all = "snake_case")]
pub enum Target {
    /// Every socket of a channel (`"channel"`).
    Channel { channel: Channel },
    /// Every socket of a user, in every channel (`"user"`).
    User { keycloak: KeycloakId },
    /// A user's sockets in one channel (`"user_channel"`).
    UserChannel {
        keycloak: KeycloakId,
        channel: Channel,
    },
}

impl Target {
    /// Every variant's name.
    pub const VARIANTS: [&'static str; 3] = ["channel", "user", "user_channel"];

    /// The variant's name, as answered by `/notify` and used as a metric label.
    pub fn variant(&self) -> &'static str {
        match self {
            Target::Channel { .. } => "channel",
            Target::User { .. } => "user",
            Target::UserChannel { .. } => "user_channel",
        }
    }
}

/// One accepted `/notify` call, as it travels over the bus.
#[derive(Debug, Serialize, Deserialize)]
pub struct Notification {
    /// Unique id, answered to the caller and logged on every node.
    pub id: String,
    pub target: Target,
    /// The message exactly as posted: kept as raw JSON text so it is neither
    /// re-ordered nor re-encoded on its way to the sockets.
    pub msg: Box<RawValue>,
    /// When the call was accepted, in microseconds since the Unix epoch (wall
    /// clock, so latency can be measured on another node).
    pub accepted_at_us: u64,
    /// `?receipt=true`: where each node that writes it reports how many
    /// sockets it wrote it to. Absent (and not on the wire) otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receipt: Option<Receipt>,
    /// The `Idempotency-Key` this call claimed, for a bus that keeps the
    /// call's answer in the same step as the publish (a Redis bus with
    /// recovery on). Never on the wire.
    #[serde(skip)]
    pub claimed: Option<crate::idempotency::Claimed>,
}

/// The node that asked for a delivery receipt, and its request's id.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Receipt {
    pub node: u64,
    pub id: u64,
}

impl Notification {
    pub fn new(target: Target, msg: Box<RawValue>) -> Self {
        Self {
            id: new_id(),
            target,
            msg,
            accepted_at_us: now_us(),
            receipt: None,
            claimed: None,
        }
    }
}

/// A random UUID in its hyphenated form: a notification's id, and an HTTP
/// request's ([`crate::http`]). Written straight into its buffer, not
/// through `Display`, whose formatting machinery cost more than the
/// random draw (on every call of `/notify`, twice).
pub fn new_id() -> String {
    let mut text = [0u8; uuid::fmt::Hyphenated::LENGTH];
    uuid::Uuid::new_v4()
        .hyphenated()
        .encode_lower(&mut text)
        .to_owned()
}

/// Wall-clock microseconds since the Unix epoch.
pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_names_follow_the_spec_charset_and_length() {
        assert!(Channel::parse("admin").is_ok());
        assert!(Channel::parse("b2b.eu:west_1-a").is_ok());
        assert_eq!(Channel::parse(""), Err(IdError::Empty));
        assert_eq!(Channel::parse("a b"), Err(IdError::Charset));
        assert_eq!(Channel::parse("é"), Err(IdError::Charset));
        assert!(Channel::parse(&"a".repeat(64)).is_ok());
        assert_eq!(Channel::parse(&"a".repeat(65)), Err(IdError::TooLong(64)));
    }

    #[test]
    fn keycloak_ids_are_limited_in_characters_not_bytes() {
        assert!(KeycloakId::parse(&"é".repeat(256)).is_ok());
        assert_eq!(
            KeycloakId::parse(&"é".repeat(257)),
            Err(IdError::TooLong(256))
        );
        assert_eq!(KeycloakId::parse(""), Err(IdError::Empty));
    }

    #[test]
    fn a_notification_round_trips_through_json_with_its_message_untouched() {
        let msg = RawValue::from_string(r#"{"b":1,"a":[true,null,"é"]}"#.into()).unwrap();
        let n = Notification::new(
            Target::UserChannel {
                keycloak: KeycloakId::parse("u1").unwrap(),
                channel: Channel::parse("admin").unwrap(),
            },
            msg,
        );
        let back: Notification = serde_json::from_str(&serde_json::to_string(&n).unwrap()).unwrap();
        assert_eq!(back.msg.get(), r#"{"b":1,"a":[true,null,"é"]}"#);
        assert_eq!(back.target, n.target);
    }
}
