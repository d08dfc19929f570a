//! Drives `ensemble::combine` (and the softmax family) with arbitrary shapes,
//! weights, temperatures and raw logit bit patterns (NaN, ±inf, huge, tiny,
//! subnormal). Asserts: no panic; an error leaves outputs untouched; on
//! success every row is exactly one of "NaN row" (all NaN, counted),
//! "masked row" (all -inf, counted) or a valid distribution (no NaN, log-probs
//! <= 0 up to rounding, probabilities summing to 1 within 1e-4). The per-row
//! uncertainty outputs are NaN exactly on NaN and masked rows, else within
//! their ranges: entropy in [0, ln V], top-1 in (0, 1], margin in
//! [0, top-1], disagreement (linear) in [0, ln M].
#![no_main]

use libfuzzer_sys::fuzz_target;
use medley_core::ensemble::{Config, Logits, MaskRule, Mode, Model, Output, Plausibility, Weights, combine};
use medley_core::softmax::log_softmax;
use medley_core::{Rows, RowsMut, bf16, f16};

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
    /// Mostly sane floats, sometimes raw bit patterns.
    fn f32(&mut self) -> f32 {
        match self.u8() % 8 {
            0 => f32::from_bits(self.u32()),
            1 => f32::NEG_INFINITY,
            2 => 0.0,
            _ => (self.u8() as i8) as f32 / 8.0,
        }
    }
    fn param(&mut self) -> f32 {
        match self.u8() % 10 {
            0 => f32::from_bits(self.u32()),
            1 => 0.0,
            2 => -1.0,
            _ => (self.u8() as f32 + 1.0) / 64.0,
        }
    }
}

const SENTINEL: f32 = 12345.0;

fuzz_target!(|data: &[u8]| {
    let mut r = Bytes(data);
    let m = 1 + (r.u8() % 5) as usize;
    let b = (r.u8() % 4) as usize;
    let v = (r.u8() as usize) % 300;
    let mode = if r.u8() % 2 == 0 { Mode::Linear } else { Mode::LogLinear };
    let mut vms = Vec::new();
    let mut strides = Vec::new();
    let mut dtypes = Vec::new();
    let mut temps = Vec::new();
    for _ in 0..m {
        let vm = if r.u8() % 4 == 0 { (r.u8() as usize) % (v + 2) } else { v };
        vms.push(vm);
        strides.push(vm + (r.u8() % 3) as usize);
        dtypes.push(r.u8() % 3);
        temps.push(if r.u8() % 4 == 0 { r.param() } else { 1.0 });
    }
    let mut f32s: Vec<Vec<f32>> = Vec::new();
    for i in 0..m {
        let n = b * strides[i];
        f32s.push((0..n).map(|_| r.f32()).collect());
    }
    let f16s: Vec<Vec<f16>> = f32s.iter().map(|x| x.iter().map(|&y| f16::from_f32(y)).collect()).collect();
    let bf16s: Vec<Vec<bf16>> = f32s.iter().map(|x| x.iter().map(|&y| bf16::from_f32(y)).collect()).collect();
    let mut models = Vec::new();
    for i in 0..m {
        let logits: Logits<'_> = match dtypes[i] {
            0 => Rows::new(&f32s[i][..], b, vms[i], strides[i]).unwrap().into(),
            1 => Rows::new(&f16s[i][..], b, vms[i], strides[i]).unwrap().into(),
            _ => Rows::new(&bf16s[i][..], b, vms[i], strides[i]).unwrap().into(),
        };
        models.push(Model { logits, temperature: temps[i] });
    }
    let per_row = r.u8() % 3 == 0;
    let wtab: Vec<f32> = (0..(if per_row { b * m } else { m })).map(|_| r.param()).collect();
    let weights = if per_row { Weights::PerRow(Rows::dense(&wtab, b, m).unwrap()) } else { Weights::PerModel(&wtab) };
    let plausibility = if r.u8() % 3 == 0 {
        Some(Plausibility { model: (r.u8() as usize) % (m + 1), alpha: r.param() })
    } else {
        None
    };
    let cfg = Config {
        mode,
        weights,
        out_temperature: if r.u8() % 4 == 0 { r.param() } else { 1.0 },
        plausibility,
        mask_rule: if r.u8() % 2 == 0 { MaskRule::All } else { MaskRule::Any },
    };
    let want_log = r.u8() % 4 != 0;
    if std::env::var_os("MEDLEY_FUZZ_DEBUG").is_some() {
        eprintln!("m={m} b={b} v={v} vms={vms:?} strides={strides:?} dtypes={dtypes:?} temps={temps:?}");
        eprintln!("data={f32s:?}\ncfg={cfg:?}");
    }
    let want_prob = !want_log || r.u8() % 2 == 0;
    let mut lp = vec![SENTINEL; b * v];
    let mut p = vec![SENTINEL; b * v];
    let mut am = vec![7u32; b];
    let mut lz = vec![SENTINEL; b];
    let want_unc = r.u8() % 2 == 0;
    // Disagreement is asked for in either mode: log-linear must refuse it.
    let want_dis = want_unc && r.u8() % 2 == 0;
    let [mut h, mut t1, mut mg, mut js] = [(); 4].map(|_| vec![SENTINEL; b]);
    let out = Output {
        log_probs: want_log.then(|| RowsMut::dense(&mut lp, b, v).unwrap()),
        probs: want_prob.then(|| RowsMut::dense(&mut p, b, v).unwrap()),
        argmax: Some(&mut am),
        log_normalizer: Some(&mut lz),
        entropy: want_unc.then_some(&mut h[..]),
        top1_prob: want_unc.then_some(&mut t1[..]),
        margin: want_unc.then_some(&mut mg[..]),
        disagreement: want_dis.then_some(&mut js[..]),
    };
    match combine(&models, &cfg, out) {
        Err(_) => {
            assert!(lp.iter().chain(&p).chain(&lz).all(|&x| x == SENTINEL));
            assert!(h.iter().chain(&t1).chain(&mg).chain(&js).all(|&x| x == SENTINEL));
            assert!(am.iter().all(|&x| x == 7));
        }
        Ok(report) => {
            let (mut nan_rows, mut masked_rows) = (0, 0);
            for row in 0..b {
                let l = &lp[row * v..(row + 1) * v];
                let q = &p[row * v..(row + 1) * v];
                let main = if want_log { l } else { q };
                if main.iter().any(|x| x.is_nan()) || (v == 0 && lz[row].is_nan()) {
                    assert!(main.iter().all(|x| x.is_nan()), "partial NaN row");
                    assert!(lz[row].is_nan());
                    assert_eq!(am[row], u32::MAX);
                    if want_unc {
                        assert!(h[row].is_nan() && t1[row].is_nan() && mg[row].is_nan());
                    }
                    if want_dis {
                        assert!(js[row].is_nan());
                    }
                    nan_rows += 1;
                    continue;
                }
                if want_log {
                    assert!(l.iter().all(|x| !x.is_nan() && *x <= 1e-3), "{l:?}");
                }
                if want_prob {
                    assert!(q.iter().all(|x| (0.0..=1.0 + 1e-5).contains(x)));
                }
                let total: f64 = if want_log {
                    l.iter().map(|&x| (x as f64).exp()).sum()
                } else {
                    q.iter().map(|&x| x as f64).sum()
                };
                if total == 0.0 {
                    assert_eq!(am[row], u32::MAX);
                    assert_eq!(lz[row], f32::NEG_INFINITY);
                    if want_unc {
                        assert!(h[row].is_nan() && t1[row].is_nan() && mg[row].is_nan());
                    }
                    masked_rows += 1;
                } else {
                    if want_unc {
                        let ln_v = (v as f32).ln();
                        assert!(h[row] >= 0.0 && h[row] <= ln_v * (1.0 + 1e-4) + 1e-4, "entropy {} of {v}", h[row]);
                        assert!(t1[row] > 0.0 && t1[row] <= 1.0 + 1e-5, "top1 {}", t1[row]);
                        assert!(mg[row] >= 0.0 && mg[row] <= t1[row], "margin {} top1 {}", mg[row], t1[row]);
                    }
                    if want_dis {
                        assert_eq!(mode, Mode::Linear, "log-linear must refuse disagreement");
                        let ln_m = (m as f32).ln();
                        assert!(js[row] >= 0.0 && js[row] <= ln_m * (1.0 + 1e-4) + 1e-4, "disagreement {}", js[row]);
                    }
                    assert!((total - 1.0).abs() < 1e-4, "row sums to {total}");
                    assert!((am[row] as usize) < v);
                    assert!(!lz[row].is_nan());
                }
            }
            assert_eq!(report.nan_rows, nan_rows);
            assert_eq!(report.masked_rows, masked_rows);
        }
    }
    // The softmax family on the first model's raw f32 rows.
    if let Some(first) = f32s.first() {
        let x = Rows::new(&first[..], b, vms[0], strides[0]).unwrap();
        let mut o = vec![SENTINEL; b * vms[0]];
        if let Ok(rep) = log_softmax(x, temps[0], RowsMut::dense(&mut o, b, vms[0]).unwrap()) {
            let nan = (0..b).filter(|&i| o[i * vms[0]..(i + 1) * vms[0]].iter().any(|x| x.is_nan())).count();
            assert_eq!(rep.nan_rows, if vms[0] == 0 { 0 } else { nan });
        }
    }
});
