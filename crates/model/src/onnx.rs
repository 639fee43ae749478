//! ONNX models. Two runtimes behind the one [`Model`] trait:
//!
//! - A graph whose output comes from an ONNX-ML `TreeEnsembleRegressor`/`Classifier` node
//!   (what skl2onnx and onnxmltools write for tree models) is read into the native
//!   [`Forest`]: tract's tree-ensemble operator takes ~1.5 ms per row on a 100-tree model and
//!   refuses skl2onnx's binary classifiers, so the node's attributes are evaluated natively.
//!   Only the wrappers those converters put around the node are accepted (`Cast` on the
//!   input; `Identity` and multiplication by a scalar constant on the output).
//! - Everything else (linear models, neural nets) runs in tract, optimized once at load for
//!   a symbolic batch size.
//!
//! Quiver uses the graph output the model's config names first, or else the graph's first
//! floating-point output (skl2onnx classifiers list `label` first, then `probabilities`;
//! export them with `zipmap=False`). Its row is the model's output row:
//! `[P(class 0), P(class 1)]` for a binary classifier, `[y]` for a regressor.

use std::collections::HashMap;
use std::sync::Arc;

use tract_onnx::pb;
use tract_onnx::prelude::*;

use crate::trees::{Forest, OnnxEnsemble};
use crate::{Model, ModelError, Result};

const FLOAT: i32 = 1;
const DOUBLE: i32 = 11;

/// Loads an ONNX model from its bytes, evaluating graph output `output` (if given).
pub fn load(bytes: &[u8], output: Option<&str>) -> Result<Arc<dyn Model>> {
    let proto = tract_onnx::onnx()
        .proto_model_for_read(&mut &bytes[..])
        .map_err(|e| ModelError::Parse(format!("ONNX: {e}")))?;
    let graph = proto
        .graph
        .as_ref()
        .ok_or_else(|| ModelError::Parse("ONNX: no graph".into()))?;
    let initializers: HashMap<&str, &pb::TensorProto> = graph
        .initializer
        .iter()
        .map(|t| (t.name.as_str(), t))
        .collect();
    let inputs: Vec<&pb::ValueInfoProto> = graph
        .input
        .iter()
        .filter(|i| !initializers.contains_key(i.name.as_str()))
        .collect();
    let [input] = inputs.as_slice() else {
        return Err(ModelError::Unsupported(format!(
            "ONNX graph with {} inputs (Quiver feeds one [N, features] tensor)",
            inputs.len()
        )));
    };
    let (in_type, in_shape) = tensor_type(input)?;
    if !matches!(in_type, FLOAT | DOUBLE) || in_shape.len() != 2 {
        return Err(ModelError::Unsupported(format!(
            "ONNX input {:?} must be a float or double [N, features] tensor",
            input.name
        )));
    }
    let width = in_shape[1].ok_or_else(|| {
        ModelError::Unsupported(format!(
            "ONNX input {:?}: unknown feature count",
            input.name
        ))
    })?;
    let output = match output {
        Some(name) => graph
            .output
            .iter()
            .find(|o| o.name == name)
            .ok_or_else(|| {
                let names: Vec<&str> = graph.output.iter().map(|o| o.name.as_str()).collect();
                ModelError::Unsupported(format!(
                    "the graph has no output {name:?} (it has {names:?})"
                ))
            })?,
        None => graph
            .output
            .iter()
            .find(|o| matches!(tensor_type(o), Ok((FLOAT | DOUBLE, _))))
            .ok_or_else(|| ModelError::Unsupported("ONNX graph without a float output".into()))?,
    };
    if !matches!(tensor_type(output)?.0, FLOAT | DOUBLE) {
        return Err(ModelError::Unsupported(format!(
            "ONNX output {:?} is not a float tensor (use the probabilities, not the label)",
            output.name
        )));
    }
    if let Some(forest) = tree_ensemble(graph, &initializers, &input.name, &output.name, width)? {
        return Ok(Arc::new(forest));
    }
    let columns = match tensor_type(output)?.1.as_slice() {
        [_] => 1,
        [_, Some(k)] => *k,
        _ => {
            return Err(ModelError::Unsupported(format!(
                "ONNX output {:?} must be [N] or [N, k] with k known",
                output.name
            )))
        }
    };
    TractModel::load(&proto, in_type, width, &output.name, columns).map(|m| Arc::new(m) as _)
}

/// Element type and dims (`None` for symbolic) of a tensor value.
fn tensor_type(v: &pb::ValueInfoProto) -> Result<(i32, Vec<Option<usize>>)> {
    let Some(pb::type_proto::Value::TensorType(t)) =
        v.r#type.as_ref().and_then(|t| t.value.as_ref())
    else {
        return Err(ModelError::Unsupported(format!(
            "ONNX value {:?} is not a tensor",
            v.name
        )));
    };
    let dims = t
        .shape
        .as_ref()
        .map(|s| {
            s.dim
                .iter()
                .map(|d| match d.value {
                    Some(pb::tensor_shape_proto::dimension::Value::DimValue(n)) if n > 0 => {
                        Some(n as usize)
                    }
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    Ok((t.elem_type, dims))
}

/// If `output` is computed by a tree-ensemble node from `input`, that node as a forest.
fn tree_ensemble(
    graph: &pb::GraphProto,
    initializers: &HashMap<&str, &pb::TensorProto>,
    input: &str,
    output: &str,
    width: usize,
) -> Result<Option<Forest>> {
    let producer = |name: &str| {
        graph
            .node
            .iter()
            .find(|n| n.output.iter().any(|o| o == name))
    };
    let mut scale = 1.0;
    let mut at = output.to_string();
    // Walk back through the converters' wrappers to the ensemble.
    let node = loop {
        let Some(n) = producer(&at) else {
            return Ok(None);
        };
        match n.op_type.as_str() {
            "Identity" => at = n.input[0].clone(),
            "Mul" if n.input.len() == 2 => {
                let Some((c, other)) = [(1, 0), (0, 1)]
                    .into_iter()
                    .find_map(|(c, o)| Some((scalar(initializers.get(n.input[c].as_str())?)?, o)))
                else {
                    return Ok(None);
                };
                scale *= c;
                at = n.input[other].clone();
            }
            "TreeEnsembleRegressor" | "TreeEnsembleClassifier" => break n,
            _ => return Ok(None),
        }
    };
    let classifier = node.op_type == "TreeEnsembleClassifier";
    // The classifier's probabilities are its second output; the regressor has one.
    let wanted = usize::from(classifier);
    if node.output.get(wanted) != Some(&at) {
        return Err(ModelError::Unsupported(
            "the graph's output is the ensemble's label, not its scores".into(),
        ));
    }
    let mut source = node.input[0].clone();
    while source != input {
        match producer(&source) {
            Some(n) if n.op_type == "Cast" || n.op_type == "Identity" => {
                source = n.input[0].clone()
            }
            _ => {
                return Err(ModelError::Unsupported(
                    "a tree ensemble fed by anything but the graph input".into(),
                ))
            }
        }
    }
    let attr = |name: &str| node.attribute.iter().find(|a| a.name == name);
    let ints = |name: &str| attr(name).map(|a| a.ints.clone()).unwrap_or_default();
    let floats = |name: &str| -> Vec<f64> {
        match attr(name) {
            Some(a) => a.floats.iter().map(|&f| f64::from(f)).collect(),
            None => attr(&format!("{name}_as_tensor"))
                .and_then(|a| a.t.as_ref())
                .map(doubles)
                .unwrap_or_default(),
        }
    };
    let strings = |name: &str| -> Vec<String> {
        attr(name)
            .map(|a| {
                a.strings
                    .iter()
                    .map(|s| String::from_utf8_lossy(s).into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    let string = |name: &str| {
        attr(name)
            .map(|a| String::from_utf8_lossy(&a.s).into_owned())
            .unwrap_or_default()
    };
    let prefix = if classifier { "class" } else { "target" };
    let classes = ints("classlabels_int64s").len() + strings("classlabels_strings").len();
    let e = OnnxEnsemble {
        classifier,
        classes,
        inputs: width,
        nodes_treeids: ints("nodes_treeids"),
        nodes_nodeids: ints("nodes_nodeids"),
        nodes_featureids: ints("nodes_featureids"),
        nodes_values: floats("nodes_values"),
        nodes_modes: strings("nodes_modes"),
        nodes_truenodeids: ints("nodes_truenodeids"),
        nodes_falsenodeids: ints("nodes_falsenodeids"),
        nodes_missing_value_tracks_true: ints("nodes_missing_value_tracks_true"),
        target_treeids: ints(&format!("{prefix}_treeids")),
        target_nodeids: ints(&format!("{prefix}_nodeids")),
        target_ids: ints(&format!("{prefix}_ids")),
        target_weights: floats(&format!("{prefix}_weights")),
        base_values: floats("base_values"),
        aggregate_function: string("aggregate_function"),
        post_transform: string("post_transform"),
        output_scale: scale,
    };
    Forest::from_onnx(&e).map(Some)
}

/// A one-element float tensor's value.
fn scalar(t: &pb::TensorProto) -> Option<f64> {
    let v = doubles(t);
    (v.len() == 1).then(|| v[0])
}

fn doubles(t: &pb::TensorProto) -> Vec<f64> {
    match t.data_type {
        FLOAT if !t.float_data.is_empty() => t.float_data.iter().map(|&f| f64::from(f)).collect(),
        FLOAT => t
            .raw_data
            .chunks_exact(4)
            .map(|b| f64::from(f32::from_le_bytes([b[0], b[1], b[2], b[3]])))
            .collect(),
        DOUBLE if !t.double_data.is_empty() => t.double_data.clone(),
        DOUBLE => t
            .raw_data
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().expect("chunks of 8")))
            .collect(),
        _ => Vec::new(),
    }
}

/// An ONNX graph run by tract, optimized at load for a symbolic batch dimension.
pub struct TractModel {
    plan: Arc<TypedRunnableModel>,
    double: bool,
    inputs: usize,
    outputs: usize,
}

impl TractModel {
    fn load(
        proto: &pb::ModelProto,
        elem_type: i32,
        inputs: usize,
        output: &str,
        outputs: usize,
    ) -> Result<TractModel> {
        let fail = |e: TractError| ModelError::Unsupported(format!("tract: {e:#}"));
        let onnx = tract_onnx::onnx();
        let mut model = onnx.model_for_proto_model(proto).map_err(fail)?;
        let batch = model.symbols.sym("N");
        let double = elem_type == DOUBLE;
        let dt = if double {
            f64::datum_type()
        } else {
            f32::datum_type()
        };
        let shape = [batch.to_dim(), inputs.to_dim()];
        model
            .set_input_fact(0, InferenceFact::dt_shape(dt, shape))
            .map_err(fail)?;
        model.select_outputs_by_name([output]).map_err(fail)?;
        let typed = model.into_optimized().map_err(fail)?;
        let plan = typed.into_runnable().map_err(fail)?;
        Ok(TractModel {
            plan,
            double,
            inputs,
            outputs,
        })
    }
}

impl Model for TractModel {
    fn inputs(&self) -> usize {
        self.inputs
    }

    fn engine(&self) -> &'static str {
        "tract"
    }

    fn outputs(&self) -> usize {
        self.outputs
    }

    fn predict(&self, rows: &[f64], out: &mut [f64]) -> Result<()> {
        crate::check_shape(self.inputs, self.outputs, rows, out)?;
        let n = out.len() / self.outputs;
        let fail = |e: TractError| ModelError::Eval(format!("{e:#}"));
        let input: Tensor = if self.double {
            tract_ndarray::Array2::from_shape_vec((n, self.inputs), rows.to_vec())
                .map_err(|e| ModelError::Eval(e.to_string()))?
                .into()
        } else {
            let v: Vec<f32> = rows.iter().map(|&x| x as f32).collect();
            tract_ndarray::Array2::from_shape_vec((n, self.inputs), v)
                .map_err(|e| ModelError::Eval(e.to_string()))?
                .into()
        };
        // tract panics on some bad inputs instead of failing (0.23: a Gather index past the
        // end of its data); a request must get an error, never a dropped connection.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.plan.run(tvec!(input.into()))
        }))
        .map_err(|panic| {
            let why = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("a panic");
            ModelError::Eval(format!("the graph failed: {why}"))
        })?
        .map_err(fail)?;
        let t = &result[0];
        if t.len() != out.len() {
            return Err(ModelError::Eval(format!(
                "the graph returned {} values for {n} rows of {} outputs",
                t.len(),
                self.outputs
            )));
        }
        let v = t.cast_to::<f64>().map_err(fail)?;
        let view = v.to_plain_array_view::<f64>().map_err(fail)?;
        for (o, &x) in out.iter_mut().zip(view.iter()) {
            *o = x;
        }
        Ok(())
    }
}
