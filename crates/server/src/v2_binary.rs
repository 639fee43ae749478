//! Triton's binary tensor data extension: decoding one input tensor's raw bytes.
//!
//! Layout (Triton's `binary_tensor_data` extension): elements in row-major order, numbers
//! little-endian at their datatype's width, BOOL one byte (0 or 1), BYTES each a u32
//! little-endian length followed by that many bytes (UTF-8 here: they are entity keys).
//! Every decoder checks the byte count against the shape and never panics on input.

use quiver_serving::infer::Elements;

/// `raw` as `count` elements of `datatype`; the error names the input.
pub(crate) fn decode(
    name: &str,
    datatype: &str,
    raw: &[u8],
    count: usize,
) -> Result<Elements, String> {
    let width = match datatype {
        "BOOL" | "INT8" | "UINT8" => 1,
        "INT16" | "UINT16" | "FP16" => 2,
        "INT32" | "UINT32" | "FP32" => 4,
        "INT64" | "UINT64" | "FP64" => 8,
        "BYTES" => return strings(name, raw, count).map(Elements::Strings),
        other => return Err(format!("input {name:?}: unknown datatype {other:?}")),
    };
    if count.checked_mul(width) != Some(raw.len()) {
        return Err(format!(
            "input {name:?}: {count} {datatype} elements need {} bytes, binary_data_size is {}",
            count.saturating_mul(width),
            raw.len()
        ));
    }
    let numbers = raw
        .chunks_exact(width)
        .map(|b| number(datatype, b))
        .collect();
    Ok(Elements::Numbers(numbers))
}

fn number(datatype: &str, b: &[u8]) -> f64 {
    let a2 = || [b[0], b[1]];
    let a4 = || [b[0], b[1], b[2], b[3]];
    let a8 = || [b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]];
    match datatype {
        "BOOL" => f64::from(u8::from(b[0] != 0)),
        "INT8" => f64::from(b[0] as i8),
        "UINT8" => f64::from(b[0]),
        "INT16" => f64::from(i16::from_le_bytes(a2())),
        "UINT16" => f64::from(u16::from_le_bytes(a2())),
        "FP16" => f16_to_f64(u16::from_le_bytes(a2())),
        "INT32" => f64::from(i32::from_le_bytes(a4())),
        "UINT32" => f64::from(u32::from_le_bytes(a4())),
        "FP32" => f64::from(f32::from_le_bytes(a4())),
        "INT64" => i64::from_le_bytes(a8()) as f64,
        "UINT64" => u64::from_le_bytes(a8()) as f64,
        _ => f64::from_le_bytes(a8()),
    }
}

/// IEEE 754 half precision to f64 (subnormals, infinities and NaN included).
fn f16_to_f64(h: u16) -> f64 {
    let sign = if h & 0x8000 != 0 { -1.0 } else { 1.0 };
    let exp = i32::from((h >> 10) & 0x1f);
    let frac = f64::from(h & 0x3ff);
    sign * match exp {
        0 => frac * 2f64.powi(-24),
        31 if frac == 0.0 => f64::INFINITY,
        31 => f64::NAN,
        e => (1.0 + frac / 1024.0) * 2f64.powi(e - 15),
    }
}

fn strings(name: &str, mut raw: &[u8], count: usize) -> Result<Vec<String>, String> {
    let mut out = Vec::with_capacity(count.min(raw.len() / 4));
    while out.len() < count {
        let (len, rest) = raw
            .split_first_chunk::<4>()
            .ok_or_else(|| format!("input {name:?}: BYTES element {} is cut off", out.len()))?;
        let len = u32::from_le_bytes(*len) as usize;
        if len > rest.len() {
            return Err(format!(
                "input {name:?}: BYTES element {} claims {len} bytes, {} are left",
                out.len(),
                rest.len()
            ));
        }
        let (s, rest) = rest.split_at(len);
        let s = std::str::from_utf8(s)
            .map_err(|_| format!("input {name:?}: BYTES element {} is not UTF-8", out.len()))?;
        out.push(s.to_string());
        raw = rest;
    }
    if !raw.is_empty() {
        return Err(format!(
            "input {name:?}: {} bytes after its {count} BYTES elements",
            raw.len()
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn numbers(e: Elements) -> Vec<f64> {
        match e {
            Elements::Numbers(n) => n,
            Elements::Strings(_) => panic!("numbers expected"),
        }
    }

    #[test]
    fn numbers_decode_little_endian_at_their_width() {
        let fp32: Vec<u8> = [1.5f32, -2.0]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        assert_eq!(numbers(decode("x", "FP32", &fp32, 2).unwrap()), [1.5, -2.0]);
        let i64s: Vec<u8> = [-7i64].iter().flat_map(|x| x.to_le_bytes()).collect();
        assert_eq!(numbers(decode("x", "INT64", &i64s, 1).unwrap()), [-7.0]);
        assert_eq!(
            numbers(decode("x", "BOOL", &[0, 1, 2], 3).unwrap()),
            [0.0, 1.0, 1.0]
        );
        // FP16: 1.0 = 0x3c00, -2.0 = 0xc000, 65504 = 0x7bff, smallest subnormal 0x0001.
        let h: Vec<u8> = [0x3c00u16, 0xc000, 0x7bff, 0x0001]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        assert_eq!(
            numbers(decode("x", "FP16", &h, 4).unwrap()),
            [1.0, -2.0, 65504.0, 2f64.powi(-24)]
        );
        let nan: Vec<u8> = f64::NAN.to_le_bytes().to_vec();
        assert!(
            numbers(decode("x", "FP64", &nan, 1).unwrap())[0].is_nan(),
            "NaN is a missing value"
        );
        assert!(decode("x", "FP64", &[0; 7], 1)
            .unwrap_err()
            .contains("8 bytes"));
        assert!(decode("x", "COMPLEX", &[], 0).is_err());
    }

    #[test]
    fn bytes_elements_are_length_prefixed() {
        let mut raw = Vec::new();
        for s in ["u1", "", "ü"] {
            raw.extend_from_slice(&(s.len() as u32).to_le_bytes());
            raw.extend_from_slice(s.as_bytes());
        }
        match decode("k", "BYTES", &raw, 3).unwrap() {
            Elements::Strings(s) => assert_eq!(s, ["u1", "", "ü"]),
            Elements::Numbers(_) => panic!("strings expected"),
        }
        assert!(decode("k", "BYTES", &raw, 4)
            .unwrap_err()
            .contains("cut off"));
        assert!(decode("k", "BYTES", &raw, 2).unwrap_err().contains("after"));
        assert!(decode("k", "BYTES", &[9, 0, 0, 0, b'a'], 1)
            .unwrap_err()
            .contains("claims"));
    }

    proptest! {
        #[test]
        fn no_input_makes_a_decoder_panic(raw in proptest::collection::vec(any::<u8>(), 0..64), count in 0usize..40, t in 0usize..13) {
            let types = ["BOOL", "INT8", "UINT8", "INT16", "UINT16", "FP16", "INT32", "UINT32", "FP32", "INT64", "UINT64", "FP64", "BYTES"];
            let _ = decode("x", types[t], &raw, count);
        }

        #[test]
        fn fp64_round_trips(xs in proptest::collection::vec(any::<f64>(), 0..16)) {
            let raw: Vec<u8> = xs.iter().flat_map(|x| x.to_le_bytes()).collect();
            let got = numbers(decode("x", "FP64", &raw, xs.len()).unwrap());
            prop_assert_eq!(got.len(), xs.len());
            for (g, x) in got.iter().zip(&xs) {
                prop_assert!(g.to_bits() == x.to_bits());
            }
        }
    }
}
