//! Whole-checkpoint merging: a mergekit YAML configuration and model
//! folders in, a merged model folder out.
//!
//! ```text
//! config (YAML) --parse--> MergeConfig --plan--> Plan --layout--> shards
//!                                                 \--exec (rayon)--> bytes in place --commit--> OUT/
//! ```
//!
//! - [`config`]: mergekit's schema, typed, with errors naming the key and
//!   the line.
//! - [`model`] and [`safetensors`]: inputs memory-mapped, every header
//!   checked when a model is opened.
//! - [`plan`]: one task per output tensor; every name, shape, dtype and
//!   parameter is checked before any tensor data is read.
//! - [`exec`]: tensors and chunks of tensors in parallel through
//!   `medley_core::merge`'s streaming forms, written into pre-sized shards.
//! - [`output`]: the shard layout, side files and the all-or-nothing
//!   commit of the output folder.
//!
//! [`merge`] runs all of it; the `medley` binary is a thin command line
//! over it.

pub mod config;
pub mod error;
pub mod exec;
pub mod model;
pub mod output;
pub mod plan;
pub mod safetensors;
pub mod yaml;

pub use config::MergeConfig;
pub use error::{MergeError, Result};
pub use exec::{NoProgress, Progress};
pub use plan::{Plan, PlanOptions, VocabPolicy};

use crate::error::io;
use crate::safetensors::Dtype;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

/// Options of [`merge`] beyond the configuration.
#[derive(Debug, Clone)]
pub struct MergeOptions {
    /// Worker threads (`None`: one per core).
    pub threads: Option<usize>,
    /// Replace an existing output folder.
    pub overwrite: bool,
    /// Largest shard, in bytes ([`output::DEFAULT_SHARD_BYTES`]).
    pub shard_bytes: u64,
    /// Elements per chunk ([`exec::DEFAULT_CHUNK`]).
    pub chunk: usize,
    /// Copy the tokenizer files.
    pub copy_tokenizer: bool,
    /// Planning options.
    pub plan: PlanOptions,
}

impl Default for MergeOptions {
    fn default() -> Self {
        Self {
            threads: None,
            overwrite: false,
            shard_bytes: output::DEFAULT_SHARD_BYTES,
            chunk: exec::DEFAULT_CHUNK,
            copy_tokenizer: true,
            plan: PlanOptions::default(),
        }
    }
}

/// What a finished merge did.
#[derive(Debug, Clone)]
pub struct Report {
    /// The output folder.
    pub output: PathBuf,
    /// Tensors written.
    pub tensors: usize,
    /// Tensor bytes written.
    pub bytes: u64,
    /// Shard files.
    pub shards: usize,
    /// Notes from planning (also given to `on_plan`).
    pub notes: Vec<String>,
    /// Seed of the random methods.
    pub seed: u64,
    /// Wall time.
    pub wall: Duration,
}

/// Reads and parses a configuration file.
pub fn load_config(path: &Path) -> Result<(MergeConfig, String)> {
    let text = std::fs::read_to_string(path).map_err(io(path, "reading the configuration"))?;
    let cfg = MergeConfig::parse(&text).map_err(|error| MergeError::Config {
        file: path.to_path_buf(),
        error,
    })?;
    Ok((cfg, text))
}

/// The ChatML template (`chat_template: chatml`).
pub const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

fn template_of(folder: &Path) -> Option<String> {
    if let Ok(t) = std::fs::read_to_string(folder.join("chat_template.jinja")) {
        return Some(t);
    }
    let b = std::fs::read(folder.join("tokenizer_config.json")).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&b).ok()?;
    v.get("chat_template")?.as_str().map(str::to_string)
}

fn resolve_chat_template(spec: &str, plan: &Plan) -> Result<String> {
    match spec {
        "auto" => {
            let mut counts: Vec<(String, usize)> = Vec::new();
            for m in plan.models.iter().filter(|m| m.is_folder) {
                if let Some(t) = template_of(m.folder()) {
                    match counts.iter_mut().find(|c| c.0 == t) {
                        Some(c) => c.1 += 1,
                        None => counts.push((t, 1)),
                    }
                }
            }
            counts
                .into_iter()
                .max_by_key(|c| c.1)
                .map(|c| c.0)
                .ok_or_else(|| {
                    error::plan_err(
                        "",
                        "`chat_template: auto`, but no input model has a chat template",
                    )
                })
        }
        "chatml" => Ok(CHATML.to_string()),
        s if s.contains("{{") || s.contains("{%") => Ok(s.to_string()),
        s => Err(error::plan_err(
            "",
            format!(
                "`chat_template: {s}`: medley has the built-in template `chatml`, `auto` (the input models' most common) or a Jinja template given inline"
            ),
        )),
    }
}

/// Merges the models of the configuration at `config_path` into `out`
/// (see the crate documentation). `on_plan` sees the plan before any data
/// is read (to print notes); `cancel` stops the run when set.
pub fn merge(
    config_path: &Path,
    out: &Path,
    opts: &MergeOptions,
    cancel: &AtomicBool,
    progress: &dyn Progress,
    on_plan: &mut dyn FnMut(&Plan),
) -> Result<Report> {
    let start = Instant::now();
    let (cfg, text) = load_config(config_path)?;
    let mut popts = opts.plan.clone();
    if popts.config_dir.is_none() {
        popts.config_dir = config_path.parent().map(Path::to_path_buf);
    }
    let plan = plan::plan(&cfg, &popts)?;
    // The output must not be (inside) an input.
    let out_abs = absolute(out);
    for m in &plan.models {
        let mf = std::fs::canonicalize(m.folder()).unwrap_or_else(|_| m.folder().to_path_buf());
        if out_abs.starts_with(&mf) && m.is_folder {
            return Err(MergeError::Output {
                path: out.to_path_buf(),
                message: format!(
                    "is inside input model `{}`'s folder; write the merge elsewhere",
                    m.name
                ),
            });
        }
    }
    let template = cfg
        .chat_template
        .as_deref()
        .map(|s| resolve_chat_template(s, &plan))
        .transpose()?;
    if template.is_some() && !opts.copy_tokenizer {
        return Err(error::plan_err(
            "",
            "`chat_template` is set but tokenizer copying is off (--no-copy-tokenizer)",
        ));
    }
    on_plan(&plan);
    let layout = output::layout(&plan.tensors, opts.shard_bytes);
    let staging = output::Staging::new(out, opts.overwrite)?;
    let files = staging.create_shards(&layout)?;
    let paths: Vec<PathBuf> = layout.files.iter().map(|f| staging.dir.join(f)).collect();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(opts.threads.unwrap_or(0))
        .build()
        .map_err(|e| error::plan_err("", format!("cannot start worker threads: {e}")))?;
    pool.install(|| {
        exec::run(
            &plan,
            &files,
            &paths,
            &layout.places,
            opts.chunk,
            cancel,
            progress,
        )
    })?;
    pool.install(|| {
        use rayon::prelude::*;
        files
            .par_iter()
            .zip(paths.par_iter())
            .try_for_each(|(f, p)| f.sync_all().map_err(io(p, "flushing")))
    })?;
    drop(files);
    if layout.files.len() > 1 {
        staging.write(output::INDEX, &output::index_json(&plan.tensors, &layout))?;
    }
    write_side_files(&plan, &cfg, &text, &staging, opts, template.as_deref())?;
    let output = staging.commit()?;
    Ok(Report {
        output,
        tensors: plan.tensors.len(),
        bytes: layout.total_size,
        shards: layout.files.len(),
        notes: plan.notes.clone(),
        seed: plan.seed,
        wall: start.elapsed(),
    })
}

fn absolute(p: &Path) -> PathBuf {
    if let Ok(c) = std::fs::canonicalize(p) {
        return c;
    }
    let parent = p
        .parent()
        .filter(|x| !x.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let parent = std::fs::canonicalize(parent).unwrap_or_else(|_| parent.to_path_buf());
    parent.join(p.file_name().unwrap_or_default())
}

fn write_side_files(
    plan: &Plan,
    cfg: &MergeConfig,
    text: &str,
    staging: &output::Staging,
    opts: &MergeOptions,
    template: Option<&str>,
) -> Result<()> {
    let r = &plan.models[plan.reference];
    if let Some(c) = &r.config {
        let mut c = c.clone();
        let dts: std::collections::HashSet<Dtype> = plan
            .tensors
            .iter()
            .filter(|t| t.dtype.is_mergeable())
            .map(|t| t.dtype)
            .collect();
        if dts.len() == 1 {
            let name = match dts.into_iter().next().expect("one") {
                Dtype::F32 => "float32",
                Dtype::F16 => "float16",
                _ => "bfloat16",
            };
            if let Some(o) = c.as_object_mut() {
                // transformers 5 reads `dtype` (and warns on `torch_dtype`),
                // older versions `torch_dtype`: write both.
                o.insert("torch_dtype".into(), name.into());
                o.insert("dtype".into(), name.into());
            }
        }
        if let (Some(l), Some(o)) = (plan.layers, c.as_object_mut()) {
            for k in ["num_hidden_layers", "n_layer", "num_layers"] {
                if o.contains_key(k) {
                    o.insert(k.into(), l.into());
                    break;
                }
            }
        }
        let mut b = serde_json::to_vec_pretty(&c).expect("JSON");
        b.push(b'\n');
        staging.write("config.json", &b)?;
    }
    if r.is_folder {
        let g = r.folder().join("generation_config.json");
        if g.exists() {
            staging.copy(&g, "generation_config.json")?;
        }
    }
    if opts.copy_tokenizer {
        let tm = &plan.models[plan.tokenizer_from];
        if tm.is_folder {
            for f in output::TOKENIZER_FILES {
                let p = tm.folder().join(f);
                if p.exists() {
                    staging.copy(&p, f)?;
                }
            }
        }
        if let Some(t) = template {
            staging.write("chat_template.jinja", t.as_bytes())?;
            let tc = staging.dir.join("tokenizer_config.json");
            if let Ok(b) = std::fs::read(&tc)
                && let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(&b)
                && let Some(o) = v.as_object_mut()
            {
                o.insert("chat_template".into(), t.into());
                let mut b = serde_json::to_vec_pretty(&v).expect("JSON");
                b.push(b'\n');
                staging.write("tokenizer_config.json", &b)?;
            }
        }
    }
    staging.write("mergekit_config.yml", text.as_bytes())?;
    let mut card = format!(
        "---\nlibrary_name: transformers\ntags:\n- merge\n- medley\n---\n# Merged model\n\nMerged with medley (`medley merge`), method `{}`, from:\n\n",
        cfg.merge_method.name()
    );
    for m in &plan.models {
        card.push_str(&format!("- `{}`\n", m.name));
    }
    card.push_str("\nThe configuration is in `mergekit_config.yml`.\n");
    staging.write("README.md", card.as_bytes())?;
    Ok(())
}
