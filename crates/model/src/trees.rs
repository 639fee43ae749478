//! Tree ensembles, flattened: every tree's nodes in one array, children by index, so a
//! prediction is a few dependent loads per tree and no pointer chasing or allocation.
//!
//! Semantics follow each library exactly (outputs match the reference within 1e-5 on
//! committed data, `tests/conformance.rs`):
//! - **XGBoost** compares in `f32`: left iff `(x as f32) < threshold`; a NaN input goes the
//!   node's `default_left` way. Margin = Σ leaf weights + base margin (`logit(base_score)` for
//!   logistic objectives).
//! - **LightGBM** compares in `f64`: left iff `x <= threshold`. By the node's missing type: `NaN`
//!   sends NaN the default way; `Zero` sends zero (|x| ≤ 1e-35) and NaN the default way; `None`
//!   treats NaN as 0. Output = Σ leaf values, then `sigmoid(k · raw)` for binary objectives.

use serde::Deserialize;

use crate::{Model, ModelError, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rule {
    /// XGBoost: `x < t` in f32, NaN → default.
    XgbLess,
    /// LightGBM: `x <= t` in f64, with a missing-value type.
    LgbLessEq(Missing),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Missing {
    None,
    Zero,
    NaN,
}

#[derive(Debug, Clone, Copy)]
struct Node {
    /// `u32::MAX` for a leaf.
    feature: u32,
    /// Threshold, or the leaf's value.
    value: f64,
    left: u32,
    right: u32,
    default_left: bool,
    rule: Rule,
}

const LEAF: u32 = u32::MAX;

impl Node {
    fn leaf(value: f64) -> Node {
        // `rule` and `default_left` are never read on a leaf.
        Node {
            feature: LEAF,
            value,
            left: 0,
            right: 0,
            default_left: false,
            rule: Rule::XgbLess,
        }
    }
}
/// LightGBM's `kZeroThreshold`.
const ZERO_THRESHOLD: f64 = 1e-35;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Transform {
    Identity,
    /// `1 / (1 + exp(-k · margin))`
    Sigmoid(f64),
}

#[derive(Debug, Clone)]
pub struct Forest {
    nodes: Vec<Node>,
    roots: Vec<u32>,
    base_margin: f64,
    transform: Transform,
    inputs: usize,
}

impl Forest {
    pub fn trees(&self) -> usize {
        self.roots.len()
    }

    /// The raw margin of one row (before the output transform).
    pub fn margin(&self, row: &[f64]) -> f64 {
        debug_assert_eq!(row.len(), self.inputs);
        let mut sum = self.base_margin;
        for &root in &self.roots {
            let mut i = root as usize;
            loop {
                let n = &self.nodes[i];
                if n.feature == LEAF {
                    sum += n.value;
                    break;
                }
                let x = row[n.feature as usize];
                let left = match n.rule {
                    Rule::XgbLess => {
                        if x.is_nan() {
                            n.default_left
                        } else {
                            (x as f32) < (n.value as f32)
                        }
                    }
                    Rule::LgbLessEq(missing) => {
                        let x = if x.is_nan() && missing != Missing::NaN {
                            0.0
                        } else {
                            x
                        };
                        let is_missing = match missing {
                            Missing::NaN => x.is_nan(),
                            Missing::Zero => x > -ZERO_THRESHOLD && x <= ZERO_THRESHOLD,
                            Missing::None => false,
                        };
                        if is_missing {
                            n.default_left
                        } else {
                            x <= n.value
                        }
                    }
                };
                i = if left { n.left } else { n.right } as usize;
            }
        }
        sum
    }

    pub fn predict_row(&self, row: &[f64]) -> f64 {
        let m = self.margin(row);
        match self.transform {
            Transform::Identity => m,
            Transform::Sigmoid(k) => 1.0 / (1.0 + (-k * m).exp()),
        }
    }

    /// Loads an XGBoost model saved as JSON (`save_model("m.json")`), gbtree booster,
    /// single output.
    pub fn from_xgboost_json(text: &str) -> Result<Forest> {
        #[derive(Deserialize)]
        struct File {
            learner: Learner,
        }
        #[derive(Deserialize)]
        struct Learner {
            gradient_booster: Booster,
            learner_model_param: Params,
            objective: Objective,
        }
        #[derive(Deserialize)]
        struct Booster {
            name: String,
            model: Option<GbModel>,
        }
        #[derive(Deserialize)]
        struct GbModel {
            trees: Vec<Tree>,
        }
        #[derive(Deserialize)]
        struct Params {
            base_score: String,
            num_feature: String,
            #[serde(default)]
            num_class: Option<String>,
        }
        #[derive(Deserialize)]
        struct Objective {
            name: String,
        }
        #[derive(Deserialize)]
        struct Tree {
            left_children: Vec<i64>,
            right_children: Vec<i64>,
            split_indices: Vec<i64>,
            split_conditions: Vec<f64>,
            default_left: Vec<serde_json::Value>,
            #[serde(default)]
            split_type: Vec<i64>,
        }
        let parse = |e: serde_json::Error| ModelError::Parse(format!("XGBoost JSON: {e}"));
        let file: File = serde_json::from_str(text).map_err(parse)?;
        let l = file.learner;
        if l.gradient_booster.name != "gbtree" {
            return Err(ModelError::Unsupported(format!(
                "booster {:?} (only gbtree)",
                l.gradient_booster.name
            )));
        }
        if l.learner_model_param
            .num_class
            .as_deref()
            .is_some_and(|c| c != "0" && c != "1")
        {
            return Err(ModelError::Unsupported("multi-class models".into()));
        }
        let number = |s: &str| -> Result<f64> {
            s.trim_matches(|c| c == '[' || c == ']')
                .split(',')
                .next()
                .and_then(|v| v.trim().parse::<f64>().ok())
                .ok_or_else(|| ModelError::Parse(format!("number {s:?}")))
        };
        let base_score = number(&l.learner_model_param.base_score)?;
        let inputs = number(&l.learner_model_param.num_feature)? as usize;
        let (transform, base_margin) = match l.objective.name.as_str() {
            "binary:logistic" | "reg:logistic" => {
                if !(0.0..1.0).contains(&base_score) || base_score == 0.0 {
                    return Err(ModelError::Parse(format!(
                        "base_score {base_score} outside (0, 1)"
                    )));
                }
                (
                    Transform::Sigmoid(1.0),
                    (base_score / (1.0 - base_score)).ln(),
                )
            }
            "binary:logitraw" => (Transform::Identity, (base_score / (1.0 - base_score)).ln()),
            "reg:squarederror" | "reg:absoluteerror" | "reg:pseudohubererror" => {
                (Transform::Identity, base_score)
            }
            other => return Err(ModelError::Unsupported(format!("objective {other:?}"))),
        };
        let trees = l
            .gradient_booster
            .model
            .ok_or_else(|| ModelError::Parse("no trees".into()))?
            .trees;
        let mut forest = Forest {
            nodes: Vec::new(),
            roots: Vec::new(),
            base_margin,
            transform,
            inputs,
        };
        for (ti, t) in trees.iter().enumerate() {
            let n = t.left_children.len();
            let ok = t.right_children.len() == n
                && t.split_indices.len() == n
                && t.split_conditions.len() == n
                && t.default_left.len() == n;
            if !ok || n == 0 {
                return Err(ModelError::Parse(format!(
                    "tree {ti}: arrays of different lengths"
                )));
            }
            if t.split_type.iter().any(|&s| s != 0) {
                return Err(ModelError::Unsupported(format!(
                    "tree {ti}: categorical splits"
                )));
            }
            let base = forest.nodes.len() as u32;
            forest.roots.push(base);
            for i in 0..n {
                let leaf = t.left_children[i] < 0;
                let child = |c: i64| -> Result<u32> {
                    usize::try_from(c)
                        .ok()
                        .filter(|&c| c < n)
                        .map(|c| base + c as u32)
                        .ok_or_else(|| ModelError::Parse(format!("tree {ti}: child {c}")))
                };
                let feature = t.split_indices[i];
                if !leaf && !(0..inputs as i64).contains(&feature) {
                    return Err(ModelError::Parse(format!(
                        "tree {ti}: feature {feature} of {inputs}"
                    )));
                }
                let default_left = match &t.default_left[i] {
                    serde_json::Value::Bool(b) => *b,
                    v => v.as_i64().unwrap_or(0) != 0,
                };
                forest.nodes.push(Node {
                    feature: if leaf { LEAF } else { feature as u32 },
                    value: t.split_conditions[i],
                    left: if leaf { 0 } else { child(t.left_children[i])? },
                    right: if leaf { 0 } else { child(t.right_children[i])? },
                    default_left,
                    rule: Rule::XgbLess,
                });
            }
        }
        forest.check()?;
        Ok(forest)
    }

    /// Loads a LightGBM text model (`booster.save_model("m.txt")`), numerical splits, one
    /// output per row.
    pub fn from_lightgbm_text(text: &str) -> Result<Forest> {
        let mut header = std::collections::HashMap::new();
        let mut sections: Vec<std::collections::HashMap<&str, &str>> = Vec::new();
        for line in text.lines() {
            let line = line.trim();
            if line.starts_with("Tree=") {
                sections.push(Default::default());
                continue;
            }
            if line == "end of trees" {
                break;
            }
            if let Some((k, v)) = line.split_once('=') {
                match sections.last_mut() {
                    Some(s) => {
                        s.insert(k, v);
                    }
                    None => {
                        header.insert(k, v);
                    }
                }
            }
        }
        let get = |m: &std::collections::HashMap<&str, &str>, k: &str| -> Result<String> {
            m.get(k)
                .map(|v| v.to_string())
                .ok_or_else(|| ModelError::Parse(format!("LightGBM: missing {k}")))
        };
        if get(&header, "num_class")? != "1"
            || header
                .get("num_tree_per_iteration")
                .is_some_and(|v| *v != "1")
        {
            return Err(ModelError::Unsupported("multi-class models".into()));
        }
        let inputs = get(&header, "max_feature_idx")?
            .parse::<usize>()
            .map_err(|e| ModelError::Parse(e.to_string()))?
            + 1;
        let objective = get(&header, "objective")?;
        let transform = match objective.split_whitespace().next() {
            Some("binary") => {
                let k = objective
                    .split_whitespace()
                    .find_map(|p| p.strip_prefix("sigmoid:"))
                    .map(|k| {
                        k.parse::<f64>()
                            .map_err(|e| ModelError::Parse(e.to_string()))
                    })
                    .transpose()?
                    .unwrap_or(1.0);
                Transform::Sigmoid(k)
            }
            Some(
                "regression" | "regression_l2" | "regression_l1" | "huber" | "fair" | "quantile",
            ) => Transform::Identity,
            other => return Err(ModelError::Unsupported(format!("objective {other:?}"))),
        };
        if header.contains_key("average_output") {
            return Err(ModelError::Unsupported(
                "random forest mode (average_output)".into(),
            ));
        }
        let mut forest = Forest {
            nodes: Vec::new(),
            roots: Vec::new(),
            base_margin: 0.0,
            transform,
            inputs,
        };
        for (ti, s) in sections.iter().enumerate() {
            let floats = |k: &str| list::<f64>(&get(s, k)?, ti, k);
            let ints = |k: &str| list::<i64>(&get(s, k)?, ti, k);
            let leaves = floats("leaf_value")?;
            let base = forest.nodes.len() as u32;
            forest.roots.push(base);
            let num_leaves = get(s, "num_leaves")?
                .parse::<usize>()
                .map_err(|e| ModelError::Parse(e.to_string()))?;
            if num_leaves <= 1 {
                let value = *leaves
                    .first()
                    .ok_or_else(|| ModelError::Parse(format!("tree {ti}: no leaf")))?;
                forest.nodes.push(Node::leaf(value));
                continue;
            }
            let (feat, thr, dec, lc, rc) = (
                ints("split_feature")?,
                floats("threshold")?,
                ints("decision_type")?,
                ints("left_child")?,
                ints("right_child")?,
            );
            let internal = num_leaves - 1;
            if [feat.len(), thr.len(), dec.len(), lc.len(), rc.len()]
                .iter()
                .any(|&l| l != internal)
                || leaves.len() != num_leaves
            {
                return Err(ModelError::Parse(format!(
                    "tree {ti}: arrays of unexpected lengths"
                )));
            }
            // Internal nodes first, then leaves: child c >= 0 is internal node c, c < 0 is leaf !c.
            let index = |c: i64| -> Result<u32> {
                let i = if c >= 0 {
                    c as usize
                } else {
                    internal + (!c) as usize
                };
                (i < internal + num_leaves)
                    .then_some(base + i as u32)
                    .ok_or_else(|| ModelError::Parse(format!("tree {ti}: child {c}")))
            };
            for i in 0..internal {
                let d = dec[i];
                if d & 1 != 0 {
                    return Err(ModelError::Unsupported(format!(
                        "tree {ti}: categorical splits"
                    )));
                }
                let missing = match (d >> 2) & 3 {
                    0 => Missing::None,
                    1 => Missing::Zero,
                    2 => Missing::NaN,
                    m => return Err(ModelError::Parse(format!("tree {ti}: missing type {m}"))),
                };
                if !(0..inputs as i64).contains(&feat[i]) {
                    return Err(ModelError::Parse(format!(
                        "tree {ti}: feature {} of {inputs}",
                        feat[i]
                    )));
                }
                forest.nodes.push(Node {
                    feature: feat[i] as u32,
                    value: thr[i],
                    left: index(lc[i])?,
                    right: index(rc[i])?,
                    default_left: d & 2 != 0,
                    rule: Rule::LgbLessEq(missing),
                });
            }
            for &value in &leaves {
                forest.nodes.push(Node::leaf(value));
            }
        }
        forest.check()?;
        Ok(forest)
    }

    /// Every walk ends at a leaf: children point forward within their tree, so no cycle can
    /// make a prediction loop forever, whatever the file said.
    fn check(&self) -> Result<()> {
        if self.roots.is_empty() {
            return Err(ModelError::Parse("no trees".into()));
        }
        for (t, &root) in self.roots.iter().enumerate() {
            let end = self
                .roots
                .get(t + 1)
                .copied()
                .unwrap_or(self.nodes.len() as u32);
            for i in root..end {
                let n = &self.nodes[i as usize];
                if n.feature != LEAF
                    && !(n.left > i && n.left < end && n.right > i && n.right < end)
                {
                    return Err(ModelError::Parse(format!(
                        "tree {t}: node {} has a child outside its subtree order",
                        i - root
                    )));
                }
            }
        }
        Ok(())
    }
}

/// A LightGBM list field (`1 2 3`), each element parsed as `T`.
fn list<T: std::str::FromStr>(text: &str, tree: usize, key: &str) -> Result<Vec<T>>
where
    T::Err: std::fmt::Display,
{
    text.split_whitespace()
        .map(|v| {
            v.parse::<T>()
                .map_err(|e| ModelError::Parse(format!("tree {tree} {key}: {e}")))
        })
        .collect()
}

impl Model for Forest {
    fn inputs(&self) -> usize {
        self.inputs
    }

    fn predict(&self, rows: &[f64], out: &mut [f64]) -> Result<()> {
        if rows.len() != out.len() * self.inputs {
            return Err(ModelError::Shape {
                expected: self.inputs,
                got: rows.len() / out.len().max(1),
            });
        }
        for (row, o) in rows.chunks_exact(self.inputs).zip(out.iter_mut()) {
            *o = self.predict_row(row);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Garbage never panics and never loads a forest that could loop.
        #[test]
        fn arbitrary_text_is_an_error_or_a_sound_forest(text in ".{0,400}") {
            let _ = Forest::from_lightgbm_text(&text);
            let _ = Forest::from_xgboost_json(&text);
        }
    }

    #[test]
    fn a_cycle_is_refused() {
        let text = "tree\nnum_class=1\nmax_feature_idx=0\nobjective=regression\nTree=0\nnum_leaves=3\nsplit_feature=0 0\nthreshold=1 2\ndecision_type=0 0\nleft_child=1 0\nright_child=-1 -2\nleaf_value=1 2 3\nend of trees\n";
        assert!(Forest::from_lightgbm_text(text).is_err());
    }
}
