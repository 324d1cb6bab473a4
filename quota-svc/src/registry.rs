//! The quota registry: for each feature, the limit of each tier over the window.
//!
//! The built-in default is the table of the product spec. An operator may replace it
//! with a TOML file (`REEVE_QUOTA_CONFIG`), which is validated whole at load: an
//! unknown tier, a negative limit, a missing tier or a duplicate feature refuses
//! start-up with a message naming the line. Nothing here ever allows by default: an
//! unknown feature or tier is an error for the caller.

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;

/// The tiers, in the order they are listed.
/// PostgreSQL's `quota_consume_batch` (migrations 2003 and 2005) takes one limit array per tier
/// in this order and knows these names: change them together (a test pins them).
pub const TIERS: [&str; 3] = ["free", "pro", "enterprise"];
pub const DEFAULT_TIER: &str = "free";

/// A limit per window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    Units(i64),
    Unlimited,
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Limit::Units(units) => write!(f, "{units}"),
            Limit::Unlimited => f.write_str("unlimited"),
        }
    }
}

/// Feature → limits of `free`, `pro`, `enterprise` (in [`TIERS`] order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registry {
    features: BTreeMap<String, [Limit; 3]>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    #[error("unknown feature {0:?}")]
    UnknownFeature(String),
    #[error("unknown tier {0:?} (expected free, pro or enterprise)")]
    UnknownTier(String),
}

/// Why a registry file was refused, with the 1-based line it points at.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: line {line}: {message}")]
pub struct RegistryFileError {
    pub path: String,
    pub line: usize,
    pub message: String,
}

const DEFAULT_TABLE: [(&str, i64, i64); 23] = [
    ("ad_generations", 10, 100),
    ("brand_analyses", 5, 50),
    ("connector_syncs", 20, 500),
    ("dashboard_refreshes", 50, 500),
    ("goal_creations", 5, 50),
    ("agent_creations", 3, 20),
    ("campaign_launches", 5, 100),
    ("audience_builds", 5, 50),
    ("creative_variations", 20, 300),
    ("image_generations", 20, 300),
    ("video_generations", 2, 30),
    ("copy_rewrites", 30, 500),
    ("competitor_scans", 3, 40),
    ("keyword_researches", 10, 150),
    ("report_exports", 10, 200),
    ("scheduled_posts", 20, 400),
    ("workflow_runs", 50, 1000),
    ("knowledge_uploads", 10, 200),
    ("alert_rules", 3, 50),
    ("forecast_runs", 5, 100),
    ("ab_tests", 2, 30),
    ("team_invites", 2, 20),
    ("api_requests", 1000, 50000),
];

impl Default for Registry {
    /// The product spec's table: 23 features, enterprise unlimited everywhere.
    fn default() -> Registry {
        let features = DEFAULT_TABLE
            .iter()
            .map(|(name, free, pro)| {
                (
                    (*name).to_owned(),
                    [Limit::Units(*free), Limit::Units(*pro), Limit::Unlimited],
                )
            })
            .collect();
        Registry { features }
    }
}

pub fn tier_index(tier: &str) -> Result<usize, RegistryError> {
    TIERS
        .iter()
        .position(|t| *t == tier)
        .ok_or_else(|| RegistryError::UnknownTier(tier.to_owned()))
}

impl Registry {
    pub fn limit(&self, feature: &str, tier: &str) -> Result<Limit, RegistryError> {
        let limits = self
            .features
            .get(feature)
            .ok_or_else(|| RegistryError::UnknownFeature(feature.to_owned()))?;
        Ok(limits[tier_index(tier)?])
    }

    /// The feature's limit in each tier, in [`TIERS`] order.
    pub fn tier_limits(&self, feature: &str) -> Result<[Limit; 3], RegistryError> {
        self.features
            .get(feature)
            .copied()
            .ok_or_else(|| RegistryError::UnknownFeature(feature.to_owned()))
    }

    pub fn contains(&self, feature: &str) -> bool {
        self.features.contains_key(feature)
    }

    pub fn features(&self) -> impl Iterator<Item = &str> {
        self.features.keys().map(String::as_str)
    }

    /// Reads and validates a registry file.
    pub fn load(path: &str) -> Result<Registry, RegistryFileError> {
        let text = std::fs::read_to_string(path).map_err(|e| RegistryFileError {
            path: path.to_owned(),
            line: 0,
            message: format!("cannot read: {e}"),
        })?;
        Registry::parse(&text).map_err(|(line, message)| RegistryFileError {
            path: path.to_owned(),
            line,
            message,
        })
    }

    /// Parses registry TOML:
    ///
    /// ```toml
    /// [features.ad_generations]
    /// free = 10
    /// pro = 100
    /// enterprise = "unlimited"
    /// ```
    pub fn parse(text: &str) -> Result<Registry, (usize, String)> {
        let line_of = |offset: usize| text[..offset.min(text.len())].matches('\n').count() + 1;
        let file: File = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| line_of(s.start)).unwrap_or(0);
            (line, e.message().to_owned())
        })?;
        let mut features = BTreeMap::new();
        for (name, table) in file.features {
            let line = line_of(table.span().start);
            if name.is_empty()
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            {
                return Err((
                    line,
                    format!("feature name {name:?} must be lowercase letters, digits and '_'"),
                ));
            }
            let mut limits: [Option<Limit>; 3] = [None; 3];
            for (tier, value) in table.into_inner() {
                let line = line_of(value.span().start);
                let index = tier_index(&tier)
                    .map_err(|_| (line, format!("feature {name:?}: unknown tier {tier:?} (expected free, pro or enterprise)")))?;
                limits[index] = Some(match value.into_inner() {
                    LimitValue::Units(units) if units >= 0 => Limit::Units(units),
                    LimitValue::Units(units) => {
                        return Err((
                            line,
                            format!("feature {name:?}, tier {tier:?}: limit {units} is negative"),
                        ));
                    }
                    LimitValue::Word(word) if word == "unlimited" => Limit::Unlimited,
                    LimitValue::Word(word) => {
                        return Err((
                            line,
                            format!(
                                "feature {name:?}, tier {tier:?}: {word:?} is neither a count nor \"unlimited\""
                            ),
                        ));
                    }
                });
            }
            let mut complete = [Limit::Unlimited; 3];
            for (index, limit) in limits.iter().enumerate() {
                complete[index] = limit.ok_or_else(|| {
                    (
                        line,
                        format!("feature {name:?} has no limit for tier {:?}", TIERS[index]),
                    )
                })?;
            }
            features.insert(name, complete);
        }
        if features.is_empty() {
            return Err((1, "the registry defines no feature".to_owned()));
        }
        Ok(Registry { features })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    features: BTreeMap<String, toml::Spanned<BTreeMap<String, toml::Spanned<LimitValue>>>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum LimitValue {
    Units(i64),
    Word(String),
}

#[cfg(test)]
mod tests {

    #[test]
    fn tiers_match_the_batch_function() {
        // quota_consume_batch (migrations/postgres/2003) hard-codes these, in this order.
        assert_eq!(TIERS, ["free", "pro", "enterprise"]);
        assert_eq!(DEFAULT_TIER, "free");
        let sql = include_str!("../migrations/postgres/2003_quota_consume_batch.sql");
        for tier in TIERS {
            assert!(
                sql.contains(&format!("v_tier = '{tier}'")),
                "{tier} missing from the batch function"
            );
            assert!(
                sql.contains(&format!("v_limit := p_{tier}[i]")),
                "{tier} not mapped to its array"
            );
        }
        // Its set-based successor (migration 2005) maps them the same way.
        let set_based =
            include_str!("../migrations/postgres/2005_quota_consume_batch_set_based.sql");
        for tier in TIERS {
            assert!(
                set_based.contains(&format!("WHEN i.t_tier = '{tier}' THEN p_{tier}[i.ord]")),
                "{tier} not mapped to its array in the set-based batch"
            );
        }
        let order: Vec<usize> = TIERS
            .iter()
            .map(|t| {
                sql.find(&format!("p_{t:<10} BIGINT[]"))
                    .unwrap_or(usize::MAX)
            })
            .collect();
        assert!(
            order.windows(2).all(|w| w[0] < w[1]),
            "the limit arrays are in TIERS order"
        );
    }
    use super::*;

    #[test]
    fn default_is_the_spec_table() {
        let registry = Registry::default();
        assert_eq!(registry.features().count(), 23);
        assert_eq!(
            registry.limit("agent_creations", "free"),
            Ok(Limit::Units(3))
        );
        assert_eq!(
            registry.limit("api_requests", "pro"),
            Ok(Limit::Units(50_000))
        );
        assert_eq!(
            registry.limit("api_requests", "enterprise"),
            Ok(Limit::Unlimited)
        );
        assert!(matches!(
            registry.limit("nope", "free"),
            Err(RegistryError::UnknownFeature(_))
        ));
        assert!(matches!(
            registry.limit("ab_tests", "gold"),
            Err(RegistryError::UnknownTier(_))
        ));
    }

    #[test]
    fn parses_a_valid_file() {
        let text = "[features.ad_generations]\nfree = 1\npro = 2\nenterprise = \"unlimited\"\n";
        let registry = Registry::parse(text).unwrap();
        assert_eq!(registry.features().collect::<Vec<_>>(), ["ad_generations"]);
        assert_eq!(registry.limit("ad_generations", "pro"), Ok(Limit::Units(2)));
    }

    #[test]
    fn refuses_invalid_files_naming_the_line() {
        let cases = [
            (
                "[features.a]\nfree = 1\ngold = 2\npro = 3\nenterprise = 4\n",
                3,
                "unknown tier",
            ),
            (
                "[features.a]\nfree = 1\npro = -2\nenterprise = 4\n",
                3,
                "negative",
            ),
            (
                "[features.a]\nfree = 1\npro = 2\nenterprise = 3\n\n[features.a]\nfree = 1\n",
                6,
                "duplicate",
            ),
            (
                "[features.a]\nfree = 1\npro = 2\n",
                1,
                "no limit for tier \"enterprise\"",
            ),
            (
                "[features.a]\nfree = 1\npro = 2\nenterprise = \"lots\"\n",
                4,
                "neither",
            ),
            ("[feature.a]\nfree = 1\n", 1, "unknown field"),
        ];
        for (text, line, needle) in cases {
            let (got_line, message) = Registry::parse(text).unwrap_err();
            assert_eq!(got_line, line, "{message}");
            assert!(
                message.contains(needle),
                "{message:?} should contain {needle:?}"
            );
        }
    }
}
