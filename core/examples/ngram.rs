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
//!   the recent characters) should beat fixed weights on mixed text.
//!
//! Run: `cargo run --release --example ngram`

use medley_core::ensemble::{Config, Model, Output, Weights, combine};
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

/// Per-row weights: the posterior over the two domains given the previous
/// `window` characters (a Bayesian mixture restricted to recent history),
/// starting from a uniform prior.
fn posterior_weights(a: &[f32], b: &[f32], text: &[u8], window: usize) -> Vec<f32> {
    let mut w = vec![0.0f32; text.len() * 2];
    let (mut la, mut lb) = (0.0f64, 0.0f64);
    let mut hist = std::collections::VecDeque::new();
    for (i, &c) in text.iter().enumerate() {
        let d = la - lb;
        let pa = 1.0 / (1.0 + (-d).exp());
        // Keep both weights away from 0 so neither model is ever dropped.
        let pa = pa.clamp(0.01, 0.99);
        w[2 * i] = pa as f32;
        w[2 * i + 1] = (1.0 - pa) as f32;
        let (x, y) = (a[i * V + c as usize] as f64, b[i * V + c as usize] as f64);
        la += x;
        lb += y;
        hist.push_back((x, y));
        if hist.len() > window {
            let (x, y) = hist.pop_front().unwrap();
            la -= x;
            lb -= y;
        }
    }
    w
}

fn split(text: &str) -> (&[u8], &[u8]) {
    let bytes = text.as_bytes();
    let cut = bytes.len() * 9 / 10;
    (&bytes[..cut], &bytes[cut..])
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
    let (prose_train, prose_test) = split(&prose);
    let (code_train, code_test) = split(&code);
    let m_prose = NGram::train(prose_train, order);
    let m_code = NGram::train(code_train, order);
    println!(
        "character {order}-gram models; prose: {} train / {} held-out bytes, code: {} / {}\n",
        prose_train.len(),
        prose_test.len(),
        code_train.len(),
        code_test.len()
    );
    // A third evaluation set alternating the two domains in 400-byte pieces,
    // where context-dependent weights can follow the switches.
    let mut mixed = Vec::new();
    for (p, c) in prose_test.chunks(400).zip(code_test.chunks(400)) {
        mixed.extend_from_slice(p);
        mixed.extend_from_slice(c);
    }
    let sets: [(&str, &[u8], &[u8]); 3] = [
        ("prose", prose_train, prose_test),
        ("code", code_train, code_test),
        ("mixed", &[], &mixed),
    ];
    let mut table: Vec<(String, [f64; 3])> = Vec::new();
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
                let w = posterior_weights(&a, &b, text, 64);
                let cfg = Config {
                    weights: Weights::PerRow(Rows::dense(&w, rows, 2).unwrap()),
                    ..Config::linear(&[])
                };
                bits_per_char(&combined(&a, &b, rows, &cfg), text)
            },
        ];
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
}
