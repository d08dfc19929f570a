//! Drives `learn::{target_log_probs, fit_linear_em, posterior_weights}` and
//! `cascade::defer` with arbitrary shapes, tables and scores (NaN, ±inf,
//! huge, tiny). Asserts: no panic; an error leaves outputs untouched; EM's
//! weights are a distribution and its held-out likelihood never decreases;
//! posterior weights are per-row distributions; `defer` marks exactly the
//! count it reports, always including NaN rows, and a rate defers
//! `round(rate * B)` rows unless more rows are NaN.
#![no_main]

use libfuzzer_sys::fuzz_target;
use medley_core::cascade::{Threshold, defer, defer_scratch_len};
use medley_core::ensemble::Model;
use medley_core::learn::{EmOptions, PosteriorOptions, fit_linear_em, posterior_weights, target_log_probs};
use medley_core::{Rows, RowsMut};

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
    /// Mostly log-probability-like values, sometimes raw bit patterns.
    fn f32(&mut self) -> f32 {
        match self.u8() % 8 {
            0 => f32::from_bits(self.u32()),
            1 => f32::NEG_INFINITY,
            2 => 0.0,
            _ => -(self.u8() as f32) / 16.0,
        }
    }
}

const SENTINEL: f32 = 12345.0;

fuzz_target!(|data: &[u8]| {
    let mut r = Bytes(data);
    let m = 1 + (r.u8() % 4) as usize;
    let b = (r.u8() % 40) as usize;
    let v = 1 + (r.u8() % 12) as usize;
    // target_log_probs from raw logits
    let logits: Vec<Vec<f32>> = (0..m).map(|_| (0..b * v).map(|_| r.f32()).collect()).collect();
    let targets: Vec<u32> = (0..b).map(|_| (r.u8() % (v as u8 + 1)) as u32).collect();
    let models: Vec<Model<'_>> = logits
        .iter()
        .map(|l| Model::new(Rows::dense(&l[..], b, v).unwrap()))
        .collect();
    let mut table = vec![SENTINEL; b * m];
    match target_log_probs(&models, &targets, v, RowsMut::dense(&mut table, b, m).unwrap()) {
        Err(_) => assert!(table.iter().all(|&x| x == SENTINEL)),
        Ok(_) => assert!(table.iter().all(|&x| x.is_nan() || x <= 1e-5)),
    }
    // EM on an arbitrary table
    let tab: Vec<f32> = (0..b * m).map(|_| r.f32()).collect();
    let init: Option<Vec<f32>> = (r.u8() % 2 == 0).then(|| (0..m).map(|_| r.u8() as f32 / 8.0).collect());
    let opts = EmOptions {
        max_iterations: (r.u8() % 50) as usize,
        ..EmOptions::default()
    };
    let mut w = vec![SENTINEL; m];
    if b > 0 {
        match fit_linear_em(Rows::dense(&tab, b, m).unwrap(), init.as_deref(), &opts, &mut w) {
            Err(_) => assert!(w.iter().all(|&x| x == SENTINEL)),
            Ok(rep) => {
                let s: f32 = w.iter().sum();
                assert!(w.iter().all(|&x| x >= 0.0) && (s - 1.0).abs() < 1e-4, "{w:?}");
                assert!(rep.log_likelihood_after >= rep.log_likelihood_before, "{rep:?}");
            }
        }
    }
    // posterior weights
    let popts = PosteriorOptions {
        window: (r.u8() % 8) as usize,
        decay: r.u8() as f32 / 255.0,
        floor: (r.u8() % 4) as f32 / 16.0,
    };
    let mut pw = vec![SENTINEL; b * m];
    match posterior_weights(Rows::dense(&tab, b, m).unwrap(), None, &popts, RowsMut::dense(&mut pw, b, m).unwrap()) {
        Err(_) => assert!(pw.iter().all(|&x| x == SENTINEL)),
        Ok(()) => {
            for row in pw.chunks(m) {
                if row.iter().any(|x| x.is_nan()) {
                    continue;
                }
                let s: f32 = row.iter().sum();
                assert!(row.iter().all(|&x| x >= 0.0) && (s - 1.0).abs() < 1e-4, "{row:?}");
            }
        }
    }
    // defer
    let u: Vec<f32> = (0..b).map(|_| r.f32()).collect();
    let th = match r.u8() % 3 {
        0 => Threshold::Value(r.f32()),
        1 => Threshold::Rate(r.u8() as f32 / 200.0),
        _ => Threshold::Rate(f32::from_bits(r.u32())),
    };
    let mut scratch = vec![0.0f32; defer_scratch_len(b, th)];
    let mut d = vec![false; b];
    let mut d_before = d.clone();
    d_before.iter_mut().for_each(|x| *x = true);
    let mut d2 = d_before.clone();
    match defer(&u, th, &mut scratch, &mut d2) {
        Err(_) => assert_eq!(d2, d_before),
        Ok(rep) => {
            assert_eq!(d2.iter().filter(|&&x| x).count(), rep.count);
            assert!(u.iter().zip(&d2).all(|(x, &k)| !x.is_nan() || k), "NaN rows defer");
            if let Threshold::Rate(rate) = th {
                let k = (rate as f64 * b as f64 + 0.5).floor() as usize;
                let nan = u.iter().filter(|x| x.is_nan()).count();
                assert_eq!(rep.count, k.max(nan).min(b).max(nan), "rate {rate} b {b}");
            }
            d.copy_from_slice(&d2);
        }
    }
});
