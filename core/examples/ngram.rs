//! Character-level n-gram language models from two domains that ship in
//! this repository (its prose: README.md and docs/*.md; its Rust source),
//! combined with medley's ensemble operators. Prints held-out bits per
//! character and perplexity of each model alone and of several
//! combinations, so the claims of the "combining models" literature can be
//! checked on real text:
//!
//! - linear interpolation ("logical OR") should be good on both domains,
//!   close to the in-domain model on each;
//! - log-linear combination ("logical AND", product of experts) rewards
//!   tokens both models like, and punishes tokens either model dislikes;
//! - a negative coefficient (contrastive, "prose minus code") removes what
//!   the two domains share and should hurt perplexity, however sharp it makes
//!   domain-specific choices;
//! - context-dependent weights (per-row, a posterior over the domains given
//!   the recent characters) should beat fixed weights on mixed text;
//! - interpolation weights "can be learnt" and that "doesn't need much
//!   data": EM (linear) and Newton's method (log-linear) fitted on a small
//!   held-out development split should beat the fixed 0.5/0.5;
//! - "models tend to be more uncertain when they are about to make
//!   errors": each per-row uncertainty measure of the combination should
//!   rank the characters it gets wrong above the ones it gets right
//!   (AUROC > 0.5), so a cascade that escalates the most uncertain rows
//!   removes more than its share of errors.
//!
//! Run: `cargo run --release --example ngram`

use medley_core::cascade::{Threshold, defer, defer_scratch_len};
use medley_core::ensemble::{Config, Model, Output, Weights, combine};
use medley_core::learn::{
    EmOptions, NewtonOptions, PosteriorOptions, fit_linear_em, fit_log_linear_newton, posterior_weights,
    target_log_probs,
};
use medley_core::{Rows, RowsMut};
use std::collections::HashMap;

/// Interpolated Kneser-Ney-style character model (absolute discounting,
/// lower orders interpolated down to a uniform distribution over bytes).
struct NGram {
    order: usize,
    /// context (0..order-1 bytes) -> (next byte -> count)
    counts: HashMap<Vec<u8>, HashMap<u8, u32>>,
}

const V: usize = 256;
const DISCOUNT: f64 = 0.75;

impl NGram {
    fn train(text: &[u8], order: usize) -> Self {
        let mut counts: HashMap<Vec<u8>, HashMap<u8, u32>> = HashMap::new();
        for i in 0..text.len() {
            for n in 0..order {
                if i < n {
                    break;
                }
                let ctx = text[i - n..i].to_vec();
                *counts.entry(ctx).or_default().entry(text[i]).or_default() += 1;
            }
        }
        NGram { order, counts }
    }

    /// Natural-log probabilities of every next byte after `history`.
    fn log_probs(&self, history: &[u8], out: &mut [f32]) {
        let mut p = [1.0 / V as f64; V];
        for n in 0..self.order {
            if history.len() < n {
                break;
            }
            let ctx = &history[history.len() - n..];
            let Some(next) = self.counts.get(ctx) else { break };
            let total: u32 = next.values().sum();
            let types = next.len() as f64;
            let backoff = DISCOUNT * types / total as f64;
            let mut q = [0.0f64; V];
            for (c, qc) in q.iter_mut().enumerate() {
                *qc = backoff * p[c];
            }
            for (&c, &k) in next {
                q[c as usize] += (k as f64 - DISCOUNT).max(0.0) / total as f64;
            }
            p = q;
        }
        for (o, &x) in out.iter_mut().zip(&p) {
            *o = x.ln() as f32;
        }
    }
}

/// Held-out bits per character of `log_probs` (B x V, natural log) on `text`.
fn bits_per_char(log_probs: &[f32], text: &[u8]) -> f64 {
    let nats: f64 = text
        .iter()
        .enumerate()
        .map(|(i, &c)| -(log_probs[i * V + c as usize] as f64))
        .sum();
    nats / text.len() as f64 / std::f64::consts::LN_2
}

/// Each model's log-probabilities for every position of `text`.
fn model_rows(model: &NGram, history_before: &[u8], text: &[u8]) -> Vec<f32> {
    let mut all = history_before.to_vec();
    let mut out = vec![0.0f32; text.len() * V];
    for (i, &c) in text.iter().enumerate() {
        model.log_probs(&all, &mut out[i * V..(i + 1) * V]);
        all.push(c);
    }
    out
}

/// Combines the two models' rows with `cfg`, returning log-probabilities.
fn combined(a: &[f32], b: &[f32], rows: usize, cfg: &Config<'_>) -> Vec<f32> {
    let models = [
        Model::new(Rows::dense(a, rows, V).unwrap()),
        Model::new(Rows::dense(b, rows, V).unwrap()),
    ];
    let mut lp = vec![0.0f32; rows * V];
    let out = Output {
        log_probs: Some(RowsMut::dense(&mut lp, rows, V).unwrap()),
        ..Default::default()
    };
    let report = combine(&models, cfg, out).expect("valid configuration");
    assert!(report.is_clean(), "{report:?}");
    lp
}

/// The `B x 2` table of each model's log-probability of the observed
/// character.
fn target_table(a: &[f32], b: &[f32], text: &[u8]) -> Vec<f32> {
    let rows = text.len();
    let models = [
        Model::new(Rows::dense(a, rows, V).unwrap()),
        Model::new(Rows::dense(b, rows, V).unwrap()),
    ];
    let targets: Vec<u32> = text.iter().map(|&c| c as u32).collect();
    let mut table = vec![0.0f32; rows * 2];
    let report =
        target_log_probs(&models, &targets, V, RowsMut::dense(&mut table, rows, 2).unwrap()).unwrap();
    assert!(report.is_clean(), "{report:?}");
    table
}

/// Per-row weights: the posterior over the two domains given the previous
/// `window` characters (a Bayesian mixture restricted to recent history),
/// from a uniform prior, no weight below 0.01 so neither model is dropped.
fn posterior(a: &[f32], b: &[f32], text: &[u8], window: usize) -> Vec<f32> {
    let rows = text.len();
    let table = target_table(a, b, text);
    let mut w = vec![0.0f32; rows * 2];
    let opts = PosteriorOptions {
        window,
        decay: 1.0,
        floor: 0.01,
    };
    posterior_weights(
        Rows::dense(&table, rows, 2).unwrap(),
        None,
        &opts,
        RowsMut::dense(&mut w, rows, 2).unwrap(),
    )
    .unwrap();
    w
}

/// Area under the ROC curve of `score` (higher = more suspicious) for
/// telling the positives (`hit`) from the rest; ties count one half
/// (Mann-Whitney). 0.5 is chance.
fn auroc(score: &[f32], hit: &[bool]) -> f64 {
    let mut idx: Vec<usize> = (0..score.len()).collect();
    idx.sort_by(|&i, &j| score[i].total_cmp(&score[j]));
    // Average ranks over ties.
    let mut rank = vec![0.0f64; score.len()];
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && score[idx[j + 1]] == score[idx[i]] {
            j += 1;
        }
        let r = (i + j) as f64 / 2.0 + 1.0;
        for &k in &idx[i..=j] {
            rank[k] = r;
        }
        i = j + 1;
    }
    let pos = hit.iter().filter(|&&h| h).count() as f64;
    let neg = hit.len() as f64 - pos;
    let rank_sum: f64 = rank.iter().zip(hit).filter(|(_, h)| **h).map(|(r, _)| r).sum();
    (rank_sum - pos * (pos + 1.0) / 2.0) / (pos * neg)
}

/// 80% training, 10% development (for fitting combination weights), 10%
/// test.
fn split(text: &str) -> (&[u8], &[u8], &[u8]) {
    let bytes = text.as_bytes();
    let (c1, c2) = (bytes.len() * 8 / 10, bytes.len() * 9 / 10);
    (&bytes[..c1], &bytes[c1..c2], &bytes[c2..])
}

/// The two domains alternated in 400-byte pieces.
fn interleave(p: &[u8], c: &[u8]) -> Vec<u8> {
    let mut mixed = Vec::new();
    for (p, c) in p.chunks(400).zip(c.chunks(400)) {
        mixed.extend_from_slice(p);
        mixed.extend_from_slice(c);
    }
    mixed
}

fn main() {
    // The two domains, as they ship in this repository.
    let prose: String = [
        include_str!("../../README.md"),
        include_str!("../../docs/DESIGN.md"),
        include_str!("../../BENCHMARKS.md"),
    ]
    .concat();
    let code: String = [
        include_str!("../src/ensemble.rs"),
        include_str!("../src/softmax.rs"),
        include_str!("../src/distill.rs"),
        include_str!("../src/rows.rs"),
        include_str!("../src/element.rs"),
        include_str!("../src/math/mod.rs"),
        include_str!("../src/rng.rs"),
        include_str!("../src/rowops.rs"),
    ]
    .concat();
    let order = 5;
    let (prose_train, prose_dev, prose_test) = split(&prose);
    let (code_train, code_dev, code_test) = split(&code);
    let m_prose = NGram::train(prose_train, order);
    let m_code = NGram::train(code_train, order);
    println!(
        "character {order}-gram models; prose: {} train / {} dev / {} test bytes, code: {} / {} / {}\n",
        prose_train.len(),
        prose_dev.len(),
        prose_test.len(),
        code_train.len(),
        code_dev.len(),
        code_test.len()
    );
    // A third evaluation set alternating the two domains in 400-byte pieces,
    // where context-dependent weights can follow the switches.
    let mixed = interleave(prose_test, code_test);
    // Combination weights are fitted on the development split of both
    // domains, interleaved the same way (text neither model trained on).
    let dev = interleave(prose_dev, code_dev);
    let dev_history: Vec<u8> = [prose_train, code_train].concat();
    let (dev_a, dev_b) = (
        model_rows(&m_prose, &dev_history, &dev),
        model_rows(&m_code, &dev_history, &dev),
    );
    let dev_table = target_table(&dev_a, &dev_b, &dev);
    let mut w_em = [0.0f32; 2];
    let em = fit_linear_em(
        Rows::dense(&dev_table, dev.len(), 2).unwrap(),
        None,
        &EmOptions::default(),
        &mut w_em,
    )
    .expect("finite table");
    let dev_models = [
        Model::new(Rows::dense(&dev_a, dev.len(), V).unwrap()),
        Model::new(Rows::dense(&dev_b, dev.len(), V).unwrap()),
    ];
    let dev_targets: Vec<u32> = dev.iter().map(|&c| c as u32).collect();
    let mut c_nt = [0.0f32; 2];
    let nt = fit_log_linear_newton(
        &dev_models,
        &dev_targets,
        Some(&[0.5, 0.5]),
        &NewtonOptions::default(),
        &mut c_nt,
    )
    .expect("finite logits");
    println!(
        "fitted on {} dev characters: EM linear weights ({:.3}, {:.3}) in {} iterations, dev log-likelihood {:.4} -> {:.4} nats/char; \
         Newton log-linear coefficients ({:.3}, {:.3}) in {} steps, dev NLL {:.4} -> {:.4} nats/char\n",
        dev.len(),
        w_em[0],
        w_em[1],
        em.iterations,
        em.log_likelihood_before,
        em.log_likelihood_after,
        c_nt[0],
        c_nt[1],
        nt.iterations,
        nt.nll_before,
        nt.nll_after
    );
    let sets: [(&str, &[u8], &[u8]); 3] = [
        ("prose", prose_train, prose_test),
        ("code", code_train, code_test),
        ("mixed", &[], &mixed),
    ];
    let mut table: Vec<(String, [f64; 3])> = Vec::new();
    let mut uncertainty_rows = None;
    let names = [
        "prose model alone",
        "code model alone",
        "linear 0.5 prose + 0.5 code (OR)",
        "linear 0.9 prose + 0.1 code",
        "log-linear 0.5 prose + 0.5 code (AND)",
        "log-linear 1.0 prose + 1.0 code",
        "log-linear 1.5 prose - 0.5 code (contrast)",
        "log-linear 1.5 code - 0.5 prose (contrast)",
        "linear, per-row posterior weights (64 chars)",
        "linear, EM-fitted weights (dev split)",
        "log-linear, Newton-fitted coefficients (dev split)",
    ];
    for name in names {
        table.push((name.to_string(), [0.0; 3]));
    }
    for (col, (_, before, text)) in sets.iter().enumerate() {
        let rows = text.len();
        let a = model_rows(&m_prose, before, text);
        let b = model_rows(&m_code, before, text);
        let results = [
            bits_per_char(&a, text),
            bits_per_char(&b, text),
            bits_per_char(&combined(&a, &b, rows, &Config::linear(&[0.5, 0.5])), text),
            bits_per_char(&combined(&a, &b, rows, &Config::linear(&[0.9, 0.1])), text),
            bits_per_char(&combined(&a, &b, rows, &Config::log_linear(&[0.5, 0.5])), text),
            bits_per_char(&combined(&a, &b, rows, &Config::log_linear(&[1.0, 1.0])), text),
            bits_per_char(&combined(&a, &b, rows, &Config::log_linear(&[1.5, -0.5])), text),
            bits_per_char(&combined(&a, &b, rows, &Config::log_linear(&[-0.5, 1.5])), text),
            {
                let w = posterior(&a, &b, text, 64);
                let cfg = Config {
                    weights: Weights::PerRow(Rows::dense(&w, rows, 2).unwrap()),
                    ..Config::linear(&[])
                };
                bits_per_char(&combined(&a, &b, rows, &cfg), text)
            },
            bits_per_char(&combined(&a, &b, rows, &Config::linear(&w_em)), text),
            bits_per_char(&combined(&a, &b, rows, &Config::log_linear(&c_nt)), text),
        ];
        if col == 2 {
            uncertainty_rows = Some((a, b));
        }
        for (row, r) in table.iter_mut().zip(results) {
            row.1[col] = r;
        }
    }
    println!("held-out bits per character (perplexity per character in parentheses); lower is better\n");
    println!("| combination | prose | code | mixed |");
    println!("|---|---|---|---|");
    for (name, r) in &table {
        let cell = |x: f64| format!("{x:.3} ({:.2})", x.exp2());
        println!("| {name} | {} | {} | {} |", cell(r[0]), cell(r[1]), cell(r[2]));
    }
    let [pa, _, ma] = table[0].1;
    let [_, cb, mb] = table[1].1;
    let [pl, cl, ml] = table[2].1;
    let [pg, cg, _] = table[4].1;
    let [pc, _, _] = table[6].1;
    let [_, _, mr] = table[8].1;
    let [_, _, me] = table[9].1;
    let [_, _, mg] = table[4].1;
    let [_, _, mn] = table[10].1;
    println!();
    let verdict = |ok: bool| if ok { "holds" } else { "does NOT hold" };
    println!(
        "linear = OR: within 0.5 bit/char of the in-domain model on both domains: {}",
        verdict(pl - pa < 0.5 && cl - cb < 0.5)
    );
    println!(
        "linear beats each single model on the mixed set: {}",
        verdict(ml < ma && ml < mb)
    );
    println!(
        "log-linear = AND: worse than linear on both domains (a token must please both models): {}",
        verdict(pg > pl && cg > cl)
    );
    println!(
        "the negative coefficient hurts in-domain perplexity (prose): {}",
        verdict(pc > pa)
    );
    println!(
        "context-dependent weights beat fixed 0.5/0.5 on mixed text: {}",
        verdict(mr < ml)
    );
    println!(
        "EM never lowers the held-out likelihood (dev {:.4} -> {:.4}): {}",
        em.log_likelihood_before,
        em.log_likelihood_after,
        verdict(em.log_likelihood_after >= em.log_likelihood_before)
    );
    let dev_bits = |cfg: &Config<'_>| bits_per_char(&combined(&dev_a, &dev_b, dev.len(), cfg), &dev);
    let (de, dh) = (
        dev_bits(&Config::linear(&w_em)),
        dev_bits(&Config::linear(&[0.5, 0.5])),
    );
    println!(
        "EM-fitted weights beat fixed 0.5/0.5 on the dev split they were fitted on ({de:.3} vs {dh:.3}): {}",
        verdict(de < dh)
    );
    println!(
        "EM-fitted weights beat fixed 0.5/0.5 on the mixed test set ({me:.3} vs {ml:.3}): {}",
        verdict(me < ml)
    );
    println!(
        "Newton-fitted log-linear coefficients beat log-linear 0.5/0.5 on the mixed test set ({mn:.3} vs {mg:.3}): {}",
        verdict(mn < mg)
    );
    println!(
        "per-row posterior weights beat the best fixed (EM-fitted) weights on mixed text ({mr:.3} vs {me:.3}): {}",
        verdict(mr < me)
    );

    // Uncertainty of the EM-weighted linear combination on the mixed test
    // set: does it know which characters it gets wrong?
    let (a, b) = uncertainty_rows.expect("mixed set evaluated");
    let rows = mixed.len();
    let models = [
        Model::new(Rows::dense(&a, rows, V).unwrap()),
        Model::new(Rows::dense(&b, rows, V).unwrap()),
    ];
    let mut lp = vec![0.0f32; rows * V];
    let mut best = vec![0u32; rows];
    let [mut h, mut t1, mut mg, mut js] = [(); 4].map(|_| vec![0.0f32; rows]);
    let out = Output {
        log_probs: Some(RowsMut::dense(&mut lp, rows, V).unwrap()),
        argmax: Some(&mut best),
        entropy: Some(&mut h),
        top1_prob: Some(&mut t1),
        margin: Some(&mut mg),
        disagreement: Some(&mut js),
        ..Default::default()
    };
    let report = combine(&models, &Config::linear(&w_em), out).expect("valid configuration");
    assert!(report.is_clean(), "{report:?}");
    let wrong: Vec<bool> = best.iter().zip(&mixed).map(|(&p, &c)| p != c as u32).collect();
    let n_wrong = wrong.iter().filter(|&&w| w).count();
    let neg = |x: &[f32]| -> Vec<f32> { x.iter().map(|&v| -v).collect() };
    let measures: [(&str, Vec<f32>); 4] = [
        ("entropy of the combination", h.clone()),
        ("1 - top-1 probability", t1.iter().map(|&p| 1.0 - p).collect()),
        ("- (top-1 - top-2 margin)", neg(&mg)),
        ("model disagreement (Jensen-Shannon)", js.clone()),
    ];
    println!(
        "\nuncertainty of the EM-weighted linear combination on the mixed test set: argmax wrong on {n_wrong} of {rows} characters ({:.1}%)\n",
        100.0 * n_wrong as f64 / rows as f64
    );
    println!(
        "| uncertainty measure | AUROC of \"argmax is wrong\" | errors removed by deferring the 20% most uncertain rows |"
    );
    println!("|---|---|---|");
    let mut scratch = vec![0.0f32; defer_scratch_len(rows, Threshold::Rate(0.2))];
    let mut deferred = vec![false; rows];
    let mut aurocs = Vec::new();
    let mut removed = Vec::new();
    for (name, score) in &measures {
        let auc = auroc(score, &wrong);
        let d = defer(score, Threshold::Rate(0.2), &mut scratch, &mut deferred).expect("valid rate");
        let caught = deferred.iter().zip(&wrong).filter(|(d, w)| **d && **w).count();
        let share = caught as f64 / n_wrong as f64;
        println!(
            "| {name} | {auc:.3} | {:.1}% ({caught} of {n_wrong}; {} rows deferred) |",
            100.0 * share,
            d.count
        );
        aurocs.push(auc);
        removed.push(share);
    }
    println!();
    println!(
        "models are more uncertain when they are about to err (every measure's AUROC > 0.5): {}",
        verdict(aurocs.iter().all(|&a| a > 0.5))
    );
    println!(
        "a cascade escalating the 20% most uncertain rows (by entropy) catches more than 20% of the errors ({:.1}%): {}",
        100.0 * removed[0],
        verdict(removed[0] > 0.2)
    );
}
