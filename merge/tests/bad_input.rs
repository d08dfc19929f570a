//! Every class of bad input through the `medley` binary: a clear message
//! naming the file, key or tensor, a non-zero exit, and nothing left in
//! (or beside) the output folder.

mod common;

use common::*;
use medley_merge::safetensors::Dtype;
use std::path::{Path, PathBuf};
use std::process::Command;

struct Run {
    ok: bool,
    stderr: String,
}

fn medley(args: &[&str]) -> Run {
    let o = Command::new(env!("CARGO_BIN_EXE_medley"))
        .args(args)
        .output()
        .unwrap();
    Run {
        ok: o.status.success(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

/// Runs a merge that must fail with a message containing every `needle`,
/// and checks that nothing was left behind.
fn fails(root: &Path, name: &str, cfg: &str, extra: &[&str], needles: &[&str]) -> String {
    let c = root.join(format!("{name}.yml"));
    std::fs::write(&c, cfg).unwrap();
    let out = root.join(format!("{name}-out"));
    let mut args = vec!["merge", c.to_str().unwrap(), out.to_str().unwrap()];
    args.extend_from_slice(extra);
    let r = medley(&args);
    assert!(!r.ok, "{name}: the merge succeeded");
    for n in needles {
        assert!(r.stderr.contains(n), "{name}: `{n}` not in:\n{}", r.stderr);
    }
    assert!(!out.exists(), "{name}: output folder left behind");
    let stray: Vec<String> = listing(root)
        .into_iter()
        .filter(|n| n.contains("medley-tmp"))
        .collect();
    assert!(stray.is_empty(), "{name}: temporary folders left: {stray:?}");
    r.stderr
}

fn ties(base: &Path, models: &[&Path]) -> String {
    let mut s = format!("merge_method: ties\nbase_model: {}\nmodels:\n", base.display());
    for m in models {
        s.push_str(&format!(
            "  - model: {}\n    parameters: {{weight: 0.5, density: 0.5}}\n",
            m.display()
        ));
    }
    s
}

fn setup(name: &str) -> (PathBuf, [PathBuf; 4]) {
    let root = scratch(name);
    let f = family(&root, &Spec::tiny());
    (root, f)
}

#[test]
fn missing_and_unreadable_models() {
    let (root, [b, a, _, _]) = setup("bad-models");
    let missing = root.join("nope");
    fails(
        &root,
        "missing",
        &ties(&b, &[&a, &missing]),
        &[],
        &["nope", "no such file or folder"],
    );
    fails(
        &root,
        "hub",
        &ties(&b, &[&a]).replace(&a.display().to_string(), "meta-llama/Llama-3.2-1B"),
        &[],
        &["meta-llama/Llama-3.2-1B", "download it first"],
    );
    // A folder of PyTorch pickles.
    let pt = root.join("pickles");
    std::fs::create_dir_all(&pt).unwrap();
    std::fs::write(pt.join("pytorch_model.bin"), b"not really").unwrap();
    fails(
        &root,
        "pickles",
        &ties(&b, &[&a, &pt]),
        &[],
        &["pickles", "PyTorch pickles", "convert them to safetensors"],
    );
    // A sharded model whose index names a shard that is not there.
    let sh = write_model(
        &root.join("sharded"),
        &Spec {
            shards: 3,
            ..Spec::tiny()
        },
        1,
        Some(4),
    );
    std::fs::remove_file(sh.join("model-00002-of-00003.safetensors")).unwrap();
    fails(
        &root,
        "noshard",
        &ties(&b, &[&a, &sh]),
        &[],
        &["model-00002-of-00003.safetensors", "missing"],
    );
}

#[test]
fn corrupt_safetensors() {
    let (root, [b, a, bb, c]) = setup("bad-files");
    // Truncated: cut the data short.
    let f = bb.join("model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
    fails(
        &root,
        "truncated",
        &ties(&b, &[&a, &bb]),
        &[],
        &["model.safetensors", "past the", "truncated"],
    );
    // Truncated inside the header.
    std::fs::write(&f, &bytes[..20]).unwrap();
    fails(
        &root,
        "header-cut",
        &ties(&b, &[&a, &bb]),
        &[],
        &["model.safetensors", "past the end"],
    );
    std::fs::write(&f, &bytes[..5]).unwrap();
    fails(&root, "tiny-file", &ties(&b, &[&a, &bb]), &[], &["too short"]);
    // A header that lies: one tensor's offsets claim a different size.
    let g = c.join("model.safetensors");
    let bytes = std::fs::read(&g).unwrap();
    let l = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut h: serde_json::Value = serde_json::from_slice(&bytes[8..8 + l]).unwrap();
    let offs = &mut h["model.norm.weight"]["data_offsets"];
    let start = offs[0].as_u64().unwrap();
    *offs = serde_json::json!([start, start + 10]);
    let mut hj = serde_json::to_vec(&h).unwrap();
    hj.resize(l, b' ');
    assert_eq!(hj.len(), l, "the edited header must keep its length");
    let mut nb = bytes[..8].to_vec();
    nb.extend_from_slice(&hj);
    nb.extend_from_slice(&bytes[8 + l..]);
    std::fs::write(&g, &nb).unwrap();
    fails(
        &root,
        "lying",
        &ties(&b, &[&a, &c]),
        &[],
        &["model.norm.weight", "hold 10 bytes", "needs 48"],
    );
    // Not JSON at all.
    let mut junk = bytes.clone();
    junk[8] = b'#';
    std::fs::write(&g, &junk).unwrap();
    fails(&root, "junk", &ties(&b, &[&a, &c]), &[], &["not valid JSON"]);
}

fn rewrite(dir: &Path, f: impl Fn(&mut Vec<(String, Dtype, Vec<usize>, Vec<u8>)>)) {
    let m = medley_merge::model::Model::open("x", dir).unwrap();
    let mut ts: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = m
        .order
        .iter()
        .map(|n| {
            let (s, t) = m.get(n).unwrap();
            (n.clone(), t.dtype, t.shape.clone(), s.bytes(t).to_vec())
        })
        .collect();
    drop(m);
    f(&mut ts);
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    write_tensors(dir, &ts, 1);
}

#[test]
fn models_that_do_not_fit_together() {
    let (root, [b, a, bb, c]) = setup("bad-fit");
    rewrite(&bb, |ts| {
        ts.retain(|t| t.0 != "model.layers.1.mlp.up_proj.weight")
    });
    fails(
        &root,
        "missing-tensor",
        &ties(&b, &[&a, &bb]),
        &[],
        &["model.layers.1.mlp.up_proj.weight", "has no tensor"],
    );
    let wide = write_model(
        &root.join("wide"),
        &Spec {
            inter: 44,
            ..Spec::tiny()
        },
        1,
        Some(3),
    );
    fails(
        &root,
        "shapes",
        &ties(&b, &[&a, &wide]),
        &[],
        &["shapes differ", "[44, 24]", "[40, 24]"],
    );
    let deep = write_model(
        &root.join("deep"),
        &Spec {
            layers: 4,
            ..Spec::tiny()
        },
        1,
        Some(3),
    );
    fails(
        &root,
        "depth",
        &ties(&b, &[&a, &deep]),
        &[],
        &["4 layers", "slices"],
    );
    // Integer tensors: copied when identical in every model, refused when not.
    let ids: Vec<u8> = (0..16i32).flat_map(|v| v.to_le_bytes()).collect();
    for m in [&b, &a, &c] {
        let ids = ids.clone();
        rewrite(m, move |ts| {
            ts.push(("model.position_ids".into(), Dtype::I32, vec![16], ids.clone()))
        });
    }
    let ok_out = root.join("ints-ok");
    let cfg = root.join("ints.yml");
    std::fs::write(&cfg, ties(&b, &[&a, &c])).unwrap();
    let r = medley(&[
        "merge",
        cfg.to_str().unwrap(),
        ok_out.to_str().unwrap(),
        "--quiet",
    ]);
    assert!(r.ok, "{}", r.stderr);
    let got = read_all(&ok_out);
    assert_eq!(got["model.position_ids"], (Dtype::I32, vec![16], ids.clone()));
    rewrite(&c, |ts| {
        let t = ts.iter_mut().find(|t| t.0 == "model.position_ids").unwrap();
        t.3[4] ^= 1;
    });
    fails(
        &root,
        "ints-differ",
        &ties(&b, &[&a, &c]),
        &[],
        &["model.position_ids", "I32", "differs"],
    );
    // A float tensor stored as an integer in another model.
    rewrite(&a, |ts| {
        let t = ts.iter_mut().find(|t| t.0 == "model.norm.weight").unwrap();
        t.1 = Dtype::I16;
    });
    fails(
        &root,
        "dtype-mix",
        &ties(&b, &[&a]),
        &[],
        &["model.norm.weight", "stores it as I16"],
    );
}

#[test]
fn bad_configurations() {
    let (root, [b, a, bb, _]) = setup("bad-config");
    let (bs, as_) = (b.display().to_string(), a.display().to_string());
    fails(
        &root,
        "yaml",
        "merge_method: ties\nmodels: [\n",
        &[],
        &["bad-config", "YAML syntax error", "line"],
    );
    let e = fails(
        &root,
        "unknown-key",
        &format!(
            "merge_method: ties\nbase_model: {bs}\nmodels:\n  - model: {as_}\n    paramters: {{weight: 1}}\n"
        ),
        &[],
        &["models[0].paramters", "unknown key", "line 5"],
    );
    assert!(e.contains("unknown-key.yml"), "{e}");
    fails(
        &root,
        "unknown-param",
        &format!(
            "merge_method: ties\nbase_model: {bs}\nmodels:\n  - model: {as_}\n    parameters: {{weight: 1, densty: 0.5}}\n"
        ),
        &[],
        &[
            "models[0].parameters.densty",
            "unknown parameter `densty`",
            "density",
        ],
    );
    fails(
        &root,
        "density-range",
        &format!(
            "merge_method: ties\nbase_model: {bs}\nmodels:\n  - model: {as_}\n    parameters: {{weight: 1, density: 1.5}}\n"
        ),
        &[],
        &["models[0].parameters.density", "line 5", "(0, 1]"],
    );
    fails(
        &root,
        "density-type",
        &format!(
            "merge_method: ties\nbase_model: {bs}\nmodels:\n  - model: {as_}\n    parameters: {{weight: 1, density: high}}\n"
        ),
        &[],
        &["models[0].parameters.density", "must be a number", "`high`"],
    );
    fails(
        &root,
        "no-weight",
        &format!(
            "merge_method: ties\nbase_model: {bs}\nmodels:\n  - model: {as_}\n    parameters: {{density: 0.5}}\n"
        ),
        &[],
        &["missing required parameter `weight`"],
    );
    fails(
        &root,
        "no-base",
        &format!("merge_method: ties\nmodels:\n  - model: {as_}\n    parameters: {{weight: 1}}\n"),
        &[],
        &["needs `base_model`"],
    );
    fails(
        &root,
        "union",
        &format!("{}tokenizer_source: union\n", ties(&b, &[&a])),
        &[],
        &["`union`", "not supported"],
    );
    fails(
        &root,
        "lora",
        &ties(&b, &[&a]).replace(&as_, &format!("{as_}+some/lora")),
        &[],
        &["LoRA"],
    );
    fails(
        &root,
        "slerp-three",
        &format!(
            "merge_method: slerp\nbase_model: {bs}\nmodels:\n  - model: {as_}\n  - model: {}\nparameters: {{t: 0.5}}\n",
            bb.display()
        ),
        &[],
        &["exactly two models"],
    );
    fails(
        &root,
        "linear-base",
        &format!(
            "merge_method: linear\nbase_model: {bs}\nmodels:\n  - model: {as_}\n    parameters: {{weight: 1}}\n"
        ),
        &[],
        &["not under `models`", "weight"],
    );
    fails(
        &root,
        "template",
        &format!("{}chat_template: vicuna\n", ties(&b, &[&a])),
        &[],
        &["vicuna", "chatml"],
    );
    fails(
        &root,
        "config-missing",
        "",
        &["--threads", "1"],
        &["missing required key `merge_method`"],
    );
    let r = medley(&[
        "merge",
        root.join("nope.yml").to_str().unwrap(),
        root.join("x").to_str().unwrap(),
    ]);
    assert!(!r.ok && r.stderr.contains("nope.yml"), "{}", r.stderr);
}

#[test]
fn output_folder_rules_and_a_full_disk() {
    let (root, [b, a, _, _]) = setup("bad-output");
    let cfg = root.join("ok.yml");
    std::fs::write(&cfg, ties(&b, &[&a])).unwrap();
    let out = root.join("out");
    let r = medley(&["merge", cfg.to_str().unwrap(), out.to_str().unwrap()]);
    assert!(r.ok, "{}", r.stderr);
    // Not a terminal: no progress bar, one summary line.
    assert!(
        r.stderr.starts_with("merged ") && r.stderr.contains("peak memory"),
        "{}",
        r.stderr
    );
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
    let first = read_all(&out);
    let r = medley(&["merge", cfg.to_str().unwrap(), out.to_str().unwrap()]);
    assert!(
        !r.ok && r.stderr.contains("already exists") && r.stderr.contains("--overwrite"),
        "{}",
        r.stderr
    );
    assert_eq!(
        read_all(&out),
        first,
        "a refused run must not touch the existing output"
    );
    let r = medley(&[
        "merge",
        cfg.to_str().unwrap(),
        out.to_str().unwrap(),
        "--overwrite",
        "--quiet",
    ]);
    assert!(r.ok && r.stderr.is_empty(), "{}", r.stderr);
    assert_eq!(read_all(&out), first);
    // Inside an input folder.
    let inside = a.join("merged");
    let r = medley(&["merge", cfg.to_str().unwrap(), inside.to_str().unwrap()]);
    assert!(!r.ok && r.stderr.contains("inside input model"), "{}", r.stderr);
    assert!(!inside.exists());
    // A full disk, simulated by a file-size limit: the shard cannot be
    // reserved, the run fails before merging and cleans up.
    let full = root.join("full");
    let o = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "ulimit -f 8; exec {} merge {} {}",
            env!("CARGO_BIN_EXE_medley"),
            cfg.display(),
            full.display()
        ))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{stderr}");
    assert!(
        stderr.contains("model.safetensors")
            && stderr.contains("File too large")
            && stderr.contains("free space"),
        "{stderr}"
    );
    assert!(!full.exists());
    assert!(
        listing(&root).iter().all(|n| !n.contains("medley-tmp")),
        "{:?}",
        listing(&root)
    );
}

#[test]
fn an_interrupted_merge_leaves_all_or_nothing() {
    let root = scratch("interrupt");
    let spec = Spec {
        hidden: 256,
        inter: 512,
        layers: 4,
        vocab: 4000,
        ..Spec::tiny()
    };
    let [b, a, bb, _] = family(&root, &spec);
    let cfg = root.join("ties.yml");
    std::fs::write(&cfg, ties(&b, &[&a, &bb])).unwrap();
    let mut interrupted = 0;
    for (k, delay_ms) in [5u64, 20, 60, 150].into_iter().enumerate() {
        let out = root.join(format!("out{k}"));
        let child = Command::new(env!("CARGO_BIN_EXE_medley"))
            .args([
                "merge",
                cfg.to_str().unwrap(),
                out.to_str().unwrap(),
                "-j",
                "1",
                "--chunk-elements",
                "2048",
            ])
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        // SAFETY: signalling our own child process by its id.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
        let o = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        if o.status.success() {
            assert_eq!(
                read_all(&out).len(),
                spec.tensors().len(),
                "a finished merge is complete"
            );
        } else {
            interrupted += 1;
            assert_eq!(o.status.code(), Some(130), "{stderr}");
            assert!(stderr.contains("interrupted"), "{stderr}");
            assert!(!out.exists(), "an interrupted merge left {}", out.display());
        }
        assert!(
            listing(&root).iter().all(|n| !n.contains("medley-tmp")),
            "{:?}",
            listing(&root)
        );
    }
    assert!(interrupted > 0, "no run was caught before it finished");
}
