//! The output folder: shard layout, pre-sized shard files, the index, the
//! side files (config, tokenizer, the configuration that produced it), and
//! the all-or-nothing commit.
//!
//! Everything is written into a hidden temporary folder beside the target
//! (`.NAME.medley-tmp-PID`), which is renamed onto the target only when
//! every byte is written and synced; on any error (or when the
//! [`Staging`] is dropped uncommitted) the temporary folder is removed, so
//! a failed or interrupted merge leaves nothing that looks like a model.

use crate::error::{MergeError, Result, io};
use crate::model::{INDEX_FILE, SINGLE_FILE};
use crate::plan::TensorTask;
use crate::safetensors::{OutTensor, write_header};
use std::fs::File;
use std::path::{Path, PathBuf};

/// Default shard size limit: 5 GB (10^9 bytes, as mergekit's `5B`).
pub const DEFAULT_SHARD_BYTES: u64 = 5_000_000_000;

/// Where each output tensor goes.
#[derive(Debug, Clone)]
pub struct Layout {
    /// Shard file names, in order.
    pub files: Vec<String>,
    /// Per shard: its header bytes and its total length.
    pub headers: Vec<(Vec<u8>, u64)>,
    /// Per tensor (plan order): `(shard, absolute byte offset in the file)`.
    pub places: Vec<(usize, u64)>,
    /// Sum of all tensor bytes (the index's `total_size`).
    pub total_size: u64,
}

/// Assigns tensors to shards in plan order: a new shard starts when the
/// next tensor would take the current one past `limit` bytes (a tensor
/// larger than the limit gets a shard of its own). Inside a shard, tensors
/// are ordered by descending element size, so every tensor starts aligned
/// to its element size.
pub fn layout(tensors: &[TensorTask], limit: u64) -> Layout {
    let mut groups: Vec<Vec<usize>> = Vec::new();
    let mut cur = 0u64;
    for (i, t) in tensors.iter().enumerate() {
        let b = t.bytes();
        if groups.is_empty() || (cur > 0 && cur + b > limit) {
            groups.push(Vec::new());
            cur = 0;
        }
        groups.last_mut().expect("a group").push(i);
        cur += b;
    }
    if groups.is_empty() {
        groups.push(Vec::new());
    }
    let n = groups.len();
    let files: Vec<String> = (0..n)
        .map(|i| {
            if n == 1 {
                SINGLE_FILE.to_string()
            } else {
                format!("model-{:05}-of-{:05}.safetensors", i + 1, n)
            }
        })
        .collect();
    let mut places = vec![(0usize, 0u64); tensors.len()];
    let mut headers = Vec::with_capacity(n);
    let mut total_size = 0;
    for (si, g) in groups.iter_mut().enumerate() {
        g.sort_by_key(|&i| std::cmp::Reverse(tensors[i].dtype.size()));
        let outs: Vec<OutTensor> = g
            .iter()
            .map(|&i| OutTensor {
                name: tensors[i].name.clone(),
                dtype: tensors[i].dtype,
                shape: tensors[i].shape.clone(),
            })
            .collect();
        let (h, offs) = write_header(&outs, &[("format".to_string(), "pt".to_string())]);
        let data: u64 = g.iter().map(|&i| tensors[i].bytes()).sum();
        total_size += data;
        for (&i, &o) in g.iter().zip(&offs) {
            places[i] = (si, h.len() as u64 + o);
        }
        let len = h.len() as u64 + data;
        headers.push((h, len));
    }
    Layout {
        files,
        headers,
        places,
        total_size,
    }
}

/// The temporary output folder, removed on drop unless committed.
#[derive(Debug)]
pub struct Staging {
    /// The temporary folder.
    pub dir: PathBuf,
    target: PathBuf,
    committed: bool,
}

impl Staging {
    /// Checks the target and creates the temporary folder beside it.
    /// An existing target is refused unless `overwrite`.
    pub fn new(target: &Path, overwrite: bool) -> Result<Staging> {
        if target.exists() && !overwrite {
            return Err(MergeError::Output {
                path: target.to_path_buf(),
                message: "already exists; pick another folder or pass --overwrite to replace it".into(),
            });
        }
        if target.exists() && !target.is_dir() {
            return Err(MergeError::Output {
                path: target.to_path_buf(),
                message: "exists and is not a folder".into(),
            });
        }
        let name = target
            .file_name()
            .ok_or_else(|| MergeError::Output {
                path: target.to_path_buf(),
                message: "has no folder name".into(),
            })?
            .to_string_lossy()
            .into_owned();
        let parent = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if !parent.is_dir() {
            return Err(MergeError::Output {
                path: target.to_path_buf(),
                message: format!("its parent folder {} does not exist", parent.display()),
            });
        }
        let dir = parent.join(format!(".{name}.medley-tmp-{}", std::process::id()));
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(io(&dir, "removing the stale temporary folder"))?;
        }
        std::fs::create_dir(&dir).map_err(io(&dir, "creating the temporary output folder"))?;
        Ok(Staging {
            dir,
            target: target.to_path_buf(),
            committed: false,
        })
    }

    /// Creates the shard files: header written, length reserved on disk
    /// (`posix_fallocate`, so a full disk is found now, not halfway).
    pub fn create_shards(&self, l: &Layout) -> Result<Vec<File>> {
        use std::os::unix::fs::FileExt;
        use std::os::unix::io::AsRawFd;
        let mut files = Vec::with_capacity(l.files.len());
        for (name, (h, len)) in l.files.iter().zip(&l.headers) {
            let p = self.dir.join(name);
            let f = File::options()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&p)
                .map_err(io(&p, "creating"))?;
            // SAFETY: `f` is an open file descriptor for the whole call;
            // posix_fallocate only reserves blocks.
            let r = unsafe { libc::posix_fallocate(f.as_raw_fd(), 0, *len as libc::off_t) };
            if r != 0 && r != libc::EOPNOTSUPP && r != libc::EINVAL {
                return Err(io(&p, "reserving space for")(std::io::Error::from_raw_os_error(
                    r,
                )));
            }
            f.set_len(*len).map_err(io(&p, "sizing"))?;
            f.write_all_at(h, 0).map_err(io(&p, "writing the header of"))?;
            files.push(f);
        }
        Ok(files)
    }

    /// Writes a side file into the temporary folder.
    pub fn write(&self, name: &str, bytes: &[u8]) -> Result<()> {
        let p = self.dir.join(name);
        std::fs::write(&p, bytes).map_err(io(&p, "writing"))
    }

    /// Copies a file into the temporary folder.
    pub fn copy(&self, from: &Path, name: &str) -> Result<()> {
        let p = self.dir.join(name);
        std::fs::copy(from, &p).map_err(io(from, "copying"))?;
        Ok(())
    }

    /// Renames the temporary folder onto the target (replacing an
    /// existing target when the staging was made with `overwrite`).
    pub fn commit(mut self) -> Result<PathBuf> {
        if self.target.exists() {
            let old = self.dir.with_extension("old");
            std::fs::rename(&self.target, &old).map_err(io(&self.target, "moving aside the existing"))?;
            if let Err(e) = std::fs::rename(&self.dir, &self.target) {
                let _ = std::fs::rename(&old, &self.target);
                return Err(io(&self.target, "renaming the finished output onto")(e));
            }
            std::fs::remove_dir_all(&old).map_err(io(&old, "removing the replaced output"))?;
        } else {
            std::fs::rename(&self.dir, &self.target)
                .map_err(io(&self.target, "renaming the finished output onto"))?;
        }
        self.committed = true;
        Ok(self.target.clone())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// The index JSON of a sharded output.
pub fn index_json(tensors: &[TensorTask], l: &Layout) -> Vec<u8> {
    let mut wm = serde_json::Map::new();
    let mut order: Vec<usize> = (0..tensors.len()).collect();
    order.sort_by(|&a, &b| tensors[a].name.cmp(&tensors[b].name));
    for i in order {
        wm.insert(
            tensors[i].name.clone(),
            serde_json::Value::String(l.files[l.places[i].0].clone()),
        );
    }
    let v = serde_json::json!({"metadata": {"total_size": l.total_size}, "weight_map": wm});
    let mut b = serde_json::to_vec_pretty(&v).expect("JSON");
    b.push(b'\n');
    b
}

/// Tokenizer and generation files copied from the tokenizer's model.
pub const TOKENIZER_FILES: &[&str] = &[
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer.model",
    "added_tokens.json",
    "merges.txt",
    "vocab.json",
    "vocab.txt",
    "chat_template.jinja",
    "chat_template.json",
];

/// The index file name (re-exported for callers).
pub const INDEX: &str = INDEX_FILE;
