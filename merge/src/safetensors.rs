//! The safetensors format: reading and checking headers, writing them.
//!
//! A file is an 8-byte little-endian header length `L`, `L` bytes of JSON
//! (`{name: {dtype, shape, data_offsets: [start, end]}, "__metadata__": {..}}`)
//! and the data, with offsets relative to the end of the header.
//! [`parse_header`] checks everything a merge relies on before any data is
//! read: the length fits the file, the JSON is an object of well-formed
//! entries, every byte range is `numel x element size` long, lies inside the
//! file and overlaps no other. A header that lies about its offsets is
//! therefore an error here, not a crash or garbage later.

use std::fmt;

/// Largest header accepted (the safetensors crate's limit).
pub const MAX_HEADER: u64 = 100 * 1000 * 1000;

/// A tensor dtype of the safetensors format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(missing_docs)]
pub enum Dtype {
    Bool,
    U8,
    I8,
    U16,
    I16,
    U32,
    I32,
    U64,
    I64,
    F16,
    BF16,
    F32,
    F64,
    F8E4M3,
    F8E5M2,
    F8E8M0,
    F8E4M3Fnuz,
    F8E5M2Fnuz,
    C64,
}

impl Dtype {
    /// Every dtype, with its header name.
    const NAMES: [(Dtype, &'static str); 19] = [
        (Dtype::Bool, "BOOL"),
        (Dtype::U8, "U8"),
        (Dtype::I8, "I8"),
        (Dtype::U16, "U16"),
        (Dtype::I16, "I16"),
        (Dtype::U32, "U32"),
        (Dtype::I32, "I32"),
        (Dtype::U64, "U64"),
        (Dtype::I64, "I64"),
        (Dtype::F16, "F16"),
        (Dtype::BF16, "BF16"),
        (Dtype::F32, "F32"),
        (Dtype::F64, "F64"),
        (Dtype::F8E4M3, "F8_E4M3"),
        (Dtype::F8E5M2, "F8_E5M2"),
        (Dtype::F8E8M0, "F8_E8M0"),
        (Dtype::F8E4M3Fnuz, "F8_E4M3FNUZ"),
        (Dtype::F8E5M2Fnuz, "F8_E5M2FNUZ"),
        (Dtype::C64, "C64"),
    ];

    /// The dtype with header name `s`.
    pub fn from_name(s: &str) -> Option<Dtype> {
        Self::NAMES.iter().find(|(_, n)| *n == s).map(|(d, _)| *d)
    }

    /// The header name.
    pub fn name(self) -> &'static str {
        Self::NAMES
            .iter()
            .find(|(d, _)| *d == self)
            .map(|(_, n)| *n)
            .expect("every dtype is named")
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::Bool | Dtype::U8 | Dtype::I8 => 1,
            Dtype::F8E4M3 | Dtype::F8E5M2 | Dtype::F8E8M0 | Dtype::F8E4M3Fnuz | Dtype::F8E5M2Fnuz => 1,
            Dtype::U16 | Dtype::I16 | Dtype::F16 | Dtype::BF16 => 2,
            Dtype::U32 | Dtype::I32 | Dtype::F32 => 4,
            Dtype::U64 | Dtype::I64 | Dtype::F64 | Dtype::C64 => 8,
        }
    }

    /// True for the dtypes medley merges (f32, f16, bf16).
    pub fn is_mergeable(self) -> bool {
        matches!(self, Dtype::F32 | Dtype::F16 | Dtype::BF16)
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One tensor of a header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// Its name.
    pub name: String,
    /// Its dtype.
    pub dtype: Dtype,
    /// Its shape.
    pub shape: Vec<usize>,
    /// Byte range in the data section (relative to its start).
    pub start: u64,
    /// End of the byte range (exclusive).
    pub end: u64,
}

impl TensorInfo {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A checked header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// The tensors, in file order of their data.
    pub tensors: Vec<TensorInfo>,
    /// The `__metadata__` entries.
    pub metadata: Vec<(String, String)>,
    /// Offset of the data section in the file (`8 + L`).
    pub data_start: u64,
}

/// Why a header is invalid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderError {
    /// The tensor concerned, if any.
    pub tensor: Option<String>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for HeaderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.tensor {
            Some(t) => write!(f, "tensor `{t}`: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for HeaderError {}

fn herr(tensor: Option<&str>, message: impl Into<String>) -> HeaderError {
    HeaderError {
        tensor: tensor.map(str::to_string),
        message: message.into(),
    }
}

/// The header length stored in the first 8 bytes, checked against
/// [`MAX_HEADER`] and the file length.
pub fn header_len(prefix: &[u8], file_len: u64) -> Result<u64, HeaderError> {
    if file_len < 8 || prefix.len() < 8 {
        return Err(herr(
            None,
            format!("file is {file_len} bytes, too short for a safetensors header (truncated?)"),
        ));
    }
    let l = u64::from_le_bytes(prefix[..8].try_into().expect("8 bytes"));
    if l > MAX_HEADER {
        return Err(herr(
            None,
            format!(
                "header length {l} exceeds the {MAX_HEADER}-byte limit (not a safetensors file, or corrupt)"
            ),
        ));
    }
    if l > file_len - 8 {
        return Err(herr(
            None,
            format!("header length {l} runs past the end of the {file_len}-byte file (truncated or corrupt)"),
        ));
    }
    Ok(l)
}

/// Parses and checks a header. `bytes` starts at the beginning of the file
/// and holds at least the 8-byte length and the JSON; `file_len` is the
/// whole file's length.
pub fn parse_header(bytes: &[u8], file_len: u64) -> Result<Header, HeaderError> {
    let l = header_len(bytes, file_len)?;
    let json = bytes
        .get(8..8 + l as usize)
        .ok_or_else(|| herr(None, "header bytes missing (truncated file)"))?;
    let text = std::str::from_utf8(json).map_err(|_| herr(None, "header is not UTF-8 JSON"))?;
    let v: serde_json::Value = serde_json::from_str(text.trim_end_matches([' ', '\0']))
        .map_err(|e| herr(None, format!("header is not valid JSON: {e}")))?;
    let obj = v
        .as_object()
        .ok_or_else(|| herr(None, "header JSON is not an object"))?;
    let data_len = file_len - 8 - l;
    let mut tensors = Vec::with_capacity(obj.len());
    let mut metadata = Vec::new();
    for (name, e) in obj {
        if name == "__metadata__" {
            let m = e
                .as_object()
                .ok_or_else(|| herr(None, "`__metadata__` is not an object"))?;
            for (k, v) in m {
                let s = v
                    .as_str()
                    .ok_or_else(|| herr(None, format!("`__metadata__.{k}` is not a string")))?;
                metadata.push((k.clone(), s.to_string()));
            }
            continue;
        }
        let t = Some(name.as_str());
        let e = e.as_object().ok_or_else(|| herr(t, "entry is not an object"))?;
        for k in e.keys() {
            if !matches!(k.as_str(), "dtype" | "shape" | "data_offsets") {
                return Err(herr(t, format!("unknown field `{k}`")));
            }
        }
        let dname = e
            .get("dtype")
            .and_then(|d| d.as_str())
            .ok_or_else(|| herr(t, "missing `dtype`"))?;
        let dtype = Dtype::from_name(dname).ok_or_else(|| herr(t, format!("unknown dtype `{dname}`")))?;
        let shape_v = e
            .get("shape")
            .and_then(|s| s.as_array())
            .ok_or_else(|| herr(t, "missing `shape`"))?;
        let mut shape = Vec::with_capacity(shape_v.len());
        for d in shape_v {
            let d = d
                .as_u64()
                .ok_or_else(|| herr(t, "shape entries must be non-negative integers"))?;
            shape.push(usize::try_from(d).map_err(|_| herr(t, "shape entry too large"))?);
        }
        let offs = e
            .get("data_offsets")
            .and_then(|o| o.as_array())
            .ok_or_else(|| herr(t, "missing `data_offsets`"))?;
        if offs.len() != 2 {
            return Err(herr(t, "`data_offsets` must be [start, end]"));
        }
        let start = offs[0]
            .as_u64()
            .ok_or_else(|| herr(t, "`data_offsets` must be integers"))?;
        let end = offs[1]
            .as_u64()
            .ok_or_else(|| herr(t, "`data_offsets` must be integers"))?;
        let numel = shape
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d as u64))
            .ok_or_else(|| herr(t, "shape overflows"))?;
        let bytes_needed = numel
            .checked_mul(dtype.size() as u64)
            .ok_or_else(|| herr(t, "byte size overflows"))?;
        if end < start || end - start != bytes_needed {
            return Err(herr(
                t,
                format!(
                    "data_offsets [{start}, {end}] hold {} bytes but shape {shape:?} of {dtype} needs {bytes_needed}",
                    end.wrapping_sub(start) as i128
                ),
            ));
        }
        if end > data_len {
            return Err(herr(
                t,
                format!(
                    "data_offsets end {end} lies past the {data_len}-byte data section (truncated or corrupt file)"
                ),
            ));
        }
        tensors.push(TensorInfo {
            name: name.clone(),
            dtype,
            shape,
            start,
            end,
        });
    }
    tensors.sort_by_key(|t| (t.start, t.end));
    for w in tensors.windows(2) {
        if w[1].start < w[0].end {
            return Err(herr(
                Some(&w[1].name),
                format!("its bytes overlap those of `{}`", w[0].name),
            ));
        }
    }
    Ok(Header {
        tensors,
        metadata,
        data_start: 8 + l,
    })
}

/// One entry of a header to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutTensor {
    /// Name.
    pub name: String,
    /// Dtype.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<usize>,
}

/// Serializes a header for `tensors` laid out in the given order without
/// gaps: returns the 8-byte length plus the JSON (padded with spaces to a
/// multiple of 8, so the data section starts 8-byte aligned) and each
/// tensor's byte offset in the data section.
pub fn write_header(tensors: &[OutTensor], metadata: &[(String, String)]) -> (Vec<u8>, Vec<u64>) {
    let mut obj = serde_json::Map::new();
    if !metadata.is_empty() {
        let mut m = serde_json::Map::new();
        for (k, v) in metadata {
            m.insert(k.clone(), serde_json::Value::String(v.clone()));
        }
        obj.insert("__metadata__".into(), serde_json::Value::Object(m));
    }
    let mut offsets = Vec::with_capacity(tensors.len());
    let mut at = 0u64;
    for t in tensors {
        let len = (t.shape.iter().product::<usize>() * t.dtype.size()) as u64;
        offsets.push(at);
        obj.insert(
            t.name.clone(),
            serde_json::json!({"dtype": t.dtype.name(), "shape": t.shape, "data_offsets": [at, at + len]}),
        );
        at += len;
    }
    let mut json = serde_json::to_vec(&serde_json::Value::Object(obj)).expect("JSON of strings and numbers");
    while !json.len().is_multiple_of(8) {
        json.push(b' ');
    }
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&json);
    (out, offsets)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(json: &str, data: usize) -> Vec<u8> {
        let mut v = (json.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(json.as_bytes());
        v.resize(v.len() + data, 0);
        v
    }

    #[test]
    fn a_written_header_parses_back() {
        let t = [
            OutTensor {
                name: "a".into(),
                dtype: Dtype::F32,
                shape: vec![2, 3],
            },
            OutTensor {
                name: "b".into(),
                dtype: Dtype::BF16,
                shape: vec![5],
            },
        ];
        let (mut bytes, offs) = write_header(&t, &[("format".into(), "pt".into())]);
        assert_eq!(offs, [0, 24]);
        assert_eq!((bytes.len() - 8) % 8, 0);
        bytes.resize(bytes.len() + 34, 0);
        let h = parse_header(&bytes, bytes.len() as u64).unwrap();
        assert_eq!(h.tensors.len(), 2);
        assert_eq!(h.tensors[1].shape, [5]);
        assert_eq!(h.metadata, [("format".to_string(), "pt".to_string())]);
    }

    #[test]
    fn lies_are_caught() {
        let bad = |json: &str, data: usize| {
            let f = file(json, data);
            parse_header(&f, f.len() as u64).unwrap_err().to_string()
        };
        assert!(bad(r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}"#, 8).contains("needs 8"));
        assert!(bad(r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#, 4).contains("past the"));
        assert!(
            bad(r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#, 16)
                .contains("overlap")
        );
        assert!(bad(r#"{"a":{"dtype":"Q4","shape":[2],"data_offsets":[0,8]}}"#, 8).contains("unknown dtype"));
        assert!(bad(r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}}"#, 8).contains("hold"));
        assert!(bad("not json", 0).contains("not valid JSON"));
        assert!(bad(r#"[1]"#, 0).contains("not an object"));
        let mut f = file("{}", 0);
        f[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
        assert!(
            parse_header(&f, f.len() as u64)
                .unwrap_err()
                .to_string()
                .contains("limit")
        );
        f[..8].copy_from_slice(&100u64.to_le_bytes());
        assert!(
            parse_header(&f, f.len() as u64)
                .unwrap_err()
                .to_string()
                .contains("past the end")
        );
        assert!(
            parse_header(&f[..4], 4)
                .unwrap_err()
                .to_string()
                .contains("too short")
        );
    }
}
