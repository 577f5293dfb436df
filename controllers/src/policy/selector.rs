//! Label selectors over identity labels: compiled once (keys translated to identity label
//! keys, operators checked), matched by [`Selector::matches`] — the one matching function
//! every policy kind uses — and evaluated against an inverted index of the identities.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

/// One requirement of a selector, on identity label keys (`k8s:app`, …).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Requirement {
    /// `matchLabels` entry: the key is present with exactly this value.
    Equals(String, String),
    /// The key is present with one of the values.
    In(String, BTreeSet<String>),
    /// The key is absent, or present with none of the values.
    NotIn(String, BTreeSet<String>),
    Exists(String),
    DoesNotExist(String),
}

impl Requirement {
    pub fn key(&self) -> &str {
        match self {
            Requirement::Equals(k, _)
            | Requirement::In(k, _)
            | Requirement::NotIn(k, _)
            | Requirement::Exists(k)
            | Requirement::DoesNotExist(k) => k,
        }
    }
}

/// A compiled label selector: the conjunction of its requirements. No requirement selects
/// everything (`{}`).
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Selector {
    requirements: Vec<Requirement>,
}

impl Selector {
    /// Compiles `selector`, mapping every key with `key` (e.g. `app` → `k8s:app`). An
    /// unknown operator, or values that do not fit the operator, is an error message.
    pub fn compile(selector: &LabelSelector, key: impl Fn(&str) -> String) -> Result<Self, String> {
        let mut requirements = Vec::new();
        for (k, v) in selector.match_labels.iter().flatten() {
            requirements.push(Requirement::Equals(key(k), v.clone()));
        }
        for expr in selector.match_expressions.iter().flatten() {
            let k = key(&expr.key);
            let values: BTreeSet<String> = expr.values.iter().flatten().cloned().collect();
            let requirement = match expr.operator.as_str() {
                "In" | "NotIn" if values.is_empty() => {
                    return Err(format!(
                        "matchExpressions on {:?}: operator {} needs at least one value",
                        expr.key, expr.operator
                    ));
                }
                "Exists" | "DoesNotExist" if !values.is_empty() => {
                    return Err(format!(
                        "matchExpressions on {:?}: operator {} takes no values",
                        expr.key, expr.operator
                    ));
                }
                "In" => Requirement::In(k, values),
                "NotIn" => Requirement::NotIn(k, values),
                "Exists" => Requirement::Exists(k),
                "DoesNotExist" => Requirement::DoesNotExist(k),
                other => {
                    return Err(format!(
                        "matchExpressions on {:?}: unknown operator {other:?} (use In, NotIn, Exists or DoesNotExist)",
                        expr.key
                    ));
                }
            };
            requirements.push(requirement);
        }
        Ok(Self::from_requirements(requirements))
    }

    fn from_requirements(mut requirements: Vec<Requirement>) -> Self {
        requirements.sort();
        requirements.dedup();
        Self { requirements }
    }

    /// This selector further limited to identities whose `key` is `value`.
    pub fn and_equals(&self, key: &str, value: &str) -> Self {
        let mut requirements = self.requirements.clone();
        requirements.push(Requirement::Equals(key.to_string(), value.to_string()));
        Self::from_requirements(requirements)
    }

    /// The conjunction of both selectors.
    pub fn and(&self, other: &Selector) -> Self {
        let mut requirements = self.requirements.clone();
        requirements.extend(other.requirements.iter().cloned());
        Self::from_requirements(requirements)
    }

    /// Whether any requirement is about `key`.
    pub fn mentions(&self, key: &str) -> bool {
        self.requirements.iter().any(|r| r.key() == key)
    }

    /// Whether `labels` satisfy every requirement: the one label matching function.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.requirements.iter().all(|r| match r {
            Requirement::Equals(k, v) => labels.get(k) == Some(v),
            Requirement::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
            Requirement::NotIn(k, vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::DoesNotExist(k) => !labels.contains_key(k),
        })
    }
}

/// The identities selectors choose from, indexed by every `key=value` label (so a selector
/// naming a namespace or an app only looks at that namespace's or app's identities), with
/// a memo of the selectors already evaluated in this resolve.
pub struct IdentityIndex<'a> {
    labels: &'a BTreeMap<i64, BTreeMap<String, String>>,
    all: Vec<i64>,
    by_label: HashMap<(&'a str, &'a str), Vec<i64>>,
    memo: HashMap<Selector, Arc<[i64]>>,
}

impl<'a> IdentityIndex<'a> {
    /// Indexes the identities of `labels` with an id of at least `min_id`.
    pub fn new(labels: &'a BTreeMap<i64, BTreeMap<String, String>>, min_id: i64) -> Self {
        let mut all = Vec::new();
        let mut by_label: HashMap<(&str, &str), Vec<i64>> = HashMap::new();
        for (&id, l) in labels.range(min_id..) {
            all.push(id);
            for (k, v) in l {
                by_label.entry((k, v)).or_default().push(id);
            }
        }
        Self {
            labels,
            all,
            by_label,
            memo: HashMap::new(),
        }
    }

    /// Every indexed identity, ascending.
    pub fn all(&self) -> &[i64] {
        &self.all
    }

    /// The indexed identities `selector` matches, ascending.
    pub fn select(&mut self, selector: &Selector) -> Arc<[i64]> {
        if let Some(hit) = self.memo.get(selector) {
            return hit.clone();
        }
        // Candidates: the smallest posting list of an exact requirement, else everyone.
        let candidates = selector
            .requirements
            .iter()
            .filter_map(|r| match r {
                Requirement::Equals(k, v) => Some(
                    self.by_label
                        .get(&(k.as_str(), v.as_str()))
                        .map_or(&[][..], Vec::as_slice),
                ),
                _ => None,
            })
            .min_by_key(|ids| ids.len())
            .unwrap_or(&self.all);
        let selected: Arc<[i64]> = candidates
            .iter()
            .copied()
            .filter(|id| selector.matches(&self.labels[id]))
            .collect();
        self.memo.insert(selector.clone(), selected.clone());
        selected
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn expr(key: &str, op: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: (!values.is_empty()).then(|| values.iter().map(|v| v.to_string()).collect()),
        }
    }

    fn compile(sel: LabelSelector) -> Result<Selector, String> {
        Selector::compile(&sel, |k| format!("k8s:{k}"))
    }

    #[test]
    fn every_operator_matches_like_kubernetes() {
        let pod = labels(&[("k8s:app", "web"), ("k8s:tier", "front")]);
        let cases = [
            (expr("app", "In", &["web", "db"]), true),
            (expr("app", "In", &["db"]), false),
            (expr("app", "NotIn", &["db"]), true),
            (expr("app", "NotIn", &["web"]), false),
            (expr("missing", "NotIn", &["x"]), true),
            (expr("missing", "In", &["x"]), false),
            (expr("tier", "Exists", &[]), true),
            (expr("missing", "Exists", &[]), false),
            (expr("missing", "DoesNotExist", &[]), true),
            (expr("tier", "DoesNotExist", &[]), false),
        ];
        for (e, want) in cases {
            let sel = compile(LabelSelector {
                match_expressions: Some(vec![e.clone()]),
                ..Default::default()
            })
            .unwrap();
            assert_eq!(sel.matches(&pod), want, "{e:?}");
        }
    }

    #[test]
    fn match_labels_and_expressions_are_anded() {
        let sel = compile(LabelSelector {
            match_labels: Some([("app".to_string(), "web".to_string())].into()),
            match_expressions: Some(vec![expr("tier", "In", &["back"])]),
        })
        .unwrap();
        assert!(!sel.matches(&labels(&[("k8s:app", "web"), ("k8s:tier", "front")])));
        assert!(sel.matches(&labels(&[("k8s:app", "web"), ("k8s:tier", "back")])));
    }

    #[test]
    fn empty_selector_matches_everything() {
        let sel = compile(LabelSelector::default()).unwrap();
        assert!(sel.matches(&labels(&[])));
        assert!(sel.matches(&labels(&[("k8s:a", "b")])));
    }

    #[test]
    fn bad_operators_and_values_are_errors() {
        for e in [
            expr("app", "Equals", &["web"]),
            expr("app", "in", &["web"]),
            expr("app", "In", &[]),
            expr("app", "NotIn", &[]),
            expr("app", "Exists", &["web"]),
        ] {
            let err = compile(LabelSelector {
                match_expressions: Some(vec![e.clone()]),
                ..Default::default()
            })
            .unwrap_err();
            assert!(err.contains("app"), "{err}");
        }
    }

    #[test]
    fn index_selects_through_postings_and_memo() {
        let ids: BTreeMap<i64, BTreeMap<String, String>> = [
            (2, labels(&[("reserved:world", "")])),
            (256, labels(&[("k8s:app", "a"), ("k8s:ns", "x")])),
            (257, labels(&[("k8s:app", "b"), ("k8s:ns", "x")])),
            (258, labels(&[("k8s:app", "a"), ("k8s:ns", "y")])),
        ]
        .into();
        let mut index = IdentityIndex::new(&ids, 256);
        assert_eq!(index.all(), &[256, 257, 258]);
        let everyone = Selector::default();
        assert_eq!(&*index.select(&everyone), &[256, 257, 258]);
        let a = everyone.and_equals("k8s:app", "a");
        assert_eq!(&*index.select(&a), &[256, 258]);
        assert_eq!(&*index.select(&a.and_equals("k8s:ns", "y")), &[258]);
        assert_eq!(&*index.select(&a.and_equals("k8s:ns", "z")), &[] as &[i64]);
        assert!(a.mentions("k8s:app") && !a.mentions("k8s:ns"));
    }
}
