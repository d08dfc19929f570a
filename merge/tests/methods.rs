//! Every merge method end to end on generated checkpoints: the output has
//! the reference model's names, shapes and dtypes, and every tensor holds
//! exactly the bits medley-core's one-shot function gives for the same
//! inputs and parameters. Also: 1 thread vs many and tiny chunks vs whole
//! tensors give identical files; sharded inputs and outputs; gradients,
//! filters, slices and passthrough.

mod common;

use common::*;
use half::bf16;
use medley_core::merge::gta::{self, GtaOptions, TaskParams};
use medley_core::merge::linear::linear;
use medley_core::merge::sce::{SceOptions, sce};
use medley_core::merge::sphere::{self, KarcherOptions, MultislerpOptions, NuslerpOptions, SlerpOptions};
use medley_core::merge::stock::{StockOptions, model_stock};
use medley_merge::plan::tensor_id;
use medley_merge::safetensors::Dtype;
use medley_merge::{MergeOptions, NoProgress, PlanOptions};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

type Tensors = BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>;

fn merge_with(root: &Path, cfg: &str, out: &str, opts: &MergeOptions) -> PathBuf {
    let cpath = root.join(format!("{out}.yml"));
    std::fs::write(&cpath, cfg).unwrap();
    let o = root.join(out);
    let cancel = AtomicBool::new(false);
    medley_merge::merge(&cpath, &o, opts, &cancel, &NoProgress, &mut |_| {})
        .unwrap_or_else(|e| panic!("merge {out} failed: {e}"));
    o
}

fn opts_seed(seed: u64) -> MergeOptions {
    MergeOptions {
        plan: PlanOptions {
            random_seed: Some(seed),
            ..Default::default()
        },
        ..Default::default()
    }
}

struct Fam {
    root: PathBuf,
    paths: [PathBuf; 4],
    t: [Tensors; 4],
}

fn fam(name: &str, spec: &Spec) -> Fam {
    let root = scratch(name);
    let paths = family(&root, spec);
    let t = [
        read_all(&paths[0]),
        read_all(&paths[1]),
        read_all(&paths[2]),
        read_all(&paths[3]),
    ];
    Fam { root, paths, t }
}

impl Fam {
    fn p(&self, i: usize) -> String {
        self.paths[i].display().to_string()
    }
    fn v(&self, i: usize, name: &str) -> Vec<bf16> {
        bf16s(&self.t[i][name].2)
    }
}

/// Checks names, shapes, dtypes against the base and every tensor against
/// `expect(name, shape) -> bf16 values`.
fn check(out: &Path, f: &Fam, expect: &dyn Fn(&str, &[usize]) -> Vec<bf16>) {
    let got = read_all(out);
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        f.t[0].keys().collect::<Vec<_>>(),
        "{}",
        out.display()
    );
    for (name, (dt, shape, bytes)) in &got {
        assert_eq!(*dt, Dtype::BF16, "{name}");
        assert_eq!(shape, &f.t[0][name].1, "{name}");
        let want = expect(name, shape);
        let g = bf16s(bytes);
        let diff = g
            .iter()
            .zip(&want)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        assert_eq!(
            diff,
            0,
            "{}: {name}: {diff} of {} elements differ from medley-core",
            out.display(),
            g.len()
        );
    }
}

fn out_of(n: usize) -> Vec<bf16> {
    vec![bf16::from_f32(f32::NAN); n]
}

/// medley-core's one-shot task-vector merge of `models` over `base`.
fn gta_expected(models: &[&[bf16]], base: &[bf16], ps: &[TaskParams], opts: &GtaOptions) -> Vec<bf16> {
    let mut out = out_of(base.len());
    let plan = gta::Gta::new(base.len(), ps, opts).unwrap();
    let mut scratch = vec![0u32; plan.scratch_len()];
    gta::merge(models, base, ps, opts, &mut scratch, &mut out).unwrap();
    out
}

#[test]
fn every_method_matches_the_core_bit_for_bit() {
    let f = fam("methods", &Spec::tiny());
    let (b, a, bb, c) = (f.p(0), f.p(1), f.p(2), f.p(3));
    let seed = 7;
    // linear
    let o = merge_with(
        &f.root,
        &format!(
            "merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.3}}\n  - model: {bb}\n    parameters: {{weight: 0.7}}\n"
        ),
        "linear",
        &opts_seed(seed),
    );
    check(&o, &f, &|n, _| {
        let mut out = out_of(f.v(1, n).len());
        linear(&[&f.v(1, n)[..], &f.v(2, n)[..]], &[0.3, 0.7], true, &mut out).unwrap();
        out
    });
    // The GTA family.
    type Preset = fn(&str, &[usize]) -> GtaOptions;
    let gta_cases: [(&str, &str, Preset, TaskParams); 8] = [
        (
            "task_arithmetic",
            "weight: 0.6",
            |_, _| GtaOptions::task_arithmetic(),
            TaskParams::new(0.6),
        ),
        (
            "ties",
            "weight: 0.6, density: 0.5",
            |_, _| GtaOptions::ties(),
            TaskParams::new(0.6).with_density(0.5),
        ),
        (
            "dare_ties",
            "weight: 0.6, density: 0.6",
            |n, _| GtaOptions::dare_ties(7, tensor_id(n)),
            TaskParams::new(0.6).with_density(0.6),
        ),
        (
            "dare_linear",
            "weight: 0.6, density: 0.6",
            |n, _| GtaOptions::dare_linear(7, tensor_id(n)),
            TaskParams::new(0.6).with_density(0.6),
        ),
        (
            "breadcrumbs",
            "weight: 0.6, density: 0.8, gamma: 0.05",
            |_, _| GtaOptions::breadcrumbs(),
            TaskParams::new(0.6).with_density(0.8).with_gamma(0.05),
        ),
        (
            "breadcrumbs_ties",
            "weight: 0.6, density: 0.8, gamma: 0.05",
            |_, _| GtaOptions::breadcrumbs_ties(),
            TaskParams::new(0.6).with_density(0.8).with_gamma(0.05),
        ),
        (
            "della",
            "weight: 0.6, density: 0.6, epsilon: 0.2",
            |n, s| GtaOptions::della((s.len() >= 2).then(|| s[s.len() - 1]), 7, tensor_id(n)),
            TaskParams::new(0.6).with_density(0.6).with_epsilon(0.2),
        ),
        (
            "della_linear",
            "weight: 0.6, density: 0.6, epsilon: 0.2",
            |n, s| GtaOptions::della_linear((s.len() >= 2).then(|| s[s.len() - 1]), 7, tensor_id(n)),
            TaskParams::new(0.6).with_density(0.6).with_epsilon(0.2),
        ),
    ];
    for (method, params, preset, tp) in gta_cases {
        let o = merge_with(
            &f.root,
            &format!(
                "merge_method: {method}\nbase_model: {b}\nmodels:\n  - model: {a}\n    parameters: {{{params}}}\n  - model: {bb}\n    parameters: {{{params}}}\n  - model: {c}\n    parameters: {{{params}}}\n"
            ),
            method,
            &opts_seed(seed),
        );
        check(&o, &f, &|n, s| {
            gta_expected(
                &[&f.v(1, n)[..], &f.v(2, n)[..], &f.v(3, n)[..]],
                &f.v(0, n),
                &[tp; 3],
                &preset(n, s),
            )
        });
    }
    // SLERP: v0 is the base.
    let o = merge_with(
        &f.root,
        &format!(
            "merge_method: slerp\nbase_model: {b}\nmodels:\n  - model: {b}\n  - model: {a}\nparameters:\n  t: 0.3\n"
        ),
        "slerp",
        &opts_seed(seed),
    );
    check(&o, &f, &|n, _| {
        let mut out = out_of(f.v(0, n).len());
        sphere::slerp(&f.v(0, n), &f.v(1, n), &SlerpOptions::new(0.3), &mut out).unwrap();
        out
    });
    // NuSLERP over a base, and row-wise.
    for (name, extra, row) in [
        ("nuslerp", "", false),
        ("nuslerp_rows", "parameters:\n  nuslerp_flatten: false\n", true),
    ] {
        let o = merge_with(
            &f.root,
            &format!(
                "merge_method: nuslerp\nbase_model: {b}\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.4}}\n  - model: {bb}\n    parameters: {{weight: 0.6}}\n{extra}"
            ),
            name,
            &opts_seed(seed),
        );
        check(&o, &f, &|n, s| {
            let mut out = out_of(f.v(0, n).len());
            let mut opts = NuslerpOptions::new();
            if row && s.len() >= 2 {
                opts.layout = sphere::Layout::Rows(s[s.len() - 1]);
            }
            let mut scratch = vec![0f64; 3 * s[s.len() - 1]];
            sphere::nuslerp(
                &f.v(1, n),
                &f.v(2, n),
                Some(&f.v(0, n)),
                [0.4, 0.6],
                &opts,
                &mut scratch,
                &mut out,
            )
            .unwrap();
            out
        });
    }
    // multi-SLERP without a base.
    let o = merge_with(
        &f.root,
        &format!(
            "merge_method: multislerp\nmodels:\n  - model: {a}\n    parameters: {{weight: 1}}\n  - model: {bb}\n    parameters: {{weight: 2}}\n  - model: {c}\n    parameters: {{weight: 1}}\n"
        ),
        "multislerp",
        &opts_seed(seed),
    );
    // The reference model is the first one; its names equal the base's.
    check(&o, &f, &|n, _| {
        let mut out = out_of(f.v(0, n).len());
        sphere::multislerp(
            &[&f.v(1, n)[..], &f.v(2, n)[..], &f.v(3, n)[..]],
            None,
            &[1.0, 2.0, 1.0],
            &MultislerpOptions::new(),
            &mut out,
        )
        .unwrap();
        out
    });
    // Karcher over three models.
    let o = merge_with(
        &f.root,
        &format!(
            "merge_method: karcher\nmodels:\n  - model: {a}\n  - model: {bb}\n  - model: {c}\nparameters:\n  max_iter: 20\n"
        ),
        "karcher",
        &opts_seed(seed),
    );
    check(&o, &f, &|n, _| {
        let mut out = out_of(f.v(0, n).len());
        let opts = KarcherOptions {
            max_iter: 20,
            ..KarcherOptions::new()
        };
        sphere::karcher(
            &[&f.v(1, n)[..], &f.v(2, n)[..], &f.v(3, n)[..]],
            &[1.0; 3],
            &opts,
            &mut out,
        )
        .unwrap();
        out
    });
    // Model Stock, whole tensor and filter-wise.
    for (name, fw) in [("model_stock", false), ("model_stock_rows", true)] {
        let o = merge_with(
            &f.root,
            &format!(
                "merge_method: model_stock\nbase_model: {b}\nmodels:\n  - model: {a}\n  - model: {bb}\n  - model: {c}\nparameters:\n  filter_wise: {fw}\n"
            ),
            name,
            &opts_seed(seed),
        );
        check(&o, &f, &|n, s| {
            let mut out = out_of(f.v(0, n).len());
            let opts = StockOptions {
                rows: fw.then(|| s[s.len() - 1]),
            };
            model_stock(
                &[&f.v(1, n)[..], &f.v(2, n)[..], &f.v(3, n)[..]],
                &f.v(0, n),
                &opts,
                &mut out,
            )
            .unwrap();
            out
        });
    }
    // SCE with a variance selection.
    let o = merge_with(
        &f.root,
        &format!(
            "merge_method: sce\nbase_model: {b}\nmodels:\n  - model: {a}\n  - model: {bb}\nparameters:\n  select_topk: 0.5\n"
        ),
        "sce",
        &opts_seed(seed),
    );
    check(&o, &f, &|n, _| {
        let mut out = out_of(f.v(0, n).len());
        let opts = SceOptions { select_topk: 0.5 };
        let plan = medley_core::merge::sce::Sce::new(out.len(), 2, &opts).unwrap();
        let mut scratch = vec![0u32; plan.scratch_len()];
        sce(
            &[&f.v(1, n)[..], &f.v(2, n)[..]],
            &f.v(0, n),
            &opts,
            &mut scratch,
            &mut out,
        )
        .unwrap();
        out
    });
    // Passthrough of one model, scaling the attention output projections.
    let o = merge_with(
        &f.root,
        &format!(
            "merge_method: passthrough\nmodels:\n  - model: {a}\n    parameters:\n      scale:\n        - filter: o_proj\n          value: 0.5\n        - value: 1.0\n"
        ),
        "passthrough",
        &opts_seed(seed),
    );
    check(&o, &f, &|n, _| {
        let mut out = out_of(f.v(0, n).len());
        let s = if n.contains("o_proj") { 0.5 } else { 1.0 };
        linear(&[&f.v(1, n)[..]], &[s], false, &mut out).unwrap();
        out
    });
}

#[test]
fn gradients_and_filters_follow_mergekit() {
    let f = fam(
        "gradients",
        &Spec {
            layers: 5,
            ..Spec::tiny()
        },
    );
    let (b, a) = (f.p(0), f.p(1));
    let o = merge_with(
        &f.root,
        &format!(
            "merge_method: slerp\nbase_model: {b}\nmodels:\n  - model: {b}\n  - model: {a}\nparameters:\n  t:\n    - filter: self_attn\n      value: [0, 0.5, 0.3, 0.7, 1]\n    - filter: mlp\n      value: [1, 0.5, 0.7, 0.3, 0]\n    - value: 0.25\n"
        ),
        "gslerp",
        &MergeOptions::default(),
    );
    let g_attn = [0.0, 0.5, 0.3, 0.7, 1.0];
    let g_mlp = [1.0, 0.5, 0.7, 0.3, 0.0];
    check(&o, &f, &|n, _| {
        // 5 layers: layer l sits at t = l / 4, exactly on the gradient's points.
        let t = match medley_merge::plan::layer_of(n) {
            Some((_, _, l)) if n.contains("self_attn") => g_attn[l],
            Some((_, _, l)) if n.contains("mlp") => g_mlp[l],
            _ => 0.25,
        };
        let mut out = out_of(f.v(0, n).len());
        sphere::slerp(&f.v(0, n), &f.v(1, n), &SlerpOptions::new(t as f32), &mut out).unwrap();
        out
    });
    // A per-model weight gradient with 3 points over 5 layers (interpolated),
    // and a filter on a per-model density.
    let bb = f.p(2);
    let o = merge_with(
        &f.root,
        &format!(
            "merge_method: ties\nbase_model: {b}\nmodels:\n  - model: {a}\n    parameters:\n      weight: [0.2, 0.6, 1.0]\n      density:\n        - filter: mlp\n          value: 0.3\n        - value: 0.7\n  - model: {bb}\n    parameters: {{weight: 0.5, density: 0.5}}\n"
        ),
        "gties",
        &MergeOptions::default(),
    );
    check(&o, &f, &|n, _| {
        let t = medley_merge::plan::layer_of(n).map_or(0.0, |(_, _, l)| l as f64 / 4.0);
        let w = medley_merge::plan::gradient_at(&[0.2, 0.6, 1.0], t) as f32;
        let d = if n.contains("mlp") { 0.3 } else { 0.7 };
        let ps = [
            TaskParams::new(w).with_density(d),
            TaskParams::new(0.5).with_density(0.5),
        ];
        gta_expected(
            &[&f.v(1, n)[..], &f.v(2, n)[..]],
            &f.v(0, n),
            &ps,
            &GtaOptions::ties(),
        )
    });
}

#[test]
fn slices_stack_layers_and_passthrough_copies_bytes() {
    let f = fam(
        "slices",
        &Spec {
            layers: 4,
            ..Spec::tiny()
        },
    );
    let (a, bb) = (f.p(1), f.p(2));
    let o = merge_with(
        &f.root,
        &format!(
            "merge_method: passthrough\nslices:\n  - sources:\n      - model: {a}\n        layer_range: [0, 3]\n  - sources:\n      - model: {bb}\n        layer_range: [1, 4]\ndtype: bfloat16\n"
        ),
        "franken",
        &MergeOptions::default(),
    );
    let got = read_all(&o);
    // 6 output layers: 0..3 from a's 0..3, 3..6 from b's 1..4.
    for l in 0..6 {
        let (src, sl) = if l < 3 { (1, l) } else { (2, l - 2) };
        for suffix in [
            "self_attn.q_proj.weight",
            "mlp.down_proj.weight",
            "input_layernorm.weight",
        ] {
            let on = format!("model.layers.{l}.{suffix}");
            let inn = format!("model.layers.{sl}.{suffix}");
            assert_eq!(got[&on].2, f.t[src][&inn].2, "{on} should be model {src}'s {inn}");
        }
    }
    assert!(!got.contains_key("model.layers.6.mlp.up_proj.weight"));
    // As mergekit: embeddings from the first slice's model, the final norm
    // and the head from the last slice's.
    assert_eq!(got["model.norm.weight"].2, f.t[2]["model.norm.weight"].2);
    assert_eq!(
        got["model.embed_tokens.weight"].2,
        f.t[1]["model.embed_tokens.weight"].2
    );
    assert_eq!(got["lm_head.weight"].2, f.t[2]["lm_head.weight"].2);
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(o.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["num_hidden_layers"], 6);
    assert_eq!(got.len(), 6 * 9 + 3);

    // A per-slice SLERP with different t per slice.
    let b = f.p(0);
    let o = merge_with(
        &f.root,
        &format!(
            "merge_method: slerp\nbase_model: {b}\nslices:\n  - sources:\n      - model: {b}\n        layer_range: [0, 2]\n      - model: {a}\n        layer_range: [0, 2]\n    parameters: {{t: 0.2}}\n  - sources:\n      - model: {b}\n        layer_range: [2, 4]\n      - model: {a}\n        layer_range: [2, 4]\n    parameters: {{t: 0.9}}\n"
        ),
        "slice_slerp",
        &MergeOptions::default(),
    );
    check(&o, &f, &|n, _| {
        // Layers 2.. and the tensors after the layers take the last slice's t.
        let t = match medley_merge::plan::layer_of(n) {
            Some((_, _, l)) if l >= 2 => 0.9,
            None if n != "model.embed_tokens.weight" => 0.9,
            _ => 0.2,
        };
        let mut out = out_of(f.v(0, n).len());
        sphere::slerp(&f.v(0, n), &f.v(1, n), &SlerpOptions::new(t), &mut out).unwrap();
        out
    });
}

fn files_of(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    listing(dir)
        .into_iter()
        .filter(|n| n.ends_with(".safetensors") || n.ends_with(".json"))
        .map(|n| (n.clone(), std::fs::read(dir.join(&n)).unwrap()))
        .collect()
}

#[test]
fn threads_and_chunks_do_not_change_a_bit() {
    let f = fam(
        "determinism",
        &Spec {
            vocab: 301,
            ..Spec::tiny()
        },
    );
    let (b, a, bb) = (f.p(0), f.p(1), f.p(2));
    for (method, params) in [
        ("ties", "weight: 0.7, density: 0.4"),
        ("dare_ties", "weight: 0.7, density: 0.4"),
        ("della", "weight: 0.7, density: 0.5, epsilon: 0.1"),
        ("breadcrumbs_ties", "weight: 0.7, density: 0.5, gamma: 0.1"),
    ] {
        let cfg = format!(
            "merge_method: {method}\nbase_model: {b}\nmodels:\n  - model: {a}\n    parameters: {{{params}}}\n  - model: {bb}\n    parameters: {{{params}}}\n"
        );
        let one = merge_with(
            &f.root,
            &cfg,
            &format!("{method}_1"),
            &MergeOptions {
                threads: Some(1),
                ..opts_seed(3)
            },
        );
        let many = merge_with(
            &f.root,
            &cfg,
            &format!("{method}_many"),
            &MergeOptions {
                threads: Some(4),
                chunk: 96, // whole rows of 24 for DELLA; many chunks per tensor
                ..opts_seed(3)
            },
        );
        assert_eq!(
            files_of(&one),
            files_of(&many),
            "{method}: 1 thread whole tensors vs 4 threads 96-element chunks"
        );
    }
    // SLERP and multi-SLERP too (statistics passes fed in chunks).
    let cfg = format!(
        "merge_method: slerp\nbase_model: {b}\nmodels:\n  - model: {b}\n  - model: {a}\nparameters: {{t: 0.4}}\n"
    );
    let one = merge_with(
        &f.root,
        &cfg,
        "slerp_1",
        &MergeOptions {
            threads: Some(1),
            ..Default::default()
        },
    );
    let many = merge_with(
        &f.root,
        &cfg,
        "slerp_many",
        &MergeOptions {
            threads: Some(3),
            chunk: 7,
            ..Default::default()
        },
    );
    assert_eq!(files_of(&one), files_of(&many));
}

#[test]
fn sharded_inputs_and_outputs() {
    let spec = Spec {
        shards: 3,
        ..Spec::tiny()
    };
    let root = scratch("sharded");
    let [b, a, bb, _] = family(&root, &spec);
    let flat = scratch("sharded-flat");
    let [fb, fa, fbb, _] = family(&flat, &Spec::tiny());
    let cfg = |b: &Path, a: &Path, bb: &Path| {
        format!(
            "merge_method: ties\nbase_model: {}\nmodels:\n  - model: {}\n    parameters: {{weight: 0.5, density: 0.5}}\n  - model: {}\n    parameters: {{weight: 0.5, density: 0.5}}\n",
            b.display(),
            a.display(),
            bb.display()
        )
    };
    let small = MergeOptions {
        shard_bytes: 6000,
        ..Default::default()
    };
    let o = merge_with(&root, &cfg(&b, &a, &bb), "out", &small);
    let files = listing(&o);
    let shards: Vec<&String> = files.iter().filter(|n| n.ends_with(".safetensors")).collect();
    assert!(shards.len() > 2, "{files:?}");
    let n = shards.len();
    for (i, s) in shards.iter().enumerate() {
        assert_eq!(**s, format!("model-{:05}-of-{n:05}.safetensors", i + 1));
    }
    let idx: serde_json::Value =
        serde_json::from_slice(&std::fs::read(o.join("model.safetensors.index.json")).unwrap()).unwrap();
    let total: u64 = read_all(&o).values().map(|t| t.2.len() as u64).sum();
    assert_eq!(idx["metadata"]["total_size"], total);
    assert_eq!(
        idx["weight_map"].as_object().unwrap().len(),
        Spec::tiny().tensors().len()
    );
    for f in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "mergekit_config.yml",
        "README.md",
    ] {
        assert!(files.iter().any(|x| x == f), "{f} missing: {files:?}");
    }
    // The same merge from unsharded inputs into one shard: same tensors.
    let o2 = merge_with(&flat, &cfg(&fb, &fa, &fbb), "out", &MergeOptions::default());
    assert_eq!(
        listing(&o2)
            .iter()
            .filter(|n| n.ends_with(".safetensors"))
            .count(),
        1
    );
    assert!(!o2.join("model.safetensors.index.json").exists());
    assert_eq!(read_all(&o), read_all(&o2));
}

#[test]
fn dtypes_tied_heads_and_vocabulary_policy() {
    let root = scratch("dtypes");
    let base = write_model(&root.join("base"), &Spec::tiny(), 1, None);
    let f32m = write_model(
        &root.join("f32"),
        &Spec {
            dtype: Dtype::F32,
            ..Spec::tiny()
        },
        1,
        Some(5),
    );
    let tied = write_model(
        &root.join("tied"),
        &Spec {
            tied: true,
            ..Spec::tiny()
        },
        1,
        Some(6),
    );
    // Mixed input dtypes, f16 output.
    let o = merge_with(
        &root,
        &format!(
            "merge_method: linear\nmodels:\n  - model: {}\n    parameters: {{weight: 0.5}}\n  - model: {}\n    parameters: {{weight: 0.5}}\nout_dtype: float16\n",
            base.display(),
            f32m.display()
        ),
        "mixed",
        &MergeOptions::default(),
    );
    let got = read_all(&o);
    let tb = read_all(&base);
    let tf = read_all(&f32m);
    for (n, (dt, _, bytes)) in &got {
        assert_eq!(*dt, Dtype::F16);
        let x: Vec<f32> = bf16s(&tb[n].2).iter().map(|v| v.to_f32()).collect();
        let y: Vec<f32> = tf[n]
            .2
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let mut want = vec![half::f16::ZERO; x.len()];
        linear(&[&x[..], &y[..]], &[0.5, 0.5], true, &mut want).unwrap();
        let g: Vec<half::f16> = bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]))
            .collect();
        assert_eq!(g, want, "{n}");
    }
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(o.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["torch_dtype"], "float16");
    // A tied model contributes its embeddings to lm_head.
    let o = merge_with(
        &root,
        &format!(
            "merge_method: linear\nmodels:\n  - model: {}\n    parameters: {{weight: 0.5}}\n  - model: {}\n    parameters: {{weight: 0.5}}\n",
            base.display(),
            tied.display()
        ),
        "tied_out",
        &MergeOptions::default(),
    );
    let got = read_all(&o);
    let tt = read_all(&tied);
    let x = bf16s(&tb["lm_head.weight"].2);
    let y = bf16s(&tt["model.embed_tokens.weight"].2);
    let mut want = out_of(x.len());
    linear(&[&x[..], &y[..]], &[0.5, 0.5], true, &mut want).unwrap();
    assert_eq!(bf16s(&got["lm_head.weight"].2), want);

    // Vocabulary mismatch: an error by default, shared rows + base rows with the policy.
    let big = write_model(
        &root.join("big"),
        &Spec {
            vocab: 60,
            ..Spec::tiny()
        },
        1,
        Some(9),
    );
    let cfg = format!(
        "merge_method: ties\nbase_model: {}\nmodels:\n  - model: {}\n    parameters: {{weight: 1.0, density: 0.5}}\n",
        base.display(),
        big.display()
    );
    std::fs::write(root.join("vocab.yml"), &cfg).unwrap();
    let cancel = AtomicBool::new(false);
    let e = medley_merge::merge(
        &root.join("vocab.yml"),
        &root.join("vocab_err"),
        &MergeOptions::default(),
        &cancel,
        &NoProgress,
        &mut |_| {},
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("vocabulary sizes differ") && e.contains("53 rows") && e.contains("60"),
        "{e}"
    );
    assert!(!root.join("vocab_err").exists());
    let o = merge_with(
        &root,
        &cfg,
        "vocab_base",
        &MergeOptions {
            plan: PlanOptions {
                vocab: medley_merge::VocabPolicy::Base,
                ..Default::default()
            },
            ..Default::default()
        },
    );
    let got = read_all(&o);
    let tg = read_all(&big);
    let n = "model.embed_tokens.weight";
    assert_eq!(got[n].1, vec![53, 24]);
    // Rows 0..53 are all shared here (the base is the smaller one).
    let shared = 53 * 24;
    let ps = [TaskParams::new(1.0).with_density(0.5)];
    let want = gta_expected(
        &[&bf16s(&tg[n].2)[..shared]],
        &bf16s(&tb[n].2),
        &ps,
        &GtaOptions::ties(),
    );
    assert_eq!(bf16s(&got[n].2), want);
    // The base has the larger vocabulary: its extra rows are copied.
    let cfg = format!(
        "merge_method: ties\nbase_model: {}\nmodels:\n  - model: {}\n    parameters: {{weight: 1.0, density: 0.5}}\n",
        big.display(),
        base.display()
    );
    let o = merge_with(
        &root,
        &cfg,
        "vocab_tail",
        &MergeOptions {
            plan: PlanOptions {
                vocab: medley_merge::VocabPolicy::Base,
                ..Default::default()
            },
            ..Default::default()
        },
    );
    let got = read_all(&o);
    for n in ["model.embed_tokens.weight", "lm_head.weight"] {
        assert_eq!(got[n].1, vec![60, 24]);
        let want = gta_expected(
            &[&bf16s(&tb[n].2)[..]],
            &bf16s(&tg[n].2)[..shared],
            &ps,
            &GtaOptions::ties(),
        );
        let g = bf16s(&got[n].2);
        assert_eq!(&g[..shared], &want[..], "{n}: shared rows");
        assert_eq!(
            &got[n].2[shared * 2..],
            &tg[n].2[shared * 2..],
            "{n}: rows 53..60 are the base's"
        );
    }
}

#[test]
fn side_files_tokenizer_source_and_chat_template() {
    let f = fam("side", &Spec::tiny());
    let (b, a, bb) = (f.p(0), f.p(1), f.p(2));
    let cfg = format!(
        "merge_method: ties\nbase_model: {b}\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.5, density: 0.5}}\n  - model: {bb}\n    parameters: {{weight: 0.5, density: 0.5}}\ntokenizer_source: {bb}\nchat_template: chatml\ndtype: float32\n"
    );
    let o = merge_with(&f.root, &cfg, "side", &MergeOptions::default());
    // The tokenizer is b's (the generator writes each model's seed into it).
    assert_eq!(
        std::fs::read(o.join("tokenizer.json")).unwrap(),
        std::fs::read(f.paths[2].join("tokenizer.json")).unwrap()
    );
    assert_eq!(
        std::fs::read_to_string(o.join("chat_template.jinja")).unwrap(),
        medley_merge::CHATML
    );
    let tc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(o.join("tokenizer_config.json")).unwrap()).unwrap();
    assert_eq!(tc["chat_template"], medley_merge::CHATML);
    assert_eq!(tc["model_max_length"], 2048);
    // The configuration that produced it, verbatim; config.json from the base with the dtype.
    assert_eq!(
        std::fs::read_to_string(o.join("mergekit_config.yml")).unwrap(),
        cfg
    );
    let c: serde_json::Value =
        serde_json::from_slice(&std::fs::read(o.join("config.json")).unwrap()).unwrap();
    assert_eq!(c["torch_dtype"], "float32");
    assert_eq!(c["dtype"], "float32");
    assert_eq!(c["num_hidden_layers"], 3);
    assert!(read_all(&o).values().all(|t| t.0 == Dtype::F32));
    // `auto` takes the models' most common template.
    let o = merge_with(
        &f.root,
        &cfg.replace("chatml", "auto"),
        "side_auto",
        &MergeOptions::default(),
    );
    assert_eq!(
        std::fs::read_to_string(o.join("chat_template.jinja")).unwrap(),
        "{{ messages }}"
    );
}
