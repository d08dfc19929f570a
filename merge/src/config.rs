//! The merge configuration: mergekit's YAML schema, typed.
//!
//! [`MergeConfig::parse`] reads a mergekit configuration and checks its
//! shape: an unknown key, a value of the wrong type or a missing required
//! value is a [`ConfigError`] naming the key path (`models[1].parameters.density`)
//! and its line and column. mergekit features medley does not implement
//! (`tokenizer_source: union`, `modules`, LoRA model references `a+b`,
//! revisions `a@rev`, ...) are errors that say so; nothing is ignored.
//!
//! Parameter *names* are checked against the method when the merge is
//! planned ([`crate::plan`]), since the same YAML keys serve every method.

use crate::yaml::{self, Node, Pos};
use std::fmt;

/// A configuration error: where and what.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError {
    /// The key path, such as `models[1].parameters.weight` (empty for the
    /// document itself).
    pub path: String,
    /// Where in the file.
    pub pos: Pos,
    /// What is wrong, and what to do instead.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{} ({})", self.message, self.pos)
        } else {
            write!(f, "`{}`: {} ({})", self.path, self.message, self.pos)
        }
    }
}

impl std::error::Error for ConfigError {}

fn err(path: &str, pos: Pos, message: impl Into<String>) -> ConfigError {
    ConfigError {
        path: path.to_string(),
        pos,
        message: message.into(),
    }
}

/// A merge method (mergekit's `merge_method` names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Method {
    /// Weighted average (`linear`).
    Linear,
    /// `task_arithmetic`.
    TaskArithmetic,
    /// `ties`.
    Ties,
    /// `dare_linear`.
    DareLinear,
    /// `dare_ties`.
    DareTies,
    /// `breadcrumbs`.
    Breadcrumbs,
    /// `breadcrumbs_ties`.
    BreadcrumbsTies,
    /// `della`.
    Della,
    /// `della_linear`.
    DellaLinear,
    /// `slerp`.
    Slerp,
    /// `nuslerp`.
    Nuslerp,
    /// `multislerp`.
    Multislerp,
    /// `karcher`.
    Karcher,
    /// `model_stock`.
    ModelStock,
    /// `sce`.
    Sce,
    /// `passthrough`.
    Passthrough,
}

impl Method {
    /// Every method, in the order of mergekit's documentation.
    pub const ALL: [Method; 16] = [
        Method::Linear,
        Method::TaskArithmetic,
        Method::Ties,
        Method::DareLinear,
        Method::DareTies,
        Method::Breadcrumbs,
        Method::BreadcrumbsTies,
        Method::Della,
        Method::DellaLinear,
        Method::Slerp,
        Method::Nuslerp,
        Method::Multislerp,
        Method::Karcher,
        Method::ModelStock,
        Method::Sce,
        Method::Passthrough,
    ];

    /// mergekit's name of the method.
    pub fn name(self) -> &'static str {
        match self {
            Method::Linear => "linear",
            Method::TaskArithmetic => "task_arithmetic",
            Method::Ties => "ties",
            Method::DareLinear => "dare_linear",
            Method::DareTies => "dare_ties",
            Method::Breadcrumbs => "breadcrumbs",
            Method::BreadcrumbsTies => "breadcrumbs_ties",
            Method::Della => "della",
            Method::DellaLinear => "della_linear",
            Method::Slerp => "slerp",
            Method::Nuslerp => "nuslerp",
            Method::Multislerp => "multislerp",
            Method::Karcher => "karcher",
            Method::ModelStock => "model_stock",
            Method::Sce => "sce",
            Method::Passthrough => "passthrough",
        }
    }

    /// The method named `s`.
    pub fn from_name(s: &str) -> Option<Method> {
        Method::ALL.into_iter().find(|m| m.name() == s)
    }

    /// Whether the method works on task vectors over a base model that the
    /// configuration must name.
    pub fn needs_base(self) -> bool {
        matches!(
            self,
            Method::TaskArithmetic
                | Method::Ties
                | Method::DareLinear
                | Method::DareTies
                | Method::Breadcrumbs
                | Method::BreadcrumbsTies
                | Method::Della
                | Method::DellaLinear
                | Method::Slerp
                | Method::ModelStock
                | Method::Sce
        )
    }
}

/// A floating-point dtype of the configuration (`dtype`, `out_dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FloatType {
    /// `float32`.
    F32,
    /// `float16`.
    F16,
    /// `bfloat16`.
    BF16,
}

impl FloatType {
    fn parse(s: &str) -> Option<FloatType> {
        match s {
            "float32" | "fp32" | "f32" => Some(FloatType::F32),
            "float16" | "fp16" | "f16" | "half" => Some(FloatType::F16),
            "bfloat16" | "bf16" => Some(FloatType::BF16),
            _ => None,
        }
    }

    /// The name transformers writes in `config.json` (`torch_dtype`).
    pub fn torch_name(self) -> &'static str {
        match self {
            FloatType::F32 => "float32",
            FloatType::F16 => "float16",
            FloatType::BF16 => "bfloat16",
        }
    }
}

/// A scalar parameter value.
#[derive(Debug, Clone, PartialEq)]
pub enum Scalar {
    /// A number.
    Number(f64),
    /// `true` / `false`.
    Bool(bool),
    /// Anything else (kept as text).
    Text(String),
}

/// A parameter value as mergekit accepts it.
#[derive(Debug, Clone, PartialEq)]
pub enum Setting {
    /// One value for every tensor.
    Scalar(Scalar),
    /// A gradient: numbers interpolated over the layers of a slice.
    Gradient(Vec<f64>),
    /// `{filter, value}` entries: the first whose filter is a substring of
    /// the tensor name (or that has no filter, or `*`) gives the value.
    Filtered(Vec<FilterEntry>),
}

/// One `{filter, value}` entry of a [`Setting::Filtered`].
#[derive(Debug, Clone, PartialEq)]
pub struct FilterEntry {
    /// Substring of the tensor name; `None` (or `*`) matches every tensor.
    pub filter: Option<String>,
    /// The value: a scalar or a gradient.
    pub value: Setting,
}

/// Parameters by name, in file order, with where each was given.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Params {
    /// `(name, setting, key path, position)`.
    pub entries: Vec<(String, Setting, String, Pos)>,
}

impl Params {
    /// The setting named `name`.
    pub fn get(&self, name: &str) -> Option<&Setting> {
        self.entries.iter().find(|e| e.0 == name).map(|e| &e.1)
    }

    /// The setting named `name` with where it was given
    /// (`` `models[0].parameters.weight` (line 3, column 15) ``).
    pub fn get_at(&self, name: &str) -> Option<(&Setting, String)> {
        self.entries
            .iter()
            .find(|e| e.0 == name)
            .map(|e| (&e.1, format!("`{}` ({})", e.2, e.3)))
    }
}

/// A model reference: a local folder (or `.safetensors` file), as written.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ModelRef {
    /// The path as written in the configuration.
    pub path: String,
}

/// One entry of `models:`.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelEntry {
    /// The model.
    pub model: ModelRef,
    /// Its parameters.
    pub parameters: Params,
    /// Key path of the entry (for messages).
    pub at: String,
    /// Position of the entry.
    pub pos: Pos,
}

/// One source of an output slice.
#[derive(Debug, Clone, PartialEq)]
pub struct SliceSource {
    /// The model.
    pub model: ModelRef,
    /// Layers `[start, end)` of the model.
    pub layer_range: (usize, usize),
    /// Its parameters.
    pub parameters: Params,
    /// Key path (for messages).
    pub at: String,
    /// Position.
    pub pos: Pos,
}

/// One output slice.
#[derive(Debug, Clone, PartialEq)]
pub struct Slice {
    /// Its sources; each covers the same number of layers.
    pub sources: Vec<SliceSource>,
    /// The slice's base model, if it names one.
    pub base_model: Option<ModelRef>,
    /// The slice's parameters.
    pub parameters: Params,
    /// Key path (for messages).
    pub at: String,
    /// Position.
    pub pos: Pos,
}

/// Where the merged model's tokenizer comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenizerSource {
    /// The base model's.
    Base,
    /// The named model's.
    Model(ModelRef),
}

/// What the configuration merges: `models:` or `slices:`.
#[derive(Debug, Clone, PartialEq)]
pub enum Inputs {
    /// Every tensor of every model, layer by layer.
    Models(Vec<ModelEntry>),
    /// Layer ranges of models, stacked.
    Slices(Vec<Slice>),
}

/// A whole merge configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct MergeConfig {
    /// The method.
    pub merge_method: Method,
    /// The base model.
    pub base_model: Option<ModelRef>,
    /// The inputs.
    pub inputs: Inputs,
    /// Global parameters.
    pub parameters: Params,
    /// `dtype`: the dtype mergekit computes in; in medley, the output dtype
    /// when `out_dtype` is not given (medley always computes in `f32`).
    pub dtype: Option<FloatType>,
    /// `out_dtype`: the dtype of the merged tensors.
    pub out_dtype: Option<FloatType>,
    /// `tokenizer_source` (or `tokenizer.source`).
    pub tokenizer_source: Option<TokenizerSource>,
    /// `chat_template`: `auto`, a built-in name, or a Jinja template.
    pub chat_template: Option<String>,
    /// `random_seed` (a medley extension; the command line's
    /// `--random-seed` overrides it): the seed of DARE's and DELLA's masks.
    pub random_seed: Option<u64>,
    /// Position of `merge_method` (for messages).
    pub method_pos: Pos,
}

// ---------------------------------------------------------------------------
// Readers.

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn expect_map<'a>(n: &'a Node, path: &str) -> Result<&'a [(String, Pos, Node)], ConfigError> {
    match n {
        Node::Map { entries, .. } => Ok(entries),
        other => Err(err(
            path,
            other.pos(),
            format!("expected a mapping, found {}", other.kind()),
        )),
    }
}

fn expect_seq<'a>(n: &'a Node, path: &str, what: &str) -> Result<&'a [Node], ConfigError> {
    match n {
        Node::Seq { items, .. } => Ok(items),
        other => Err(err(
            path,
            other.pos(),
            format!("expected {what}, found {}", other.kind()),
        )),
    }
}

fn expect_str(n: &Node, path: &str) -> Result<String, ConfigError> {
    match n {
        Node::Scalar { text, .. } if !n.is_null() => Ok(text.clone()),
        other => Err(err(
            path,
            other.pos(),
            format!("expected a string, found {}", other.kind()),
        )),
    }
}

fn parse_number(text: &str) -> Option<f64> {
    let t = text.trim();
    match t {
        ".inf" | ".Inf" | ".INF" | "+.inf" => return Some(f64::INFINITY),
        "-.inf" | "-.Inf" | "-.INF" => return Some(f64::NEG_INFINITY),
        ".nan" | ".NaN" | ".NAN" => return Some(f64::NAN),
        _ => {}
    }
    let ok = !t.is_empty()
        && t.chars()
            .all(|c| c.is_ascii_digit() || matches!(c, '.' | '-' | '+' | 'e' | 'E' | '_'))
        && t.chars().any(|c| c.is_ascii_digit());
    if !ok {
        return None;
    }
    t.replace('_', "").parse::<f64>().ok()
}

fn scalar_of(n: &Node) -> Option<Scalar> {
    match n {
        Node::Scalar { text, quoted, .. } => {
            if *quoted {
                return Some(Scalar::Text(text.clone()));
            }
            match text.as_str() {
                "true" | "True" | "TRUE" => return Some(Scalar::Bool(true)),
                "false" | "False" | "FALSE" => return Some(Scalar::Bool(false)),
                _ => {}
            }
            Some(match parse_number(text) {
                Some(v) => Scalar::Number(v),
                None => Scalar::Text(text.clone()),
            })
        }
        _ => None,
    }
}

fn expect_uint(n: &Node, path: &str) -> Result<u64, ConfigError> {
    match scalar_of(n) {
        Some(Scalar::Number(v)) if v >= 0.0 && v.fract() == 0.0 && v < 1.8e19 => Ok(v as u64),
        _ => Err(err(
            path,
            n.pos(),
            format!("expected a non-negative integer, found {}", describe(n)),
        )),
    }
}

fn describe(n: &Node) -> String {
    match n {
        Node::Scalar { text, .. } if !n.is_null() => format!("`{text}`"),
        other => other.kind().to_string(),
    }
}

const SETTING_HELP: &str =
    "a number, true/false, a list of numbers (a gradient over layers), or a list of {filter, value} entries";

fn parse_setting(n: &Node, path: &str, allow_filters: bool) -> Result<Setting, ConfigError> {
    match n {
        Node::Scalar { .. } if n.is_null() => {
            Err(err(path, n.pos(), format!("expected {SETTING_HELP}, found null")))
        }
        Node::Scalar { .. } => Ok(Setting::Scalar(scalar_of(n).expect("scalar"))),
        Node::Map { .. } => Err(err(
            path,
            n.pos(),
            format!("expected {SETTING_HELP}, found a mapping"),
        )),
        Node::Seq { items, pos } => {
            if items.is_empty() {
                return Err(err(
                    path,
                    *pos,
                    format!("expected {SETTING_HELP}, found an empty list"),
                ));
            }
            if items.iter().all(|i| matches!(i, Node::Map { .. })) {
                if !allow_filters {
                    return Err(err(
                        path,
                        *pos,
                        "a filter value must be a number or a gradient, not another filter list",
                    ));
                }
                let mut out = Vec::with_capacity(items.len());
                for (k, item) in items.iter().enumerate() {
                    let ip = format!("{path}[{k}]");
                    let mut filter = None;
                    let mut value = None;
                    for (key, kp, v) in expect_map(item, &ip)? {
                        match key.as_str() {
                            "filter" => {
                                if !v.is_null() {
                                    let f = expect_str(v, &join(&ip, "filter"))?;
                                    filter = (f != "*").then_some(f);
                                }
                            }
                            "value" => value = Some(parse_setting(v, &join(&ip, "value"), false)?),
                            other => {
                                return Err(err(
                                    &join(&ip, other),
                                    *kp,
                                    "unknown key in a filter entry (expected `filter` and `value`)",
                                ));
                            }
                        }
                    }
                    let value =
                        value.ok_or_else(|| err(&ip, item.pos(), "filter entry without a `value`"))?;
                    out.push(FilterEntry { filter, value });
                }
                return Ok(Setting::Filtered(out));
            }
            let mut g = Vec::with_capacity(items.len());
            for (k, item) in items.iter().enumerate() {
                match scalar_of(item) {
                    Some(Scalar::Number(v)) => g.push(v),
                    _ => {
                        return Err(err(
                            &format!("{path}[{k}]"),
                            item.pos(),
                            format!(
                                "a gradient is a list of numbers, found {} (a list mixing numbers and {{filter, value}} entries is not a setting)",
                                describe(item)
                            ),
                        ));
                    }
                }
            }
            Ok(Setting::Gradient(g))
        }
    }
}

fn parse_params(n: &Node, path: &str) -> Result<Params, ConfigError> {
    if n.is_null() {
        return Ok(Params::default());
    }
    let mut p = Params::default();
    for (k, kp, v) in expect_map(n, path)? {
        let kpath = join(path, k);
        p.entries
            .push((k.clone(), parse_setting(v, &kpath, true)?, kpath, *kp));
    }
    Ok(p)
}

fn parse_model_ref(n: &Node, path: &str) -> Result<ModelRef, ConfigError> {
    let s = match n {
        Node::Map { .. } => {
            return Err(err(
                path,
                n.pos(),
                "medley takes a model as a path string (`model: ./my-model`); the mapping form ({model: {path, revision}, lora}) is not supported",
            ));
        }
        _ => expect_str(n, path)?,
    };
    if s.contains('+') && !std::path::Path::new(&s).exists() {
        return Err(err(
            path,
            n.pos(),
            format!(
                "`{s}` looks like mergekit's `model+lora` reference; medley does not apply LoRA adapters: merge the adapter into the model first (for example with peft's merge_and_unload) and give that folder"
            ),
        ));
    }
    if s.contains('@') && !std::path::Path::new(&s).exists() {
        return Err(err(
            path,
            n.pos(),
            format!(
                "`{s}` names a revision (`@...`); medley reads local folders only: download that revision and give its path"
            ),
        ));
    }
    Ok(ModelRef { path: s })
}

fn parse_layer_range(n: &Node, path: &str) -> Result<(usize, usize), ConfigError> {
    let items = expect_seq(n, path, "a list [start, end]")?;
    if items.len() != 2 {
        return Err(err(
            path,
            n.pos(),
            format!("expected [start, end], found {} values", items.len()),
        ));
    }
    let a = expect_uint(&items[0], &format!("{path}[0]"))? as usize;
    let b = expect_uint(&items[1], &format!("{path}[1]"))? as usize;
    if b <= a {
        return Err(err(
            path,
            n.pos(),
            format!("empty layer range [{a}, {b}): end must exceed start"),
        ));
    }
    Ok((a, b))
}

fn unknown(path: &str, pos: Pos, known: &[&str]) -> ConfigError {
    err(
        path,
        pos,
        format!("unknown key (expected one of: {})", known.join(", ")),
    )
}

impl MergeConfig {
    /// Parses and checks a configuration (see the module documentation).
    pub fn parse(text: &str) -> Result<MergeConfig, ConfigError> {
        let root =
            yaml::parse(text).map_err(|e| err("", e.pos, format!("YAML syntax error: {}", e.message)))?;
        let top = expect_map(&root, "")?;
        const TOP: &[&str] = &[
            "merge_method",
            "models",
            "slices",
            "base_model",
            "parameters",
            "dtype",
            "out_dtype",
            "tokenizer_source",
            "tokenizer",
            "chat_template",
            "random_seed",
        ];
        let mut method = None;
        let mut models = None;
        let mut slices = None;
        let mut base_model = None;
        let mut parameters = Params::default();
        let mut dtype = None;
        let mut out_dtype = None;
        let mut tokenizer_source = None;
        let mut chat_template = None;
        let mut random_seed = None;
        for (k, kp, v) in top {
            let path = k.as_str();
            match path {
                "merge_method" => {
                    let s = expect_str(v, path)?;
                    let m = Method::from_name(&s).ok_or_else(|| {
                        let names: Vec<_> = Method::ALL.iter().map(|m| m.name()).collect();
                        let hint = match s.as_str() {
                            "arcee_fusion" | "nearswap" | "ram" | "ramplus_tl" => {
                                " (a mergekit method medley does not implement)"
                            }
                            _ => "",
                        };
                        err(
                            path,
                            v.pos(),
                            format!(
                                "unknown merge method `{s}`{hint}; medley has: {}",
                                names.join(", ")
                            ),
                        )
                    })?;
                    method = Some((m, v.pos()));
                }
                "models" => {
                    let items = expect_seq(v, path, "a list of {model, parameters}")?;
                    let mut out = Vec::new();
                    for (i, it) in items.iter().enumerate() {
                        let ip = format!("models[{i}]");
                        let mut model = None;
                        let mut params = Params::default();
                        for (k2, kp2, v2) in expect_map(it, &ip)? {
                            match k2.as_str() {
                                "model" => model = Some(parse_model_ref(v2, &join(&ip, "model"))?),
                                "parameters" => params = parse_params(v2, &join(&ip, "parameters"))?,
                                other => {
                                    return Err(unknown(&join(&ip, other), *kp2, &["model", "parameters"]));
                                }
                            }
                        }
                        let model =
                            model.ok_or_else(|| err(&ip, it.pos(), "missing required key `model`"))?;
                        out.push(ModelEntry {
                            model,
                            parameters: params,
                            at: ip,
                            pos: it.pos(),
                        });
                    }
                    models = Some((out, *kp));
                }
                "slices" => {
                    let items = expect_seq(v, path, "a list of {sources, ...}")?;
                    let mut out = Vec::new();
                    for (i, it) in items.iter().enumerate() {
                        let ip = format!("slices[{i}]");
                        let mut sources = None;
                        let mut sbase = None;
                        let mut sparams = Params::default();
                        for (k2, kp2, v2) in expect_map(it, &ip)? {
                            let p2 = join(&ip, k2);
                            match k2.as_str() {
                                "sources" => {
                                    let srcs = expect_seq(v2, &p2, "a list of {model, layer_range}")?;
                                    let mut so = Vec::new();
                                    for (j, s) in srcs.iter().enumerate() {
                                        let sp = format!("{p2}[{j}]");
                                        let mut model = None;
                                        let mut range = None;
                                        let mut params = Params::default();
                                        for (k3, kp3, v3) in expect_map(s, &sp)? {
                                            match k3.as_str() {
                                                "model" => {
                                                    model = Some(parse_model_ref(v3, &join(&sp, "model"))?)
                                                }
                                                "layer_range" => {
                                                    range = Some(parse_layer_range(
                                                        v3,
                                                        &join(&sp, "layer_range"),
                                                    )?)
                                                }
                                                "parameters" => {
                                                    params = parse_params(v3, &join(&sp, "parameters"))?
                                                }
                                                other => {
                                                    return Err(unknown(
                                                        &join(&sp, other),
                                                        *kp3,
                                                        &["model", "layer_range", "parameters"],
                                                    ));
                                                }
                                            }
                                        }
                                        let model = model.ok_or_else(|| {
                                            err(&sp, s.pos(), "missing required key `model`")
                                        })?;
                                        let layer_range = range.ok_or_else(|| {
                                            err(&sp, s.pos(), "missing required key `layer_range`")
                                        })?;
                                        so.push(SliceSource {
                                            model,
                                            layer_range,
                                            parameters: params,
                                            at: sp,
                                            pos: s.pos(),
                                        });
                                    }
                                    if so.is_empty() {
                                        return Err(err(&p2, v2.pos(), "a slice needs at least one source"));
                                    }
                                    sources = Some(so);
                                }
                                "base_model" => sbase = Some(parse_model_ref(v2, &p2)?),
                                "parameters" => sparams = parse_params(v2, &p2)?,
                                "residual_weight" => {
                                    return Err(err(
                                        &p2,
                                        *kp2,
                                        "`residual_weight` is not supported by medley",
                                    ));
                                }
                                _ => {
                                    return Err(unknown(&p2, *kp2, &["sources", "base_model", "parameters"]));
                                }
                            }
                        }
                        let sources =
                            sources.ok_or_else(|| err(&ip, it.pos(), "missing required key `sources`"))?;
                        out.push(Slice {
                            sources,
                            base_model: sbase,
                            parameters: sparams,
                            at: ip,
                            pos: it.pos(),
                        });
                    }
                    slices = Some((out, *kp));
                }
                "base_model" => base_model = Some(parse_model_ref(v, path)?),
                "parameters" => parameters = parse_params(v, path)?,
                "dtype" | "out_dtype" => {
                    let s = expect_str(v, path)?;
                    let t = FloatType::parse(&s).ok_or_else(|| {
                        err(
                            path,
                            v.pos(),
                            format!("unknown dtype `{s}` (expected bfloat16, float16 or float32)"),
                        )
                    })?;
                    if path == "dtype" {
                        dtype = Some(t);
                    } else {
                        out_dtype = Some(t);
                    }
                }
                "tokenizer_source" => tokenizer_source = Some(parse_tokenizer_source(v, path)?),
                "tokenizer" => {
                    for (k2, kp2, v2) in expect_map(v, path)? {
                        let p2 = join(path, k2);
                        match k2.as_str() {
                            "source" => tokenizer_source = Some(parse_tokenizer_source(v2, &p2)?),
                            "tokens" | "pad_to_multiple_of" => {
                                return Err(err(
                                    &p2,
                                    *kp2,
                                    format!(
                                        "`tokenizer.{k2}` (building a new vocabulary) is not supported by medley: give `tokenizer_source: base` or a model"
                                    ),
                                ));
                            }
                            other => return Err(unknown(&join(path, other), *kp2, &["source"])),
                        }
                    }
                }
                "chat_template" => chat_template = Some(expect_str(v, path)?),
                "random_seed" => random_seed = Some(expect_uint(v, path)?),
                "modules" => {
                    return Err(err(
                        path,
                        *kp,
                        "`modules` (multi-module architectures such as vision-language models) is not supported by medley",
                    ));
                }
                "name" => {
                    return Err(err(
                        path,
                        *kp,
                        "`name` belongs to mergekit-multi's multi-document configurations, which medley does not support: merge each document separately",
                    ));
                }
                other => return Err(unknown(other, *kp, TOP)),
            }
        }
        if tokenizer_source.is_some()
            && top.iter().any(|e| e.0 == "tokenizer")
            && top.iter().any(|e| e.0 == "tokenizer_source")
        {
            return Err(err(
                "tokenizer",
                root.pos(),
                "give either `tokenizer_source` or `tokenizer`, not both",
            ));
        }
        let (merge_method, method_pos) =
            method.ok_or_else(|| err("", root.pos(), "missing required key `merge_method`"))?;
        let inputs = match (models, slices) {
            (Some(_), Some((_, p))) => {
                return Err(err("slices", p, "give either `models` or `slices`, not both"));
            }
            (Some((m, p)), None) => {
                if m.is_empty() {
                    return Err(err("models", p, "the list of models is empty"));
                }
                Inputs::Models(m)
            }
            (None, Some((s, p))) => {
                if s.is_empty() {
                    return Err(err("slices", p, "the list of slices is empty"));
                }
                Inputs::Slices(s)
            }
            (None, None) => return Err(err("", root.pos(), "missing required key `models` (or `slices`)")),
        };
        Ok(MergeConfig {
            merge_method,
            base_model,
            inputs,
            parameters,
            dtype,
            out_dtype,
            tokenizer_source,
            chat_template,
            random_seed,
            method_pos,
        })
    }
}

fn parse_tokenizer_source(n: &Node, path: &str) -> Result<TokenizerSource, ConfigError> {
    let s = expect_str(n, path)?;
    match s.as_str() {
        "base" => Ok(TokenizerSource::Base),
        "union" => Err(err(
            path,
            n.pos(),
            "`union` (a merged vocabulary) is not supported by medley: give `base` or the path of one of the models",
        )),
        _ => Ok(TokenizerSource::Model(parse_model_ref(n, path)?)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ties_config_parses() {
        let c = MergeConfig::parse(
            "models:\n  - model: ./a\n    parameters:\n      density: [1, 0.7, 0.1]\n      weight: 1.0\n  - model: ./b\n    parameters:\n      density: 0.5\n      weight: [0, 0.3, 0.7, 1]\n  - model: ./base\nmerge_method: ties\nbase_model: ./base\nparameters:\n  normalize: true\n  int8_mask: true\ndtype: bfloat16\n",
        )
        .unwrap();
        assert_eq!(c.merge_method, Method::Ties);
        let Inputs::Models(m) = &c.inputs else { panic!() };
        assert_eq!(m.len(), 3);
        assert_eq!(
            m[0].parameters.get("density"),
            Some(&Setting::Gradient(vec![1.0, 0.7, 0.1]))
        );
        assert_eq!(
            c.parameters.get("normalize"),
            Some(&Setting::Scalar(Scalar::Bool(true)))
        );
        assert_eq!(c.dtype, Some(FloatType::BF16));
        assert_eq!(c.base_model.unwrap().path, "./base");
    }

    #[test]
    fn filters_and_slices_parse() {
        let c = MergeConfig::parse(
            "slices:\n  - sources:\n      - model: a\n        layer_range: [0, 32]\n      - model: b\n        layer_range: [0, 32]\nmerge_method: slerp\nbase_model: a\nparameters:\n  t:\n    - filter: self_attn\n      value: [0, 0.5, 0.3, 0.7, 1]\n    - filter: mlp\n      value: [1, 0.5, 0.7, 0.3, 0]\n    - value: 0.5\ndtype: bfloat16\n",
        )
        .unwrap();
        let Inputs::Slices(s) = &c.inputs else { panic!() };
        assert_eq!(s[0].sources[1].layer_range, (0, 32));
        let Some(Setting::Filtered(f)) = c.parameters.get("t") else {
            panic!()
        };
        assert_eq!(f[0].filter.as_deref(), Some("self_attn"));
        assert_eq!(f[2].filter, None);
        assert_eq!(f[2].value, Setting::Scalar(Scalar::Number(0.5)));
    }

    fn error_of(text: &str) -> ConfigError {
        MergeConfig::parse(text).unwrap_err()
    }

    #[test]
    fn errors_name_the_key_and_place() {
        let e = error_of("merge_method: ties\nmodels:\n  - model: a\n    paramters: {weight: 1}\n");
        assert_eq!(e.path, "models[0].paramters");
        assert_eq!(e.pos.line, 4);
        assert!(e.to_string().contains("unknown key"), "{e}");

        let e = error_of("merge_method: ties\nmodels:\n  - model: a\n    parameters: {density: [0.1, x]}\n");
        assert_eq!(e.path, "models[0].parameters.density[1]");

        let e = error_of("merge_method: tie\nmodels:\n  - model: a\n");
        assert!(e.message.contains("unknown merge method `tie`"), "{e}");
        let e = error_of("models:\n  - model: a\n");
        assert!(e.message.contains("missing required key `merge_method`"), "{e}");
        let e = error_of("merge_method: linear\nmodels:\n  - parameters: {weight: 1}\n");
        assert!(e.message.contains("missing required key `model`"), "{e}");
        let e = error_of("merge_method: linear\nmodels: ./a\n");
        assert!(e.message.contains("expected a list"), "{e}");
        let e = error_of("merge_method: linear\nmodels:\n  - model: a\ndtype: float8\n");
        assert!(e.message.contains("unknown dtype `float8`"), "{e}");
        let e = error_of("merge_method: linear\nmodels:\n  - model: [a\n");
        assert!(e.message.contains("YAML syntax error"), "{e}");
    }

    #[test]
    fn unsupported_mergekit_features_say_so() {
        let e = error_of("merge_method: linear\nmodels:\n  - model: a\ntokenizer_source: union\n");
        assert!(
            e.message.contains("`union`") && e.message.contains("not supported"),
            "{e}"
        );
        let e = error_of("merge_method: linear\nmodels:\n  - model: org/model+org/lora\n");
        assert!(e.message.contains("LoRA"), "{e}");
        let e = error_of("merge_method: linear\nmodels:\n  - model: org/model@main\n");
        assert!(e.message.contains("revision"), "{e}");
        let e = error_of("merge_method: arcee_fusion\nmodels:\n  - model: a\n");
        assert!(e.message.contains("does not implement"), "{e}");
        let e = error_of("merge_method: linear\nmodules: {}\n");
        assert!(e.message.contains("not supported"), "{e}");
        let e = error_of(
            "merge_method: linear\nmodels:\n  - model: a\ntokenizer:\n  source: base\n  tokens: {}\n",
        );
        assert!(e.message.contains("not supported"), "{e}");
    }
}
