//! Expert capacity (Switch Transformer, GShard): each expert accepts at most
//! `C` assignments; the rest are **dropped and reported**, never silently
//! lost.
//!
//! [`capacity`] computes `C = ceil(capacity_factor * T * k / E)` exactly;
//! [`apply_capacity`] walks the assignments in a [`Priority`] order, gives
//! each accepted one its position in its expert's buffer (the dispatch row
//! `e * C + position` of the fixed-capacity layout, DeepGEMM's "masked"
//! layout with `masked_m = counts`), and marks each dropped one with
//! [`NO_POSITION`] and, in `kept_ids`, with [`NO_EXPERT`]: the plans, the
//! layer and the statistics skip such slots, so a dropped token's MoE
//! output is zero (the residual carries it, as in Switch).

use super::{NO_EXPERT, NO_POSITION, check_experts, check_ids, check_slots};
use crate::error::{Error, ensure, ensure_len};

/// `C = ceil(capacity_factor * T * k / E)`, computed exactly (the `f32`
/// factor is decomposed into an integer mantissa and a power of two; no
/// floating-point rounding can move the ceiling), capped at `T * k` (no
/// expert can receive more assignments).
///
/// Errors: [`Error::NonFinite`] / [`Error::OutOfRange`] (`capacity_factor`
/// not finite and `> 0`), [`Error::OutOfRange`] (`k` = 0),
/// [`Error::Empty`] / [`Error::TooLarge`] (`experts` = 0 or above
/// `u32::MAX`), [`Error::SizeOverflow`] (`tokens * k`).
///
/// ```
/// use medley_core::moe::capacity::capacity;
/// assert_eq!(capacity(1.25, 4096, 8, 256).unwrap(), 160);
/// assert_eq!(capacity(1.0, 10, 2, 3).unwrap(), 7); // ceil(20 / 3)
/// ```
pub fn capacity(capacity_factor: f32, tokens: usize, k: usize, experts: usize) -> Result<usize, Error> {
    let f = capacity_factor;
    ensure(
        f.is_finite(),
        Error::NonFinite {
            arg: "capacity_factor",
            index: 0,
        },
    )?;
    ensure(
        f > 0.0,
        Error::OutOfRange {
            arg: "capacity_factor",
            index: 0,
        },
    )?;
    ensure(k > 0, Error::OutOfRange { arg: "k", index: 0 })?;
    check_experts(experts)?;
    let n = tokens
        .checked_mul(k)
        .ok_or(Error::SizeOverflow { arg: "tokens * k" })?;
    if n == 0 {
        return Ok(0);
    }
    // f = mant * 2^exp exactly, mant < 2^24.
    let bits = f.to_bits();
    let biased = ((bits >> 23) & 0xff) as i32;
    let (mant, exp2) = if biased == 0 {
        ((bits & 0x7f_ffff) as u128, -149)
    } else {
        (((bits & 0x7f_ffff) | 0x80_0000) as u128, biased - 150)
    };
    let num = mant * n as u128; // < 2^88
    let e = experts as u128;
    let c: u128 = if exp2 >= 0 {
        // num * 2^exp2 / E; once it reaches n it is capped anyway.
        if exp2 >= 40 {
            n as u128
        } else {
            (num << exp2).div_ceil(e)
        }
    } else {
        let sh = (-exp2) as u32;
        if sh >= 100 {
            // num * 2^-sh < 2^-12 and num > 0: ceil is 1.
            1
        } else {
            match e.checked_mul(1u128 << sh) {
                Some(d) if d.leading_zeros() > 0 => num.div_ceil(d),
                _ => 1,
            }
        }
    };
    Ok(c.min(n as u128) as usize)
}

/// The order in which assignments claim capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Priority {
    /// Slot order `i = t * k + j`: token by token, a token's choices in `j`
    /// order (Switch Transformer; MegaBlocks with a capacity factor).
    #[default]
    TokenOrder,
    /// Choice-major: every token's first choice (in token order), then every
    /// second choice, and so on (GShard / fairseq `top2gate`: second choices
    /// are placed after all first choices).
    ChoiceOrder,
}

/// What [`apply_capacity`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct CapacityReport {
    /// Assignments accepted.
    pub kept: u64,
    /// Assignments dropped because their expert was full.
    pub dropped: u64,
    /// Assignments that arrived already routed nowhere ([`NO_EXPERT`]).
    pub unrouted: u64,
}

/// Applies expert capacity `capacity` to the `[T, k]` assignments `ids`.
///
/// Walks the slots in `priority` order; the first `capacity` slots of each
/// expert are kept. Writes (all `T * k` long unless noted):
///
/// - `positions[i]`: the position `0..capacity` of slot `i` in its expert's
///   buffer (assignment order), or [`NO_POSITION`] if dropped or unrouted;
/// - `counts[e]` (`E` long): the slots expert `e` accepted
///   (`min(load_e, capacity)`; the `masked_m` of a masked layout);
/// - `kept_ids` (optional): `ids` with every dropped slot replaced by
///   [`NO_EXPERT`], ready for the [plans](super::plan) and the
///   [layer](super::layer).
///
/// `ids` may already hold [`NO_EXPERT`] (counted as `unrouted`, never
/// placed). The returned report counts kept and dropped assignments.
///
/// Errors: [`Error::OutOfRange`] (`k` = 0), [`Error::LengthMismatch`]
/// (`ids` not a multiple of `k`; `positions`, `kept_ids`, `counts`),
/// [`Error::Empty`] / [`Error::TooLarge`] (`experts`), [`Error::TooLarge`]
/// (`ids`: more than `u32::MAX` slots), [`Error::IndexOutOfBounds`] (an id
/// `>= experts` other than [`NO_EXPERT`]).
///
/// ```
/// use medley_core::moe::{NO_POSITION, capacity::{apply_capacity, Priority}};
/// // 3 tokens, k = 2, experts 0 and 1, capacity 2.
/// let ids = [0u32, 1, 0, 1, 1, 0];
/// let mut pos = [0u32; 6];
/// let mut counts = [0u32; 2];
/// let rep = apply_capacity(&ids, 2, 2, 2, Priority::TokenOrder, &mut pos, &mut counts, None).unwrap();
/// assert_eq!(pos, [0, 0, 1, 1, NO_POSITION, NO_POSITION]);
/// assert_eq!((rep.kept, rep.dropped), (4, 2));
/// ```
#[allow(clippy::too_many_arguments)]
pub fn apply_capacity(
    ids: &[u32],
    k: usize,
    experts: usize,
    capacity: usize,
    priority: Priority,
    positions: &mut [u32],
    counts: &mut [u32],
    kept_ids: Option<&mut [u32]>,
) -> Result<CapacityReport, Error> {
    ensure(k > 0, Error::OutOfRange { arg: "k", index: 0 })?;
    check_experts(experts)?;
    let n = ids.len();
    ensure_len("ids", n.div_ceil(k) * k, n)?;
    check_slots("ids", n)?;
    ensure_len("positions", n, positions.len())?;
    ensure_len("counts", experts, counts.len())?;
    if let Some(kid) = &kept_ids {
        ensure_len("kept_ids", n, kid.len())?;
    }
    check_ids(ids, experts)?;
    let cap = capacity.min(u32::MAX as usize) as u32;
    counts.fill(0);
    let mut rep = CapacityReport::default();
    let t = n / k;
    let mut visit = |i: usize| {
        let e = ids[i];
        if e == NO_EXPERT {
            positions[i] = NO_POSITION;
            rep.unrouted += 1;
            return;
        }
        let c = &mut counts[e as usize];
        if *c < cap {
            positions[i] = *c;
            *c += 1;
            rep.kept += 1;
        } else {
            positions[i] = NO_POSITION;
            rep.dropped += 1;
        }
    };
    match priority {
        Priority::TokenOrder => (0..n).for_each(&mut visit),
        Priority::ChoiceOrder => {
            for j in 0..k {
                for tok in 0..t {
                    visit(tok * k + j);
                }
            }
        }
    }
    if let Some(kid) = kept_ids {
        for ((o, &e), &p) in kid.iter_mut().zip(ids).zip(positions.iter()) {
            *o = if p == NO_POSITION { NO_EXPERT } else { e };
        }
    }
    Ok(rep)
}
