//! Every SIMD level gives bit-identical results: the hot entry points run at
//! each level this machine supports (`simd::force`) and their outputs are
//! compared bit for bit with the portable level's.

use medley_core::distill::{DistillOutput, distill};
use medley_core::ensemble::{Config, Model, Output, Plausibility, combine};
use medley_core::merge::gta::{Gta, GtaOptions, TaskParams, merge as gta_merge};
use medley_core::merge::linear::linear;
use medley_core::simd::{self, Level};
use medley_core::softmax::{log_softmax, logsumexp, softmax, softmax_inplace};
use medley_core::{Rows, RowsMut, bf16};
use proptest::prelude::*;

const ROWS: usize = 3;

/// The level cap is process-wide: the tests take turns.
static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Everything the hot entry points produce for one input, as bits.
fn run_all(a: &[f32], b: &[f32], v: usize) -> Vec<u32> {
    let mut bits = Vec::new();
    let mut put = |xs: &[f32]| bits.extend(xs.iter().map(|x| x.to_bits()));
    let ra = Rows::dense(a, ROWS, v).unwrap();
    let rb = Rows::dense(b, ROWS, v).unwrap();
    let b16: Vec<bf16> = b.iter().map(|&x| bf16::from_f32(x)).collect();
    let rb16 = Rows::dense(&b16, ROWS, v).unwrap();
    let mut out = vec![0.0f32; ROWS * v];
    let mut probs = vec![0.0f32; ROWS * v];
    let mut lse = vec![0.0f32; ROWS];
    softmax(ra, 0.7, RowsMut::dense(&mut out, ROWS, v).unwrap()).unwrap();
    put(&out);
    log_softmax(rb16, 1.3, RowsMut::dense(&mut out, ROWS, v).unwrap()).unwrap();
    put(&out);
    logsumexp(ra, 1.0, &mut lse).unwrap();
    put(&lse);
    out.copy_from_slice(b);
    softmax_inplace(RowsMut::dense(&mut out, ROWS, v).unwrap(), 2.0).unwrap();
    put(&out);
    let models = [Model::new(ra).with_temperature(0.9), Model::new(rb16)];
    let w = [0.3f32, 0.7];
    let c = [1.5f32, -0.5];
    let mut plaus = Config::linear(&w);
    plaus.plausibility = Some(Plausibility {
        model: 1,
        alpha: 0.01,
    });
    plaus.out_temperature = 1.2;
    for cfg in [Config::linear(&w), Config::log_linear(&c), plaus] {
        let mut am = vec![0u32; ROWS];
        let [mut h, mut t1, mut mg, mut js] = [(); 4].map(|_| vec![0.0f32; ROWS]);
        let linear = cfg.mode == medley_core::ensemble::Mode::Linear;
        let o = Output {
            log_probs: Some(RowsMut::dense(&mut out, ROWS, v).unwrap()),
            probs: Some(RowsMut::dense(&mut probs, ROWS, v).unwrap()),
            argmax: Some(&mut am),
            log_normalizer: Some(&mut lse),
            entropy: Some(&mut h),
            top1_prob: Some(&mut t1),
            margin: Some(&mut mg),
            disagreement: linear.then_some(&mut js[..]),
        };
        combine(&models, &cfg, o).unwrap();
        put(&out);
        put(&probs);
        put(&lse);
        for u in [&h, &t1, &mg, &js] {
            put(u);
        }
        put(&am.iter().map(|&i| f32::from_bits(i)).collect::<Vec<_>>());
    }
    let student = Model::new(rb);
    let (mut ce, mut kl) = (vec![0.0f32; ROWS], vec![0.0f32; ROWS]);
    let o = DistillOutput {
        cross_entropy: Some(&mut ce),
        kl: Some(&mut kl),
        grad: RowsMut::dense(&mut out, ROWS, v).unwrap(),
    };
    distill(&models, &Config::linear(&w), &student, 0.5, o).unwrap();
    put(&out);
    put(&ce);
    put(&kl);
    let mut m = vec![0.0f32; a.len()];
    linear(&[a, b], &[0.25, 0.75], true, &mut m).unwrap();
    put(&m);
    linear(&[a, b], &[0.25, -0.75], false, &mut m).unwrap();
    put(&m);
    // Task-vector merges (TIES, DARE-TIES, DELLA, task arithmetic) of a and
    // b onto their mean: the tile walks run under simd::dispatch.
    let base: Vec<f32> = a.iter().zip(b).map(|(x, y)| 0.5 * (x + y)).collect();
    let params = [
        TaskParams {
            density: 0.4,
            ..TaskParams::new(0.8)
        },
        TaskParams {
            density: 0.7,
            ..TaskParams::new(0.5)
        },
    ];
    for opts in [
        GtaOptions::task_arithmetic(),
        GtaOptions::ties(),
        GtaOptions::dare_ties(11, 3),
        GtaOptions::della(Some(v), 5, 2),
    ] {
        let plan = Gta::new(base.len(), &params, &opts).unwrap();
        let mut scratch = vec![0u32; plan.scratch_len()];
        gta_merge(&[a, b], &base, &params, &opts, &mut scratch, &mut out).unwrap();
        put(&out);
    }
    bits
}

fn logit() -> impl Strategy<Value = f32> {
    prop_oneof![
        20 => -30.0f32..30.0,
        1 => Just(f32::NEG_INFINITY),
        1 => -1e30f32..1e30,
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
    #[test]
    fn every_level_is_bit_identical(
        (v, a, b) in (1usize..300).prop_flat_map(|v| (
            Just(v),
            prop::collection::vec(logit(), ROWS * v),
            prop::collection::vec(logit(), ROWS * v),
        ))
    ) {
        let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
        simd::force(Some(Level::Portable));
        prop_assert_eq!(simd::active(), Level::Portable);
        let want = run_all(&a, &b, v);
        for l in Level::ALL.into_iter().filter(|&l| l > Level::Portable && l <= simd::detected()) {
            simd::force(Some(l));
            prop_assert_eq!(simd::active(), l);
            let got = run_all(&a, &b, v);
            prop_assert!(got == want, "level {} differs from portable (V = {})", l.name(), v);
        }
        simd::force(None);
    }
}

/// Long rows (several tiles, every lane remainder) at every level.
#[test]
fn long_rows_are_bit_identical() {
    let v = 5000;
    let a: Vec<f32> = (0..ROWS * v)
        .map(|i| ((i * 7919 % 1000) as f32 - 500.0) * 0.031)
        .collect();
    let b: Vec<f32> = (0..ROWS * v)
        .map(|i| ((i * 104_729 % 997) as f32 - 400.0) * 0.017)
        .collect();
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    simd::force(Some(Level::Portable));
    let want = run_all(&a, &b, v);
    for l in Level::ALL.into_iter().filter(|&l| l <= simd::detected()) {
        simd::force(Some(l));
        assert!(run_all(&a, &b, v) == want, "level {}", l.name());
    }
    simd::force(None);
}
