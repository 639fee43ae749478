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

mod lanes;

use serde::Deserialize;

use crate::{Model, ModelError, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rule {
    /// XGBoost: `x < t` in f32, NaN → default.
    XgbLess,
    /// LightGBM: `x <= t` in f64. LightGBM's missing types are resolved at load into where
    /// NaN goes (`default_left`; for type `None`, where 0.0 goes, as NaN reads as zero) and
    /// whether |x| ≤ 1e-35 is missing too (type `Zero`), so a walk tests no type.
    LgbLessEq { zero_missing: bool },
    /// ONNX-ML `TreeEnsemble*`: compares in `f32` by the node's mode; NaN goes the
    /// `nodes_missing_value_tracks_true` way (`default_left` = the true branch).
    Onnx(Mode),
}

/// The branch modes of ONNX-ML tree ensembles; `true` is the left child.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Leq,
    Lt,
    Gte,
    Gt,
    Eq,
    Neq,
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
/// The split rule of each library (see the module docs). Within one forest every node has
/// the same kind of rule, so the branch on it is perfectly predicted (and `lanes` compiles a
/// loop per rule, without it); the tests on the row's value are combined with
/// non-short-circuit `&`/`|` into selects, because branches on data mispredict (this took the
/// benchmark GBDT from ~7.2 to ~4 µs/row at batch 256).
#[inline(always)]
fn goes_left(n: &Node, x: f64) -> bool {
    match n.rule {
        Rule::XgbLess => xgb_left(n, x),
        Rule::Onnx(mode) => onnx_left(mode, n, x),
        Rule::LgbLessEq { .. } => lgb_left(n, x),
    }
}

#[inline(always)]
fn xgb_left(n: &Node, x: f64) -> bool {
    let nan = x.is_nan();
    (nan & n.default_left) | (!nan & ((x as f32) < (n.value as f32)))
}

#[inline(always)]
fn onnx_left(mode: Mode, n: &Node, x: f64) -> bool {
    let nan = x.is_nan();
    let (x, t) = (x as f32, n.value as f32);
    let cmp = match mode {
        Mode::Leq => x <= t,
        Mode::Lt => x < t,
        Mode::Gte => x >= t,
        Mode::Gt => x > t,
        Mode::Eq => x == t,
        Mode::Neq => x != t,
    };
    (nan & n.default_left) | (!nan & cmp)
}

#[inline(always)]
fn lgb_left(n: &Node, x: f64) -> bool {
    let zero_missing = matches!(n.rule, Rule::LgbLessEq { zero_missing: true });
    let missing = x.is_nan() | (zero_missing & (x > -ZERO_THRESHOLD) & (x <= ZERO_THRESHOLD));
    (missing & n.default_left) | (!missing & (x <= n.value))
}

/// LightGBM's `kZeroThreshold`.
const ZERO_THRESHOLD: f64 = 1e-35;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Transform {
    Identity,
    /// `1 / (1 + exp(-k · margin))`
    Sigmoid(f64),
}

/// What a row's output looks like.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Outputs {
    /// One value: the transformed margin.
    Single,
    /// An ONNX binary classifier's probabilities tensor, `[P(class 0), P(class 1)]`, scaled
    /// (skl2onnx/onnxmltools may multiply the tensor by a constant after the ensemble).
    /// `all_positive` is onnxruntime's rule for untransformed scores: `[1 - s, s]` when every
    /// leaf weight is positive, else `[-s, s]`.
    BinaryPair { scale: f64, all_positive: bool },
}

#[derive(Debug, Clone)]
pub struct Forest {
    nodes: Vec<Node>,
    roots: Vec<u32>,
    base_margin: f64,
    /// Multiplies the sum of leaves before the base margin is added (`1 / trees` for an
    /// ONNX `AVERAGE` ensemble).
    leaf_scale: f64,
    transform: Transform,
    outputs: Outputs,
    inputs: usize,
    /// The nodes compiled for walking side by side: what predictions run on.
    lanes: lanes::Lanes,
}

impl Forest {
    pub fn trees(&self) -> usize {
        self.roots.len()
    }

    /// The raw margin of one row (before the output transform).
    pub fn margin(&self, row: &[f64]) -> f64 {
        debug_assert_eq!(row.len(), self.inputs);
        self.lanes.sum_row(row) * self.leaf_scale + self.base_margin
    }

    /// The margins of many rows, tree by tree: each tree's nodes stay in cache while every
    /// row walks it, which is what makes large batches cheaper per row than single rows.
    fn margins(&self, rows: &[f64], out: &mut [f64]) {
        out.fill(0.0);
        self.lanes.add_rows(rows, self.inputs, out);
        for o in out.iter_mut() {
            *o = *o * self.leaf_scale + self.base_margin;
        }
    }

    /// The first (for a binary classifier, the positive-class) output of one row.
    pub fn predict_row(&self, row: &[f64]) -> f64 {
        self.finish(self.margin(row))
    }

    fn finish(&self, m: f64) -> f64 {
        match self.transform {
            Transform::Identity => m,
            Transform::Sigmoid(k) => 1.0 / (1.0 + (-k * m).exp()),
        }
    }

    /// Writes one row's outputs from its margin.
    fn write(&self, m: f64, out: &mut [f64]) {
        match self.outputs {
            Outputs::Single => out[0] = self.finish(m),
            Outputs::BinaryPair {
                scale,
                all_positive,
            } => {
                let (p0, p1) = match self.transform {
                    Transform::Sigmoid(_) => (self.finish(-m), self.finish(m)),
                    Transform::Identity if all_positive => (1.0 - m, m),
                    Transform::Identity => (-m, m),
                };
                out[0] = p0 * scale;
                out[1] = p1 * scale;
            }
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
            leaf_scale: 1.0,
            transform,
            outputs: Outputs::Single,
            inputs,
            lanes: lanes::Lanes::default(),
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
        forest.preorder();
        forest.sealed()
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
            leaf_scale: 1.0,
            transform,
            outputs: Outputs::Single,
            inputs,
            lanes: lanes::Lanes::default(),
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
                let default_left = d & 2 != 0;
                // Where NaN goes, and whether near-zero is missing, by LightGBM's missing type.
                let (nan_left, zero_missing) = match (d >> 2) & 3 {
                    0 => (0.0 <= thr[i], false), // None: NaN reads as 0.0
                    1 => (default_left, true),   // Zero: NaN and |x| ≤ 1e-35 go the default way
                    2 => (default_left, false),  // NaN
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
                    default_left: nan_left,
                    rule: Rule::LgbLessEq { zero_missing },
                });
            }
            for &value in &leaves {
                forest.nodes.push(Node::leaf(value));
            }
        }
        forest.preorder();
        forest.sealed()
    }

    /// Builds the forest of an ONNX-ML `TreeEnsembleRegressor` or `TreeEnsembleClassifier`
    /// node from its attributes (tract's own operator is ~2000× slower on these, and refuses
    /// skl2onnx's binary classifiers). Supported: one regression target, or a binary
    /// classifier whose leaves vote for one class (what skl2onnx and onnxmltools write for
    /// gradient boosting); `SUM`/`AVERAGE`; `NONE`/`LOGISTIC` post-transforms.
    pub fn from_onnx(e: &OnnxEnsemble) -> Result<Forest> {
        let n = e.nodes_treeids.len();
        let same = [
            e.nodes_nodeids.len(),
            e.nodes_featureids.len(),
            e.nodes_values.len(),
            e.nodes_modes.len(),
            e.nodes_truenodeids.len(),
            e.nodes_falsenodeids.len(),
        ]
        .iter()
        .all(|&l| l == n);
        let tracks = |i: usize| {
            e.nodes_missing_value_tracks_true
                .get(i)
                .copied()
                .unwrap_or(0)
                != 0
        };
        if !same
            || n == 0
            || (!e.nodes_missing_value_tracks_true.is_empty()
                && e.nodes_missing_value_tracks_true.len() != n)
        {
            return Err(ModelError::Parse(
                "tree ensemble: node arrays of different lengths".into(),
            ));
        }
        if e.target_treeids.len() != e.target_nodeids.len()
            || e.target_treeids.len() != e.target_weights.len()
            || e.target_treeids.len() != e.target_ids.len()
        {
            return Err(ModelError::Parse(
                "tree ensemble: leaf arrays of different lengths".into(),
            ));
        }
        let outputs = if e.classifier {
            if e.classes != 2 {
                return Err(ModelError::Unsupported(format!(
                    "tree ensemble classifier with {} classes (binary only)",
                    e.classes
                )));
            }
            if e.target_ids.iter().any(|&c| c != e.target_ids[0]) {
                return Err(ModelError::Unsupported(
                    "tree ensemble classifier with votes for both classes".into(),
                ));
            }
            Outputs::BinaryPair {
                scale: e.output_scale,
                all_positive: e.target_weights.iter().all(|&w| w >= 0.0),
            }
        } else {
            if e.target_ids.iter().any(|&t| t != 0) {
                return Err(ModelError::Unsupported(
                    "tree ensemble with several targets".into(),
                ));
            }
            if e.output_scale != 1.0 {
                return Err(ModelError::Unsupported("a scaled regressor output".into()));
            }
            Outputs::Single
        };
        let transform = match e.post_transform.as_str() {
            "" | "NONE" => Transform::Identity,
            "LOGISTIC" if e.classifier => Transform::Sigmoid(1.0),
            other => return Err(ModelError::Unsupported(format!("post_transform {other}"))),
        };
        // Trees in id order; within a tree, node ids index its nodes.
        let mut trees: std::collections::BTreeMap<i64, Vec<usize>> = Default::default();
        for i in 0..n {
            trees.entry(e.nodes_treeids[i]).or_default().push(i);
        }
        let mut leaf_value: std::collections::HashMap<(i64, i64), f64> = Default::default();
        for j in 0..e.target_treeids.len() {
            *leaf_value
                .entry((e.target_treeids[j], e.target_nodeids[j]))
                .or_default() += e.target_weights[j];
        }
        let leaf_scale = match e.aggregate_function.as_str() {
            "" | "SUM" => 1.0,
            "AVERAGE" => 1.0 / trees.len() as f64,
            other => {
                return Err(ModelError::Unsupported(format!(
                    "aggregate_function {other}"
                )))
            }
        };
        let base_margin = match e.base_values.as_slice() {
            [] => 0.0,
            [b] => *b,
            _ => return Err(ModelError::Unsupported("several base_values".into())),
        };
        let inputs = e.inputs;
        let mut forest = Forest {
            nodes: Vec::with_capacity(n),
            roots: Vec::with_capacity(trees.len()),
            base_margin,
            leaf_scale,
            transform,
            outputs,
            inputs,
            lanes: lanes::Lanes::default(),
        };
        for (tree, members) in &trees {
            // Lay the tree out in preorder so children always follow their parent (`check`).
            let by_id: std::collections::HashMap<i64, usize> =
                members.iter().map(|&i| (e.nodes_nodeids[i], i)).collect();
            if by_id.len() != members.len() {
                return Err(ModelError::Parse(format!(
                    "tree {tree}: duplicate node ids"
                )));
            }
            let base = forest.nodes.len() as u32;
            forest.roots.push(base);
            let root = *by_id
                .get(&0)
                .ok_or_else(|| ModelError::Parse(format!("tree {tree}: no node 0")))?;
            // (attribute index, slot in `forest.nodes` whose child pointer to patch)
            let mut stack: Vec<(usize, Option<(usize, bool)>)> = vec![(root, None)];
            while let Some((i, parent)) = stack.pop() {
                if forest.nodes.len() - base as usize >= members.len() {
                    return Err(ModelError::Parse(format!("tree {tree}: not a tree")));
                }
                let at = forest.nodes.len();
                if let Some((p, left)) = parent {
                    if left {
                        forest.nodes[p].left = at as u32;
                    } else {
                        forest.nodes[p].right = at as u32;
                    }
                }
                let mode = match e.nodes_modes[i].as_str() {
                    "LEAF" => None,
                    "BRANCH_LEQ" => Some(Mode::Leq),
                    "BRANCH_LT" => Some(Mode::Lt),
                    "BRANCH_GTE" => Some(Mode::Gte),
                    "BRANCH_GT" => Some(Mode::Gt),
                    "BRANCH_EQ" => Some(Mode::Eq),
                    "BRANCH_NEQ" => Some(Mode::Neq),
                    other => return Err(ModelError::Parse(format!("node mode {other:?}"))),
                };
                let Some(mode) = mode else {
                    let value = leaf_value
                        .get(&(*tree, e.nodes_nodeids[i]))
                        .copied()
                        .unwrap_or(0.0);
                    forest.nodes.push(Node::leaf(value));
                    continue;
                };
                let feature = e.nodes_featureids[i];
                if !(0..inputs as i64).contains(&feature) {
                    return Err(ModelError::Parse(format!(
                        "tree {tree}: feature {feature} of {inputs}"
                    )));
                }
                forest.nodes.push(Node {
                    feature: feature as u32,
                    value: e.nodes_values[i],
                    left: 0,
                    right: 0,
                    default_left: tracks(i),
                    rule: Rule::Onnx(mode),
                });
                let child = |id: i64| {
                    by_id
                        .get(&id)
                        .copied()
                        .ok_or_else(|| ModelError::Parse(format!("tree {tree}: no node {id}")))
                };
                // Right pushed first so the left subtree is laid out first.
                stack.push((child(e.nodes_falsenodeids[i])?, Some((at, false))));
                stack.push((child(e.nodes_truenodeids[i])?, Some((at, true))));
            }
        }
        forest.sealed()
    }

    /// Lays every tree out in preorder, left child first: the left child is the next node and
    /// a walk moves forward through memory, as in the ONNX loader. XGBoost stores nodes by
    /// level and LightGBM internal nodes before leaves, which scatters a walk; on the
    /// benchmark GBDT this layout alone cut the per-row time by about a third. Runs before
    /// [`Forest::check`]; a cycle or an out-of-tree child is left for `check` to refuse.
    fn preorder(&mut self) {
        let mut nodes = Vec::with_capacity(self.nodes.len());
        let mut roots = Vec::with_capacity(self.roots.len());
        for (t, &root) in self.roots.iter().enumerate() {
            let end = self
                .roots
                .get(t + 1)
                .copied()
                .unwrap_or(self.nodes.len() as u32);
            let size = (end - root) as usize;
            let base = nodes.len();
            roots.push(base as u32);
            // (old index, parent slot to patch, is left child)
            let mut stack = vec![(root, None::<(usize, bool)>)];
            while let Some((old, parent)) = stack.pop() {
                let in_tree = old >= root && old < end;
                if !in_tree || nodes.len() - base >= size {
                    return; // not a tree: `check` refuses the original
                }
                let at = nodes.len();
                if let Some((p, left)) = parent {
                    let p: &mut Node = &mut nodes[p];
                    if left {
                        p.left = at as u32;
                    } else {
                        p.right = at as u32;
                    }
                }
                let n = self.nodes[old as usize];
                nodes.push(n);
                if n.feature != LEAF {
                    stack.push((n.right, Some((at, false))));
                    stack.push((n.left, Some((at, true))));
                }
            }
        }
        self.nodes = nodes;
        self.roots = roots;
    }

    /// The loaded forest, checked, compiled for evaluation.
    fn sealed(mut self) -> Result<Forest> {
        self.check()?;
        self.lanes = lanes::Lanes::compile(&self.nodes, &self.roots);
        Ok(self)
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

/// The attributes of an ONNX-ML tree-ensemble node, as [`Forest::from_onnx`] reads them.
/// For a classifier, `target_*` holds the `class_*` attributes.
#[derive(Debug, Clone, Default)]
pub struct OnnxEnsemble {
    pub classifier: bool,
    /// Number of class labels (classifiers).
    pub classes: usize,
    pub inputs: usize,
    pub nodes_treeids: Vec<i64>,
    pub nodes_nodeids: Vec<i64>,
    pub nodes_featureids: Vec<i64>,
    pub nodes_values: Vec<f64>,
    pub nodes_modes: Vec<String>,
    pub nodes_truenodeids: Vec<i64>,
    pub nodes_falsenodeids: Vec<i64>,
    pub nodes_missing_value_tracks_true: Vec<i64>,
    pub target_treeids: Vec<i64>,
    pub target_nodeids: Vec<i64>,
    pub target_ids: Vec<i64>,
    pub target_weights: Vec<f64>,
    pub base_values: Vec<f64>,
    pub aggregate_function: String,
    pub post_transform: String,
    /// A constant the graph multiplies the probabilities by after the node (1 if none).
    pub output_scale: f64,
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

/// From this many rows a batch is evaluated tree by tree rather than row by row.
const BATCH_MAJOR_ROWS_MIN: usize = 8;

impl Model for Forest {
    fn inputs(&self) -> usize {
        self.inputs
    }

    fn engine(&self) -> &'static str {
        "native-trees"
    }

    fn outputs(&self) -> usize {
        match self.outputs {
            Outputs::Single => 1,
            Outputs::BinaryPair { .. } => 2,
        }
    }

    fn predict(&self, rows: &[f64], out: &mut [f64]) -> Result<()> {
        let k = self.outputs();
        crate::check_shape(self.inputs, k, rows, out)?;
        let n = out.len() / k;
        if n < BATCH_MAJOR_ROWS_MIN {
            for (row, o) in rows.chunks_exact(self.inputs).zip(out.chunks_exact_mut(k)) {
                self.write(self.margin(row), o);
            }
            return Ok(());
        }
        // Margins first (in place: out has at least n slots), then outputs, back to front
        // so a two-value row never overwrites a margin not yet read.
        self.margins(rows, &mut out[..n]);
        for i in (0..n).rev() {
            let m = out[i];
            self.write(m, &mut out[i * k..(i + 1) * k]);
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
