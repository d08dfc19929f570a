//! The one error type of the core.
//!
//! Every fallible function returns [`Result<T, Error>`](Result). Variants name
//! the argument that was wrong (`arg`, the parameter's name as documented on
//! the function, with a `.field` suffix for fields of option structs) and,
//! where it helps, the offending index and the sizes involved. Errors are
//! detected before any output is written: a call that returns `Err` leaves
//! every output buffer untouched.

use core::fmt;

/// What was wrong with a call. Small, `Copy`, comparable; no allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Error {
    /// A buffer is shorter than its shape requires.
    BufferTooShort {
        /// The argument.
        arg: &'static str,
        /// Elements required by the shape.
        needed: usize,
        /// Elements provided.
        got: usize,
    },
    /// A size or count disagrees with the one it must equal.
    LengthMismatch {
        /// The argument whose size is wrong.
        arg: &'static str,
        /// Its index when the argument is one of a list (0 otherwise).
        index: usize,
        /// The size it must have.
        expected: usize,
        /// The size it has.
        got: usize,
    },
    /// A size exceeds a limit (more models than supported, a model
    /// vocabulary longer than the output, a vocabulary that does not fit the
    /// `u32` token ids, ...).
    TooLarge {
        /// The argument.
        arg: &'static str,
        /// Its index when the argument is one of a list (0 otherwise).
        index: usize,
        /// The largest allowed size.
        max: usize,
        /// The size given.
        got: usize,
    },
    /// A row stride is smaller than the row length.
    StrideTooSmall {
        /// The argument.
        arg: &'static str,
        /// The stride given.
        stride: usize,
        /// The row length it must cover.
        len: usize,
    },
    /// A size computation (rows x stride, elements x bytes, ...) overflows,
    /// or an index would not fit the output index type.
    SizeOverflow {
        /// The argument whose size overflows.
        arg: &'static str,
    },
    /// A dimension or list that must be non-empty is empty.
    Empty {
        /// The empty argument.
        arg: &'static str,
    },
    /// A scalar parameter is NaN or infinite where a finite value is required.
    NonFinite {
        /// The parameter.
        arg: &'static str,
        /// Its index when the parameter is a list (0 for a scalar).
        index: usize,
    },
    /// A parameter is finite but outside its documented range
    /// (a temperature <= 0, a negative linear weight, alpha outside [0, 1], ...).
    OutOfRange {
        /// The parameter.
        arg: &'static str,
        /// Its index when the parameter is a list (0 for a scalar).
        index: usize,
    },
    /// Weights that a normalization divides by sum to zero.
    ZeroSum {
        /// The weights.
        arg: &'static str,
        /// The row (for per-row weights) or 0.
        index: usize,
    },
    /// An index (a model, an expert, a token) is outside its range.
    IndexOutOfBounds {
        /// The argument holding the index.
        arg: &'static str,
        /// The index given.
        index: usize,
        /// The exclusive upper bound.
        bound: usize,
    },
    /// Two or more options cannot be used together, or a required output is
    /// missing.
    Unsupported {
        /// What was asked for.
        what: &'static str,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Error::BufferTooShort { arg, needed, got } => {
                write!(f, "`{arg}` holds {got} elements but its shape needs {needed}")
            }
            Error::LengthMismatch {
                arg,
                index,
                expected,
                got,
            } => {
                write!(f, "`{arg}` (#{index}) has size {got}, expected {expected}")
            }
            Error::TooLarge { arg, index, max, got } => {
                write!(f, "`{arg}` (#{index}) has size {got}, more than the limit {max}")
            }
            Error::StrideTooSmall { arg, stride, len } => {
                write!(f, "`{arg}` has row stride {stride} < row length {len}")
            }
            Error::SizeOverflow { arg } => write!(f, "size of `{arg}` overflows"),
            Error::Empty { arg } => write!(f, "`{arg}` is empty"),
            Error::NonFinite { arg, index } => write!(f, "`{arg}[{index}]` is NaN or infinite"),
            Error::OutOfRange { arg, index } => write!(f, "`{arg}[{index}]` is out of range"),
            Error::ZeroSum { arg, index } => {
                write!(f, "`{arg}` (row {index}) sums to zero but is normalized")
            }
            Error::IndexOutOfBounds { arg, index, bound } => {
                write!(f, "`{arg}` index {index} is not below {bound}")
            }
            Error::Unsupported { what } => write!(f, "unsupported: {what}"),
        }
    }
}

impl core::error::Error for Error {}

/// `Ok(())` if `cond`, else `Err(err)`: keeps argument checks to one line.
#[inline]
pub(crate) fn ensure(cond: bool, err: Error) -> Result<(), Error> {
    if cond { Ok(()) } else { Err(err) }
}

/// Checks that `got == expected`, naming `arg` otherwise.
#[inline]
pub(crate) fn ensure_len(arg: &'static str, expected: usize, got: usize) -> Result<(), Error> {
    ensure_len_at(arg, 0, expected, got)
}

/// Checks that `got == expected` for element `index` of the list `arg`.
#[inline]
pub(crate) fn ensure_len_at(
    arg: &'static str,
    index: usize,
    expected: usize,
    got: usize,
) -> Result<(), Error> {
    ensure(
        expected == got,
        Error::LengthMismatch {
            arg,
            index,
            expected,
            got,
        },
    )
}
