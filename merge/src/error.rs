//! The error type of whole-checkpoint merging.

use crate::config::ConfigError;
use std::fmt;
use std::path::PathBuf;

/// Why a merge failed. Every variant names the file, model or tensor
/// concerned; the message says what to do next where there is something
/// to do.
#[derive(Debug)]
#[non_exhaustive]
pub enum MergeError {
    /// The configuration is invalid.
    Config {
        /// The configuration file.
        file: PathBuf,
        /// What and where.
        error: ConfigError,
    },
    /// A model cannot be used (missing, unreadable, corrupt, unsupported).
    Model {
        /// The model as the configuration names it.
        model: String,
        /// The file or folder concerned.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The models do not fit together, or a parameter does not fit a
    /// tensor (found while planning, before any output is written).
    Plan {
        /// The tensor concerned (empty for the whole merge).
        tensor: String,
        /// What is wrong.
        message: String,
    },
    /// The numeric core refused a tensor's merge.
    Core {
        /// The output tensor.
        tensor: String,
        /// The core's error.
        error: medley_core::Error,
    },
    /// Reading or writing a file failed.
    Io {
        /// The file or folder.
        path: PathBuf,
        /// What was being done.
        action: &'static str,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// The output folder cannot be used.
    Output {
        /// The folder.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The run was interrupted (Ctrl-C).
    Cancelled,
}

impl fmt::Display for MergeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MergeError::Config { file, error } => write!(f, "{}: {error}", file.display()),
            MergeError::Model { model, path, message } => {
                if path.as_os_str().is_empty() || path.to_string_lossy() == model.as_str() {
                    write!(f, "model `{model}`: {message}")
                } else {
                    write!(f, "model `{model}` ({}): {message}", path.display())
                }
            }
            MergeError::Plan { tensor, message } => {
                if tensor.is_empty() {
                    f.write_str(message)
                } else {
                    write!(f, "tensor `{tensor}`: {message}")
                }
            }
            MergeError::Core { tensor, error } => {
                write!(f, "tensor `{tensor}`: the merge refused it: {error}")
            }
            MergeError::Io { path, action, source } => {
                write!(f, "{action} {}: {source}", path.display())?;
                if matches!(
                    source.raw_os_error(),
                    Some(libc::ENOSPC) | Some(libc::EFBIG) | Some(libc::EDQUOT)
                ) {
                    write!(f, " (free space or pick another output folder, then run again)")?;
                }
                Ok(())
            }
            MergeError::Output { path, message } => write!(f, "output {}: {message}", path.display()),
            MergeError::Cancelled => f.write_str("interrupted; nothing was written"),
        }
    }
}

impl std::error::Error for MergeError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            MergeError::Io { source, .. } => Some(source),
            MergeError::Config { error, .. } => Some(error),
            _ => None,
        }
    }
}

/// `Result` with [`MergeError`].
pub type Result<T, E = MergeError> = std::result::Result<T, E>;

pub(crate) fn io(
    path: impl Into<PathBuf>,
    action: &'static str,
) -> impl FnOnce(std::io::Error) -> MergeError {
    let path = path.into();
    move |source| MergeError::Io { path, action, source }
}

pub(crate) fn plan_err(tensor: &str, message: impl Into<String>) -> MergeError {
    MergeError::Plan {
        tensor: tensor.to_string(),
        message: message.into(),
    }
}
