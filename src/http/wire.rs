//! The award's wire form: the JSON body of `POST /api/v1/awards` with the original's field
//! names, checked field by field, and the error bodies every route answers with.
//!
//! Pure: no I/O, so every rule here is unit-tested below.

use serde_json::{json, Value};

use crate::error::Error;
use crate::model::{AwardRecord, NewAward};

/// A refusal: the status and a body that says what the caller did wrong (and never anything about
/// this machine: no paths, URLs or credentials).
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    /// HTTP status.
    pub status: u16,
    /// JSON body.
    pub body: Value,
}

impl Refusal {
    /// `{"error": msg}` with `status`.
    pub fn new(status: u16, msg: impl Into<String>) -> Refusal {
        Refusal {
            status,
            body: json!({ "error": msg.into() }),
        }
    }
    /// `{"error": msg, "field": field}` with 400.
    pub fn field(field: &str, msg: impl Into<String>) -> Refusal {
        Refusal {
            status: 400,
            body: json!({ "error": msg.into(), "field": field }),
        }
    }
}

/// The original's field names for the model's.
fn wire_field(field: &str) -> &str {
    match field {
        "user_id" => "userId",
        "order_id" => "orderId",
        "activity_id" => "activityId",
        "strategy_id" => "strategyId",
        "award_id" => "awardId",
        "award_title" => "awardTitle",
        "award_time" => "awardTime",
        other => other,
    }
}

/// Parse `awardTime`: epoch milliseconds, or an RFC 3339 / ISO 8601 date-time (as a Spring/Jackson
/// client writes a `Date`), with or without a fraction and an offset; without an offset it is UTC.
pub fn parse_award_time(v: &Value) -> Result<i64, String> {
    let ms = match v {
        Value::Number(n) => n
            .as_i64()
            .ok_or("awardTime must be epoch milliseconds (an integer) or an RFC 3339 string")?,
        Value::String(s) => {
            let s = s.trim();
            if let Ok(ts) = s.parse::<jiff::Timestamp>() {
                ts.as_millisecond()
            } else if let Ok(dt) = s.parse::<jiff::civil::DateTime>() {
                dt.to_zoned(jiff::tz::TimeZone::UTC)
                    .map_err(|e| format!("awardTime {s:?} is out of range: {e}"))?
                    .timestamp()
                    .as_millisecond()
            } else {
                return Err(format!(
                    "awardTime {s:?} is not an RFC 3339 date-time like 2024-04-06T12:16:50.878+08:00"
                ));
            }
        }
        _ => {
            return Err(
                "awardTime must be epoch milliseconds (an integer) or an RFC 3339 string".into(),
            )
        }
    };
    if !(0..=crate::model::MAX_AWARD_TIME_MS).contains(&ms) {
        return Err(format!(
            "awardTime {ms} ms is outside 1970-01-01 .. 9999-12-31"
        ));
    }
    Ok(ms)
}

/// Parse and validate an award body with the original's field names. `awardTime` left out (or
/// null) is `now_ms`.
pub fn parse_award(body: &[u8], now_ms: i64) -> Result<AwardRecord, Refusal> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| Refusal::new(400, format!("body is not JSON: {e}")))?;
    let obj = v
        .as_object()
        .ok_or_else(|| Refusal::new(400, "body must be a JSON object"))?;
    let text = |f: &str| match obj.get(f) {
        Some(Value::String(s)) => Ok(s.as_str()),
        Some(_) => Err(Refusal::field(f, format!("{f} must be a string"))),
        None => Err(Refusal::field(f, format!("{f} is required"))),
    };
    let int = |f: &str| match obj.get(f) {
        Some(Value::Number(n)) => n
            .as_i64()
            .ok_or_else(|| Refusal::field(f, format!("{f} must be an integer"))),
        Some(_) => Err(Refusal::field(f, format!("{f} must be an integer"))),
        None => Err(Refusal::field(f, format!("{f} is required"))),
    };
    let award_time_ms = match obj.get("awardTime") {
        None | Some(Value::Null) => now_ms,
        Some(t) => parse_award_time(t).map_err(|e| Refusal::field("awardTime", e))?,
    };
    AwardRecord::new(NewAward {
        user_id: text("userId")?,
        activity_id: int("activityId")?,
        strategy_id: int("strategyId")?,
        order_id: text("orderId")?,
        award_id: int("awardId")?,
        award_title: text("awardTitle")?,
        award_time_ms,
    })
    .map_err(|e| match e {
        Error::InvalidInput { field, reason } => {
            let f = wire_field(field);
            Refusal::field(f, format!("invalid {f}: {reason}"))
        }
        other => Refusal::new(400, other.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(v: Value) -> Vec<u8> {
        v.to_string().into_bytes()
    }

    fn with(field: &str, value: Value) -> Value {
        let mut v = ok_award();
        v[field] = value;
        v
    }

    fn ok_award() -> Value {
        json!({"userId":"xiaofuge","activityId":100301,"strategyId":100006,"orderId":"123456789012","awardId":101,"awardTitle":"t","awardTime":1712377010878i64})
    }

    #[test]
    fn award_bodies_are_validated_field_by_field() {
        assert_eq!(
            parse_award(&body(ok_award()), 0).unwrap().award_time_ms,
            1712377010878
        );
        let mut no_time = ok_award();
        no_time.as_object_mut().unwrap().remove("awardTime");
        assert_eq!(parse_award(&body(no_time), 42).unwrap().award_time_ms, 42);
        let cases: Vec<(Value, &str)> = vec![
            (json!({"userId":"u"}), "activityId"),
            (with("activityId", json!("100301")), "activityId"),
            (with("userId", json!(7)), "userId"),
            (with("orderId", json!("1234567890123")), "orderId"),
            (with("awardId", json!(1.5)), "awardId"),
            (with("awardTime", json!("yesterday")), "awardTime"),
            (with("awardTime", json!(-1)), "awardTime"),
            (with("awardTime", json!(true)), "awardTime"),
        ];
        for (v, field) in cases {
            let r = parse_award(&body(v.clone()), 0).unwrap_err();
            assert_eq!(r.status, 400);
            assert_eq!(r.body["field"], field, "{v} -> {}", r.body);
        }
        assert_eq!(parse_award(b"not json", 0).unwrap_err().status, 400);
        assert_eq!(parse_award(b"[1]", 0).unwrap_err().status, 400);
        assert_eq!(
            parse_award(b"{\"userId\":\"\xff\"}", 0).unwrap_err().status,
            400
        );
    }

    #[test]
    fn award_time_is_epoch_ms_or_rfc3339() {
        let want = 1712377010878i64; // 2024-04-06T04:16:50.878Z
        for s in [
            "2024-04-06T04:16:50.878Z",
            "2024-04-06T04:16:50.878+00:00",
            "2024-04-06T12:16:50.878+08:00",
            "2024-04-06T04:16:50.878",
        ] {
            assert_eq!(parse_award_time(&json!(s)), Ok(want), "{s}");
        }
        assert_eq!(
            parse_award_time(&json!("2024-04-06T04:16:50Z")),
            Ok(want - 878)
        );
        assert_eq!(parse_award_time(&json!(want)), Ok(want));
        assert!(parse_award_time(&json!("2024-13-06T04:16:50Z")).is_err());
        assert!(parse_award_time(&json!(i64::MAX)).is_err());
    }
}
