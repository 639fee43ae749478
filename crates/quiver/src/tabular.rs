//! Parquet input for `quiver push` (backfills) and `quiver history` (entity rows): each row as
//! (column name, JSON value) pairs, streamed one record batch at a time so a year of history
//! never has to fit in memory.
//!
//! Arrow → JSON: strings stay strings; integers, floats and booleans stay typed; timestamps
//! (any unit, any zone) and dates become epoch milliseconds; lists of numbers become arrays
//! (embeddings); nulls are `null`. Other types are refused with the column's name.

use std::path::Path;

use anyhow::{bail, Context, Result};
use arrow_array::cast::AsArray;
use arrow_array::types::{
    Date32Type, Float32Type, Float64Type, Int16Type, Int32Type, Int64Type, Int8Type,
    TimestampMicrosecondType, TimestampMillisecondType, TimestampNanosecondType,
    TimestampSecondType, UInt32Type, UInt64Type,
};
use arrow_array::{Array, RecordBatch};
use arrow_schema::{DataType, TimeUnit};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde_json::Value;

/// Rows of a Parquet file, in order.
pub struct ParquetRows {
    pub columns: Vec<String>,
    pub total_rows: u64,
    reader: parquet::arrow::arrow_reader::ParquetRecordBatchReader,
}

impl ParquetRows {
    pub fn open(path: &Path) -> Result<ParquetRows> {
        let file =
            std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let builder = ParquetRecordBatchReaderBuilder::try_new(file)
            .with_context(|| format!("{} is not a Parquet file", path.display()))?;
        let total_rows = builder.metadata().file_metadata().num_rows().max(0) as u64;
        let columns = builder
            .schema()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        let reader = builder.with_batch_size(8192).build()?;
        Ok(ParquetRows {
            columns,
            total_rows,
            reader,
        })
    }

    /// Calls `f` with each row's values (in `columns` order) and the rows read so far, until
    /// the file ends or `f` returns false.
    pub fn for_each(mut self, mut f: impl FnMut(Vec<Value>, u64) -> Result<bool>) -> Result<()> {
        let mut done = 0u64;
        for batch in self.reader.by_ref() {
            let batch = batch?;
            for i in 0..batch.num_rows() {
                done += 1;
                if !f(row(&batch, i)?, done)? {
                    return Ok(());
                }
            }
        }
        Ok(())
    }
}

pub fn is_parquet(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("parquet"))
}

fn row(batch: &RecordBatch, i: usize) -> Result<Vec<Value>> {
    batch
        .columns()
        .iter()
        .zip(batch.schema().fields())
        .map(|(col, field)| {
            cell(col.as_ref(), i).with_context(|| format!("column {:?}", field.name()))
        })
        .collect()
}

/// One cell as JSON (see the module docs for the mapping).
pub fn cell(a: &dyn Array, i: usize) -> Result<Value> {
    if a.is_null(i) {
        return Ok(Value::Null);
    }
    Ok(match a.data_type() {
        DataType::Utf8 => Value::from(a.as_string::<i32>().value(i)),
        DataType::LargeUtf8 => Value::from(a.as_string::<i64>().value(i)),
        DataType::Utf8View => Value::from(a.as_string_view().value(i)),
        DataType::Boolean => Value::from(a.as_boolean().value(i)),
        DataType::Int8 => Value::from(a.as_primitive::<Int8Type>().value(i)),
        DataType::Int16 => Value::from(a.as_primitive::<Int16Type>().value(i)),
        DataType::Int32 => Value::from(a.as_primitive::<Int32Type>().value(i)),
        DataType::Int64 => Value::from(a.as_primitive::<Int64Type>().value(i)),
        DataType::UInt32 => Value::from(a.as_primitive::<UInt32Type>().value(i)),
        DataType::UInt64 => Value::from(a.as_primitive::<UInt64Type>().value(i)),
        DataType::Float32 => float(f64::from(a.as_primitive::<Float32Type>().value(i))),
        DataType::Float64 => float(a.as_primitive::<Float64Type>().value(i)),
        DataType::Date32 => {
            Value::from(i64::from(a.as_primitive::<Date32Type>().value(i)) * 86_400_000)
        }
        DataType::Timestamp(unit, _) => Value::from(match unit {
            TimeUnit::Second => a.as_primitive::<TimestampSecondType>().value(i) * 1000,
            TimeUnit::Millisecond => a.as_primitive::<TimestampMillisecondType>().value(i),
            TimeUnit::Microsecond => a
                .as_primitive::<TimestampMicrosecondType>()
                .value(i)
                .div_euclid(1000),
            TimeUnit::Nanosecond => a
                .as_primitive::<TimestampNanosecondType>()
                .value(i)
                .div_euclid(1_000_000),
        }),
        DataType::List(_) => {
            let list = a.as_list::<i32>().value(i);
            Value::Array(
                (0..list.len())
                    .map(|j| cell(list.as_ref(), j))
                    .collect::<Result<_>>()?,
            )
        }
        DataType::FixedSizeList(_, _) => {
            let list = a.as_fixed_size_list().value(i);
            Value::Array(
                (0..list.len())
                    .map(|j| cell(list.as_ref(), j))
                    .collect::<Result<_>>()?,
            )
        }
        other => bail!("unsupported Parquet type {other}"),
    })
}

/// A float as JSON; NaN and infinities (which JSON cannot carry) as null, which the event
/// decoder then refuses with the feature's name if the feature is not nullable there.
fn float(x: f64) -> Value {
    serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow_array::builder::{Float64Builder, ListBuilder};
    use arrow_array::{ArrayRef, Int32Array, StringArray, TimestampMicrosecondArray};

    use super::*;

    #[test]
    fn cells_map_to_json() {
        let ts: ArrayRef = Arc::new(
            TimestampMicrosecondArray::from(vec![Some(1_732_350_000_123_456), None])
                .with_timezone("UTC"),
        );
        assert_eq!(
            cell(ts.as_ref(), 0).unwrap(),
            Value::from(1_732_350_000_123i64)
        );
        assert_eq!(cell(ts.as_ref(), 1).unwrap(), Value::Null);
        let s: ArrayRef = Arc::new(StringArray::from(vec!["u1"]));
        assert_eq!(cell(s.as_ref(), 0).unwrap(), Value::from("u1"));
        let n: ArrayRef = Arc::new(Int32Array::from(vec![7]));
        assert_eq!(cell(n.as_ref(), 0).unwrap(), Value::from(7));
        let mut l = ListBuilder::new(Float64Builder::new());
        l.values().append_value(0.5);
        l.values().append_value(1.5);
        l.append(true);
        let l: ArrayRef = Arc::new(l.finish());
        assert_eq!(cell(l.as_ref(), 0).unwrap(), serde_json::json!([0.5, 1.5]));
    }
}
