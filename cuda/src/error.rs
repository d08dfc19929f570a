//! Errors of the CUDA layer: a driver failure with its raw code, or an
//! argument problem found before anything was launched.

use crate::driver::DriverError;
use core::fmt;

/// What went wrong in a medley-cuda call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CudaError {
    /// A driver call failed; the raw `CUresult` is kept.
    Driver(DriverError),
    /// An argument was invalid (shape, stride, parameter): the same
    /// variants the CPU core reports for the same mistake.
    Invalid(medley_core::Error),
    /// A device pointer is not aligned as the kernel requires.
    Misaligned {
        /// The argument.
        arg: &'static str,
        /// The required alignment in bytes.
        align: usize,
    },
    /// A device pointer that must be given is null.
    Null {
        /// The argument.
        arg: &'static str,
    },
    /// The loaded kernels belong to another CUDA context than the caller's.
    WrongContext,
    /// The device cannot run this kernel (compute capability, cooperative
    /// launch support, or not enough resident blocks).
    Unsupported {
        /// What is missing.
        what: &'static str,
    },
}

impl From<DriverError> for CudaError {
    fn from(e: DriverError) -> Self {
        CudaError::Driver(e)
    }
}

impl From<medley_core::Error> for CudaError {
    fn from(e: medley_core::Error) -> Self {
        CudaError::Invalid(e)
    }
}

impl fmt::Display for CudaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CudaError::Driver(e) => write!(f, "{e}"),
            CudaError::Invalid(e) => write!(f, "{e}"),
            CudaError::Misaligned { arg, align } => write!(f, "`{arg}` is not {align}-byte aligned"),
            CudaError::Null { arg } => write!(f, "`{arg}` is null"),
            CudaError::WrongContext => write!(f, "kernels were loaded in another CUDA context"),
            CudaError::Unsupported { what } => write!(f, "unsupported on this device: {what}"),
        }
    }
}

impl std::error::Error for CudaError {}
