//! Strided row views over caller buffers.
//!
//! A batch of `rows` rows, each `len` elements long, row `i` starting at
//! element `i * stride` (`stride >= len`, so padded rows such as a 32000-token
//! vocabulary stored with stride 32064 are described exactly). The buffer must
//! hold at least `(rows - 1) * stride + len` elements (0 when `rows == 0`);
//! elements in the padding between rows are never read or written.
//!
//! Constructors validate once; functions taking a view rely on it.

use crate::error::{Error, ensure};

/// Elements a `rows x len` view with `stride` spans, or `None` on overflow or
/// when `stride < len`.
#[inline]
pub const fn span(rows: usize, len: usize, stride: usize) -> Option<usize> {
    if stride < len {
        return None;
    }
    if rows == 0 {
        return Some(0);
    }
    match (rows - 1).checked_mul(stride) {
        Some(a) => a.checked_add(len),
        None => None,
    }
}

fn check(buf_len: usize, rows: usize, len: usize, stride: usize) -> Result<(), Error> {
    ensure(
        stride >= len,
        Error::StrideTooSmall {
            arg: "stride",
            stride,
            len,
        },
    )?;
    let needed = span(rows, len, stride).ok_or(Error::SizeOverflow { arg: "rows * stride" })?;
    ensure(
        buf_len >= needed,
        Error::BufferTooShort {
            arg: "data",
            needed,
            got: buf_len,
        },
    )
}

/// A read-only `rows x len` view with a row stride.
#[derive(Debug, Clone, Copy)]
pub struct Rows<'a, T> {
    data: &'a [T],
    rows: usize,
    len: usize,
    stride: usize,
}

impl<'a, T> Rows<'a, T> {
    /// A view of `rows` rows of `len` elements, row `i` at `data[i * stride..]`.
    ///
    /// Errors: [`Error::StrideTooSmall`] if `stride < len`,
    /// [`Error::SizeOverflow`] if the span overflows, [`Error::BufferTooShort`]
    /// if `data` is shorter than the span.
    pub fn new(data: &'a [T], rows: usize, len: usize, stride: usize) -> Result<Self, Error> {
        check(data.len(), rows, len, stride)?;
        Ok(Self {
            data,
            rows,
            len,
            stride,
        })
    }

    /// A dense view: `rows` rows of `len` elements, stride `len`.
    pub fn dense(data: &'a [T], rows: usize, len: usize) -> Result<Self, Error> {
        Self::new(data, rows, len, len)
    }

    /// One row spanning all of `data`.
    pub fn single(data: &'a [T]) -> Self {
        Self {
            data,
            rows: 1,
            len: data.len(),
            stride: data.len(),
        }
    }

    /// Number of rows.
    #[inline]
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Elements per row.
    #[inline]
    pub fn len(&self) -> usize {
        self.len
    }

    /// True if the view holds no element.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.rows == 0 || self.len == 0
    }

    /// Distance between row starts, in elements.
    #[inline]
    pub fn stride(&self) -> usize {
        self.stride
    }

    /// Row `i`. Panics if `i >= rows()`.
    #[inline]
    pub fn row(&self, i: usize) -> &'a [T] {
        assert!(i < self.rows, "row {i} out of {} rows", self.rows);
        let start = i * self.stride;
        &self.data[start..start + self.len]
    }

    /// The underlying buffer (padding included).
    #[inline]
    pub fn data(&self) -> &'a [T] {
        self.data
    }
}

/// A writable `rows x len` view with a row stride.
#[derive(Debug)]
pub struct RowsMut<'a, T> {
    data: &'a mut [T],
    rows: usize,
    len: usize,
    stride: usize,
}

impl<'a, T> RowsMut<'a, T> {
    /// A writable view of `rows` rows of `len` elements, row `i` at
    /// `data[i * stride..]`. Errors as [`Rows::new`].
    pub fn new(data: &'a mut [T], rows: usize, len: usize, stride: usize) -> Result<Self, Error> {
        check(data.len(), rows, len, stride)?;
        Ok(Self {
            data,
            rows,
            len,
            stride,
        })
    }

    /// A dense writable view: stride `len`.
    pub fn dense(data: &'a mut [T], rows: usize, len: usize) -> Result<Self, Error> {
        Self::new(data, rows, len, len)
    }

    /// One row spanning all of `data`.
    pub fn single(data: &'a mut [T]) -> Self {
        let len = data.len();
        Self {
            data,
            rows: 1,
            len,
            stride: len,
        }
    }

    /// Number of rows.
    #[inline]
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Elements per row.
    #[inline]
    pub fn len(&self) -> usize {
        self.len
    }

    /// True if the view holds no element.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.rows == 0 || self.len == 0
    }

    /// Distance between row starts, in elements.
    #[inline]
    pub fn stride(&self) -> usize {
        self.stride
    }

    /// Row `i`, writable. Panics if `i >= rows()`.
    #[inline]
    pub fn row_mut(&mut self, i: usize) -> &mut [T] {
        assert!(i < self.rows, "row {i} out of {} rows", self.rows);
        let start = i * self.stride;
        &mut self.data[start..start + self.len]
    }

    /// Row `i`, read-only. Panics if `i >= rows()`.
    #[inline]
    pub fn row(&self, i: usize) -> &[T] {
        assert!(i < self.rows, "row {i} out of {} rows", self.rows);
        let start = i * self.stride;
        &self.data[start..start + self.len]
    }

    /// A shorter-lived writable view of the same rows.
    #[inline]
    pub fn reborrow(&mut self) -> RowsMut<'_, T> {
        RowsMut {
            data: self.data,
            rows: self.rows,
            len: self.len,
            stride: self.stride,
        }
    }

    /// A read-only view of the same rows.
    #[inline]
    pub fn as_rows(&self) -> Rows<'_, T> {
        Rows {
            data: self.data,
            rows: self.rows,
            len: self.len,
            stride: self.stride,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_and_errors() {
        let buf = [0u8; 10];
        assert_eq!(span(0, 5, 5), Some(0));
        assert_eq!(span(3, 2, 4), Some(10));
        assert!(Rows::new(&buf, 3, 2, 4).is_ok());
        assert_eq!(
            Rows::new(&buf, 3, 3, 4).unwrap_err(),
            Error::BufferTooShort {
                arg: "data",
                needed: 11,
                got: 10
            }
        );
        assert_eq!(
            Rows::new(&buf, 1, 3, 2).unwrap_err(),
            Error::StrideTooSmall {
                arg: "stride",
                stride: 2,
                len: 3
            }
        );
        assert_eq!(
            Rows::new(&buf, usize::MAX, 1, 2).unwrap_err(),
            Error::SizeOverflow { arg: "rows * stride" }
        );
        let v = Rows::new(&buf, 3, 2, 4).unwrap();
        assert_eq!(v.row(2).len(), 2);
    }
}
