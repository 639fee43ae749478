//! The forest compiled for walking several trees (one row) or several rows (one tree) side by
//! side.
//!
//! A node walk is one chain of dependent loads — node, then the row's value, then the compare
//! that picks the next node — about 17 cycles a level, one tree after the other, and it ends
//! on a data-dependent "is this a leaf" branch. Here every leaf points to itself, so a walk of
//! a tree takes a fixed number of steps (its depth) with no exit test, and [`LANES`] walks
//! advance together: their chains are independent, so the CPU overlaps them (QuickScorer's
//! and lleaves' idea: no branch on the data). Each lane's step is a handful of instructions:
//! fixed-width arrays the compiler unrolls, node indexes masked into a power-of-two table
//! instead of bounds-checked. (A first attempt, `BENCHMARKS.md` "Tried and reverted",
//! stepped lanes through iterator bookkeeping and checked every index: 38 instructions a
//! level against the node walk's 25, and slower.)
//!
//! Results are bit-identical to the node walk: the same compare per node, and each row's
//! leaves added in tree order (property-tested below).

use super::{goes_left, lgb_left, Mode, Node, Rule, LEAF};

/// Walks advanced together.
pub(super) const LANES: usize = 8;

#[derive(Debug, Clone, Default)]
pub(super) struct Lanes {
    /// The forest's nodes with every leaf a self-loop, padded with self-loops to a power of
    /// two so that `index & mask` is always in range.
    nodes: Box<[Node]>,
    /// Per tree, in order: its root and the steps from it to its deepest leaf.
    trees: Vec<(u32, u32)>,
    /// The one rule every split uses, when there is one: the lanes' loops are then compiled
    /// for it alone (no match on the rule per step).
    kind: Kind,
    /// The same forest without a NaN test per step, for rows and batches, when it can be built
    /// (see [`Splits`]).
    splits: Option<Splits>,
}

/// Inputs a [`Splits`] forest may read: a single row is spread on the stack into twice this
/// many.
const SPREAD: usize = 64;

/// The forest with the missing-value test moved out of the walk.
///
/// Every rule [`Splits`] takes sends NaN its node's default way and otherwise compares
/// `x <= t` (or `x < t`). A row is spread once per call into two copies, `half` values apart
/// (the inputs the splits read, rounded up to a power of two): the first as it is —
/// NaN compares false, so it goes right — and the second with NaN made −∞, which goes left for
/// every threshold (but `x < −∞`, refused at compile). A split reads the copy of its default.
/// So a step is one compare, no NaN test, and the spread row is indexed under a mask, not
/// bounds-checked. Children are laid out side by side, so a split stores one child index (16
/// bytes a split, half a [`Node`]); a leaf is a split on a NaN threshold (always "right")
/// whose left child is the slot before it, so it steps to itself. Built only when every
/// feature is below [`SPREAD`] and no threshold is NaN; otherwise rows take [`Lanes`]' nodes.
/// A batch is spread whole (`2 × half` values a row), and walked as [`Lanes`] walks one: tree
/// by tree, eight rows side by side.
#[derive(Debug, Clone)]
struct Splits {
    /// Power-of-two length, so `index & mask` is always in range.
    splits: Box<[Split]>,
    /// The value of the leaf at each index (0 elsewhere).
    leaves: Box<[f64]>,
    /// Per tree, in order: its root here and the steps to its deepest leaf.
    trees: Vec<(u32, u32)>,
    /// The compare is `x < t` (XGBoost, ONNX `BRANCH_LT`), not `x <= t`.
    strict: bool,
    /// Where a spread row's second copy starts: a power of two above every feature read.
    half: usize,
}

#[derive(Debug, Clone, Copy)]
struct Split {
    threshold: f64,
    /// The input, plus `half` when NaN goes left (it reads the −∞ copy).
    feature: u32,
    /// The left child; the right one is the next slot.
    left: u32,
}

impl Splits {
    /// `nodes` (thresholds as compared) of the `trees` (root, depth), if every split's rule is
    /// `kind`'s and the conditions above hold.
    fn compile(nodes: &[Node], trees: &[(u32, u32)], kind: Kind) -> Option<Splits> {
        let strict = match kind {
            Kind::Xgb | Kind::OnnxLt => true,
            Kind::LgbNan | Kind::OnnxLeq => false,
            Kind::Mixed | Kind::Lgb => return None,
        };
        let splits = nodes.iter().filter(|n| n.feature != LEAF);
        // NaN compares false both ways; `x < −∞` is false even for the −∞ copy.
        let incomparable = |t: f64| t.is_nan() || (strict && t == f64::NEG_INFINITY);
        let comparable = |t: f64| !incomparable(t);
        let half = splits.clone().map(|n| n.feature as usize + 1).max();
        let half = half.unwrap_or(1).next_power_of_two();
        if half > SPREAD || !splits.clone().all(|n| comparable(n.value)) {
            return None;
        }
        // Two slots per split's children plus one per root, and slot 0 kept free so a leaf's
        // "slot before" never wraps.
        let used = 1 + trees.len() + 2 * splits.count();
        let len = used.next_power_of_two();
        let looped = |i: usize| Split {
            threshold: f64::NAN,
            feature: 0,
            left: i.wrapping_sub(1) as u32 & (len as u32 - 1),
        };
        let mut out: Vec<Split> = (0..len).map(looped).collect();
        let mut leaves = vec![0.0; len];
        let mut placed = Vec::with_capacity(trees.len());
        let mut next = 1usize;
        let mut queue = std::collections::VecDeque::new();
        for &(root, depth) in trees {
            if next >= used {
                return None; // slots taken by copies of shared nodes
            }
            placed.push((next as u32, depth));
            queue.push_back((root as usize, next));
            next += 1;
            while let Some((from, to)) = queue.pop_front() {
                let n = &nodes[from];
                if n.feature == LEAF {
                    leaves[to] = n.value;
                    continue;
                }
                if next + 2 > used {
                    // A split with two parents (a malformed file) is copied under each, with
                    // its subtree: more slots than counted.
                    return None;
                }
                out[to] = Split {
                    threshold: n.value,
                    feature: n.feature + if n.default_left { half as u32 } else { 0 },
                    left: next as u32,
                };
                queue.push_back((n.left as usize, next));
                queue.push_back((n.right as usize, next + 1));
                next += 2;
            }
        }
        if next != used {
            return None; // a node no root reaches
        }
        Some(Splits {
            splits: out.into_boxed_slice(),
            leaves: leaves.into_boxed_slice(),
            trees: placed,
            strict,
            half,
        })
    }

    /// The sum of the leaves `row` (already rounded as the rule compares) reaches.
    fn sum_row(&self, row: &[f64]) -> f64 {
        let mut spread = [0.0; 2 * SPREAD];
        self.spread(row, &mut spread[..2 * self.half]);
        match self.strict {
            true => self.sum_by(&spread, |x, t| x < t),
            false => self.sum_by(&spread, |x, t| x <= t),
        }
    }

    /// `row`'s two copies into `out` (`2 × half` values).
    fn spread(&self, row: &[f64], out: &mut [f64]) {
        let (plain, missing_left) = out.split_at_mut(self.half);
        for ((p, m), &x) in plain.iter_mut().zip(missing_left).zip(row) {
            *p = x;
            *m = if x.is_nan() { f64::NEG_INFINITY } else { x };
        }
    }

    /// Adds to each row's `out` the leaf it reaches in every tree (rows already rounded as
    /// the rule compares).
    fn add_rows(&self, rows: &[f64], inputs: usize, out: &mut [f64]) {
        let stride = 2 * self.half;
        let mut spread = vec![0.0; out.len().next_multiple_of(LANES) * stride];
        for (row, s) in rows
            .chunks_exact(inputs)
            .zip(spread.chunks_exact_mut(stride))
        {
            self.spread(row, s);
        }
        match self.strict {
            true => self.add_by(&spread, out, |x, t| x < t),
            false => self.add_by(&spread, out, |x, t| x <= t),
        }
    }

    /// Tree by tree, [`LANES`] spread rows at a time (rows past the end are zeros, walked and
    /// not added), so each row's leaves are added in tree order.
    #[inline(always)]
    fn add_by(&self, spread: &[f64], out: &mut [f64], left: impl Fn(f64, f64) -> bool) {
        let mask = self.splits.len() - 1;
        let (splits, leaves) = (&self.splits[..=mask], &self.leaves[..=mask]);
        let stride = 2 * self.half;
        let block_mask = LANES * stride - 1; // a power of two less one
        for &(root, depth) in &self.trees {
            for (block, o) in spread
                .chunks_exact(LANES * stride)
                .zip(out.chunks_mut(LANES))
            {
                let block = &block[..=block_mask];
                let mut at = [root; LANES];
                for _ in 0..depth {
                    for (k, a) in at.iter_mut().enumerate() {
                        let s = &splits[*a as usize & mask];
                        let x = block[(k * stride + s.feature as usize) & block_mask];
                        *a = s.left + u32::from(!left(x, s.threshold));
                    }
                }
                for (o, &a) in o.iter_mut().zip(&at) {
                    *o += leaves[a as usize & mask];
                }
            }
        }
    }

    #[inline(always)]
    fn sum_by(&self, spread: &[f64; 2 * SPREAD], left: impl Fn(f64, f64) -> bool) -> f64 {
        let mask = self.splits.len() - 1;
        let (splits, leaves) = (&self.splits[..=mask], &self.leaves[..=mask]);
        let mut sum = 0.0;
        for group in self.trees.chunks(LANES) {
            // Lanes beyond the group stay on slot 0, a self-loop, and are not added.
            let (mut at, steps) = start(group);
            for _ in 0..steps {
                for a in &mut at {
                    let s = &splits[*a as usize & mask];
                    let x = spread[s.feature as usize & (2 * SPREAD - 1)];
                    *a = s.left + u32::from(!left(x, s.threshold));
                }
            }
            for &a in &at[..group.len()] {
                sum += leaves[a as usize & mask];
            }
        }
        sum
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum Kind {
    #[default]
    Mixed,
    Xgb,
    Lgb,
    /// LightGBM with no split that takes zero as missing (its default): one test fewer.
    LgbNan,
    OnnxLeq,
    OnnxLt,
}

impl Kind {
    /// Compares in f32 (on values rounded to f32 beforehand).
    fn in_f32(self) -> bool {
        matches!(self, Kind::Xgb | Kind::OnnxLeq | Kind::OnnxLt)
    }

    fn of(nodes: &[Node]) -> Kind {
        let kind = |n: &Node| match n.rule {
            Rule::XgbLess => Kind::Xgb,
            Rule::LgbLessEq { .. } => Kind::Lgb,
            Rule::Onnx(Mode::Leq) => Kind::OnnxLeq,
            Rule::Onnx(Mode::Lt) => Kind::OnnxLt,
            Rule::Onnx(_) => Kind::Mixed,
        };
        let mut splits = nodes.iter().filter(|n| n.feature != LEAF).map(kind);
        let first = splits.next().unwrap_or(Kind::Mixed);
        let zero_missing = |n: &Node| matches!(n.rule, Rule::LgbLessEq { zero_missing: true });
        match first {
            _ if !splits.all(|k| k == first) => Kind::Mixed,
            Kind::Lgb if !nodes.iter().any(zero_missing) => Kind::LgbNan,
            _ => first,
        }
    }
}

/// Rows of up to this many inputs are rounded to f32 on the stack.
const ROUNDED_ON_STACK: usize = 64;

fn round_into(row: &[f64], out: &mut [f64]) {
    for (o, &x) in out.iter_mut().zip(row) {
        *o = f64::from(x as f32);
    }
}

// `goes_left` with the rule known at compile time. For the f32 rules (XGBoost, ONNX) both
// the value and the threshold are already rounded to f32 (see `Lanes::compile`).
#[inline(always)]
fn f32_lt(n: &Node, x: f64) -> bool {
    let nan = x.is_nan();
    (nan & n.default_left) | (!nan & (x < n.value))
}

#[inline(always)]
fn f32_leq(n: &Node, x: f64) -> bool {
    let nan = x.is_nan();
    (nan & n.default_left) | (!nan & (x <= n.value))
}

#[inline(always)]
fn lgb_nan(n: &Node, x: f64) -> bool {
    debug_assert!(!matches!(n.rule, Rule::LgbLessEq { zero_missing: true }));
    let nan = x.is_nan();
    (nan & n.default_left) | (!nan & (x <= n.value))
}

impl Lanes {
    /// Compiles `nodes` laid out as `Forest::check` guarantees: each tree's nodes from its
    /// root up to the next root, children after their parent.
    pub(super) fn compile(nodes: &[Node], roots: &[u32]) -> Lanes {
        let kind = Kind::of(nodes);
        let mut compared = nodes.to_vec();
        if kind.in_f32() {
            // Thresholds rounded to f32 once here, rows once per call (`rounded`): the f32
            // compare `(x as f32) < (t as f32)` is the f64 compare of the rounded values
            // (f32 → f64 is exact and keeps order), without two conversions per step.
            for n in compared.iter_mut().filter(|n| n.feature != LEAF) {
                n.value = f64::from(n.value as f32);
            }
        }
        let len = nodes.len().max(1).next_power_of_two();
        let looped = |i: usize, n: &Node| Node {
            feature: 0,
            left: i as u32,
            right: i as u32,
            ..*n
        };
        let mut out: Vec<Node> = Vec::with_capacity(len);
        for (i, n) in compared.iter().enumerate() {
            out.push(if n.feature == LEAF { looped(i, n) } else { *n });
        }
        while out.len() < len {
            let i = out.len();
            out.push(looped(i, &Node::leaf(0.0)));
        }
        // Depth of each node's subtree, children (later indexes) first.
        let mut depth = vec![0u32; nodes.len()];
        for i in (0..nodes.len()).rev() {
            let n = &nodes[i];
            if n.feature != LEAF {
                depth[i] = 1 + depth[n.left as usize].max(depth[n.right as usize]);
            }
        }
        let trees: Vec<(u32, u32)> = roots.iter().map(|&r| (r, depth[r as usize])).collect();
        Lanes {
            splits: Splits::compile(&compared, &trees, kind),
            nodes: out.into_boxed_slice(),
            trees,
            kind,
        }
    }

    /// The sum of the leaves `row` reaches, trees taken [`LANES`] at a time.
    pub(super) fn sum_row(&self, row: &[f64]) -> f64 {
        let mut buf = [0.0; ROUNDED_ON_STACK];
        let rounded: Vec<f64>;
        let row = match self.kind.in_f32() {
            false => row,
            true if row.len() <= ROUNDED_ON_STACK => {
                round_into(row, &mut buf[..row.len()]);
                &buf[..row.len()]
            }
            true => {
                rounded = row.iter().map(|&x| f64::from(x as f32)).collect();
                &rounded
            }
        };
        if let Some(splits) = &self.splits {
            return splits.sum_row(row);
        }
        match self.kind {
            Kind::Mixed => self.sum_row_by(row, goes_left),
            Kind::Xgb => self.sum_row_by(row, f32_lt),
            Kind::Lgb => self.sum_row_by(row, lgb_left),
            Kind::LgbNan => self.sum_row_by(row, lgb_nan),
            Kind::OnnxLeq => self.sum_row_by(row, f32_leq),
            Kind::OnnxLt => self.sum_row_by(row, f32_lt),
        }
    }

    /// Adds to each row's `out` the leaf it reaches in every tree, tree by tree, [`LANES`]
    /// rows at a time (so each row's leaves are added in tree order).
    pub(super) fn add_rows(&self, rows: &[f64], inputs: usize, out: &mut [f64]) {
        let rounded: Vec<f64>;
        let rows = if self.kind.in_f32() {
            rounded = rows.iter().map(|&x| f64::from(x as f32)).collect();
            &rounded
        } else {
            rows
        };
        if let Some(splits) = &self.splits {
            return splits.add_rows(rows, inputs, out);
        }
        match self.kind {
            Kind::Mixed => self.add_rows_by(rows, inputs, out, goes_left),
            Kind::Xgb => self.add_rows_by(rows, inputs, out, f32_lt),
            Kind::Lgb => self.add_rows_by(rows, inputs, out, lgb_left),
            Kind::LgbNan => self.add_rows_by(rows, inputs, out, lgb_nan),
            Kind::OnnxLeq => self.add_rows_by(rows, inputs, out, f32_leq),
            Kind::OnnxLt => self.add_rows_by(rows, inputs, out, f32_lt),
        }
    }

    #[inline(always)]
    fn sum_row_by(&self, row: &[f64], left: impl Fn(&Node, f64) -> bool + Copy) -> f64 {
        let mask = self.nodes.len() - 1;
        let nodes = &self.nodes[..=mask];
        let mut sum = 0.0;
        for group in self.trees.chunks(LANES) {
            // Lanes beyond the group walk node 0's tree harmlessly and are not added.
            let (mut at, steps) = start(group);
            for _ in 0..steps {
                for a in &mut at {
                    let n = &nodes[*a as usize & mask];
                    *a = step(n, row[n.feature as usize], left);
                }
            }
            for &a in &at[..group.len()] {
                sum += nodes[a as usize & mask].value;
            }
        }
        sum
    }

    #[inline(always)]
    fn add_rows_by(
        &self,
        rows: &[f64],
        inputs: usize,
        out: &mut [f64],
        left: impl Fn(&Node, f64) -> bool + Copy,
    ) {
        debug_assert_eq!(rows.len(), inputs * out.len());
        let mask = self.nodes.len() - 1;
        let nodes = &self.nodes[..=mask];
        for &(root, depth) in &self.trees {
            let mut blocks = rows.chunks_exact(inputs * LANES);
            let mut outs = out.chunks_exact_mut(LANES);
            for (block, o) in (&mut blocks).zip(&mut outs) {
                let mut at = [root; LANES];
                for _ in 0..depth {
                    for (k, a) in at.iter_mut().enumerate() {
                        let n = &nodes[*a as usize & mask];
                        *a = step(n, block[k * inputs + n.feature as usize], left);
                    }
                }
                for (o, &a) in o.iter_mut().zip(&at) {
                    *o += nodes[a as usize & mask].value;
                }
            }
            for (row, o) in blocks
                .remainder()
                .chunks_exact(inputs)
                .zip(outs.into_remainder())
            {
                let mut a = root;
                for _ in 0..depth {
                    let n = &nodes[a as usize & mask];
                    a = step(n, row[n.feature as usize], left);
                }
                *o += nodes[a as usize & mask].value;
            }
        }
    }
}

/// A group of up to [`LANES`] trees (root, depth): the lanes' first nodes (0 past the group)
/// and the steps that take every one of them to a leaf.
#[inline(always)]
fn start(group: &[(u32, u32)]) -> ([u32; LANES], u32) {
    let mut at = [0u32; LANES];
    let mut steps = 0;
    for (k, &(root, depth)) in group.iter().enumerate() {
        at[k] = root;
        steps = steps.max(depth);
    }
    (at, steps)
}

/// The next node from `n` for value `x` (a leaf: itself).
#[inline(always)]
fn step(n: &Node, x: f64, left: impl Fn(&Node, f64) -> bool) -> u32 {
    if left(n, x) {
        n.left
    } else {
        n.right
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Mode, Rule};
    use super::*;
    use proptest::prelude::*;

    /// A random tree in preorder (children after their parent), appended to `nodes`.
    fn tree(nodes: &mut Vec<Node>, depth: u32, seed: &mut u64, rule: Rule, inputs: u32) {
        let mut next = || {
            *seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            *seed >> 33
        };
        let r = next();
        if depth == 0 || r % 5 == 0 {
            nodes.push(Node::leaf((r % 1000) as f64 / 7.0 - 50.0));
            return;
        }
        let at = nodes.len();
        let rule = match rule {
            Rule::LgbLessEq { .. } => Rule::LgbLessEq {
                zero_missing: r % 3 == 0,
            },
            other => other,
        };
        // Thresholds at ±∞ now and then (when `inputs` is odd).
        let value = match next() % 400 {
            0 if inputs % 2 == 1 => f64::INFINITY,
            1 if inputs % 2 == 1 => f64::NEG_INFINITY,
            v => ((v % 200) as f64 - 100.0) / 10.0,
        };
        nodes.push(Node {
            feature: (r % u64::from(inputs)) as u32,
            value,
            left: 0,
            right: 0,
            default_left: r % 2 == 0,
            rule,
        });
        nodes[at].left = nodes.len() as u32;
        tree(nodes, depth - 1, seed, rule, inputs);
        nodes[at].right = nodes.len() as u32;
        tree(nodes, depth - 1, seed, rule, inputs);
    }

    /// The node walk `Forest` used before lanes, the reference.
    fn walk(nodes: &[Node], root: u32, row: &[f64]) -> f64 {
        let mut i = root as usize;
        loop {
            let n = &nodes[i];
            if n.feature == LEAF {
                return n.value;
            }
            i = if goes_left(n, row[n.feature as usize]) {
                n.left
            } else {
                n.right
            } as usize;
        }
    }

    /// A file whose trees share a node passes `Forest::check` (children after parents). The
    /// side-by-side layout copies a shared node where each parent reaches it: a shared leaf
    /// fits the slots counted, a shared split's children do not, and that forest keeps the node
    /// lanes. Either way the sums are the node walk's.
    #[test]
    fn nodes_with_two_parents_are_copied_or_keep_the_node_lanes() {
        let split = |left, right| Node {
            feature: 0,
            value: 0.5,
            left,
            right,
            default_left: true,
            rule: Rule::LgbLessEq {
                zero_missing: false,
            },
        };
        let (one, two) = (Node::leaf(1.0), Node::leaf(2.0));
        let shared_leaf = [split(1, 2), split(2, 3), one, two];
        let shared_split = [split(1, 2), split(2, 3), split(3, 4), one, two];
        for (nodes, copied) in [(&shared_leaf[..], true), (&shared_split[..], false)] {
            let lanes = Lanes::compile(nodes, &[0]);
            assert_eq!(lanes.splits.is_some(), copied);
            for x in [0.0, 1.0, f64::NAN] {
                assert_eq!(lanes.sum_row(&[x]), walk(nodes, 0, &[x]), "{x}");
            }
        }
    }

    proptest! {
        /// Lanes reach the node walk's leaves and add them in its order, bit for bit, for
        /// every rule, trees of any shape and depth, rows with NaN, zeros and ties.
        #[test]
        fn lanes_equal_the_node_walk(
            trees in 1usize..30,
            depth in 0u32..9,
            seed in any::<u64>(),
            rule in 0usize..5,
            rows in prop::collection::vec(prop::collection::vec(prop_oneof![
                // Values a hair from a threshold (0.1, -0.3): equal in f32, not in f64.
                Just(f64::NAN), Just(0.0), Just(-0.0), Just(1e-36), Just(0.1 + 1e-12), Just(-0.3 - 1e-12),
                Just(f64::INFINITY), Just(f64::NEG_INFINITY),
                (-120i32..120).prop_map(|v| f64::from(v) / 10.0)
            ], 70), 1..40),
            wide in any::<bool>(),
        ) {
            // Rows of 5 inputs are rounded to f32 on the stack, rows of 70 on the heap (and
            // their features past 64 keep NaN tests); 7 inputs: some thresholds at ±∞
            // (`x < −∞` keeps them too).
            let inputs = match (wide, seed % 4) {
                (true, _) => 70,
                (false, 0) => 7,
                (false, _) => 6,
            };
            let rows: Vec<Vec<f64>> = rows.iter().map(|r| r[..inputs].to_vec()).collect();
            // Index 4: XGBoost splits with one ONNX `Lt` tree among them (the mixed path).
            let rules = [Rule::XgbLess, Rule::LgbLessEq { zero_missing: false }, Rule::Onnx(Mode::Leq), Rule::Onnx(Mode::Lt), Rule::Onnx(Mode::Gt)];
            let rule = rules[rule];
            let (mut nodes, mut roots, mut s) = (Vec::new(), Vec::new(), seed);
            for t in 0..trees {
                roots.push(nodes.len() as u32);
                let rule = if t == 1 && seed % 2 == 0 { Rule::Onnx(Mode::Lt) } else { rule };
                tree(&mut nodes, depth, &mut s, rule, inputs as u32);
            }
            if seed % 3 == 0 {
                // LightGBM with no zero-as-missing split: its loop of its own.
                for n in &mut nodes {
                    if let Rule::LgbLessEq { zero_missing } = &mut n.rule {
                        *zero_missing = false;
                    }
                }
            }
            let lanes = Lanes::compile(&nodes, &roots);
            let strict = matches!(lanes.kind, Kind::Xgb | Kind::OnnxLt);
            let never = nodes.iter().any(|n| n.feature != LEAF && strict && n.value == f64::NEG_INFINITY);
            let fits = nodes.iter().all(|n| n.feature == LEAF || (n.feature as usize) < SPREAD);
            let nan_free = !never && fits && !matches!(lanes.kind, Kind::Mixed | Kind::Lgb);
            prop_assert_eq!(lanes.splits.is_some(), nan_free);
            let flat: Vec<f64> = rows.iter().flatten().copied().collect();
            let mut batch = vec![0.0; rows.len()];
            lanes.add_rows(&flat, inputs, &mut batch);
            for (row, b) in rows.iter().zip(&batch) {
                let mut expected = 0.0;
                for &r in &roots {
                    expected += walk(&nodes, r, row);
                }
                prop_assert_eq!(lanes.sum_row(row).to_bits(), expected.to_bits());
                prop_assert_eq!(b.to_bits(), expected.to_bits());
            }
        }
    }
}
