//! The panic boundary every `extern "C"` body runs inside (rustls-ffi's
//! `ffi_panic_boundary!`): no unwinding ever crosses into C.
//!
//! Two forms:
//! - `ffi_boundary!({ ...; Ok(()) })` for functions returning a
//!   [`medley_status`]: the body is a closure returning
//!   `Result<(), Fail>` (so `?` works); an `Err` is recorded as the thread's
//!   last failure and returned as its status; a panic is recorded and
//!   returned as `MEDLEY_STATUS_PANIC`.
//! - `ffi_boundary!(default = value, { ... })` for the query functions that
//!   return something else: a panic returns `value`, nothing is recorded.
//!
//! Unwinding must be enabled for the catch to work: the library is built
//! with the default `panic = "unwind"`. (Built with `panic = "abort"`, a bug
//! would abort the process instead of returning `MEDLEY_STATUS_PANIC`.)

use crate::status::{Fail, medley_status, record};

/// See the [module documentation](self).
macro_rules! ffi_boundary {
    (default = $default:expr, $body:block) => {
        match ::std::panic::catch_unwind(::std::panic::AssertUnwindSafe(|| $body)) {
            Ok(v) => v,
            Err(_) => $default,
        }
    };
    ($body:block) => {
        $crate::boundary::finish(::std::panic::catch_unwind(::std::panic::AssertUnwindSafe(
            || -> ::core::result::Result<(), $crate::status::Fail> { $body },
        )))
    };
}

/// The status of a caught body: `Ok`, or the recorded failure.
pub(crate) fn finish(r: std::thread::Result<Result<(), Fail>>) -> medley_status {
    match r {
        Ok(Ok(())) => medley_status::Ok,
        Ok(Err(f)) => record(f),
        Err(_) => record(Fail::Panic),
    }
}

#[cfg(test)]
mod tests {
    use crate::status::{Fail, last, medley_status};

    fn body(panic: bool) -> medley_status {
        ffi_boundary!({
            if panic {
                panic!("boom (expected by the test)");
            }
            Err(Fail::Null { arg: "x", index: 0 })
        })
    }

    #[test]
    fn a_panic_becomes_a_status() {
        assert_eq!(body(false), medley_status::NullArgument);
        assert_eq!(last(), Some(Fail::Null { arg: "x", index: 0 }));
        assert_eq!(body(true), medley_status::Panic);
        assert_eq!(last(), Some(Fail::Panic));
        let v: i32 = ffi_boundary!(default = -1, { panic!("boom (expected by the test)") });
        assert_eq!(v, -1);
    }
}
