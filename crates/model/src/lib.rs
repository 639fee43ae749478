//! Quiver's model runtimes, in process, behind one trait. This first part is the native
//! tree-ensemble evaluator for XGBoost JSON and LightGBM text models (the model repository,
//! ONNX via tract, batching and version routing come with the rest of the model work).

pub mod repository;
pub mod trees;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot parse model: {0}")]
    Parse(String),
    #[error("unsupported model: {0}")]
    Unsupported(String),
    #[error("expected {expected} inputs per row, got {got}")]
    Shape { expected: usize, got: usize },
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;

/// A loaded model: rows of `inputs()` f64 values in, one score per row out. Missing values
/// are NaN; each runtime applies its library's rule for them.
pub trait Model: Send + Sync {
    fn inputs(&self) -> usize;
    /// `rows` holds `out.len()` rows, row-major.
    fn predict(&self, rows: &[f64], out: &mut [f64]) -> Result<()>;
}
