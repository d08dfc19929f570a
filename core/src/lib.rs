#![no_std]
#![deny(unsafe_code)]
#![doc(test(attr(deny(warnings))))]
//! # medley-core
//!
//! The `no_std`, allocation-free numeric core of medley: primitives for
//! combining models.
//!
//! - [`softmax`]: softmax, log-softmax and log-sum-exp over strided rows,
//!   with temperature and defined behaviour for masked, `+inf` and NaN rows.
//! - [`distill`]: soft-target cross-entropy, KL and student gradients
//!   against an ensemble, fused with the combination.
//! - [`ensemble`]: combining the next-token distributions of several models
//!   (linear and log-linear interpolation, per-row weights, temperatures,
//!   padded vocabularies, plausibility masks), with optional per-row
//!   uncertainty (entropy, top-1, margin, model disagreement) fused in.
//! - [`sample`]: the next token from a (combined) distribution: greedy,
//!   temperature, top-k, top-p and min-p by Gumbel-max with the core's
//!   Philox generator, thresholds by exact radix select (no sort).
//! - [`learn`]: combination weights learnt from held-out data (EM for
//!   linear weights, Newton's method for signed log-linear coefficients)
//!   and context-dependent posterior weights.
//! - [`cascade`]: which rows to escalate to a larger model, by threshold or
//!   by an exact escalation rate.
//! - [`merge`]: merging model weights tensor by tensor (soups, task
//!   arithmetic, TIES, DARE, SLERP, Model Stock, SCE, ...).
//! - [`moe`]: mixture-of-experts gating, capacity, auxiliary losses and
//!   routing plans.
//!
//! ## Conventions (every module follows them)
//!
//! - The caller provides every buffer; nothing allocates. Inputs are slices
//!   or [`Rows`] views (rows, length, stride), outputs are `&mut` slices or
//!   [`RowsMut`] views.
//! - Inputs may be `f32`, [`f16`](struct@f16) or [`bf16`] ([`Element`]); arithmetic and
//!   accumulation are `f32`.
//! - Every fallible function returns `Result<_, `[`Error`]`>`; the error
//!   names the argument (and index) that was wrong, and a failed call leaves
//!   its outputs untouched.
//! - Row-wise functions return a [`Report`] counting fully masked rows and
//!   rows whose outputs are NaN, so no NaN leaves the core unflagged.
//! - No `unsafe`: the crate is `#![deny(unsafe_code)]`.

pub mod cascade;
pub mod distill;
pub mod element;
pub mod ensemble;
pub mod error;
pub mod learn;
pub mod math;
pub mod merge;
pub mod moe;
pub mod rng;
pub(crate) mod rowops;
pub mod rows;
pub mod sample;
pub mod simd;
pub mod softmax;

pub use element::{DType, Element};
pub use error::Error;
pub use half::{bf16, f16};
pub use rows::{Rows, RowsMut};
pub use softmax::Report;

// The README's Rust examples run as doctests, so they cannot go stale.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
struct ReadmeDoctests;
