//! Feature types and values.

use std::fmt;
use std::sync::Arc;

/// The type of a feature, fixed by its view's schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeatureType {
    F64,
    I64,
    Bool,
    String,
    /// A fixed-length `f32` vector (an embedding).
    F32s(u32),
}

impl FeatureType {
    /// Parses the config spelling: `f64`, `i64`, `bool`, `string`, `f32[16]`, or `f32[]` with `dims`.
    pub fn parse(text: &str, dims: Option<u32>) -> Result<FeatureType, String> {
        let t = match text {
            "f64" | "float64" | "double" => FeatureType::F64,
            "i64" | "int64" => FeatureType::I64,
            "bool" => FeatureType::Bool,
            "string" => FeatureType::String,
            "f32[]" => match dims {
                Some(d) if d > 0 => FeatureType::F32s(d),
                _ => return Err("f32[] needs `dims` > 0 (or write the length: f32[16])".into()),
            },
            other => {
                let inner = other.strip_prefix("f32[").and_then(|s| s.strip_suffix(']'));
                match inner.and_then(|n| n.parse::<u32>().ok()) {
                    Some(d) if d > 0 => FeatureType::F32s(d),
                    _ => {
                        return Err(format!(
                            "unknown type {other:?}: expected f64, i64, bool, string or f32[N]"
                        ))
                    }
                }
            }
        };
        Ok(t)
    }

    pub fn is_numeric(self) -> bool {
        matches!(self, FeatureType::F64 | FeatureType::I64)
    }
}

impl fmt::Display for FeatureType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FeatureType::F64 => f.write_str("f64"),
            FeatureType::I64 => f.write_str("i64"),
            FeatureType::Bool => f.write_str("bool"),
            FeatureType::String => f.write_str("string"),
            FeatureType::F32s(d) => write!(f, "f32[{d}]"),
        }
    }
}

/// One feature value. `Null` is an explicit null sent by a producer (Feast's `NULL_VALUE`).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    F64(f64),
    I64(i64),
    Bool(bool),
    Str(Arc<str>),
    F32s(Arc<[f32]>),
}

impl Value {
    /// Whether this value may be stored in a feature of type `ty`.
    pub fn fits(&self, ty: FeatureType) -> bool {
        match (self, ty) {
            (Value::Null, _) => true,
            (Value::F64(v), FeatureType::F64) => v.is_finite(),
            (Value::I64(_), FeatureType::I64) => true,
            (Value::Bool(_), FeatureType::Bool) => true,
            (Value::Str(_), FeatureType::String) => true,
            (Value::F32s(v), FeatureType::F32s(d)) => {
                v.len() == d as usize && v.iter().all(|x| x.is_finite())
            }
            _ => false,
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Value::Null => serde_json::Value::Null,
            Value::F64(v) => serde_json::Number::from_f64(*v)
                .map(serde_json::Value::Number)
                .unwrap_or(serde_json::Value::Null),
            Value::I64(v) => serde_json::Value::from(*v),
            Value::Bool(v) => serde_json::Value::Bool(*v),
            Value::Str(v) => serde_json::Value::String(v.to_string()),
            Value::F32s(v) => serde_json::Value::Array(
                v.iter()
                    .map(|x| {
                        serde_json::Number::from_f64(f64::from(*x))
                            .map(serde_json::Value::Number)
                            .unwrap_or(serde_json::Value::Null)
                    })
                    .collect(),
            ),
        }
    }
}
