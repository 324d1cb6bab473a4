//! Events as they are written into the outbox: a stable id, a type, the user they are
//! about, and JSON data. The body sent to endpoints is fixed when the event is written
//! (`{"id","type","created_at","data"}`), so every attempt carries the same bytes.
//!
//! The insert helpers run inside the caller's open transaction and never commit: the
//! event exists exactly when the caller's change does.

use sqlx::{PgConnection, SqliteConnection};

/// Event ids: `evt_` and 26 lowercase base-32 characters (128 random bits).
pub const EVENT_ID_PREFIX: &str = "evt_";

/// An event to write.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    /// `evt_…`, the `webhook-id` of every delivery of it.
    pub id: String,
    /// `credits.purchased`, `quota.threshold_reached`, …
    pub event_type: String,
    /// The user the event is about (`None` for operator events such as
    /// `endpoint.disabled`).
    pub user_id: Option<String>,
    pub data: serde_json::Value,
}

impl NewEvent {
    pub fn new(event_type: &str, user_id: Option<&str>, data: serde_json::Value) -> NewEvent {
        NewEvent {
            id: new_id(EVENT_ID_PREFIX),
            event_type: event_type.to_owned(),
            user_id: user_id.map(str::to_owned),
            data,
        }
    }

    /// The JSON body endpoints receive, written once with the event.
    pub fn payload(&self, created_at_us: i64) -> String {
        serde_json::json!({
            "id": self.id,
            "type": self.event_type,
            "created_at": rfc3339(created_at_us),
            "data": self.data,
        })
        .to_string()
    }
}

/// `prefix` and 26 base-32 characters of 128 random bits.
pub fn new_id(prefix: &str) -> String {
    const ALPHABET: &[u8; 32] = b"0123456789abcdefghjkmnpqrstvwxyz";
    let mut bits: u128 = rand::random();
    let mut id = String::with_capacity(prefix.len() + 26);
    id.push_str(prefix);
    for _ in 0..26 {
        id.push(char::from(ALPHABET[(bits & 31) as usize]));
        bits >>= 5;
    }
    id
}

/// An instant (microseconds since the Unix epoch) in RFC 3339, UTC, to the microsecond.
pub fn rfc3339(at_us: i64) -> String {
    let nanos = i128::from(at_us) * 1_000;
    time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

/// Writes `events` in the caller's open PostgreSQL transaction, in one statement
/// (nothing when `events` is empty).
pub async fn insert_pg(
    conn: &mut PgConnection,
    events: &[NewEvent],
    now_us: i64,
) -> Result<(), sqlx::Error> {
    if events.is_empty() {
        return Ok(());
    }
    let ids: Vec<&str> = events.iter().map(|e| e.id.as_str()).collect();
    let types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
    let users: Vec<Option<&str>> = events.iter().map(|e| e.user_id.as_deref()).collect();
    let payloads: Vec<String> = events.iter().map(|e| e.payload(now_us)).collect();
    sqlx::query(
        "INSERT INTO outbox_events (event_id, event_type, user_id, payload, created_at_us) \
         SELECT id, kind, user_id, payload, $5 \
         FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[]) AS e(id, kind, user_id, payload)",
    )
    .bind(&ids)
    .bind(&types)
    .bind(&users)
    .bind(&payloads)
    .bind(now_us)
    .execute(conn)
    .await?;
    Ok(())
}

/// Writes `events` in the caller's open SQLite transaction (nothing when empty).
pub async fn insert_sqlite(
    conn: &mut SqliteConnection,
    events: &[NewEvent],
    now_us: i64,
) -> Result<(), sqlx::Error> {
    // 5 parameters a row; SQLite allows 32,766 a statement.
    for chunk in events.chunks(1_000) {
        let mut sql = String::from(
            "INSERT INTO outbox_events (event_id, event_type, user_id, payload, created_at_us) VALUES ",
        );
        for i in 0..chunk.len() {
            if i > 0 {
                sql.push(',');
            }
            sql.push_str("(?, ?, ?, ?, ?)");
        }
        let mut query = sqlx::query(&sql);
        for event in chunk {
            query = query
                .bind(event.id.as_str())
                .bind(event.event_type.as_str())
                .bind(event.user_id.as_deref())
                .bind(event.payload(now_us))
                .bind(now_us);
        }
        query.execute(&mut *conn).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_have_their_prefix_and_differ() {
        let a = new_id("evt_");
        let b = new_id("evt_");
        assert!(a.starts_with("evt_") && a.len() == 30);
        assert_ne!(a, b);
    }

    #[test]
    fn payload_has_id_type_created_at_and_data() {
        let event = NewEvent::new(
            "credits.granted",
            Some("alice"),
            serde_json::json!({"a": 1}),
        );
        let body: serde_json::Value =
            serde_json::from_str(&event.payload(1_700_000_000_123_456)).unwrap_or_default();
        assert_eq!(body["id"], event.id);
        assert_eq!(body["type"], "credits.granted");
        assert_eq!(body["created_at"], "2023-11-14T22:13:20.123456Z");
        assert_eq!(body["data"]["a"], 1);
    }
}
