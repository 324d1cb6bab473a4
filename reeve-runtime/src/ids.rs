//! The one rule for the identifiers callers hand us: user ids, idempotency keys and
//! free-text descriptions. Every edge (REST, gRPC, Purchase, AddCredits, quota calls)
//! checks with these functions before anything is written or any money moves, so an
//! id the ledger could not store or credit later never gets in.
//!
//! Lengths count characters (Unicode scalar values), as JSON Schema's `maxLength`
//! does, so the published OpenAPI constraints and this check agree exactly. This
//! module never allocates on the success path and never echoes the offending value.

/// Most characters in a user id.
pub const MAX_USER_ID_CHARS: usize = 128;
/// Most characters in an idempotency key (or hold id).
pub const MAX_KEY_CHARS: usize = 256;
/// Most characters in a description or reason.
pub const MAX_DESCRIPTION_CHARS: usize = 1024;

/// JSON Schema `pattern` equal to [`check_user_id`] and [`check_key`] (lengths aside):
/// no control character (C0, DEL, C1).
pub const NO_CONTROL_PATTERN: &str = r"^[^\u0000-\u001F\u007F-\u009F]+$";

/// Why an identifier is refused: a stable code and a message naming the field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidId {
    pub code: &'static str,
    pub message: String,
}

fn check_identifier(
    value: &str,
    field: &str,
    code: &'static str,
    max_chars: usize,
) -> Result<(), InvalidId> {
    let mut chars = 0usize;
    for c in value.chars() {
        chars += 1;
        if c.is_control() {
            return Err(InvalidId {
                code,
                message: format!("{field} must not contain control characters (NUL included)"),
            });
        }
    }
    if chars == 0 || chars > max_chars {
        return Err(InvalidId {
            code,
            message: format!("{field} must be 1 to {max_chars} characters"),
        });
    }
    Ok(())
}

/// A user id: 1 to 128 characters, none of them a control character.
pub fn check_user_id(user_id: &str) -> Result<(), InvalidId> {
    check_identifier(user_id, "user_id", "invalid_user_id", MAX_USER_ID_CHARS)
}

/// An idempotency key (or any caller-chosen id of a write): 1 to 256 characters, none
/// of them a control character.
pub fn check_key(key: &str, field: &str) -> Result<(), InvalidId> {
    check_identifier(key, field, "invalid_idempotency_key", MAX_KEY_CHARS)
}

/// A description: at most 1,024 characters; line breaks and tabs are allowed, other
/// control characters (NUL first of all: PostgreSQL text cannot hold it) are not.
pub fn check_description(description: &str) -> Result<(), InvalidId> {
    let mut chars = 0usize;
    for c in description.chars() {
        chars += 1;
        if c.is_control() && !matches!(c, '\n' | '\r' | '\t') {
            return Err(InvalidId {
                code: "invalid_description",
                message: "description must not contain control characters other than line breaks and tabs".to_owned(),
            });
        }
    }
    if chars > MAX_DESCRIPTION_CHARS {
        return Err(InvalidId {
            code: "invalid_description",
            message: format!("description must be at most {MAX_DESCRIPTION_CHARS} characters"),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_ids_follow_one_rule() {
        for good in ["alice", "auth0|5f1c", "ü".repeat(128).as_str(), "a b"] {
            assert_eq!(check_user_id(good), Ok(()), "{good:?}");
        }
        for bad in [
            "",
            "a\0b",
            "\n",
            "x\u{7f}",
            "x\u{85}",
            "a".repeat(129).as_str(),
        ] {
            let err = check_user_id(bad).unwrap_err();
            assert_eq!(err.code, "invalid_user_id", "{bad:?}");
            assert!(!err.message.contains(bad) || bad.is_empty());
        }
    }

    #[test]
    fn keys_and_descriptions_refuse_nul() {
        assert!(check_key("k\0", "idempotency_key").is_err());
        assert!(check_key(&"k".repeat(256), "idempotency_key").is_ok());
        assert!(check_key(&"k".repeat(257), "idempotency_key").is_err());
        assert!(check_description("line one\nline two\tend").is_ok());
        assert!(check_description("nul\0").is_err());
        assert!(check_description("").is_ok());
        assert!(check_description(&"d".repeat(1025)).is_err());
    }

    #[test]
    fn the_pattern_matches_the_rule() {
        // The JSON Schema pattern excludes exactly `char::is_control` (Unicode Cc).
        for c in (0u32..0x200).filter_map(char::from_u32) {
            let in_class = matches!(c as u32, 0..=0x1f | 0x7f..=0x9f);
            assert_eq!(in_class, c.is_control(), "{c:?}");
        }
    }
}
