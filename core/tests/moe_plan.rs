#![allow(clippy::needless_range_loop)]
//! Routing plans and capacity against naive references: a plan is a
//! permutation of the local slots, stable, with offsets equal to the
//! per-expert counts, and its inverse undoes it.

mod moe_util;

use medley_core::Error;
use medley_core::moe::capacity::{Priority, apply_capacity, capacity};
use medley_core::moe::plan::{
    align_block_size, block_padded_len, map_experts, row_experts, sort_by_expert, sorted_len,
};
use medley_core::moe::{ExpertRange, NO_EXPERT, NO_POSITION};
use moe_util::Gen;
use proptest::prelude::*;

/// Random ids: T tokens x k distinct-ish experts, some NO_EXPERT.
fn random_routing(g: &mut Gen) -> (Vec<u32>, usize, usize, ExpertRange) {
    let e_max = if g.chance(0.2) { 300 } else { 12 };
    let e = 1 + g.below(e_max);
    let k = 1 + g.below(6);
    let t_max = if g.chance(0.2) { 200 } else { 9 };
    let t = g.below(t_max);
    let p_drop = if g.chance(0.3) { 0.2 } else { 0.0 };
    let skew = g.chance(0.5);
    let ids = (0..t * k)
        .map(|_| {
            if g.chance(p_drop) {
                NO_EXPERT
            } else if skew {
                (g.below(e) * g.below(e) / e) as u32
            } else {
                g.below(e) as u32
            }
        })
        .collect();
    let a = g.below(e + 1);
    let b = a + g.below(e + 1 - a);
    let range = if g.chance(0.5) {
        ExpertRange::all(e)
    } else {
        ExpertRange {
            first: a as u32,
            last: b as u32,
        }
    };
    (ids, k, e, range)
}

/// The local slots of expert `l`, in slot order.
fn slots_of(ids: &[u32], range: ExpertRange, l: usize) -> Vec<u32> {
    (0..ids.len())
        .filter(|&i| ids[i] == range.first + l as u32)
        .map(|i| i as u32)
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn sorted_plan_is_a_stable_permutation_with_inverse(seed in any::<u64>()) {
        let mut g = Gen(seed);
        let (ids, _k, e, range) = random_routing(&mut g);
        let n = ids.len();
        let l = range.len();
        prop_assert_eq!(sorted_len(n, l).unwrap(), (n, l + 1));
        let mut sorted = vec![7u32; n];
        let mut offsets = vec![7u64; l + 1];
        let mut inv = vec![7u32; n];
        let total = sort_by_expert(&ids, e, range, &mut sorted, &mut offsets, Some(&mut inv)).unwrap();
        prop_assert_eq!(offsets[0], 0);
        prop_assert_eq!(offsets[l], total);
        let mut expect_pos = 0u64;
        for le in 0..l {
            let want = slots_of(&ids, range, le);
            prop_assert_eq!(offsets[le], expect_pos);
            let run = &sorted[offsets[le] as usize..offsets[le + 1] as usize];
            prop_assert_eq!(run, &want[..]);
            expect_pos += want.len() as u64;
        }
        prop_assert!(sorted[total as usize..].iter().all(|&s| s as usize == n));
        for i in 0..n {
            if range.local(ids[i]).is_some() {
                prop_assert_eq!(sorted[inv[i] as usize], i as u32);
            } else {
                prop_assert_eq!(inv[i], NO_POSITION);
            }
        }
        // Un-permuting a permuted payload gives it back.
        let payload: Vec<u64> = (0..n as u64).map(|i| i * 31 + 7).collect();
        let permuted: Vec<u64> = sorted[..total as usize].iter().map(|&s| payload[s as usize]).collect();
        for i in 0..n {
            if inv[i] != NO_POSITION {
                prop_assert_eq!(permuted[inv[i] as usize], payload[i]);
            }
        }
    }

    #[test]
    fn block_padded_plan_matches_naive(seed in any::<u64>()) {
        let mut g = Gen(seed);
        let (ids, _k, e, range) = random_routing(&mut g);
        let n = ids.len();
        let l = range.len();
        let bm = [1usize, 2, 3, 4, 16, 64, 5][g.below(7)];
        let (len, blocks) = block_padded_len(n, l, bm).unwrap();
        prop_assert_eq!(len % bm, 0);
        prop_assert_eq!(blocks * bm, len);
        let mut sorted = vec![7u32; len];
        let mut bexp = vec![7u32; blocks];
        let mut offsets = vec![7u64; l + 1];
        let mut inv = vec![7u32; n];
        let total = align_block_size(&ids, e, range, bm, &mut sorted, &mut bexp, &mut offsets, Some(&mut inv)).unwrap();
        // Naive construction.
        let mut want = Vec::new();
        let mut want_blocks = Vec::new();
        let mut want_off = vec![0u64];
        for le in 0..l {
            let s = slots_of(&ids, range, le);
            let padded = s.len().div_ceil(bm) * bm;
            want.extend_from_slice(&s);
            want.extend(std::iter::repeat_n(n as u32, padded - s.len()));
            want_blocks.extend(std::iter::repeat_n(le as u32, padded / bm));
            want_off.push(want.len() as u64);
        }
        prop_assert_eq!(total, want.len() as u64);
        prop_assert!(want.len() <= len, "buffer bound {} < {}", len, want.len());
        want.resize(len, n as u32);
        want_blocks.resize(blocks, NO_EXPERT);
        prop_assert_eq!(&sorted, &want);
        prop_assert_eq!(&bexp, &want_blocks);
        prop_assert_eq!(&offsets, &want_off);
        for i in 0..n {
            if range.local(ids[i]).is_some() {
                prop_assert_eq!(sorted[inv[i] as usize], i as u32);
            } else {
                prop_assert_eq!(inv[i], NO_POSITION);
            }
        }
        // DeepGEMM contiguous layout: the expert of each real row, -1 elsewhere.
        let mut rows = vec![7u32; len];
        row_experts(&sorted, &bexp, bm, n, &mut rows).unwrap();
        for p in 0..len {
            let want = if (sorted[p] as usize) < n { ids[sorted[p] as usize] - range.first } else { NO_EXPERT };
            prop_assert_eq!(rows[p], want);
        }
    }

    #[test]
    fn capacity_keeps_the_first_c_in_priority_order(seed in any::<u64>(), choice in any::<bool>()) {
        let mut g = Gen(seed);
        let (ids, k, e, _) = random_routing(&mut g);
        let n = ids.len();
        let t = n / k;
        let c = g.below(n / e + 3);
        let priority = if choice { Priority::ChoiceOrder } else { Priority::TokenOrder };
        let mut pos = vec![7u32; n];
        let mut counts = vec![7u32; e];
        let mut kept = vec![7u32; n];
        let rep = apply_capacity(&ids, k, e, c, priority, &mut pos, &mut counts, Some(&mut kept)).unwrap();
        let order: Vec<usize> = if choice {
            (0..k).flat_map(|j| (0..t).map(move |tok| tok * k + j)).collect()
        } else {
            (0..n).collect()
        };
        let mut seen = vec![0u32; e];
        let (mut nk, mut nd, mut nu) = (0u64, 0u64, 0u64);
        for &i in &order {
            if ids[i] == NO_EXPERT {
                nu += 1;
                prop_assert_eq!(pos[i], NO_POSITION);
                prop_assert_eq!(kept[i], NO_EXPERT);
                continue;
            }
            let s = &mut seen[ids[i] as usize];
            if (*s as usize) < c {
                prop_assert_eq!(pos[i], *s);
                prop_assert_eq!(kept[i], ids[i]);
                nk += 1;
            } else {
                prop_assert_eq!(pos[i], NO_POSITION);
                prop_assert_eq!(kept[i], NO_EXPERT);
                nd += 1;
            }
            *s += 1;
        }
        for x in 0..e {
            prop_assert_eq!(counts[x] as usize, (seen[x] as usize).min(c));
        }
        prop_assert_eq!((rep.kept, rep.dropped, rep.unrouted), (nk, nd, nu));
        prop_assert_eq!(nk + nd + nu, n as u64);
    }

    #[test]
    fn capacity_formula_is_the_exact_ceiling(a in 1u32..2048, b in 0i32..12, n in 0usize..100_000, e in 1usize..5000) {
        // factor = a / 2^b is exact in f32 and f64, and so are the products.
        let f = a as f32 / (1u32 << b) as f32;
        let want = ((f as f64) * n as f64 / e as f64).ceil().min(n as f64) as usize;
        prop_assert_eq!(capacity(f, n, 1, e).unwrap(), want);
    }
}

#[test]
fn capacity_fixed_cases() {
    assert_eq!(capacity(1.0, 4096, 8, 256).unwrap(), 128);
    assert_eq!(capacity(1.25, 4096, 8, 256).unwrap(), 160);
    assert_eq!(capacity(2.0, 3, 1, 8).unwrap(), 1); // ceil(0.75)
    assert_eq!(capacity(1.0, 0, 2, 8).unwrap(), 0);
    assert_eq!(capacity(1e30, 10, 2, 3).unwrap(), 20); // capped at T * k
    assert_eq!(capacity(f32::from_bits(1), 10, 2, 3).unwrap(), 1); // tiny factor: ceil of a positive
    assert_eq!(capacity(f32::MAX, 1 << 40, 8, 7).unwrap(), 8 << 40);
    // 1.1 is not exact in f32: the ceiling is of the f32 value 1.10000002384...
    assert_eq!(capacity(1.1, 1000, 1, 10).unwrap(), 111);
    assert_eq!(
        capacity(0.0, 1, 1, 1).unwrap_err(),
        Error::OutOfRange {
            arg: "capacity_factor",
            index: 0
        }
    );
    assert_eq!(
        capacity(f32::NAN, 1, 1, 1).unwrap_err(),
        Error::NonFinite {
            arg: "capacity_factor",
            index: 0
        }
    );
    assert_eq!(
        capacity(1.0, 1, 1, 0).unwrap_err(),
        Error::Empty { arg: "experts" }
    );
    assert_eq!(
        capacity(1.0, 1, 0, 1).unwrap_err(),
        Error::OutOfRange { arg: "k", index: 0 }
    );
}

#[test]
fn gshard_second_choices_come_after_first_choices() {
    // 3 tokens, k = 2, everyone's second choice is expert 0, token 2's first is expert 0.
    let ids = [1u32, 0, 2, 0, 0, 1];
    let (mut pos, mut counts) = ([0u32; 6], [0u32; 3]);
    apply_capacity(&ids, 2, 3, 1, Priority::ChoiceOrder, &mut pos, &mut counts, None).unwrap();
    assert_eq!(pos, [0, NO_POSITION, 0, NO_POSITION, 0, NO_POSITION]);
    apply_capacity(&ids, 2, 3, 1, Priority::TokenOrder, &mut pos, &mut counts, None).unwrap();
    assert_eq!(pos, [0, 0, 0, NO_POSITION, NO_POSITION, NO_POSITION]);
    assert_eq!(counts, [1, 1, 1]);
}

#[test]
fn empty_and_edge_plans() {
    // T = 0.
    let (mut s, mut o) = (vec![], vec![9u64; 5]);
    assert_eq!(
        sort_by_expert(&[], 4, ExpertRange::all(4), &mut s, &mut o, None).unwrap(),
        0
    );
    assert_eq!(o, [0; 5]);
    let (len, blocks) = block_padded_len(0, 4, 16).unwrap();
    assert_eq!((len, blocks), (0, 0));
    assert_eq!(
        align_block_size(&[], 4, ExpertRange::all(4), 16, &mut [], &mut [], &mut o, None).unwrap(),
        0
    );
    // No local experts.
    let ids = [0u32, 1, 2, 3];
    let mut sorted = [0u32; 4];
    let mut off = [9u64; 1];
    let r = ExpertRange { first: 2, last: 2 };
    assert_eq!(
        sort_by_expert(&ids, 4, r, &mut sorted, &mut off, None).unwrap(),
        0
    );
    assert_eq!(sorted, [4; 4]);
    // T = 1, k = E: every expert gets one slot; block 4 pads each to 4.
    let ids = [2u32, 0, 1];
    let (len, blocks) = block_padded_len(3, 3, 4).unwrap();
    assert_eq!((len, blocks), (12, 3));
    let (mut s, mut b, mut o) = (vec![0u32; len], vec![0u32; blocks], vec![0u64; 4]);
    let tot = align_block_size(&ids, 3, ExpertRange::all(3), 4, &mut s, &mut b, &mut o, None).unwrap();
    assert_eq!(tot, 12);
    assert_eq!(s, [1, 3, 3, 3, 2, 3, 3, 3, 0, 3, 3, 3]);
    assert_eq!(b, [0, 1, 2]);
    assert_eq!(o, [0, 4, 8, 12]);
    // Small batch, many experts: the buffer is bounded by the slots, not E.
    assert_eq!(block_padded_len(2, 256, 64).unwrap(), (128, 2));
}

#[test]
fn size_limits_are_explicit() {
    let max = u32::MAX as usize;
    // Slot ids are u32 with the sentinel N itself representable.
    assert_eq!(block_padded_len(max, 1, 1).unwrap(), (max, max));
    assert_eq!(
        block_padded_len(max + 1, 1, 1).unwrap_err(),
        Error::TooLarge {
            arg: "ids",
            index: 0,
            max,
            got: max + 1
        }
    );
    assert!(matches!(
        block_padded_len(max - 10, 8, 64).unwrap_err(),
        Error::TooLarge {
            arg: "sorted_ids",
            ..
        }
    ));
    assert_eq!(sorted_len(max, 255).unwrap(), (max, 256));
    // Offsets are u64: 2^31 and more slots are fine for the size queries.
    assert_eq!(sorted_len(1 << 31, 8).unwrap(), (1 << 31, 9));
    assert_eq!(block_padded_len(3 << 30, 8, 64).unwrap().0, (3 << 30) + 8 * 64);
}

#[test]
fn map_experts_then_plan() {
    // Logical experts 0..4 on physical 0..4 with 2 and 3 swapped, 1 off-rank.
    let map = [0u32, NO_EXPERT, 3, 2];
    let ids = [2u32, 1, 3, NO_EXPERT];
    let mut out = [0u32; 4];
    map_experts(&ids, &map, &mut out).unwrap();
    assert_eq!(out, [3, NO_EXPERT, 2, NO_EXPERT]);
    assert!(matches!(
        map_experts(&[4], &map, &mut out[..1]).unwrap_err(),
        Error::IndexOutOfBounds {
            arg: "ids",
            index: 4,
            bound: 4
        }
    ));
}

#[test]
fn plan_errors_write_nothing() {
    let ids = [0u32, 5, 1, 2];
    let mut sorted = [7u32; 4];
    let mut off = [7u64; 4];
    let mut inv = [7u32; 4];
    assert_eq!(
        sort_by_expert(
            &ids,
            3,
            ExpertRange::all(3),
            &mut sorted,
            &mut off,
            Some(&mut inv)
        )
        .unwrap_err(),
        Error::IndexOutOfBounds {
            arg: "ids",
            index: 5,
            bound: 3
        }
    );
    let ok_ids = [0u32, 2, 1, 2];
    assert_eq!(
        sort_by_expert(
            &ok_ids,
            3,
            ExpertRange { first: 2, last: 4 },
            &mut sorted,
            &mut off,
            None
        )
        .unwrap_err(),
        Error::OutOfRange {
            arg: "range",
            index: 0
        }
    );
    assert_eq!(
        sort_by_expert(&ok_ids, 3, ExpertRange::all(3), &mut sorted[..3], &mut off, None).unwrap_err(),
        Error::LengthMismatch {
            arg: "sorted",
            index: 0,
            expected: 4,
            got: 3
        }
    );
    assert_eq!(
        sort_by_expert(
            &ok_ids,
            3,
            ExpertRange::all(3),
            &mut sorted,
            &mut off[..3],
            Some(&mut inv)
        )
        .unwrap_err(),
        Error::LengthMismatch {
            arg: "offsets",
            index: 0,
            expected: 4,
            got: 3
        }
    );
    let mut b = [7u32; 12];
    let mut s = [7u32; 16];
    assert_eq!(
        align_block_size(&ok_ids, 3, ExpertRange::all(3), 0, &mut s, &mut b, &mut off, None).unwrap_err(),
        Error::OutOfRange {
            arg: "block_m",
            index: 0
        }
    );
    assert!(matches!(
        align_block_size(&ok_ids, 3, ExpertRange::all(3), 4, &mut s, &mut b, &mut off, None).unwrap_err(),
        Error::LengthMismatch {
            arg: "block_experts",
            ..
        }
    ));
    let mut pos = [7u32; 4];
    let mut counts = [7u32; 3];
    assert_eq!(
        apply_capacity(&ids, 2, 3, 1, Priority::TokenOrder, &mut pos, &mut counts, None).unwrap_err(),
        Error::IndexOutOfBounds {
            arg: "ids",
            index: 5,
            bound: 3
        }
    );
    assert!(matches!(
        apply_capacity(
            &ok_ids,
            3,
            3,
            1,
            Priority::TokenOrder,
            &mut pos,
            &mut counts,
            None
        )
        .unwrap_err(),
        Error::LengthMismatch { arg: "ids", .. }
    ));
    assert!(
        sorted
            .iter()
            .chain(&inv)
            .chain(&b)
            .chain(&s)
            .chain(&pos)
            .chain(&counts)
            .all(|&v| v == 7)
    );
    assert!(off.iter().all(|&v| v == 7));
}
