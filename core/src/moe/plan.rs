//! Routing plans: the inputs of the expert matmuls.
//!
//! Given the `[T, k]` expert ids (flat: slot `i = t * k + j`, `N = T * k`
//! slots) and the local experts `[first, last)` ([`ExpertRange`], `L`
//! experts), a plan groups the local slots by expert. Slots whose expert is
//! not local, or is [`NO_EXPERT`] (dropped by capacity, mapped off this
//! rank), are not placed: they belong to other ranks and contribute zero
//! here.
//!
//! Both plans are deterministic: a stable counting sort in slot order, so
//! within an expert the slots are strictly increasing (token order, then
//! choice order). No atomics, no dependence on scheduling (vLLM's
//! `moe_align_block_size` orders slots within an expert by atomic
//! arrival).
//!
//! # (a) Expert-sorted order: [`sort_by_expert`]
//!
//! - `sorted` (`u32`, `N` long): positions `offsets[l]..offsets[l + 1]` hold
//!   the slot ids routed to local expert `l` (global `first + l`), increasing;
//!   positions from `offsets[L]` to `N` hold the sentinel `N`.
//! - `offsets` (`u64`, `L + 1` long): `offsets[0] = 0`, `offsets[l + 1] -
//!   offsets[l]` = slots of expert `l`; `offsets[L]` = local slots. torch's
//!   `offs` for `grouped_mm` (cumulative ends) is `offsets[1..]`.
//! - `inverse` (optional, `u32`, `N` long): `inverse[i]` = position of slot
//!   `i` in `sorted`, or [`NO_POSITION`] for an unplaced slot. Un-permuting
//!   row `p` of a sorted result back to slot `i` is `y_slot[i] =
//!   y_sorted[inverse[i]]`; the token is `i / k`.
//!
//! # (b) Block-padded layout: [`align_block_size`] (vLLM `moe_align_block_size`)
//!
//! - `sorted_ids` (`u32`, [`block_padded_len`] long): expert `l`'s slots
//!   (increasing) start at `offsets[l]`, a multiple of `block_m`, and are
//!   followed by the sentinel `N` up to `offsets[l + 1] = offsets[l] +
//!   ceil(count_l / block_m) * block_m`; everything from `offsets[L]` (the
//!   returned `num_tokens_post_padded`) on is `N` as well.
//! - `block_experts` (`u32`, `blocks` long): block `b` covers positions
//!   `b * block_m..(b + 1) * block_m` and holds the **local** expert `l` of
//!   those rows (global `first + l`), or [`NO_EXPERT`] (`-1` as `i32`) for
//!   blocks at or past `num_tokens_post_padded`.
//! - `offsets` (`u64`, `L + 1`): the padded starts as above.
//! - `inverse` (optional): position of slot `i` in `sorted_ids`, or
//!   [`NO_POSITION`].
//!
//! The buffer length is `N + min(L, N) * (block_m - 1)` rounded up to a
//! multiple of `block_m` (at most `min(L, N)` experts are non-empty, each
//! wasting at most `block_m - 1` rows: tighter than vLLM's `N + E *
//! (block_m - 1)` for small batches). Any `block_m >= 1` (no power-of-two
//! rule).
//!
//! # Other layouts
//!
//! - DeepGEMM's contiguous layout (a per-row expert id, `-1` for padding):
//!   [`row_experts`] over a block-padded plan with `block_m = 128`.
//! - The fixed-capacity ("masked") layout `[E, C]`: the positions and counts
//!   of [`apply_capacity`](super::capacity::apply_capacity) (`masked_m` =
//!   counts).
//! - torch `grouped_mm`'s `offs`: `offsets[1..]` of [`sort_by_expert`].
//!
//! An arbitrary expert map (EPLB logical-to-physical, a non-contiguous
//! local set) composes: map the ids first (unmapped ones to [`NO_EXPERT`]),
//! then plan with the mapped id space.

use super::{ExpertRange, NO_EXPERT, NO_POSITION, check_experts, check_ids, check_slots};
use crate::error::{Error, ensure, ensure_len};

fn check_common(ids: &[u32], experts: usize, range: ExpertRange) -> Result<(usize, usize), Error> {
    check_experts(experts)?;
    range.check(experts)?;
    let n = ids.len();
    check_slots("ids", n)?;
    Ok((n, range.len()))
}

/// Counts local slots per expert into `offsets[1..]` (after a zero fill).
fn count(ids: &[u32], range: ExpertRange, offsets: &mut [u64]) {
    offsets.fill(0);
    for &e in ids {
        if let Some(l) = range.local(e) {
            offsets[l + 1] += 1;
        }
    }
}

/// Buffer lengths of the expert-sorted plan for `slots = T * k` and
/// `local_experts = L`: `(sorted length, offsets length) = (slots, L + 1)`
/// (`inverse`, when wanted, is `slots` long as well).
///
/// Errors: [`Error::TooLarge`] (`ids`: more than `u32::MAX` slots),
/// [`Error::SizeOverflow`] (`offsets`).
pub fn sorted_len(slots: usize, local_experts: usize) -> Result<(usize, usize), Error> {
    check_slots("ids", slots)?;
    let off = local_experts
        .checked_add(1)
        .ok_or(Error::SizeOverflow { arg: "offsets" })?;
    Ok((slots, off))
}

/// (a) The expert-sorted order of the local slots, with per-expert offsets
/// and optionally the inverse map (layouts in the [module docs](self)).
/// Returns the number of local slots `offsets[L]`.
///
/// `O(N + L)` time, no scratch: the offsets double as cursors. Buffer
/// lengths: [`sorted_len`].
///
/// Errors (checked before anything is written): [`Error::Empty`] /
/// [`Error::TooLarge`] (`experts` 0 or above `u32::MAX`),
/// [`Error::OutOfRange`] (`range` not within `0..=experts`),
/// [`Error::TooLarge`] (`ids`: more than `u32::MAX` slots),
/// [`Error::LengthMismatch`] (`sorted`, `offsets`, `inverse`),
/// [`Error::IndexOutOfBounds`] (an id `>= experts` other than
/// [`NO_EXPERT`]).
///
/// ```
/// use medley_core::moe::{ExpertRange, NO_POSITION, plan::sort_by_expert};
/// // T = 3 tokens, k = 2, E = 3 experts, all local.
/// let ids = [2u32, 0, 0, 1, 2, 0];
/// let (mut sorted, mut offsets, mut inv) = ([0u32; 6], [0u64; 4], [0u32; 6]);
/// let n = sort_by_expert(&ids, 3, ExpertRange::all(3), &mut sorted, &mut offsets, Some(&mut inv)).unwrap();
/// assert_eq!(n, 6);
/// assert_eq!(sorted, [1, 2, 5, 3, 0, 4]);
/// assert_eq!(offsets, [0, 3, 4, 6]);
/// assert_eq!(inv, [4, 0, 1, 3, 5, 2]);
/// // Expert parallelism: this rank holds experts [1, 3) only.
/// let mut off2 = [0u64; 3];
/// sort_by_expert(&ids, 3, ExpertRange { first: 1, last: 3 }, &mut sorted, &mut off2, Some(&mut inv)).unwrap();
/// assert_eq!(&sorted[..3], &[3, 0, 4]);
/// assert_eq!(&sorted[3..], &[6, 6, 6]); // sentinel N
/// assert_eq!(inv[1], NO_POSITION);
/// ```
pub fn sort_by_expert(
    ids: &[u32],
    experts: usize,
    range: ExpertRange,
    sorted: &mut [u32],
    offsets: &mut [u64],
    inverse: Option<&mut [u32]>,
) -> Result<u64, Error> {
    let (n, l) = check_common(ids, experts, range)?;
    ensure_len("sorted", n, sorted.len())?;
    ensure_len("offsets", l + 1, offsets.len())?;
    if let Some(inv) = &inverse {
        ensure_len("inverse", n, inv.len())?;
    }
    check_ids(ids, experts)?;
    count(ids, range, offsets);
    for e in 0..l {
        offsets[e + 1] += offsets[e];
    }
    let total = offsets[l];
    // offsets[e] is now the start of e: use it as the cursor.
    let mut inverse = inverse;
    if let Some(inv) = inverse.as_deref_mut() {
        inv.fill(NO_POSITION);
    }
    for (i, &e) in ids.iter().enumerate() {
        if let Some(le) = range.local(e) {
            let p = offsets[le] as usize;
            sorted[p] = i as u32;
            if let Some(inv) = inverse.as_deref_mut() {
                inv[i] = p as u32;
            }
            offsets[le] += 1;
        }
    }
    // Each cursor now holds the end of its expert = the next start.
    for e in (0..l).rev() {
        offsets[e + 1] = offsets[e];
    }
    offsets[0] = 0;
    sorted[total as usize..].fill(n as u32);
    Ok(total)
}

/// Buffer lengths of the block-padded layout for `slots = T * k`,
/// `local_experts = L` and `block_m`: `(sorted_ids length, blocks)` with
/// `sorted_ids length = round_up(slots + min(L, slots) * (block_m - 1),
/// block_m)` and `blocks = sorted_ids length / block_m`.
///
/// Errors: [`Error::OutOfRange`] (`block_m` = 0), [`Error::TooLarge`]
/// (`ids`: more than `u32::MAX` slots; `sorted_ids`: a padded length above
/// `u32::MAX`, which positions must fit).
pub fn block_padded_len(slots: usize, local_experts: usize, block_m: usize) -> Result<(usize, usize), Error> {
    ensure(
        block_m > 0,
        Error::OutOfRange {
            arg: "block_m",
            index: 0,
        },
    )?;
    check_slots("ids", slots)?;
    let pad = local_experts.min(slots) as u128 * (block_m as u128 - 1);
    let len = (slots as u128 + pad).div_ceil(block_m as u128) * block_m as u128;
    ensure(
        len <= u32::MAX as u128,
        Error::TooLarge {
            arg: "sorted_ids",
            index: 0,
            max: u32::MAX as usize,
            got: len.min(usize::MAX as u128) as usize,
        },
    )?;
    let len = len as usize;
    Ok((len, len / block_m))
}

/// (b) The block-padded layout of vLLM's `moe_align_block_size` for the
/// local experts (layout in the [module docs](self)); returns
/// `num_tokens_post_padded = offsets[L]`.
///
/// `sorted_ids` and `block_experts` must have exactly the lengths
/// [`block_padded_len`] gives; `offsets` is `L + 1` long; `inverse`, when
/// given, `N` long.
///
/// Errors (checked before anything is written): those of [`sort_by_expert`]
/// and [`block_padded_len`], and [`Error::LengthMismatch`] (`sorted_ids`,
/// `block_experts`, `offsets`, `inverse`).
///
/// ```
/// use medley_core::moe::{ExpertRange, NO_EXPERT, plan::{align_block_size, block_padded_len}};
/// // vLLM's docstring example: k = 3, E = 4, block 4, 12 slots.
/// let ids = [2u32, 3, 0, 1, 2, 3, 1, 3, 0, 1, 0, 2];
/// let (len, blocks) = block_padded_len(12, 4, 4).unwrap();
/// let (mut sorted, mut bexp, mut off) = (vec![0u32; len], vec![0u32; blocks], [0u64; 5]);
/// let total = align_block_size(&ids, 4, ExpertRange::all(4), 4, &mut sorted, &mut bexp, &mut off, None).unwrap();
/// assert_eq!(total, 16); // 3 slots per expert, each padded to 4
/// assert_eq!(&sorted[..4], &[2, 8, 10, 12]); // expert 0: slots 2, 8, 10 + sentinel 12
/// assert_eq!(&bexp[..4], &[0, 1, 2, 3]);
/// assert!(bexp[4..].iter().all(|&b| b == NO_EXPERT));
/// ```
#[allow(clippy::too_many_arguments)]
pub fn align_block_size(
    ids: &[u32],
    experts: usize,
    range: ExpertRange,
    block_m: usize,
    sorted_ids: &mut [u32],
    block_experts: &mut [u32],
    offsets: &mut [u64],
    inverse: Option<&mut [u32]>,
) -> Result<u64, Error> {
    let (n, l) = check_common(ids, experts, range)?;
    let (len, blocks) = block_padded_len(n, l, block_m)?;
    ensure_len("sorted_ids", len, sorted_ids.len())?;
    ensure_len("block_experts", blocks, block_experts.len())?;
    ensure_len("offsets", l + 1, offsets.len())?;
    if let Some(inv) = &inverse {
        ensure_len("inverse", n, inv.len())?;
    }
    check_ids(ids, experts)?;
    let bm = block_m as u64;
    count(ids, range, offsets);
    // Padded starts: offsets[e] = sum of the padded counts before e.
    for e in 0..l {
        offsets[e + 1] = offsets[e] + offsets[e + 1].div_ceil(bm) * bm;
    }
    let total = offsets[l];
    sorted_ids.fill(n as u32);
    for e in 0..l {
        let (b0, b1) = ((offsets[e] / bm) as usize, (offsets[e + 1] / bm) as usize);
        block_experts[b0..b1].fill(e as u32);
    }
    block_experts[(total / bm) as usize..].fill(NO_EXPERT);
    let mut inverse = inverse;
    if let Some(inv) = inverse.as_deref_mut() {
        inv.fill(NO_POSITION);
    }
    for (i, &e) in ids.iter().enumerate() {
        if let Some(le) = range.local(e) {
            let p = offsets[le] as usize;
            sorted_ids[p] = i as u32;
            if let Some(inv) = inverse.as_deref_mut() {
                inv[i] = p as u32;
            }
            offsets[le] += 1;
        }
    }
    // offsets[e] = padded start + count; the next padded start is that
    // rounded up to block_m (each start is a multiple of block_m).
    for e in (0..l).rev() {
        offsets[e + 1] = offsets[e].div_ceil(bm) * bm;
    }
    offsets[0] = 0;
    Ok(total)
}

/// DeepGEMM's contiguous layout from a block-padded plan: `out[p]` = the
/// local expert of row `p` of the padded activations, or [`NO_EXPERT`]
/// (`-1` as `i32`, DeepGEMM's "skip") for padding rows and rows past
/// `num_tokens_post_padded`. With `block_m = 128` this is the
/// `grouped_layout` of `m_grouped_*_gemm_nt_contiguous` on SM90.
///
/// `sorted_ids` and `block_experts` are the outputs of [`align_block_size`]
/// for `slots = T * k` slots and this `block_m`; `out` has the length of
/// `sorted_ids`.
///
/// Errors: [`Error::OutOfRange`] (`block_m` = 0), [`Error::LengthMismatch`]
/// (`sorted_ids` not `block_experts.len() * block_m` long, `out`).
pub fn row_experts(
    sorted_ids: &[u32],
    block_experts: &[u32],
    block_m: usize,
    slots: usize,
    out: &mut [u32],
) -> Result<(), Error> {
    ensure(
        block_m > 0,
        Error::OutOfRange {
            arg: "block_m",
            index: 0,
        },
    )?;
    let len = block_experts
        .len()
        .checked_mul(block_m)
        .ok_or(Error::SizeOverflow { arg: "block_experts" })?;
    ensure_len("sorted_ids", len, sorted_ids.len())?;
    ensure_len("out", len, out.len())?;
    for ((o, &s), p) in out.iter_mut().zip(sorted_ids).zip(0..) {
        *o = if s as usize >= slots {
            NO_EXPERT
        } else {
            block_experts[p / block_m]
        };
    }
    Ok(())
}

/// Maps every id through `map` (global or logical id to the id space of the
/// plan; [`NO_EXPERT`] for experts not on this rank): `out[i] =
/// map[ids[i]]`, and [`NO_EXPERT`] stays [`NO_EXPERT`]. For expert-parallel
/// load balancers with logical-to-physical maps or non-contiguous local
/// expert sets.
///
/// Errors: [`Error::LengthMismatch`] (`out`), [`Error::IndexOutOfBounds`]
/// (`ids`: an id `>= map.len()` other than [`NO_EXPERT`]).
pub fn map_experts(ids: &[u32], map: &[u32], out: &mut [u32]) -> Result<(), Error> {
    ensure_len("out", ids.len(), out.len())?;
    check_ids(ids, map.len())?;
    for (o, &e) in out.iter_mut().zip(ids) {
        *o = if e == NO_EXPERT {
            NO_EXPERT
        } else {
            map[e as usize]
        };
    }
    Ok(())
}
