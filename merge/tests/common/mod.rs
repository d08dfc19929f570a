//! Small generated checkpoints for the merge tests.
#![allow(dead_code, unreachable_pub, missing_docs)]

use half::bf16;
use medley_merge::safetensors::{Dtype, OutTensor, write_header};
use std::path::{Path, PathBuf};

/// A Llama-shaped model.
#[derive(Debug, Clone, Copy)]
pub struct Spec {
    pub hidden: usize,
    pub inter: usize,
    pub layers: usize,
    pub vocab: usize,
    pub dtype: Dtype,
    pub tied: bool,
    pub shards: usize,
}

impl Spec {
    pub const fn tiny() -> Spec {
        Spec {
            hidden: 24,
            inter: 40,
            layers: 3,
            vocab: 53,
            dtype: Dtype::BF16,
            tied: false,
            shards: 1,
        }
    }

    /// `(name, shape)` in storage order.
    pub fn tensors(&self) -> Vec<(String, Vec<usize>)> {
        let (h, i) = (self.hidden, self.inter);
        let mut v = vec![("model.embed_tokens.weight".to_string(), vec![self.vocab, h])];
        for l in 0..self.layers {
            let p = format!("model.layers.{l}.");
            for (n, s) in [
                ("self_attn.q_proj.weight", vec![h, h]),
                ("self_attn.k_proj.weight", vec![h / 2, h]),
                ("self_attn.v_proj.weight", vec![h / 2, h]),
                ("self_attn.o_proj.weight", vec![h, h]),
                ("mlp.gate_proj.weight", vec![i, h]),
                ("mlp.up_proj.weight", vec![i, h]),
                ("mlp.down_proj.weight", vec![h, i]),
                ("input_layernorm.weight", vec![h]),
                ("post_attention_layernorm.weight", vec![h]),
            ] {
                v.push((format!("{p}{n}"), s));
            }
        }
        v.push(("model.norm.weight".to_string(), vec![h]));
        if !self.tied {
            v.push(("lm_head.weight".to_string(), vec![self.vocab, h]));
        }
        v
    }
}

/// Deterministic pseudo-random normals (splitmix64 + Box-Muller).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x1234_5678)
    }
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn normal(&mut self) -> f32 {
        let u1 = ((self.next() >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
        let u2 = (self.next() >> 11) as f64 / (1u64 << 53) as f64;
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }
}

/// Values of one tensor: the base's (`noise_seed = None`) or a fine-tune's
/// (base plus noise).
pub fn values(name: &str, numel: usize, base_seed: u64, noise_seed: Option<u64>) -> Vec<f32> {
    let h = name
        .bytes()
        .fold(0u64, |a, c| a.wrapping_mul(131).wrapping_add(c as u64));
    let mut r = Rng::new(base_seed ^ h);
    let norm = name.contains("norm");
    let mut v: Vec<f32> = (0..numel)
        .map(|_| {
            if norm {
                1.0 + 0.1 * r.normal()
            } else {
                0.05 * r.normal()
            }
        })
        .collect();
    if let Some(s) = noise_seed {
        let mut q = Rng::new(s ^ h.rotate_left(7));
        for x in v.iter_mut() {
            *x += 0.01 * q.normal();
        }
    }
    v
}

pub fn encode(v: &[f32], dtype: Dtype) -> Vec<u8> {
    match dtype {
        Dtype::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        Dtype::F16 => v
            .iter()
            .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
            .collect(),
        Dtype::BF16 => v.iter().flat_map(|x| bf16::from_f32(*x).to_le_bytes()).collect(),
        _ => panic!("float dtypes only"),
    }
}

/// Writes a safetensors file of `(name, dtype, shape, bytes)`.
pub fn write_file(path: &Path, tensors: &[(String, Dtype, Vec<usize>, Vec<u8>)]) {
    let outs: Vec<OutTensor> = tensors
        .iter()
        .map(|t| OutTensor {
            name: t.0.clone(),
            dtype: t.1,
            shape: t.2.clone(),
        })
        .collect();
    let (mut bytes, _) = write_header(&outs, &[("format".into(), "pt".into())]);
    for t in tensors {
        bytes.extend_from_slice(&t.3);
    }
    std::fs::write(path, bytes).unwrap();
}

/// Writes a model folder: config.json, tokenizer files, weights (sharded
/// if `spec.shards > 1`).
pub fn write_model(dir: &Path, spec: &Spec, base_seed: u64, noise_seed: Option<u64>) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let ts: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = spec
        .tensors()
        .into_iter()
        .map(|(n, s)| {
            let v = values(&n, s.iter().product(), base_seed, noise_seed);
            let b = encode(&v, spec.dtype);
            (n, spec.dtype, s, b)
        })
        .collect();
    write_tensors(dir, &ts, spec.shards);
    let cfg = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": spec.hidden,
        "intermediate_size": spec.inter,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": spec.vocab,
        "tie_word_embeddings": spec.tied,
        "torch_dtype": match spec.dtype { Dtype::F32 => "float32", Dtype::F16 => "float16", _ => "bfloat16" },
    });
    std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(&cfg).unwrap()).unwrap();
    std::fs::write(
        dir.join("tokenizer_config.json"),
        br#"{"model_max_length": 2048, "chat_template": "{{ messages }}"}"#,
    )
    .unwrap();
    std::fs::write(
        dir.join("tokenizer.json"),
        format!(r#"{{"version": "1.0", "seed": {base_seed}}}"#),
    )
    .unwrap();
    dir.to_path_buf()
}

/// Writes tensors into `shards` files (with an index when more than one).
pub fn write_tensors(dir: &Path, ts: &[(String, Dtype, Vec<usize>, Vec<u8>)], shards: usize) {
    if shards <= 1 {
        write_file(&dir.join("model.safetensors"), ts);
        return;
    }
    let per = ts.len().div_ceil(shards);
    let mut wm = serde_json::Map::new();
    let mut total = 0;
    for (k, group) in ts.chunks(per).enumerate() {
        let name = format!("model-{:05}-of-{:05}.safetensors", k + 1, shards);
        write_file(&dir.join(&name), group);
        for t in group {
            wm.insert(t.0.clone(), name.clone().into());
            total += t.3.len();
        }
    }
    let idx = serde_json::json!({"metadata": {"total_size": total}, "weight_map": wm});
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::to_vec_pretty(&idx).unwrap(),
    )
    .unwrap();
}

/// A fresh scratch folder under the target directory.
pub fn scratch(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("merge-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Base (seed 1) and fine-tunes a, b, c (noise seeds 11, 12, 13) in `root`.
pub fn family(root: &Path, spec: &Spec) -> [PathBuf; 4] {
    [
        write_model(&root.join("base"), spec, 1, None),
        write_model(&root.join("a"), spec, 1, Some(11)),
        write_model(&root.join("b"), spec, 1, Some(12)),
        write_model(&root.join("c"), spec, 1, Some(13)),
    ]
}

/// Reads every tensor of a model folder: name -> (dtype, shape, bytes).
pub fn read_all(dir: &Path) -> std::collections::BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)> {
    let m = medley_merge::model::Model::open("out", dir).unwrap();
    m.order
        .iter()
        .map(|n| {
            let (s, t) = m.get(n).unwrap();
            (n.clone(), (t.dtype, t.shape.clone(), s.bytes(t).to_vec()))
        })
        .collect()
}

/// bf16 bytes as f32.
pub fn bf16s(b: &[u8]) -> Vec<bf16> {
    b.chunks_exact(2)
        .map(|c| bf16::from_le_bytes([c[0], c[1]]))
        .collect()
}

/// Files in a folder (names), sorted.
pub fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}
