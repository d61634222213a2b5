//! Domain types with no I/O: validated ids, the award record, task and award states, and the
//! `send_award` wire message.
//!
//! Constructors validate, so nothing downstream checks again. Widths follow the original's MySQL
//! columns (`user_id` varchar(32), `order_id` varchar(12), `award_title` varchar(128)), so rows can
//! move between the two systems.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

fn check_id(field: &'static str, value: &str, max: usize) -> Result<()> {
    check_text(field, value, max)?;
    if value.chars().any(char::is_whitespace) {
        return Err(Error::invalid(
            field,
            format!("{value:?} contains whitespace"),
        ));
    }
    Ok(())
}

/// 1 to `max` characters with no control characters (what a `varchar(max)` column of the
/// original holds and its services accept).
fn check_text(field: &'static str, value: &str, max: usize) -> Result<()> {
    if value.is_empty() {
        return Err(Error::invalid(field, "must not be empty"));
    }
    if value.chars().count() > max {
        return Err(Error::invalid(
            field,
            format!("{:?} is longer than {max} characters", value),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(Error::invalid(
            field,
            format!("{value:?} contains control characters"),
        ));
    }
    Ok(())
}

/// A user id: 1 to 32 characters, no control characters (spaces are allowed: the original's
/// `user_id varchar(32)` holds `user 4`, and routes it). The router's key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UserId(String);

impl UserId {
    /// Validate a user id.
    pub fn parse(s: &str) -> Result<Self> {
        check_text("user_id", s, 32)?;
        Ok(UserId(s.to_string()))
    }
    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// An order id: 1 to 12 characters, no whitespace. The idempotency key of an award.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct OrderId(String);

impl OrderId {
    /// Validate an order id.
    pub fn parse(s: &str) -> Result<Self> {
        check_id("order_id", s, 12)?;
        Ok(OrderId(s.to_string()))
    }
    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A message id: `b`, the database index in two base-36 digits and the task's sequence number
/// in eight (`b` `01` `000000aa` for sequence 370 on database 1): 11 characters, the width of
/// the original's `message_id varchar(11)`. Unique by construction: no two tasks anywhere share
/// a database and a sequence, and the letter keeps every id apart from the original's, which
/// are 11 random digits. Sequence numbers run from 1 to [`MessageId::MAX_SEQ`] per database; a
/// shard refuses saves past it rather than make a longer id.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MessageId(String);

/// The digits of a message id, lowercase base 36.
const BASE36: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";

impl MessageId {
    /// The highest sequence number a message id holds: 36^8 - 1 (2,821,109,907,455).
    pub const MAX_SEQ: u64 = 36u64.pow(8) - 1;
    /// The highest database index it holds: 36^2 - 1.
    pub const MAX_DB: u32 = 36 * 36 - 1;

    /// The id of the task with sequence `seq` on database `db`. `seq` must be at most
    /// [`MessageId::MAX_SEQ`] (the store refuses saves past it) and `db` at most
    /// [`MessageId::MAX_DB`] (layouts have at most 1024 databases).
    pub fn new(db: u32, seq: u64) -> Self {
        assert!(
            seq <= Self::MAX_SEQ && db <= Self::MAX_DB,
            "message id out of range: db {db} seq {seq}"
        );
        let mut out = String::with_capacity(11);
        out.push('b');
        let digits = |mut v: u64, n: usize, out: &mut String| {
            let mut buf = vec![b'0'; n];
            for slot in buf.iter_mut().rev() {
                *slot = BASE36[(v % 36) as usize];
                v /= 36;
            }
            out.push_str(std::str::from_utf8(&buf).expect("ASCII digits"));
        };
        digits(u64::from(db), 2, &mut out);
        digits(seq, 8, &mut out);
        MessageId(out)
    }

    /// Whether sequence number `seq` has a message id.
    pub fn fits(seq: u64) -> bool {
        seq <= Self::MAX_SEQ
    }

    /// The refusal of a save that would take a sequence number past [`MessageId::MAX_SEQ`] on
    /// the shard at `location`.
    pub fn exhausted(location: &str) -> Error {
        Error::Config(format!(
            "{location} has used every message id (sequence numbers up to {}): it takes no new awards; nothing of this award was written; add databases to the layout or move users to another shard",
            Self::MAX_SEQ
        ))
    }

    /// Parse and check an id read back from a row or message: ours (as [`MessageId::new`]
    /// makes them), or 11 or more digits (the original's, and big-market's before this scheme).
    pub fn parse(s: &str) -> Result<Self> {
        let ours =
            s.len() == 11 && s.starts_with('b') && s[1..].bytes().all(|b| BASE36.contains(&b));
        let digits = s.len() >= 11 && s.bytes().all(|b| b.is_ascii_digit());
        if !ours && !digits {
            return Err(Error::invalid(
                "message_id",
                format!("{s:?} is neither big-market's (b and 10 base-36 digits) nor 11+ digits"),
            ));
        }
        Ok(MessageId(s.to_string()))
    }
    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A validated award: what `save_award` takes.
#[derive(Debug, Clone, PartialEq)]
pub struct AwardRecord {
    /// Who won.
    pub user_id: UserId,
    /// The activity the draw belonged to.
    pub activity_id: i64,
    /// The strategy that drew it.
    pub strategy_id: i64,
    /// Idempotency key.
    pub order_id: OrderId,
    /// What was won.
    pub award_id: i32,
    /// The award's title, 1 to 128 characters.
    pub award_title: String,
    /// When it was won, epoch milliseconds.
    pub award_time_ms: i64,
}

/// The fields of an award before validation.
#[derive(Debug, Clone, Default)]
pub struct NewAward<'a> {
    /// User id.
    pub user_id: &'a str,
    /// Activity id (positive).
    pub activity_id: i64,
    /// Strategy id (positive).
    pub strategy_id: i64,
    /// Order id.
    pub order_id: &'a str,
    /// Award id (positive).
    pub award_id: i64,
    /// Award title.
    pub award_title: &'a str,
    /// Award time, epoch milliseconds.
    pub award_time_ms: i64,
}

impl AwardRecord {
    /// The seed's award (activity 100301, strategy 100006, award 101 "OpenAI 增加使用次数") for
    /// `user_id` and `order_id` at `award_time_ms`: what `load`, `bench` and the tests save.
    pub fn sample(user_id: &str, order_id: &str, award_time_ms: i64) -> Result<Self> {
        AwardRecord::new(NewAward {
            user_id,
            activity_id: 100301,
            strategy_id: 100006,
            order_id,
            award_id: 101,
            award_title: "OpenAI 增加使用次数",
            award_time_ms,
        })
    }

    /// Validate every field; the first bad field is reported.
    pub fn new(a: NewAward<'_>) -> Result<Self> {
        let user_id = UserId::parse(a.user_id)?;
        let order_id = OrderId::parse(a.order_id)?;
        if a.activity_id <= 0 {
            return Err(Error::invalid("activity_id", "must be a positive integer"));
        }
        if a.strategy_id <= 0 {
            return Err(Error::invalid("strategy_id", "must be a positive integer"));
        }
        if a.award_id <= 0 || a.award_id > i64::from(i32::MAX) {
            return Err(Error::invalid(
                "award_id",
                "must be a positive 32-bit integer",
            ));
        }
        let title = a.award_title.trim();
        if title.is_empty() {
            return Err(Error::invalid("award_title", "must not be empty"));
        }
        if title.chars().count() > 128 || title.chars().any(char::is_control) {
            return Err(Error::invalid(
                "award_title",
                "must be at most 128 characters with no control characters",
            ));
        }
        if !(0..=MAX_AWARD_TIME_MS).contains(&a.award_time_ms) {
            return Err(Error::invalid(
                "award_time",
                "must be epoch milliseconds from 1970 to 9999-12-31",
            ));
        }
        Ok(AwardRecord {
            user_id,
            activity_id: a.activity_id,
            strategy_id: a.strategy_id,
            order_id,
            award_id: a.award_id as i32,
            award_title: title.to_string(),
            award_time_ms: a.award_time_ms,
        })
    }
}

/// The width of the `task.message` column (`varchar(512)`, characters): the longest message
/// big-market writes fits it.
pub const MESSAGE_MAX: usize = 512;

/// The latest award time accepted: 9999-12-31T23:59:59.999Z in epoch milliseconds.
pub const MAX_AWARD_TIME_MS: i64 = 253_402_300_799_999;

/// A task's state in the outbox. The spelling is the original's data (`completed`, not `complete`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TaskState {
    /// Committed; the first publish is pending or in flight.
    Create,
    /// Confirmed by the broker (or handled by the in-process consumer).
    Completed,
    /// A publish failed; due again at its next attempt time.
    Fail,
    /// Parked after too many refused attempts; only an operator requeues it.
    Dead,
}

impl TaskState {
    /// Every state, in display order.
    pub const ALL: [TaskState; 4] = [
        TaskState::Create,
        TaskState::Fail,
        TaskState::Completed,
        TaskState::Dead,
    ];
    /// The column value.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Create => "create",
            TaskState::Completed => "completed",
            TaskState::Fail => "fail",
            TaskState::Dead => "dead",
        }
    }
    /// Parse a column value or a `--state` flag.
    pub fn parse(s: &str) -> Result<Self> {
        TaskState::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| {
                Error::invalid(
                    "state",
                    format!("{s:?} is not one of create, fail, completed, dead"),
                )
            })
    }
}

/// An award record's delivery state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AwardState {
    /// Written, not yet delivered.
    Create,
    /// Delivered by the consumer.
    Completed,
}

impl AwardState {
    /// The column value.
    pub fn as_str(self) -> &'static str {
        match self {
            AwardState::Create => "create",
            AwardState::Completed => "completed",
        }
    }
}

/// The payload of a `send_award` message. Fields are declared in alphabetical order so that the
/// JSON matches fastjson's output byte for byte.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SendAward {
    /// Award id.
    pub award_id: i32,
    /// Award title.
    pub award_title: String,
    /// Order id, so the consumer can find the record. The original's message has none (its
    /// consumer only logs the message); later versions of the original add it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order_id: Option<String>,
    /// User id.
    pub user_id: String,
}

/// The `send_award` message: the original's `EventMessage` plus the shard and sequence that let
/// an audit prove nothing is missing. Keys are alphabetical, like fastjson.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventMessage {
    /// The payload.
    pub data: SendAward,
    /// The message id.
    pub id: String,
    /// Per-shard sequence number of the task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// The database index (1-based) the task lives on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard: Option<u32>,
    /// When the message was built, epoch milliseconds.
    pub timestamp: i64,
}

impl EventMessage {
    /// Build the message for an award committed as task `seq` on database `db`.
    pub fn for_award(record: &AwardRecord, db: u32, seq: u64, now_ms: i64) -> Self {
        EventMessage {
            data: SendAward {
                award_id: record.award_id,
                award_title: record.award_title.clone(),
                order_id: Some(record.order_id.as_str().to_string()),
                user_id: record.user_id.as_str().to_string(),
            },
            id: MessageId::new(db, seq).as_str().to_string(),
            seq: Some(seq),
            shard: Some(db),
            timestamp: now_ms,
        }
    }

    /// Encode as compact JSON.
    pub fn encode(&self) -> String {
        serde_json::to_string(self).expect("an EventMessage always serializes")
    }

    /// Decode and validate a message body: ours, or the original's (no `orderId`, an id of
    /// 11 random digits), which [`EventMessage::order_id`] tells apart.
    pub fn decode(body: &[u8]) -> Result<Self> {
        let msg: EventMessage = serde_json::from_slice(body)
            .map_err(|e| Error::Poison(format!("not a send_award message: {e}")))?;
        UserId::parse(&msg.data.user_id).map_err(|e| Error::Poison(e.to_string()))?;
        if let Some(order) = &msg.data.order_id {
            OrderId::parse(order).map_err(|e| Error::Poison(e.to_string()))?;
        }
        MessageId::parse(&msg.id).map_err(|e| Error::Poison(e.to_string()))?;
        Ok(msg)
    }

    /// The order id the message names: `None` for the original's form, which names no award
    /// (the original's consumer only logs it); such a message is recorded, not delivered.
    pub fn order_id(&self) -> Option<&str> {
        self.data.order_id.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn award() -> AwardRecord {
        AwardRecord::new(NewAward {
            user_id: "xiaofuge",
            activity_id: 100301,
            strategy_id: 100006,
            order_id: "123456789012",
            award_id: 101,
            award_title: "OpenAI 增加使用次数",
            award_time_ms: 1712377010878,
        })
        .unwrap()
    }

    #[test]
    fn message_json_is_fastjson_shaped() {
        let m = EventMessage::for_award(&award(), 1, 42, 1712377010878);
        assert_eq!(
            m.encode(),
            r#"{"data":{"awardId":101,"awardTitle":"OpenAI 增加使用次数","orderId":"123456789012","userId":"xiaofuge"},"id":"b0100000016","seq":42,"shard":1,"timestamp":1712377010878}"#
        );
    }

    #[test]
    fn decode_reads_what_encode_writes_and_the_originals_form() {
        let m = EventMessage::for_award(&award(), 2, 7, 5);
        assert_eq!(EventMessage::decode(m.encode().as_bytes()).unwrap(), m);
        assert_eq!(m.order_id(), Some("123456789012"));
        // The seed's message has no orderId: it decodes, naming no award.
        let original = r#"{"data":{"awardId":101,"awardTitle":"OpenAI 增加使用次数","userId":"xiaofuge"},"id":"74920280321","timestamp":1712377010878}"#;
        let o = EventMessage::decode(original.as_bytes()).unwrap();
        assert_eq!(
            (o.order_id(), o.id.as_str(), o.seq, o.shard),
            (None, "74920280321", None, None)
        );
        assert_eq!(o.data.user_id, "xiaofuge");
        assert_eq!(o.encode(), original, "and encodes back byte for byte");
        // A later version's message names its award.
        let later = r#"{"data":{"awardId":101,"awardTitle":"t","orderId":"880000000001","userId":"xiaofuge"},"id":"74920280322","timestamp":1712377010878}"#;
        assert_eq!(
            EventMessage::decode(later.as_bytes()).unwrap().order_id(),
            Some("880000000001")
        );
    }

    #[test]
    fn decode_refuses_garbage() {
        for body in [&b"not json"[..], b"{}", b"[]", br#"{"data":{"awardId":1,"awardTitle":"t","orderId":"","userId":"u"},"id":"01000000001","timestamp":1}"#] {
            assert!(matches!(EventMessage::decode(body), Err(Error::Poison(_))), "{body:?}");
        }
    }

    #[test]
    fn message_ids_are_eleven_characters_never_all_digits_and_distinct_per_shard() {
        assert_eq!(MessageId::new(1, 1).as_str(), "b0100000001");
        assert_eq!(MessageId::new(1, 370).as_str(), "b01000000aa");
        assert_ne!(MessageId::new(1, 12), MessageId::new(11, 2));
        // Over the whole range: 11 characters, never all digits, read back by parse.
        for (db, seq) in [
            (1, 1),
            (2, 999_999_999),
            (1024, 1_000_000_000),
            (MessageId::MAX_DB, MessageId::MAX_SEQ),
        ] {
            let id = MessageId::new(db, seq);
            assert_eq!(id.as_str().len(), 11, "{id:?}");
            assert!(!id.as_str().bytes().all(|b| b.is_ascii_digit()), "{id:?}");
            assert_eq!(MessageId::parse(id.as_str()).unwrap(), id);
        }
        assert_eq!(
            MessageId::new(MessageId::MAX_DB, MessageId::MAX_SEQ).as_str(),
            "bzzzzzzzzzz"
        );
        assert!(MessageId::fits(MessageId::MAX_SEQ) && !MessageId::fits(MessageId::MAX_SEQ + 1));
        // Distinct per database and sequence (a sample over the edges of every digit).
        let mut seen = std::collections::HashSet::new();
        for db in [1, 2, 35, 36, 1024] {
            for seq in [1, 35, 36, 1295, 1296, 36u64.pow(7), MessageId::MAX_SEQ] {
                assert!(seen.insert(MessageId::new(db, seq)), "{db} {seq}");
            }
        }
        // The original's ids (and ours before this scheme) still parse; others do not.
        assert!(MessageId::parse("74920280321").is_ok());
        for bad in [
            "b010000000",
            "b01000000001",
            "B0100000001",
            "x0100000001",
            "7492028032",
        ] {
            assert!(MessageId::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_longest_message_fits_the_originals_message_column() {
        // Every field at its widest, of the characters JSON escapes to two.
        let (user, order, title) = ("\"".repeat(32), "\\".repeat(12), "\"".repeat(128));
        let r = AwardRecord::new(NewAward {
            user_id: &user,
            activity_id: i64::MAX,
            strategy_id: i64::MAX,
            order_id: &order,
            award_id: i64::from(i32::MAX),
            award_title: &title,
            award_time_ms: MAX_AWARD_TIME_MS,
        })
        .unwrap();
        let m =
            EventMessage::for_award(&r, MessageId::MAX_DB, MessageId::MAX_SEQ, MAX_AWARD_TIME_MS);
        let n = m.encode().chars().count();
        assert!(n <= MESSAGE_MAX, "{n} characters: {}", m.encode());
    }

    #[test]
    fn validation_names_the_bad_field() {
        let base = NewAward {
            user_id: "u",
            activity_id: 1,
            strategy_id: 1,
            order_id: "o",
            award_id: 1,
            award_title: "t",
            award_time_ms: 0,
        };
        let long_id = "x".repeat(33);
        let cases: Vec<(NewAward, &str)> = vec![
            (
                NewAward {
                    user_id: "",
                    ..base.clone()
                },
                "user_id",
            ),
            (
                NewAward {
                    user_id: long_id.as_str(),
                    ..base.clone()
                },
                "user_id",
            ),
            (
                NewAward {
                    user_id: "a\u{7}b",
                    ..base.clone()
                },
                "user_id",
            ),
            (
                NewAward {
                    order_id: "",
                    ..base.clone()
                },
                "order_id",
            ),
            (
                NewAward {
                    order_id: "1234567890123",
                    ..base.clone()
                },
                "order_id",
            ),
            (
                NewAward {
                    activity_id: 0,
                    ..base.clone()
                },
                "activity_id",
            ),
            (
                NewAward {
                    strategy_id: -1,
                    ..base.clone()
                },
                "strategy_id",
            ),
            (
                NewAward {
                    award_id: 0,
                    ..base.clone()
                },
                "award_id",
            ),
            (
                NewAward {
                    award_id: 1 << 40,
                    ..base.clone()
                },
                "award_id",
            ),
            (
                NewAward {
                    award_title: "  ",
                    ..base.clone()
                },
                "award_title",
            ),
            (
                NewAward {
                    award_time_ms: -1,
                    ..base.clone()
                },
                "award_time",
            ),
        ];
        for (input, field) in cases {
            match AwardRecord::new(input) {
                Err(Error::InvalidInput { field: f, .. }) => assert_eq!(f, field),
                other => panic!("expected invalid {field}, got {other:?}"),
            }
        }
        assert!(AwardRecord::new(base).is_ok());
        // 32 Chinese characters are 32 characters, not 96 bytes.
        assert!(UserId::parse(&"用".repeat(32)).is_ok());
        // What the original's varchar(32) holds: spaces yes, control characters and 33 no.
        assert!(UserId::parse("user 4").is_ok());
        assert!(UserId::parse(" lead").is_ok());
        for bad in ["", "a\tb", "a\nb", "nul\0", &"x".repeat(33)] {
            assert!(UserId::parse(bad).is_err(), "{bad:?}");
        }
        assert!(
            OrderId::parse("1234 678").is_err(),
            "order ids stay without spaces"
        );
    }

    #[test]
    fn task_states_round_trip() {
        for s in TaskState::ALL {
            assert_eq!(TaskState::parse(s.as_str()).unwrap(), s);
        }
        assert!(TaskState::parse("complete").is_err());
    }
}
