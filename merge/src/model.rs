//! Input models: a folder (`config.json` plus `model.safetensors`, or
//! shards listed by `model.safetensors.index.json`) or a single
//! `.safetensors` file, memory-mapped, with every header checked when the
//! model is opened.

use crate::error::{MergeError, Result, io};
use crate::safetensors::{Header, TensorInfo, header_len, parse_header};
use memmap2::Mmap;
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

/// Index file of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// File of an unsharded checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";

/// One memory-mapped safetensors file.
#[derive(Debug)]
pub struct Shard {
    /// Its path.
    pub path: PathBuf,
    /// Its checked header.
    pub header: Header,
    map: Mmap,
}

impl Shard {
    /// Opens, maps and checks `path`.
    pub fn open(path: &Path, model: &str) -> Result<Shard> {
        let bad = |message: String| MergeError::Model {
            model: model.to_string(),
            path: path.to_path_buf(),
            message,
        };
        let file = File::open(path).map_err(io(path, "opening"))?;
        let len = file.metadata().map_err(io(path, "reading the size of"))?.len();
        if len < 8 {
            return Err(bad(format!(
                "file is {len} bytes, too short for a safetensors header (truncated?)"
            )));
        }
        // SAFETY: the mapping is read-only and medley never writes its
        // inputs (the output folder is checked not to be an input). The file
        // must not be truncated or modified by another process while the
        // merge runs (as for every mmap-based loader: safetensors, candle).
        let map = unsafe { Mmap::map(&file) }.map_err(io(path, "memory-mapping"))?;
        let l = header_len(&map[..8], len).map_err(|e| bad(e.to_string()))?;
        let header = parse_header(&map[..(8 + l) as usize], len).map_err(|e| bad(e.to_string()))?;
        Ok(Shard {
            path: path.to_path_buf(),
            header,
            map,
        })
    }

    /// The bytes of tensor `t` (one of this shard's).
    pub fn bytes(&self, t: &TensorInfo) -> &[u8] {
        let a = (self.header.data_start + t.start) as usize;
        let b = (self.header.data_start + t.end) as usize;
        &self.map[a..b]
    }

    /// Maps the pages of `bytes` (a sub-slice of this shard's map) into
    /// the process in one call (`MADV_POPULATE_READ`), instead of one page
    /// fault per 4 KiB page as the data is read. Best effort: kernels
    /// without it just fault as usual.
    pub fn populate(&self, bytes: &[u8]) {
        let base = self.map.as_ptr() as usize;
        let page = 4096usize;
        let lo = (bytes.as_ptr() as usize).saturating_sub(base) / page * page;
        let hi = ((bytes.as_ptr() as usize - base) + bytes.len()).min(self.map.len());
        if hi > lo {
            let _ = self.map.advise_range(memmap2::Advice::PopulateRead, lo, hi - lo);
        }
    }

    /// Tells the kernel this process no longer needs the pages of
    /// `bytes` (a sub-slice of this shard's map) resident: they leave the
    /// process's resident set (the page cache keeps them).
    pub fn release(&self, bytes: &[u8]) {
        let base = self.map.as_ptr() as usize;
        let page = 4096usize;
        let lo = (bytes.as_ptr() as usize).saturating_sub(base);
        let hi = lo + bytes.len();
        let lo = lo.div_ceil(page) * page;
        let hi = hi / page * page;
        if hi > lo {
            // SAFETY: the range lies inside this read-only file mapping,
            // which is never written: MADV_DONTNEED only drops page-table
            // entries, and a later read faults the same file bytes back in.
            // Slices into the range stay valid (their contents do not change).
            let _ = unsafe {
                self.map
                    .unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, lo, hi - lo)
            };
        }
    }
}

/// A model: its shards, its tensors by name and its `config.json`.
#[derive(Debug)]
pub struct Model {
    /// The model as the configuration names it.
    pub name: String,
    /// The folder (or the file, for a single `.safetensors` file).
    pub path: PathBuf,
    /// True when `path` is a folder.
    pub is_folder: bool,
    /// `config.json`, when the folder has one.
    pub config: Option<serde_json::Value>,
    /// The shards.
    pub shards: Vec<Shard>,
    /// Tensor name to (shard, index in that shard's header).
    index: HashMap<String, (usize, usize)>,
    /// Tensor names in storage order (shard by shard, by offset).
    pub order: Vec<String>,
}

fn looks_like_hub_id(s: &str) -> bool {
    let parts: Vec<_> = s.split('/').collect();
    parts.len() == 2
        && !s.starts_with('.')
        && !s.starts_with('/')
        && !s.starts_with('~')
        && parts.iter().all(|p| !p.is_empty())
}

impl Model {
    /// Opens model `name`, found at `path`.
    pub fn open(name: &str, path: &Path) -> Result<Model> {
        let bad = |p: &Path, message: String| MergeError::Model {
            model: name.to_string(),
            path: p.to_path_buf(),
            message,
        };
        if !path.exists() {
            let msg = if looks_like_hub_id(name) {
                format!(
                    "no such folder; medley reads local models only. If `{name}` is a Hugging Face Hub id, download it first (`hf download {name} --local-dir DIR`) and give DIR"
                )
            } else {
                "no such file or folder".to_string()
            };
            return Err(bad(path, msg));
        }
        let (files, is_folder, config) = if path.is_dir() {
            let config = match std::fs::read(path.join("config.json")) {
                Ok(b) => Some(
                    serde_json::from_slice::<serde_json::Value>(&b)
                        .map_err(|e| bad(&path.join("config.json"), format!("not valid JSON: {e}")))?,
                ),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => return Err(io(path.join("config.json"), "reading")(e)),
            };
            let index = path.join(INDEX_FILE);
            let files = if index.exists() {
                let b = std::fs::read(&index).map_err(io(&index, "reading"))?;
                let v: serde_json::Value =
                    serde_json::from_slice(&b).map_err(|e| bad(&index, format!("not valid JSON: {e}")))?;
                let wm = v
                    .get("weight_map")
                    .and_then(|w| w.as_object())
                    .ok_or_else(|| bad(&index, "no `weight_map` object".into()))?;
                let mut files: Vec<String> = Vec::new();
                let mut expect: Vec<(String, String)> = Vec::new();
                for (t, f) in wm {
                    let f = f
                        .as_str()
                        .ok_or_else(|| bad(&index, format!("`weight_map.{t}` is not a file name")))?;
                    if f.contains('/') || f.contains("..") {
                        return Err(bad(
                            &index,
                            format!("`weight_map.{t}` names `{f}`, outside the model folder"),
                        ));
                    }
                    if !files.iter().any(|x| x == f) {
                        files.push(f.to_string());
                    }
                    expect.push((t.clone(), f.to_string()));
                }
                files.sort();
                (
                    files.into_iter().map(|f| path.join(f)).collect::<Vec<_>>(),
                    Some(expect),
                )
            } else if path.join(SINGLE_FILE).exists() {
                (vec![path.join(SINGLE_FILE)], None)
            } else {
                let mut others: Vec<String> = std::fs::read_dir(path)
                    .map_err(io(path, "listing"))?
                    .filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.ends_with(".safetensors") || n.ends_with(".bin") || n.ends_with(".pt"))
                    .collect();
                others.sort();
                let msg = if others.iter().any(|n| n.ends_with(".bin") || n.ends_with(".pt")) {
                    format!(
                        "no {SINGLE_FILE} or {INDEX_FILE}; found PyTorch pickles ({}), which medley does not read: convert them to safetensors first",
                        others.join(", ")
                    )
                } else if others.is_empty() {
                    format!("no {SINGLE_FILE} or {INDEX_FILE} in the folder")
                } else {
                    format!(
                        "no {SINGLE_FILE} or {INDEX_FILE}; the folder has {} (give one file's path to merge it alone, or add an index)",
                        others.join(", ")
                    )
                };
                return Err(bad(path, msg));
            };
            (files, true, config)
        } else {
            if path.extension().and_then(|e| e.to_str()) != Some("safetensors") {
                return Err(bad(path, "not a folder or a .safetensors file".into()));
            }
            ((vec![path.to_path_buf()], None), false, None)
        };
        let (files, expect) = files;
        let mut shards = Vec::with_capacity(files.len());
        for f in &files {
            if !f.exists() {
                return Err(bad(f, format!("shard listed in {INDEX_FILE} is missing")));
            }
            shards.push(Shard::open(f, name)?);
        }
        let mut index = HashMap::new();
        let mut order = Vec::new();
        for (si, s) in shards.iter().enumerate() {
            for (ti, t) in s.header.tensors.iter().enumerate() {
                if let Some((other, _)) = index.insert(t.name.clone(), (si, ti)) {
                    return Err(bad(
                        &s.path,
                        format!(
                            "tensor `{}` is stored twice (also in {})",
                            t.name,
                            shards[other].path.display()
                        ),
                    ));
                }
                order.push(t.name.clone());
            }
        }
        if let Some(expect) = expect {
            for (t, f) in &expect {
                match index.get(t) {
                    None => {
                        return Err(bad(
                            &path.join(f),
                            format!("{INDEX_FILE} lists tensor `{t}` here, but the file does not hold it"),
                        ));
                    }
                    Some(&(si, _)) if shards[si].path != path.join(f) => {
                        return Err(bad(
                            &shards[si].path,
                            format!("{INDEX_FILE} puts tensor `{t}` in {f}, but it is stored here"),
                        ));
                    }
                    _ => {}
                }
            }
            if expect.len() != index.len() {
                let listed: std::collections::HashSet<&str> =
                    expect.iter().map(|(t, _)| t.as_str()).collect();
                let extra = order
                    .iter()
                    .find(|t| !listed.contains(t.as_str()))
                    .expect("more tensors than listed");
                return Err(bad(
                    path,
                    format!("tensor `{extra}` is stored in a shard but not listed in {INDEX_FILE}"),
                ));
            }
        }
        Ok(Model {
            name: name.to_string(),
            path: path.to_path_buf(),
            is_folder,
            config,
            shards,
            index,
            order,
        })
    }

    /// The tensor named `name`: its shard and header entry.
    pub fn get(&self, name: &str) -> Option<(&Shard, &TensorInfo)> {
        self.index.get(name).map(|&(s, t)| {
            let sh = &self.shards[s];
            (sh, &sh.header.tensors[t])
        })
    }

    /// Whether the model has tensor `name`.
    pub fn has(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// The number of layers `config.json` declares (`num_hidden_layers`,
    /// `n_layer` or `num_layers`).
    pub fn config_layers(&self) -> Option<usize> {
        let c = self.config.as_ref()?;
        ["num_hidden_layers", "n_layer", "num_layers"]
            .iter()
            .find_map(|k| c.get(*k).and_then(|v| v.as_u64()))
            .map(|v| v as usize)
    }

    /// The folder holding the model's side files (tokenizer, config).
    pub fn folder(&self) -> &Path {
        if self.is_folder {
            &self.path
        } else {
            self.path.parent().unwrap_or(Path::new("."))
        }
    }
}
