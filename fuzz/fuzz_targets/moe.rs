//! Drives MoE gating (all four variants), capacity and both routing plans
//! with arbitrary shapes, parameters and raw logit bit patterns. Asserts: no
//! panic; an error leaves every output untouched; on success each row is a
//! NaN row (all weights NaN, ids 0..k, counted), a masked row (weights 0,
//! counted) or a valid routing (distinct ids below E, weights finite and
//! >= 0, summing to 1 when renormalized); plans are stable permutations of
//! the local slots with consistent offsets, padding and inverse.
#![no_main]

use libfuzzer_sys::fuzz_target;
use medley_core::moe::capacity::{Priority, apply_capacity, capacity};
use medley_core::moe::gating::{
    GroupScore, GroupedConfig, Noise, Scoring, grouped_topk, keep_topk_softmax, noisy_topk, topk_softmax,
};
use medley_core::moe::plan::{align_block_size, block_padded_len, sort_by_expert};
use medley_core::moe::{ExpertRange, NO_EXPERT, NO_POSITION};
use medley_core::{Report, Rows, bf16};

struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    /// Mostly small quantized logits (many ties), sometimes raw bits.
    fn f32(&mut self) -> f32 {
        match self.u8() % 10 {
            0 => f32::from_bits(self.u32()),
            1 => f32::NEG_INFINITY,
            2 => f32::INFINITY,
            _ => (self.u8() as i8) as f32 / 16.0,
        }
    }
}

const SENT_ID: u32 = 0xDEAD_BEEF;
const SENT_W: f32 = 12345.0;

fn check_rows(ids: &[u32], w: &[f32], k: usize, e: usize, rep: Report, renorm_sum: Option<f32>) {
    let (mut nan, mut masked) = (0, 0);
    for (id, wt) in ids.chunks_exact(k).zip(w.chunks_exact(k)) {
        if wt.iter().any(|x| x.is_nan()) {
            assert!(wt.iter().all(|x| x.is_nan()), "partial NaN row {wt:?}");
            assert!(id.iter().enumerate().all(|(j, &i)| i == j as u32));
            nan += 1;
            continue;
        }
        assert!(wt.iter().all(|&x| x.is_finite() && x >= 0.0), "{wt:?}");
        let mut d = id.to_vec();
        d.sort_unstable();
        d.dedup();
        assert_eq!(d.len(), k, "duplicate ids {id:?}");
        assert!(id.iter().all(|&i| (i as usize) < e));
        let s: f64 = wt.iter().map(|&v| v as f64).sum();
        if s == 0.0 {
            masked += 1;
        } else if let Some(want) = renorm_sum {
            let want = want as f64;
            assert!((s - want).abs() <= 1e-4 * want + 1e-40, "sum {s}, want {want}");
        }
    }
    assert_eq!(rep.nan_rows, nan);
    // Masked rows have zero weights; rows with zero weights need not be masked
    // (e.g. sigmoid scores of -inf logits).
    assert!(rep.masked_rows <= masked);
}

fuzz_target!(|data: &[u8]| {
    let mut r = Bytes(data);
    let t = (r.u8() % 6) as usize;
    let e = 1 + (r.u8() as usize * 7) % 400;
    let k = (r.u8() % 34) as usize;
    let stride = e + (r.u8() % 3) as usize;
    let x: Vec<f32> = (0..t * stride).map(|_| r.f32()).collect();
    let xb: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
    let view = Rows::new(&x[..], t, e, stride).unwrap();
    let vb = Rows::new(&xb[..], t, e, stride).unwrap();
    let n = t * k;
    let mut ids = vec![SENT_ID; n];
    let mut w = vec![SENT_W; n];
    let untouched = |ids: &[u32], w: &[f32]| ids.iter().all(|&v| v == SENT_ID) && w.iter().all(|&v| v == SENT_W);

    let mode = r.u8() % 5;
    let res = match mode {
        0 => topk_softmax(view, k, true, &mut ids, &mut w).map(|rep| (rep, Some(1.0))),
        1 => topk_softmax(vb, k, false, &mut ids, &mut w).map(|rep| (rep, None)),
        2 => keep_topk_softmax(view, k, &mut ids, &mut w).map(|rep| (rep, Some(1.0))),
        3 => {
            let noise = Noise { seed: r.u32() as u64, layer: r.u8() as u32, token_offset: r.u32() as u64 };
            let nl: Vec<f32> = (0..t * stride).map(|_| r.f32()).collect();
            let nv = Rows::new(&nl[..], t, e, stride).unwrap();
            noisy_topk(view, nv, k, noise, &mut ids, &mut w).map(|rep| (rep, Some(1.0)))
        }
        _ => {
            let bias: Vec<f32> = (0..e).map(|_| if r.u8() % 8 == 0 { r.f32() } else { 0.01 * (r.u8() as f32) }).collect();
            let n_group = 1 + (r.u8() % 9) as usize;
            let cfg = GroupedConfig {
                k,
                scoring: if r.u8() % 2 == 0 { Scoring::Sigmoid } else { Scoring::Softmax },
                bias: (r.u8() % 2 == 0).then_some(&bias[..]),
                n_group,
                topk_group: (r.u8() % 10) as usize,
                group_score: if r.u8() % 2 == 0 { GroupScore::Top2Sum } else { GroupScore::Max },
                renormalize: r.u8() % 2 == 0,
                routed_scaling_factor: if r.u8() % 8 == 0 { r.f32() } else { 2.5 },
            };
            let sum = cfg.renormalize.then_some(cfg.routed_scaling_factor);
            grouped_topk(view, &cfg, &mut ids, &mut w).map(|rep| (rep, sum))
        }
    };
    match res {
        Err(_) => {
            assert!(untouched(&ids, &w));
            return;
        }
        Ok((rep, sum)) => check_rows(&ids, &w, k, e, rep, sum),
    }

    // Capacity and plans on the routing just produced, with some dropped ids.
    for i in ids.iter_mut() {
        if r.u8() % 16 == 0 {
            *i = NO_EXPERT;
        }
    }
    let factor = if r.u8() % 8 == 0 { f32::from_bits(r.u32()) } else { (1 + r.u8() % 8) as f32 * 0.25 };
    if let Ok(c) = capacity(factor, t, k, e) {
        assert!(c <= n);
        let mut pos = vec![7u32; n];
        let mut counts = vec![7u32; e];
        let mut kept = vec![7u32; n];
        let pr = if r.u8() % 2 == 0 { Priority::TokenOrder } else { Priority::ChoiceOrder };
        let rep = apply_capacity(&ids, k, e, c, pr, &mut pos, &mut counts, Some(&mut kept)).unwrap();
        assert_eq!(rep.kept + rep.dropped + rep.unrouted, n as u64);
        assert!(counts.iter().all(|&v| v as usize <= c));
        assert_eq!(counts.iter().map(|&v| v as u64).sum::<u64>(), rep.kept);
        for i in 0..n {
            assert_eq!(pos[i] == NO_POSITION, kept[i] == NO_EXPERT);
        }
        ids = kept;
    }
    let a = (r.u8() as usize) % (e + 1);
    let b = a + (r.u8() as usize) % (e + 1 - a);
    let range = ExpertRange { first: a as u32, last: b as u32 };
    let l = range.len();
    let mut sorted = vec![7u32; n];
    let mut off = vec![7u64; l + 1];
    let mut inv = vec![7u32; n];
    let total = sort_by_expert(&ids, e, range, &mut sorted, &mut off, Some(&mut inv)).unwrap();
    assert_eq!(off[0], 0);
    assert_eq!(off[l], total);
    for le in 0..l {
        let run = &sorted[off[le] as usize..off[le + 1] as usize];
        assert!(run.windows(2).all(|p| p[0] < p[1]));
        assert!(run.iter().all(|&s| ids[s as usize] == a as u32 + le as u32));
    }
    for i in 0..n {
        match range.local(ids[i]) {
            Some(_) => assert_eq!(sorted[inv[i] as usize], i as u32),
            None => assert_eq!(inv[i], NO_POSITION),
        }
    }
    let bm = 1 + (r.u8() % 70) as usize;
    let (len, blocks) = block_padded_len(n, l, bm).unwrap();
    let mut s2 = vec![7u32; len];
    let mut be = vec![7u32; blocks];
    let mut off2 = vec![7u64; l + 1];
    let total2 = align_block_size(&ids, e, range, bm, &mut s2, &mut be, &mut off2, Some(&mut inv)).unwrap();
    assert!(total2 as usize <= len);
    for le in 0..l {
        assert_eq!(off2[le] % bm as u64, 0);
        let cnt = (off[le + 1] - off[le]) as usize;
        let start = off2[le] as usize;
        assert_eq!(&s2[start..start + cnt], &sorted[off[le] as usize..off[le + 1] as usize]);
        assert!(s2[start + cnt..off2[le + 1] as usize].iter().all(|&v| v as usize == n));
        for bidx in start / bm..off2[le + 1] as usize / bm {
            assert_eq!(be[bidx], le as u32);
        }
    }
    assert!(be[total2 as usize / bm..].iter().all(|&v| v == NO_EXPERT));
    assert!(s2[total2 as usize..].iter().all(|&v| v as usize == n));
});
