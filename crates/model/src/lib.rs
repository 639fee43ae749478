//! Quiver's model runtimes, in process, behind one trait: the native tree-ensemble evaluator
//! (XGBoost JSON, LightGBM text, ONNX-ML tree ensembles) and tract for other ONNX graphs;
//! plus the model repository that loads them.

pub mod batcher;
pub mod golden;
pub mod onnx;
pub mod registry;
pub mod repository;
pub mod rollout;
pub mod shadow;
pub mod trees;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot parse model: {0}")]
    Parse(String),
    #[error("unsupported model: {0}")]
    Unsupported(String),
    #[error("expected {expected} inputs per row, got {got}")]
    Shape { expected: usize, got: usize },
    #[error("evaluation failed: {0}")]
    Eval(String),
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;

/// A loaded model: rows of `inputs()` f64 values in, one score per row out. Missing values
/// are NaN; each runtime applies its library's rule for them.
pub trait Model: Send + Sync {
    fn inputs(&self) -> usize;
    /// Values per output row (1 for a score; 2 for a binary classifier's probabilities).
    fn outputs(&self) -> usize {
        1
    }
    /// Which evaluator runs the model (`native-trees`, `tract`), for status and metrics.
    fn engine(&self) -> &'static str;
    /// `rows` holds n rows of `inputs()` values and `out` n rows of `outputs()`, row-major.
    fn predict(&self, rows: &[f64], out: &mut [f64]) -> Result<()>;
}

/// The shape check every runtime makes before it evaluates.
pub(crate) fn check_shape(inputs: usize, outputs: usize, rows: &[f64], out: &[f64]) -> Result<()> {
    let n = out.len() / outputs.max(1);
    if out.len() != n * outputs || rows.len() != n * inputs {
        return Err(ModelError::Shape {
            expected: inputs,
            got: rows.len() / n.max(1),
        });
    }
    Ok(())
}
