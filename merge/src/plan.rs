//! The planner: from a [`MergeConfig`] and the opened models to one task
//! per output tensor, with every name, shape, dtype and parameter checked
//! before any tensor data is read.
//!
//! # Semantics (mergekit's, except where noted)
//!
//! - **Which tensors.** The output has the tensors of the *reference*
//!   model: the base model if there is one, else the first model (for
//!   `slices:`, the first source of each slice for its layers, and of the
//!   first slice for the other tensors). Every other model must have each
//!   of them, with the same shape; a tensor another model has and the
//!   reference lacks is reported and not merged.
//! - **Layers** are recognised by a `layers.N.` (or `h.N.`, `blocks.N.`)
//!   component in the name. `slices:` renumber them: output layer
//!   `offset + j` of a slice with sources `[a_k, b_k)` merges source layers
//!   `a_k + j`. Embeddings are merged from the first slice's sources, the
//!   other tensors outside the layers (final norm, output head) from the
//!   last slice's, with that slice's parameters (as mergekit's pre- and
//!   post-weights).
//! - **Parameters** resolve with mergekit's precedence: the model's (or
//!   slice source's) `parameters`, then the slice's, then the top-level
//!   ones, then the method's default. A list of numbers is a gradient read
//!   at `t = j / (L - 1)` for layer `j` of an `L`-layer slice (`t = 0` for
//!   tensors outside the layers, as mergekit does since its multi-module
//!   rewrite); a list of `{filter, value}` entries takes the first entry
//!   whose filter is a substring of the tensor name (per-model parameters
//!   match the input tensor's name, merge-wide ones the output's); when no
//!   entry matches, the next level is asked.
//! - **Tied embeddings.** A model without `lm_head.weight` whose embeddings
//!   are tied contributes its input embedding matrix to `lm_head.weight`
//!   (reported). If the reference model has no `lm_head.weight`, the output
//!   has none either (its `config.json` ties the embeddings) and the other
//!   models' heads are reported unused.
//! - **Vocabulary sizes.** Embedding and head matrices whose row counts
//!   differ between models are an error naming both sizes, unless
//!   [`VocabPolicy::Base`] is chosen: then the rows every model has are
//!   merged and the rest of the reference's rows are copied from it (rows
//!   beyond the reference's size are dropped; the output keeps the
//!   reference's vocabulary). mergekit cuts every model to the smallest
//!   matrix in linear/SLERP merges and drops mismatched models from
//!   task-vector merges, silently.
//! - **Dtypes.** f32, f16 and bf16 tensors are merged in f32 and written in
//!   `out_dtype`, else `dtype`, else the reference tensor's dtype. Other
//!   dtypes are copied when every model stores the same bytes, else refused.

use crate::config::{Inputs, MergeConfig, Method, ModelRef, Params, Scalar, Setting, TokenizerSource};
use crate::error::{MergeError, Result, plan_err};
use crate::model::Model;
use crate::safetensors::Dtype;
use medley_core::merge::gta::{GtaOptions, Rescale, TaskParams};
use medley_core::merge::sce::SceOptions;
use medley_core::merge::sphere::{KarcherOptions, Layout, MultislerpOptions, NuslerpOptions};
use medley_core::merge::stock::StockOptions;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// What to do when embedding matrices of the models differ in rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VocabPolicy {
    /// Refuse, naming both sizes (the default).
    #[default]
    Error,
    /// Merge the rows every model has; take the reference model's other
    /// rows from it.
    Base,
}

/// Options of planning that are not in the configuration.
#[derive(Debug, Clone, Default)]
pub struct PlanOptions {
    /// Seed of DARE's and DELLA's masks (overrides the configuration's
    /// `random_seed`).
    pub random_seed: Option<u64>,
    /// Vocabulary-size mismatches.
    pub vocab: VocabPolicy,
    /// Folder of the configuration file: model paths that do not exist
    /// relative to the working directory are looked up here.
    pub config_dir: Option<PathBuf>,
    /// Allow models whose `config.json` names different architectures.
    pub allow_crimes: bool,
}

/// One input of a tensor's merge: a model and its tensor name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Src {
    /// Index into [`Plan::models`].
    pub model: usize,
    /// The tensor's name in that model.
    pub tensor: String,
}

/// The operation of one output tensor.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// `linear`.
    Linear {
        /// One per input.
        weights: Vec<f32>,
        /// Divide by the weight sum.
        normalize: bool,
    },
    /// The task-vector family.
    Gta {
        /// Options (row length, seed and tensor id filled in).
        opts: GtaOptions,
        /// One per input.
        params: Vec<TaskParams>,
    },
    /// `slerp` (base = v0).
    Slerp {
        /// Interpolation parameter.
        t: f32,
    },
    /// `nuslerp`.
    Nuslerp {
        /// The two models' weights.
        weights: [f32; 2],
        /// Options.
        opts: NuslerpOptions,
    },
    /// `multislerp`.
    Multislerp {
        /// One per input.
        weights: Vec<f32>,
        /// Options.
        opts: MultislerpOptions,
    },
    /// `karcher` (every input, the base included, weighted equally).
    Karcher {
        /// Options.
        opts: KarcherOptions,
    },
    /// `model_stock`.
    Stock {
        /// Options.
        opts: StockOptions,
    },
    /// `sce`.
    Sce {
        /// Options.
        opts: SceOptions,
    },
    /// `passthrough`: the one input, times `scale` if given.
    Passthrough {
        /// Scale factor.
        scale: Option<f32>,
    },
    /// A tensor of a dtype medley does not merge, identical in every input:
    /// copied.
    Copy,
}

/// One output tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorTask {
    /// Output name.
    pub name: String,
    /// Output shape.
    pub shape: Vec<usize>,
    /// Output dtype.
    pub dtype: Dtype,
    /// The operation.
    pub op: Op,
    /// The merge inputs, in order.
    pub inputs: Vec<Src>,
    /// The base, for methods that use one.
    pub base: Option<Src>,
    /// Elements merged: all of them, or for a vocabulary mismatch under
    /// [`VocabPolicy::Base`] the shared rows; the rest is copied from
    /// `tail`.
    pub merged: usize,
    /// Source of the elements after `merged` (same dtype conversion).
    pub tail: Option<Src>,
}

impl TensorTask {
    /// Number of output elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Output bytes.
    pub fn bytes(&self) -> u64 {
        (self.numel() * self.dtype.size()) as u64
    }
}

/// A planned merge.
#[derive(Debug)]
pub struct Plan {
    /// The method.
    pub method: Method,
    /// The opened models, each once.
    pub models: Vec<Model>,
    /// The output tensors, in output order.
    pub tensors: Vec<TensorTask>,
    /// The model whose `config.json` the output starts from.
    pub reference: usize,
    /// The model whose tokenizer files are copied.
    pub tokenizer_from: usize,
    /// Number of layers of the output.
    pub layers: Option<usize>,
    /// Things the user should know (unused tensors, tied heads, ...).
    pub notes: Vec<String>,
    /// The seed of the random methods.
    pub seed: u64,
}

/// Where the layer index sits in a tensor name: `(start, end, index)` of
/// the digits.
pub fn layer_of(name: &str) -> Option<(usize, usize, usize)> {
    let b = name.as_bytes();
    for key in ["layers.", "h.", "blocks.", "layer."] {
        let mut from = 0;
        while let Some(i) = name[from..].find(key) {
            let at = from + i;
            let ok_before = at == 0 || b[at - 1] == b'.';
            let ds = at + key.len();
            let mut de = ds;
            while de < b.len() && b[de].is_ascii_digit() {
                de += 1;
            }
            if ok_before
                && de > ds
                && de < b.len()
                && b[de] == b'.'
                && let Ok(v) = name[ds..de].parse()
            {
                return Some((ds, de, v));
            }
            from = at + 1;
        }
    }
    None
}

fn with_layer(name: &str, span: (usize, usize), layer: usize) -> String {
    format!("{}{}{}", &name[..span.0], layer, &name[span.1..])
}

/// Names of embedding and output-head matrices (vocabulary rows).
fn is_vocab_tensor(name: &str) -> bool {
    [
        "embed_tokens.weight",
        "lm_head.weight",
        "wte.weight",
        "embed_in.weight",
        "embed_out.weight",
        "word_embeddings.weight",
        "tok_embeddings.weight",
        "output.weight",
    ]
    .iter()
    .any(|s| name == *s || name.ends_with(&format!(".{s}")))
}

fn is_head(name: &str) -> bool {
    name == "lm_head.weight" || name.ends_with(".lm_head.weight") || name == "embed_out.weight"
}

fn embed_of(model: &Model) -> Option<String> {
    model
        .order
        .iter()
        .find(|n| {
            [
                "embed_tokens.weight",
                "wte.weight",
                "embed_in.weight",
                "word_embeddings.weight",
                "tok_embeddings.weight",
            ]
            .iter()
            .any(|s| n.ends_with(s))
        })
        .cloned()
}

/// FNV-1a of a tensor name: the tensor id of the random streams, so masks
/// depend on the name only (not on order or threads).
pub fn tensor_id(name: &str) -> u32 {
    let mut h = 0x811c_9dc5u32;
    for &c in name.as_bytes() {
        h ^= c as u32;
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// The parameters each method reads, per model and merge-wide.
fn method_params(m: Method) -> (&'static [&'static str], &'static [&'static str]) {
    match m {
        Method::Linear => (&["weight"], &["normalize"]),
        Method::TaskArithmetic | Method::DareLinear | Method::DareTies | Method::Ties => (
            &["weight", "density"],
            &["normalize", "rescale", "lambda", "int8_mask"],
        ),
        Method::Breadcrumbs | Method::BreadcrumbsTies => (
            &["weight", "density", "gamma"],
            &["normalize", "rescale", "lambda", "int8_mask"],
        ),
        Method::Della | Method::DellaLinear => (
            &["weight", "density", "epsilon"],
            &["normalize", "rescale", "lambda", "int8_mask"],
        ),
        Method::Slerp => (&[], &["t"]),
        Method::Nuslerp => (&["weight"], &["nuslerp_flatten", "nuslerp_row_wise"]),
        Method::Multislerp => (&["weight"], &["normalize_weights", "eps"]),
        Method::Karcher => (&[], &["max_iter", "tol"]),
        Method::ModelStock => (&[], &["filter_wise"]),
        Method::Sce => (&[], &["select_topk", "int8_mask"]),
        Method::Passthrough => (&["scale"], &[]),
    }
}

/// Every parameter name some mergekit method reads.
const MERGEKIT_PARAMS: &[&str] = &[
    "weight",
    "density",
    "gamma",
    "epsilon",
    "normalize",
    "rescale",
    "lambda",
    "int8_mask",
    "t",
    "nuslerp_flatten",
    "nuslerp_row_wise",
    "normalize_weights",
    "eps",
    "max_iter",
    "tol",
    "filter_wise",
    "select_topk",
    "scale",
];

/// Checks the parameter names of the configuration against the method:
/// unknown names are errors; names mergekit knows but this method ignores
/// become notes.
fn check_param_names(cfg: &MergeConfig, notes: &mut Vec<String>) -> Result<()> {
    let (per_model, global) = method_params(cfg.merge_method);
    let mut check = |p: &Params, model_level: bool| -> Result<()> {
        for (name, _, path, pos) in &p.entries {
            let known_here = per_model.contains(&name.as_str()) || global.contains(&name.as_str());
            if !known_here && !MERGEKIT_PARAMS.contains(&name.as_str()) {
                let mut all: Vec<&str> = per_model.iter().chain(global).copied().collect();
                all.sort();
                return Err(plan_err(
                    "",
                    format!(
                        "`{path}` ({pos}): unknown parameter `{name}`; {} reads {}",
                        cfg.merge_method.name(),
                        if all.is_empty() {
                            "no parameters".to_string()
                        } else {
                            all.join(", ")
                        }
                    ),
                ));
            }
            if !known_here {
                notes.push(format!(
                    "`{path}`: {} does not use parameter `{name}` (mergekit ignores it too)",
                    cfg.merge_method.name()
                ));
            } else if model_level && global.contains(&name.as_str()) {
                return Err(plan_err(
                    "",
                    format!(
                        "`{path}` ({pos}): `{name}` applies to the whole merge: give it under the top-level (or slice) `parameters`, not a model's"
                    ),
                ));
            }
        }
        Ok(())
    };
    check(&cfg.parameters, false)?;
    match &cfg.inputs {
        Inputs::Models(ms) => {
            for m in ms {
                check(&m.parameters, true)?;
            }
        }
        Inputs::Slices(ss) => {
            for s in ss {
                check(&s.parameters, false)?;
                for src in &s.sources {
                    check(&src.parameters, true)?;
                }
            }
        }
    }
    Ok(())
}

/// Reads a setting for one tensor at layer position `t`.
fn evaluate(s: &Setting, tensor: &str, t: f64) -> Option<Scalar> {
    match s {
        Setting::Scalar(v) => Some(v.clone()),
        Setting::Gradient(g) => Some(Scalar::Number(gradient_at(g, t))),
        Setting::Filtered(entries) => {
            for e in entries {
                if e.filter.as_deref().is_none_or(|f| tensor.contains(f)) {
                    return evaluate(&e.value, tensor, t);
                }
            }
            None
        }
    }
}

/// mergekit's gradient reading: `s = t (L - 1)`, linear between the two
/// nearest points.
pub fn gradient_at(g: &[f64], t: f64) -> f64 {
    if g.len() == 1 {
        return g[0];
    }
    let s = t * (g.len() - 1) as f64;
    let i0 = (s.floor() as usize).min(g.len() - 1);
    let i1 = (i0 + 1).min(g.len() - 1);
    let f = s - i0 as f64;
    (1.0 - f) * g[i0] + f * g[i1]
}

/// One participant of a tensor's merge, with its parameter chain.
struct Part<'a> {
    model: usize,
    tensor: String,
    params: &'a Params,
    at: &'a str,
}

/// The context of one output tensor.
struct Ctx<'a> {
    name: String,
    t: f64,
    slice_params: Option<&'a Params>,
    global: &'a Params,
}

impl Ctx<'_> {
    /// A per-model parameter: model, slice, global.
    fn model_param(&self, p: &Part<'_>, name: &str) -> Option<(Scalar, String)> {
        if let Some((s, at)) = p.params.get_at(name)
            && let Some(v) = evaluate(s, &p.tensor, self.t)
        {
            return Some((v, at));
        }
        self.global_param(name)
    }

    /// A merge-wide parameter: slice, global.
    fn global_param(&self, name: &str) -> Option<(Scalar, String)> {
        for params in self.slice_params.into_iter().chain([self.global]) {
            if let Some((s, at)) = params.get_at(name)
                && let Some(v) = evaluate(s, &self.name, self.t)
            {
                return Some((v, at));
            }
        }
        None
    }
}

fn show(s: &Scalar) -> String {
    match s {
        Scalar::Number(x) => x.to_string(),
        Scalar::Bool(b) => b.to_string(),
        Scalar::Text(t) => format!("`{t}`"),
    }
}

fn number(v: Option<(Scalar, String)>, tensor: &str, name: &str, default: Option<f64>) -> Result<f64> {
    match v {
        Some((Scalar::Number(x), at)) => {
            if x.is_finite() {
                Ok(x)
            } else {
                Err(plan_err(tensor, format!("{at} is {x}; it must be a finite number")))
            }
        }
        Some((other, at)) => Err(plan_err(tensor, format!("{at} must be a number, found {}", show(&other)))),
        None => default.ok_or_else(|| {
            plan_err(
                tensor,
                format!("missing required parameter `{name}` (give it per model or under the top-level `parameters`)"),
            )
        }),
    }
}

/// A model's required `weight`, with an error naming the model entry.
fn weight_of(ctx: &Ctx<'_>, p: &Part<'_>, tensor: &str) -> Result<f64> {
    match ctx.model_param(p, "weight") {
        None => Err(plan_err(
            tensor,
            format!(
                "missing required parameter `weight` for `{}` (give it in its `parameters` or under the top-level `parameters`)",
                p.at
            ),
        )),
        v => number(v, tensor, "weight", None),
    }
}

fn flag(v: Option<(Scalar, String)>, tensor: &str, default: bool) -> Result<bool> {
    match v {
        None => Ok(default),
        Some((Scalar::Bool(b), _)) => Ok(b),
        Some((Scalar::Number(x), _)) if x == 0.0 || x == 1.0 => Ok(x == 1.0),
        Some((other, at)) => Err(plan_err(
            tensor,
            format!("{at} must be true or false, found {}", show(&other)),
        )),
    }
}

fn fraction(v: f64, at: &str, tensor: &str, lo_open: bool) -> Result<f64> {
    let ok = if lo_open { v > 0.0 } else { v >= 0.0 };
    if ok && v <= 1.0 {
        Ok(v)
    } else {
        Err(plan_err(
            tensor,
            format!(
                "{at} is {v}; it must lie in {}0, 1]",
                if lo_open { "(" } else { "[" }
            ),
        ))
    }
}

fn resolve_path(r: &ModelRef, opts: &PlanOptions) -> PathBuf {
    let p = Path::new(&r.path);
    if p.is_absolute() || p.exists() {
        return p.to_path_buf();
    }
    if let Some(d) = &opts.config_dir {
        let q = d.join(p);
        if q.exists() {
            return q;
        }
    }
    p.to_path_buf()
}

/// The opened models, deduplicated by the path they resolve to.
struct Models {
    list: Vec<Model>,
    by_ref: HashMap<String, usize>,
}

impl Models {
    fn open(&mut self, r: &ModelRef, opts: &PlanOptions) -> Result<usize> {
        if let Some(&i) = self.by_ref.get(&r.path) {
            return Ok(i);
        }
        let path = resolve_path(r, opts);
        let canon = std::fs::canonicalize(&path).ok();
        if let Some(c) = &canon
            && let Some(i) = self
                .list
                .iter()
                .position(|m| std::fs::canonicalize(&m.path).ok().as_ref() == Some(c))
        {
            self.by_ref.insert(r.path.clone(), i);
            return Ok(i);
        }
        let m = Model::open(&r.path, &path)?;
        self.list.push(m);
        let i = self.list.len() - 1;
        self.by_ref.insert(r.path.clone(), i);
        Ok(i)
    }
}

/// One group of output tensors: a slice of layers (or the non-layer
/// tensors), with its sources.
struct Group<'a> {
    /// `(model, parameters, key path, first source layer)` per source.
    sources: Vec<(usize, &'a Params, &'a str, usize)>,
    base: Option<usize>,
    slice_params: Option<&'a Params>,
    /// Output layer of the group's first layer; `None` for the non-layer
    /// tensors.
    out_first: Option<usize>,
    layers: usize,
    /// Which non-layer tensors the group takes.
    part: NonLayer,
}

/// The non-layer tensors of a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NonLayer {
    /// Layer groups take none.
    None,
    /// Every non-layer tensor (`models:`).
    All,
    /// Those before the layers: the embeddings (`slices:`, from the first
    /// slice).
    Pre,
    /// Those after: final norm, output head (`slices:`, from the last slice).
    Post,
}

/// Tensors mergekit's architectures put before the layers: embeddings.
fn is_pre(name: &str) -> bool {
    !is_head(name) && (name.contains("embed") || name.ends_with("wte.weight") || name.ends_with("wpe.weight"))
}

/// Plans a merge (see the module documentation). Opens every model and
/// checks its headers; reads no tensor data.
pub fn plan(cfg: &MergeConfig, opts: &PlanOptions) -> Result<Plan> {
    let mut notes = Vec::new();
    check_param_names(cfg, &mut notes)?;
    let method = cfg.merge_method;
    let mut models = Models {
        list: Vec::new(),
        by_ref: HashMap::new(),
    };
    let base = match &cfg.base_model {
        Some(r) => Some(models.open(r, opts)?),
        None => None,
    };
    if method.needs_base() && base.is_none() {
        let slice_bases =
            matches!(&cfg.inputs, Inputs::Slices(s) if s.iter().all(|s| s.base_model.is_some()));
        if !slice_bases {
            return Err(plan_err(
                "",
                format!(
                    "`merge_method: {}` needs `base_model` (the model the others were fine-tuned from)",
                    method.name()
                ),
            ));
        }
    }
    let empty = Params::default();
    // Layer groups.
    let mut groups: Vec<Group<'_>> = Vec::new();
    let mut reference;
    match &cfg.inputs {
        Inputs::Models(entries) => {
            let mut sources = Vec::new();
            for e in entries {
                let i = models.open(&e.model, opts)?;
                if sources.iter().any(|s: &(usize, &Params, &str, usize)| s.0 == i) {
                    return Err(plan_err(
                        "",
                        format!("`{}`: model `{}` is listed twice", e.at, e.model.path),
                    ));
                }
                sources.push((i, &e.parameters, e.at.as_str(), 0));
            }
            if let Some(b) = base
                && !sources.iter().any(|s| s.0 == b)
            {
                // mergekit merges a base that is not listed as one more input.
                sources.push((b, &empty, "base_model", 0));
            }
            reference = base.unwrap_or(sources[0].0);
            let layers = layer_count(&models.list[reference])?;
            for s in &sources {
                let l = layer_count(&models.list[s.0])?;
                if l != layers {
                    return Err(MergeError::Model {
                        model: models.list[s.0].name.clone(),
                        path: models.list[s.0].path.clone(),
                        message: format!(
                            "has {l} layers but `{}` has {layers}; merging models of different depths needs `slices:` with layer ranges",
                            models.list[reference].name
                        ),
                    });
                }
            }
            groups.push(Group {
                sources: sources.clone(),
                base,
                slice_params: None,
                out_first: Some(0),
                layers,
                part: NonLayer::None,
            });
            groups.push(Group {
                sources,
                base,
                slice_params: None,
                out_first: None,
                layers: 0,
                part: NonLayer::All,
            });
        }
        Inputs::Slices(slices) => {
            let mut out_layer = 0;
            reference = usize::MAX;
            for s in slices {
                let mut sources = Vec::new();
                let len = s.sources[0].layer_range.1 - s.sources[0].layer_range.0;
                for src in &s.sources {
                    let i = models.open(&src.model, opts)?;
                    let (a, b) = src.layer_range;
                    if b - a != len {
                        return Err(plan_err(
                            "",
                            format!(
                                "`{}.layer_range` covers {} layers but the slice's first source covers {len}: every source of a slice covers the same number",
                                src.at,
                                b - a
                            ),
                        ));
                    }
                    let l = layer_count(&models.list[i])?;
                    if b > l {
                        return Err(plan_err(
                            "",
                            format!(
                                "`{}.layer_range` [{a}, {b}) runs past model `{}`'s {l} layers",
                                src.at, src.model.path
                            ),
                        ));
                    }
                    sources.push((i, &src.parameters, src.at.as_str(), a));
                }
                let sbase = match &s.base_model {
                    Some(r) => Some(models.open(r, opts)?),
                    None => base,
                };
                if let Some(b) = sbase
                    && method.needs_base()
                    && !sources.iter().any(|x| x.0 == b)
                {
                    return Err(plan_err(
                        "",
                        format!(
                            "`{}`: the base model `{}` is not one of the slice's sources; list it with the layer range to use",
                            s.at, models.list[b].name
                        ),
                    ));
                }
                if reference == usize::MAX {
                    reference = sbase
                        .filter(|b| sources.iter().any(|x| x.0 == *b))
                        .unwrap_or(sources[0].0);
                }
                groups.push(Group {
                    sources,
                    base: sbase,
                    slice_params: Some(&s.parameters),
                    out_first: Some(out_layer),
                    layers: len,
                    part: NonLayer::None,
                });
                out_layer += len;
            }
            // mergekit: embeddings from the first slice's sources, the final
            // norm and head from the last slice's (with its parameters).
            for (g, part) in [(0, NonLayer::Pre), (groups.len() - 1, NonLayer::Post)] {
                let from = &groups[g];
                let tail = Group {
                    sources: from.sources.iter().map(|s| (s.0, s.1, s.2, 0)).collect(),
                    base: from.base,
                    slice_params: from.slice_params,
                    out_first: None,
                    layers: 0,
                    part,
                };
                groups.push(tail);
            }
        }
    }
    let models_list = models.list;
    // Architectures must agree.
    if !opts.allow_crimes {
        let arch = |m: &Model| m.config.as_ref().and_then(|c| c.get("architectures")).cloned();
        let ra = arch(&models_list[reference]);
        for m in &models_list {
            let a = arch(m);
            if let (Some(a), Some(ra)) = (&a, &ra)
                && a != ra
            {
                return Err(MergeError::Model {
                    model: m.name.clone(),
                    path: m.path.clone(),
                    message: format!(
                        "its config.json names architectures {a} but `{}` has {ra}; pass --allow-crimes to merge them anyway",
                        models_list[reference].name,
                    ),
                });
            }
        }
    }
    let seed = opts.random_seed.or(cfg.random_seed).unwrap_or(0);
    let mut tensors = Vec::new();
    let mut used: Vec<std::collections::HashSet<String>> = vec![Default::default(); models_list.len()];
    let tied_out = !models_list[reference].order.iter().any(|n| is_head(n));
    for g in &groups {
        let refm = g
            .base
            .filter(|b| g.sources.iter().any(|s| s.0 == *b))
            .unwrap_or(g.sources[0].0);
        let ref_first = g.sources.iter().find(|s| s.0 == refm).map_or(0, |s| s.3);
        let rm = &models_list[refm];
        for name in &rm.order {
            let lay = layer_of(name);
            let (out_name, j) = match (g.out_first, lay) {
                (Some(of), Some((a, b, l))) => {
                    if l < ref_first || l >= ref_first + g.layers {
                        continue;
                    }
                    (with_layer(name, (a, b), of + l - ref_first), Some(l - ref_first))
                }
                (None, None) => {
                    let take = match g.part {
                        NonLayer::None => false,
                        NonLayer::All => true,
                        NonLayer::Pre => is_pre(name),
                        NonLayer::Post => !is_pre(name),
                    };
                    if !take {
                        continue;
                    }
                    (name.clone(), None)
                }
                _ => continue,
            };
            let t = match j {
                Some(j) if g.layers > 1 => j as f64 / (g.layers - 1) as f64,
                Some(_) => 1.0,
                None => 0.0,
            };
            let ctx = Ctx {
                name: out_name.clone(),
                t,
                slice_params: g.slice_params,
                global: &cfg.parameters,
            };
            // Participants: each source's tensor of the same layer.
            let mut parts = Vec::new();
            for &(mi, params, at, first) in &g.sources {
                let m = &models_list[mi];
                let mut in_name = match (lay, j) {
                    (Some((a, b, _)), Some(j)) => with_layer(name, (a, b), first + j),
                    _ => name.clone(),
                };
                if !m.has(&in_name)
                    && is_head(&in_name)
                    && let Some(e) = embed_of(m)
                {
                    notes.push(format!(
                        "model `{}` has no `{in_name}` (tied embeddings): its `{e}` is used for `{out_name}`",
                        m.name
                    ));
                    in_name = e;
                }
                if !m.has(&in_name) {
                    return Err(MergeError::Model {
                        model: m.name.clone(),
                        path: m.path.clone(),
                        message: format!(
                            "has no tensor `{in_name}` (needed for output `{out_name}`; model `{}` has it)",
                            rm.name
                        ),
                    });
                }
                used[mi].insert(in_name.clone());
                parts.push(Part {
                    model: mi,
                    tensor: in_name,
                    params,
                    at,
                });
            }
            let base_part = g.base.and_then(|b| parts.iter().position(|p| p.model == b));
            tensors.push(plan_tensor(
                cfg,
                &models_list,
                &ctx,
                &parts,
                base_part,
                refm,
                seed,
                opts,
            )?);
        }
    }
    // What the reference lacks.
    for (mi, m) in models_list.iter().enumerate() {
        let unused: Vec<&String> = m.order.iter().filter(|n| !used[mi].contains(*n)).collect();
        if mi != reference && !unused.is_empty() && used[mi].iter().len() > 0 {
            let heads = unused.iter().all(|n| is_head(n));
            if heads && tied_out {
                notes.push(format!(
                    "model `{}`'s `{}` is not used: the output ties its embeddings like `{}`",
                    m.name, unused[0], models_list[reference].name
                ));
            } else if matches!(cfg.inputs, Inputs::Models(_)) {
                notes.push(format!(
                    "model `{}` has {} tensor(s) the reference model `{}` lacks (for example `{}`); they are not in the output",
                    m.name,
                    unused.len(),
                    models_list[reference].name,
                    unused[0]
                ));
            }
        }
    }
    let layers = match &cfg.inputs {
        Inputs::Models(_) => layer_count(&models_list[reference]).ok(),
        Inputs::Slices(s) => Some(
            s.iter()
                .map(|s| s.sources[0].layer_range.1 - s.sources[0].layer_range.0)
                .sum(),
        ),
    };
    let tokenizer_from = match &cfg.tokenizer_source {
        None | Some(TokenizerSource::Base) => reference,
        Some(TokenizerSource::Model(r)) => {
            let path = resolve_path(r, opts);
            let canon = std::fs::canonicalize(&path).ok();
            models_list
                .iter()
                .position(|m| {
                    m.name == r.path || (canon.is_some() && std::fs::canonicalize(&m.path).ok() == canon)
                })
                .ok_or_else(|| {
                    plan_err(
                        "",
                        format!("`tokenizer_source: {}` is not one of the merged models", r.path),
                    )
                })?
        }
    };
    // Duplicate output names (overlapping slices that renumber onto each other cannot happen; guard anyway).
    let mut seen = std::collections::HashSet::new();
    for t in &tensors {
        if !seen.insert(t.name.as_str()) {
            return Err(plan_err(&t.name, "two output tensors have this name"));
        }
    }
    Ok(Plan {
        method,
        models: models_list,
        tensors,
        reference,
        tokenizer_from,
        layers,
        notes,
        seed,
    })
}

fn layer_count(m: &Model) -> Result<usize> {
    let mut max = None::<usize>;
    for n in &m.order {
        if let Some((_, _, l)) = layer_of(n) {
            max = Some(max.map_or(l, |x| x.max(l)));
        }
    }
    let from_names = max.map_or(0, |x| x + 1);
    match m.config_layers() {
        Some(c) if c != from_names && from_names > 0 => Err(MergeError::Model {
            model: m.name.clone(),
            path: m.path.clone(),
            message: format!("config.json declares {c} layers but the tensors hold layers 0..{from_names}"),
        }),
        _ => Ok(from_names),
    }
}

#[allow(clippy::too_many_arguments)]
fn plan_tensor(
    cfg: &MergeConfig,
    models: &[Model],
    ctx: &Ctx<'_>,
    parts: &[Part<'_>],
    base: Option<usize>,
    refm: usize,
    seed: u64,
    opts: &PlanOptions,
) -> Result<TensorTask> {
    let name = &ctx.name;
    let method = cfg.merge_method;
    let info = |p: &Part<'_>| models[p.model].get(&p.tensor).expect("checked").1;
    let ref_part = parts.iter().position(|p| p.model == refm).unwrap_or(0);
    let ref_info = info(&parts[ref_part]);
    let mergeable = ref_info.dtype.is_mergeable();
    // Shapes and dtypes.
    let shape = ref_info.shape.clone();
    let mut merged = ref_info.numel();
    let mut tail = None;
    let mut min_rows = shape.first().copied().unwrap_or(0);
    let mut differs = None;
    for p in parts {
        let i = info(p);
        if i.dtype.is_mergeable() != mergeable || (!mergeable && i.dtype != ref_info.dtype) {
            return Err(plan_err(
                name,
                format!(
                    "model `{}` stores it as {} but model `{}` as {}",
                    models[p.model].name, i.dtype, models[refm].name, ref_info.dtype
                ),
            ));
        }
        if i.shape != shape {
            let vocab_like =
                i.shape.len() == 2 && shape.len() == 2 && i.shape[1] == shape[1] && is_vocab_tensor(name);
            if !vocab_like {
                return Err(plan_err(
                    name,
                    format!(
                        "shapes differ: {:?} in model `{}`, {:?} in model `{}`",
                        i.shape, models[p.model].name, shape, models[refm].name
                    ),
                ));
            }
            differs.get_or_insert((p.model, i.shape[0]));
            min_rows = min_rows.min(i.shape[0]);
        }
    }
    if let Some((other, rows)) = differs {
        match opts.vocab {
            VocabPolicy::Error => {
                return Err(plan_err(
                    name,
                    format!(
                        "vocabulary sizes differ: {} rows in model `{}`, {rows} in model `{}`; pass --vocab-mismatch base to merge the {min_rows} shared rows and take the rest from `{}`",
                        shape[0], models[refm].name, models[other].name, models[refm].name
                    ),
                ));
            }
            VocabPolicy::Base => {
                merged = min_rows * shape[1];
                if min_rows < shape[0] {
                    tail = Some(Src {
                        model: refm,
                        tensor: parts[ref_part].tensor.clone(),
                    });
                }
            }
        }
    }
    if !mergeable {
        return Ok(TensorTask {
            name: name.clone(),
            shape,
            dtype: ref_info.dtype,
            op: Op::Copy,
            inputs: parts
                .iter()
                .map(|p| Src {
                    model: p.model,
                    tensor: p.tensor.clone(),
                })
                .collect(),
            base: None,
            merged,
            tail: None,
        });
    }
    let dtype = match cfg.out_dtype.or(cfg.dtype) {
        Some(crate::config::FloatType::F32) => Dtype::F32,
        Some(crate::config::FloatType::F16) => Dtype::F16,
        Some(crate::config::FloatType::BF16) => Dtype::BF16,
        None => ref_info.dtype,
    };
    let src = |p: &Part<'_>| Src {
        model: p.model,
        tensor: p.tensor.clone(),
    };
    let base_src = base.map(|b| src(&parts[b]));
    let others: Vec<&Part<'_>> = parts
        .iter()
        .enumerate()
        .filter(|(i, _)| Some(*i) != base)
        .map(|(_, p)| p)
        .collect();
    let last_dim = shape.last().copied().unwrap_or(1).max(1);
    let row_len = if shape.len() >= 2 { Some(last_dim) } else { None };
    let (op, inputs, base_out): (Op, Vec<Src>, Option<Src>) = match method {
        Method::Linear => {
            let mut w = Vec::new();
            for p in parts {
                w.push(weight_of(ctx, p, name).map_err(|e| {
                    if p.at == "base_model" {
                        plan_err(
                            name,
                            format!(
                                "the base model `{}` is not under `models`; mergekit merges it as one more input, which needs a `weight`: list it under `models` with a weight, or remove `base_model`",
                                models[p.model].name
                            ),
                        )
                    } else {
                        e
                    }
                })? as f32);
            }
            let normalize = flag(ctx.global_param("normalize"), name, true)?;
            (
                Op::Linear {
                    weights: w,
                    normalize,
                },
                parts.iter().map(src).collect(),
                None,
            )
        }
        Method::TaskArithmetic
        | Method::Ties
        | Method::DareLinear
        | Method::DareTies
        | Method::Breadcrumbs
        | Method::BreadcrumbsTies
        | Method::Della
        | Method::DellaLinear => {
            let b = base_src
                .clone()
                .ok_or_else(|| plan_err(name, "needs a base model"))?;
            if others.is_empty() {
                return Err(plan_err(name, "no model besides the base to merge"));
            }
            let tid = tensor_id(name);
            let mut o = match method {
                Method::TaskArithmetic => GtaOptions::task_arithmetic(),
                Method::Ties => GtaOptions::ties(),
                Method::DareLinear => GtaOptions::dare_linear(seed, tid),
                Method::DareTies => GtaOptions::dare_ties(seed, tid),
                Method::Breadcrumbs => GtaOptions::breadcrumbs(),
                Method::BreadcrumbsTies => GtaOptions::breadcrumbs_ties(),
                Method::Della => GtaOptions::della(row_len, seed, tid),
                _ => GtaOptions::della_linear(row_len, seed, tid),
            };
            o.seed = seed;
            o.tensor_id = tid;
            o.normalize = flag(ctx.global_param("normalize"), name, o.normalize)?;
            let rescale = flag(ctx.global_param("rescale"), name, o.rescale != Rescale::None)?;
            o.rescale = if rescale { Rescale::L1 } else { Rescale::None };
            o.lambda = number(ctx.global_param("lambda"), name, "lambda", Some(1.0))? as f32;
            flag(ctx.global_param("int8_mask"), name, false)?;
            let mut params = Vec::new();
            for p in &others {
                let w = weight_of(ctx, p, name)? as f32;
                let mut tp = TaskParams::new(w);
                let d = ctx.model_param(p, "density");
                let at = d.as_ref().map(|d| d.1.clone()).unwrap_or_default();
                tp.density = fraction(number(d, name, "density", Some(1.0))?, &at, name, true)?;
                if matches!(method, Method::Breadcrumbs | Method::BreadcrumbsTies) {
                    let g = ctx.model_param(p, "gamma");
                    let at = g.as_ref().map(|d| d.1.clone()).unwrap_or_default();
                    tp.gamma = fraction(number(g, name, "gamma", Some(0.01))?, &at, name, false)?;
                }
                if matches!(method, Method::Della | Method::DellaLinear) {
                    let e = ctx.model_param(p, "epsilon");
                    let at = e
                        .as_ref()
                        .map(|d| d.1.clone())
                        .unwrap_or_else(|| "`epsilon` (default 0.15)".into());
                    tp.epsilon = number(e, name, "epsilon", Some(0.15))?;
                    if tp.density < 1.0
                        && !(tp.epsilon >= 0.0
                            && tp.density - tp.epsilon > 0.0
                            && tp.density + tp.epsilon <= 1.0)
                    {
                        return Err(plan_err(
                            name,
                            format!(
                                "{at} = {} with density {}: DELLA needs 0 <= epsilon, density - epsilon > 0 and density + epsilon <= 1",
                                tp.epsilon, tp.density
                            ),
                        ));
                    }
                }
                params.push(tp);
            }
            (
                Op::Gta { opts: o, params },
                others.iter().map(|p| src(p)).collect(),
                Some(b),
            )
        }
        Method::Slerp => {
            let b = base.ok_or_else(|| plan_err(name, "slerp needs `base_model`"))?;
            if others.len() != 1 {
                return Err(plan_err(
                    name,
                    format!(
                        "slerp merges exactly two models (the base and one other); this tensor has {}",
                        parts.len()
                    ),
                ));
            }
            let t = number(ctx.global_param("t"), name, "t", None)? as f32;
            (Op::Slerp { t }, vec![src(&parts[b]), src(others[0])], None)
        }
        Method::Nuslerp => {
            if others.len() != 2 {
                return Err(plan_err(
                    name,
                    format!(
                        "nuslerp merges exactly two models (plus an optional base); this tensor has {}",
                        others.len()
                    ),
                ));
            }
            let w0 = weight_of(ctx, others[0], name)? as f32;
            let w1 = weight_of(ctx, others[1], name)? as f32;
            let flatten = flag(ctx.global_param("nuslerp_flatten"), name, true)?;
            let row_wise = flag(ctx.global_param("nuslerp_row_wise"), name, false)?;
            let layout = if flatten || shape.len() < 2 {
                Layout::Flat
            } else if row_wise {
                Layout::Columns(last_dim)
            } else {
                Layout::Rows(last_dim)
            };
            let o = NuslerpOptions {
                layout,
                ..NuslerpOptions::new()
            };
            (
                Op::Nuslerp {
                    weights: [w0, w1],
                    opts: o,
                },
                others.iter().map(|p| src(p)).collect(),
                base_src,
            )
        }
        Method::Multislerp => {
            let mut w = Vec::new();
            for p in &others {
                w.push(weight_of(ctx, p, name)? as f32);
            }
            let o = MultislerpOptions {
                normalize_weights: flag(ctx.global_param("normalize_weights"), name, true)?,
                eps: number(ctx.global_param("eps"), name, "eps", Some(1e-8))?,
            };
            (
                Op::Multislerp { weights: w, opts: o },
                others.iter().map(|p| src(p)).collect(),
                base_src,
            )
        }
        Method::Karcher => {
            let o = KarcherOptions {
                max_iter: number(ctx.global_param("max_iter"), name, "max_iter", Some(10.0))? as u32,
                tol: number(ctx.global_param("tol"), name, "tol", Some(1e-5))?,
            };
            (Op::Karcher { opts: o }, parts.iter().map(src).collect(), None)
        }
        Method::ModelStock => {
            let b = base_src
                .clone()
                .ok_or_else(|| plan_err(name, "model_stock needs `base_model`"))?;
            if others.len() < 2 {
                return Err(plan_err(
                    name,
                    "model_stock needs the base and at least two other models",
                ));
            }
            let fw = flag(ctx.global_param("filter_wise"), name, false)?;
            let o = StockOptions {
                rows: if fw { Some(last_dim) } else { None },
            };
            (
                Op::Stock { opts: o },
                others.iter().map(|p| src(p)).collect(),
                Some(b),
            )
        }
        Method::Sce => {
            let b = base_src
                .clone()
                .ok_or_else(|| plan_err(name, "sce needs `base_model`"))?;
            if others.is_empty() {
                return Err(plan_err(name, "no model besides the base to merge"));
            }
            let k = ctx.global_param("select_topk");
            let at = k.as_ref().map(|d| d.1.clone()).unwrap_or_default();
            let o = SceOptions {
                select_topk: fraction(number(k, name, "select_topk", Some(1.0))?, &at, name, true)?,
            };
            flag(ctx.global_param("int8_mask"), name, false)?;
            (
                Op::Sce { opts: o },
                others.iter().map(|p| src(p)).collect(),
                Some(b),
            )
        }
        Method::Passthrough => {
            if parts.len() != 1 {
                return Err(plan_err(
                    name,
                    format!(
                        "passthrough copies one model's tensor, but {} models supply it (give one model, or one source per slice)",
                        parts.len()
                    ),
                ));
            }
            let scale = match ctx.model_param(&parts[0], "scale") {
                None => None,
                s => Some(number(s, name, "scale", None)? as f32),
            };
            (Op::Passthrough { scale }, vec![src(&parts[0])], None)
        }
    };
    Ok(TensorTask {
        name: name.clone(),
        shape,
        dtype,
        op,
        inputs,
        base: base_out,
        merged,
        tail,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_names() {
        assert_eq!(layer_of("model.layers.12.mlp.up_proj.weight"), Some((13, 15, 12)));
        assert_eq!(layer_of("transformer.h.3.attn.c_attn.weight"), Some((14, 15, 3)));
        assert_eq!(layer_of("model.embed_tokens.weight"), None);
        assert_eq!(layer_of("model.norm.weight"), None);
        assert_eq!(layer_of("xlayers.1.a"), None);
        assert_eq!(with_layer("model.layers.7.x", (13, 14), 31), "model.layers.31.x");
    }

    #[test]
    fn gradients_read_like_mergekit() {
        let g = [0.0, 0.5, 0.3, 0.7, 1.0];
        assert_eq!(gradient_at(&g, 0.0), 0.0);
        assert_eq!(gradient_at(&g, 1.0), 1.0);
        assert!((gradient_at(&g, 0.125) - 0.25).abs() < 1e-12);
        assert!((gradient_at(&g, 0.5) - 0.3).abs() < 1e-12);
        assert_eq!(gradient_at(&[0.4], 0.7), 0.4);
    }

    #[test]
    fn tensor_ids_are_stable() {
        assert_eq!(tensor_id(""), 0x811c_9dc5);
        assert_ne!(tensor_id("a"), tensor_id("b"));
    }
}
