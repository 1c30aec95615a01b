//! metav1.LabelSelector: matchLabels and matchExpressions, ANDed.

use serde::{Deserialize, Serialize};

use crate::model::Labels;

/// The empty selector (`{}`) matches every label set.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabelSelector {
    #[serde(default)]
    pub match_labels: Labels,
    #[serde(default)]
    pub match_expressions: Vec<Requirement>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Requirement {
    pub key: String,
    pub operator: Operator,
    #[serde(default)]
    pub values: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Operator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

/// Why a selector cannot be read (the API server refuses both).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum SelectorError {
    #[error("{operator:?} on {key:?} needs values")]
    NoValues { key: String, operator: Operator },
    #[error("{operator:?} on {key:?} takes no values")]
    UnexpectedValues { key: String, operator: Operator },
}

impl LabelSelector {
    pub fn matches(&self, labels: &Labels) -> bool {
        self.match_labels
            .iter()
            .all(|(key, value)| labels.get(key) == Some(value))
            && self.match_expressions.iter().all(|r| r.matches(labels))
    }

    pub fn check(&self) -> Result<(), SelectorError> {
        self.match_expressions
            .iter()
            .try_for_each(Requirement::check)
    }
}

impl Requirement {
    fn matches(&self, labels: &Labels) -> bool {
        let value = labels.get(&self.key);
        match self.operator {
            Operator::In => value.is_some_and(|v| self.values.contains(v)),
            // A pod without the key is "not in" any set of its values.
            Operator::NotIn => value.is_none_or(|v| !self.values.contains(v)),
            Operator::Exists => value.is_some(),
            Operator::DoesNotExist => value.is_none(),
        }
    }

    fn check(&self) -> Result<(), SelectorError> {
        let (key, operator) = (self.key.clone(), self.operator);
        match (self.operator, self.values.is_empty()) {
            (Operator::In | Operator::NotIn, true) => {
                Err(SelectorError::NoValues { key, operator })
            }
            (Operator::Exists | Operator::DoesNotExist, false) => {
                Err(SelectorError::UnexpectedValues { key, operator })
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn expression(key: &str, operator: Operator, values: &[&str]) -> LabelSelector {
        LabelSelector {
            match_expressions: vec![Requirement {
                key: key.into(),
                operator,
                values: values.iter().map(|v| v.to_string()).collect(),
            }],
            ..LabelSelector::default()
        }
    }

    #[test]
    fn empty_selector_matches_everything() {
        assert!(LabelSelector::default().matches(&labels(&[])));
        assert!(LabelSelector::default().matches(&labels(&[("a", "x")])));
    }

    #[test]
    fn match_labels_needs_every_pair() {
        let s = LabelSelector {
            match_labels: labels(&[("a", "x"), ("b", "y")]),
            ..LabelSelector::default()
        };
        assert!(s.matches(&labels(&[("a", "x"), ("b", "y"), ("c", "z")])));
        assert!(!s.matches(&labels(&[("a", "x")])));
        assert!(!s.matches(&labels(&[("a", "x"), ("b", "x")])));
    }

    #[test]
    fn operators_follow_the_api() {
        let pod = labels(&[("a", "x")]);
        assert!(expression("a", Operator::In, &["x", "y"]).matches(&pod));
        assert!(!expression("b", Operator::In, &["x"]).matches(&pod));
        assert!(!expression("a", Operator::NotIn, &["x"]).matches(&pod));
        assert!(expression("b", Operator::NotIn, &["x"]).matches(&pod));
        assert!(expression("a", Operator::Exists, &[]).matches(&pod));
        assert!(!expression("a", Operator::DoesNotExist, &[]).matches(&pod));
        assert!(expression("b", Operator::DoesNotExist, &[]).matches(&pod));
    }

    #[test]
    fn match_labels_and_expressions_are_anded() {
        let mut s = expression("b", Operator::DoesNotExist, &[]);
        s.match_labels = labels(&[("a", "x")]);
        assert!(s.matches(&labels(&[("a", "x")])));
        assert!(!s.matches(&labels(&[("a", "x"), ("b", "y")])));
    }

    #[test]
    fn invalid_selectors_are_typed_errors() {
        assert!(matches!(
            expression("a", Operator::In, &[]).check(),
            Err(SelectorError::NoValues { .. })
        ));
        assert!(matches!(
            expression("a", Operator::NotIn, &[]).check(),
            Err(SelectorError::NoValues { .. })
        ));
        assert!(matches!(
            expression("a", Operator::Exists, &["x"]).check(),
            Err(SelectorError::UnexpectedValues { .. })
        ));
        assert!(matches!(
            expression("a", Operator::DoesNotExist, &["x"]).check(),
            Err(SelectorError::UnexpectedValues { .. })
        ));
        assert!(expression("a", Operator::In, &["x"]).check().is_ok());
    }
}
