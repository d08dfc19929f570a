//! The C entry points called from Rust exactly as C calls them (raw
//! pointers, lengths, integer enums): results equal the core's, and every
//! failure class (null, misaligned, overflow, overlap, bad shape, bad
//! parameter, unknown enum value, unsupported) returns its status, records
//! a message, and leaves every output untouched.

use core::ffi::{CStr, c_char};
use core::ptr::{null, null_mut};
use medley_core::ensemble::{Config, Model, Output, combine};
use medley_core::moe::gating::topk_softmax;
use medley_core::{Rows, RowsMut, bf16};
use medley_ffi::*;

/// A versioned struct filled by its `_init` function at this header's size.
fn init<T>(f: unsafe extern "C" fn(*mut T, usize) -> medley_status) -> T {
    let mut v = std::mem::MaybeUninit::<T>::zeroed();
    // SAFETY: v is writable for size_of::<T>() bytes.
    assert_eq!(unsafe { f(v.as_mut_ptr(), size_of::<T>()) }, medley_status::Ok);
    // SAFETY: the init function wrote every byte of T (zeroed before).
    unsafe { v.assume_init() }
}

const SENTINEL: f32 = -12345.0;
const SENTINEL_ID: u32 = 0xDEAD_BEEF;

fn message() -> String {
    let mut buf = [0 as c_char; 256];
    let mut n = 0usize;
    // SAFETY: buf is writable for its length; n is a valid out-pointer.
    let s = unsafe { medley_last_error_message(buf.as_mut_ptr(), buf.len(), &mut n) };
    assert_eq!(s, medley_status::Ok);
    // SAFETY: the function NUL-terminates within the buffer.
    let m = unsafe { CStr::from_ptr(buf.as_ptr()) }
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(m.len(), n.min(buf.len() - 1));
    m
}

fn name(s: i32) -> String {
    // SAFETY: medley_status_name returns a static NUL-terminated string.
    unsafe { CStr::from_ptr(medley_status_name(s)) }
        .to_str()
        .unwrap()
        .to_string()
}

fn rows_f32(data: &[f32], rows: usize, len: usize, stride: usize) -> medley_rows {
    medley_rows {
        data: data.as_ptr().cast(),
        data_len: data.len(),
        dtype: medley_dtype::F32 as u32,
        rows,
        len,
        stride,
    }
}

/// Two rows, vocabulary 5: an f32 model (stride 6), a bf16 model covering
/// only 4 tokens.
struct Fixture {
    a: Vec<f32>,
    b: Vec<bf16>,
    weights: [f32; 2],
}

impl Fixture {
    fn new() -> Self {
        Fixture {
            a: vec![
                1.0,
                2.0,
                -0.5,
                0.25,
                3.0,
                99.0, // row 0 (+ padding)
                -1.0,
                0.0,
                f32::NEG_INFINITY,
                2.0,
                0.5,
                99.0,
            ],
            b: [0.5f32, -2.0, 1.5, 1.0, 0.0, 1.0, 2.0, -3.0]
                .iter()
                .map(|&x| bf16::from_f32(x))
                .collect(),
            weights: [0.7, 0.3],
        }
    }

    fn models(&self) -> [medley_model; 2] {
        [
            medley_model {
                logits: rows_f32(&self.a, 2, 5, 6),
                temperature: 1.0,
            },
            medley_model {
                logits: medley_rows {
                    data: self.b.as_ptr().cast(),
                    data_len: self.b.len(),
                    dtype: medley_dtype::Bf16 as u32,
                    rows: 2,
                    len: 4,
                    stride: 0,
                },
                temperature: 0.5,
            },
        ]
    }

    fn config(&self, mode: medley_mode) -> medley_ensemble_config {
        medley_ensemble_config {
            mode: mode as u32,
            weights: self.weights.as_ptr(),
            weights_len: 2,
            ..init(medley_ensemble_config_init)
        }
    }

    /// The core's own answer: log-probs, argmax, log-normalizers, report.
    fn reference(&self, config: &Config<'_>) -> (Vec<f32>, Vec<u32>, Vec<f32>, medley_core::Report) {
        let ms = [
            Model::new(Rows::new(&self.a[..], 2, 5, 6).unwrap()),
            Model::new(Rows::new(&self.b[..], 2, 4, 4).unwrap()).with_temperature(0.5),
        ];
        let (mut lp, mut am, mut lz) = (vec![0.0f32; 10], vec![0u32; 2], vec![0.0f32; 2]);
        let out = Output {
            log_probs: Some(RowsMut::dense(&mut lp, 2, 5).unwrap()),
            argmax: Some(&mut am),
            log_normalizer: Some(&mut lz),
            ..Default::default()
        };
        let rep = combine(&ms, config, out).unwrap();
        (lp, am, lz, rep)
    }
}

struct Outs {
    lp: Vec<f32>,
    p: Vec<f32>,
    am: Vec<u32>,
    lz: Vec<f32>,
    rep: medley_report,
}

impl Outs {
    fn new() -> Self {
        Outs {
            lp: vec![SENTINEL; 10],
            p: vec![SENTINEL; 10],
            am: vec![SENTINEL_ID; 2],
            lz: vec![SENTINEL; 2],
            rep: medley_report {
                struct_size: size_of::<medley_report>(),
                masked_rows: 777,
                nan_rows: 777,
            },
        }
    }

    fn desc(&mut self) -> medley_ensemble_output {
        medley_ensemble_output {
            log_probs: self.lp.as_mut_ptr(),
            log_probs_len: self.lp.len(),
            log_probs_stride: 0,
            probs: self.p.as_mut_ptr(),
            probs_len: self.p.len(),
            probs_stride: 5,
            argmax: self.am.as_mut_ptr(),
            argmax_len: 2,
            log_normalizer: self.lz.as_mut_ptr(),
            log_normalizer_len: 2,
            ..init(medley_ensemble_output_init)
        }
    }

    fn untouched(&self) -> bool {
        self.lp
            .iter()
            .chain(&self.p)
            .chain(&self.lz)
            .all(|&x| x == SENTINEL)
            && self.am.iter().all(|&x| x == SENTINEL_ID)
            && self.rep.masked_rows == 777
            && self.rep.nan_rows == 777
    }
}

fn run(models: &[medley_model], n: usize, cfg: &medley_ensemble_config, o: &mut Outs) -> medley_status {
    let desc = o.desc();
    // SAFETY: every pointer refers to live buffers of the lengths given.
    unsafe { medley_ensemble_combine(models.as_ptr(), n, cfg, 2, 5, &desc, &mut o.rep) }
}

#[test]
fn combine_matches_the_core_in_both_modes() {
    let f = Fixture::new();
    for mode in [medley_mode::Linear, medley_mode::LogLinear] {
        let cfg = f.config(mode);
        let mut o = Outs::new();
        assert_eq!(run(&f.models(), 2, &cfg, &mut o), medley_status::Ok);
        let core_cfg = match mode {
            medley_mode::Linear => Config::linear(&f.weights),
            medley_mode::LogLinear => Config::log_linear(&f.weights),
        };
        let (lp, am, lz, rep) = f.reference(&core_cfg);
        assert_eq!(o.lp, lp, "{mode:?}");
        assert_eq!(o.am, am);
        assert_eq!(o.lz, lz);
        assert_eq!(o.rep, medley_report::from(rep));
        for (p, l) in o.p.iter().zip(&o.lp) {
            assert!((p - l.exp()).abs() < 1e-6);
        }
    }
}

#[test]
fn per_row_weights_and_plausibility_pass_through() {
    let f = Fixture::new();
    let table = [1.0f32, 0.0, 99.0, 0.25, 0.75];
    let cfg = medley_ensemble_config {
        weights: table.as_ptr(),
        weights_len: 5,
        weights_stride: 3,
        plausibility_model: 0,
        plausibility_alpha: 0.1,
        mask_rule: medley_mask_rule::Any as u32,
        out_temperature: 0.8,
        ..f.config(medley_mode::Linear)
    };
    let mut o = Outs::new();
    assert_eq!(
        run(&f.models(), 2, &cfg, &mut o),
        medley_status::Ok,
        "{}",
        message()
    );
    let core_cfg = Config {
        weights: medley_core::ensemble::Weights::PerRow(Rows::new(&table[..], 2, 2, 3).unwrap()),
        plausibility: Some(medley_core::ensemble::Plausibility { model: 0, alpha: 0.1 }),
        mask_rule: medley_core::ensemble::MaskRule::Any,
        out_temperature: 0.8,
        ..Config::linear(&[])
    };
    let (lp, am, _, _) = f.reference(&core_cfg);
    assert_eq!(o.lp, lp);
    assert_eq!(o.am, am);
}

#[test]
fn every_failure_leaves_outputs_untouched() {
    let f = Fixture::new();
    let good = f.config(medley_mode::Linear);
    type Case = (&'static str, medley_status, &'static str);
    type Edit = Box<dyn Fn(&mut [medley_model; 2], &mut medley_ensemble_config)>;
    let mut cases: Vec<(Case, Edit)> = vec![
        (
            (
                "null data",
                medley_status::NullArgument,
                "`models[1].logits` is null",
            ),
            Box::new(|m, _| m[1].logits.data = null()),
        ),
        (
            (
                "misaligned data",
                medley_status::Misaligned,
                "`models[0].logits` is not 4-byte aligned",
            ),
            Box::new(|m, _| m[0].logits.data = m[0].logits.data.cast::<u8>().wrapping_add(2).cast()),
        ),
        (
            (
                "huge data_len",
                medley_status::Overflow,
                "`models[0].logits` overflows",
            ),
            Box::new(|m, _| m[0].logits.data_len = usize::MAX / 2),
        ),
        (
            (
                "data too short",
                medley_status::BadShape,
                "`models[0].logits`: `data` holds 10",
            ),
            Box::new(|m, _| m[0].logits.data_len = 10),
        ),
        (
            (
                "stride below len",
                medley_status::BadShape,
                "row stride 4 < row length 5",
            ),
            Box::new(|m, _| m[0].logits.stride = 4),
        ),
        (
            (
                "rows mismatch",
                medley_status::BadShape,
                "`models.logits.rows` (#1) has size 1",
            ),
            Box::new(|m, _| m[1].logits.rows = 1),
        ),
        (
            ("vocab too long", medley_status::BadShape, "more than the limit 5"),
            Box::new(|m, _| m[0].logits.len = 6),
        ),
        (
            (
                "bad dtype",
                medley_status::BadParameter,
                "= 7 is not a valid value",
            ),
            Box::new(|m, _| m[1].logits.dtype = 7),
        ),
        (
            (
                "zero temperature",
                medley_status::BadParameter,
                "`models.temperature[1]` is out of range",
            ),
            Box::new(|m, _| m[1].temperature = 0.0),
        ),
        (
            ("NaN temperature", medley_status::BadParameter, "NaN or infinite"),
            Box::new(|m, _| m[0].temperature = f32::NAN),
        ),
        (
            ("bad mode", medley_status::BadParameter, "`config.mode` = 2"),
            Box::new(|_, c| c.mode = 2),
        ),
        (
            ("bad mask rule", medley_status::BadParameter, "`config.mask_rule`"),
            Box::new(|_, c| c.mask_rule = 9),
        ),
        (
            (
                "null weights",
                medley_status::NullArgument,
                "`config.weights` is null",
            ),
            Box::new(|_, c| c.weights = null()),
        ),
        (
            (
                "weights too few",
                medley_status::BadShape,
                "`weights` (#0) has size 1, expected 2",
            ),
            Box::new(|_, c| c.weights_len = 1),
        ),
        (
            (
                "plausibility model",
                medley_status::BadParameter,
                "`plausibility.model` index 2",
            ),
            Box::new(|_, c| c.plausibility_model = 2),
        ),
        (
            (
                "alpha",
                medley_status::BadParameter,
                "`plausibility.alpha[0]` is out of range",
            ),
            Box::new(|_, c| {
                c.plausibility_model = 0;
                c.plausibility_alpha = 1.5;
            }),
        ),
        (
            (
                "device weights",
                medley_status::Unsupported,
                "device_weights in a CPU call",
            ),
            Box::new(|_, c| c.device_weights = 0x1000),
        ),
        (
            (
                "out temperature",
                medley_status::BadParameter,
                "`out_temperature[0]`",
            ),
            Box::new(|_, c| c.out_temperature = -1.0),
        ),
    ];
    // Negative linear weight and all-zero weights.
    let neg = [0.5f32, -0.5];
    let zero = [0.0f32, 0.0];
    let neg_ptr = neg.as_ptr() as usize;
    let zero_ptr = zero.as_ptr() as usize;
    cases.push((
        (
            "negative weight",
            medley_status::BadParameter,
            "`weights[1]` is out of range",
        ),
        Box::new(move |_, c| c.weights = neg_ptr as *const f32),
    ));
    cases.push((
        ("zero sum", medley_status::BadParameter, "sums to zero"),
        Box::new(move |_, c| c.weights = zero_ptr as *const f32),
    ));
    for ((what, status, msg), edit) in &cases {
        let mut ms = f.models();
        let mut cfg = good;
        edit(&mut ms, &mut cfg);
        let mut o = Outs::new();
        assert_eq!(run(&ms, 2, &cfg, &mut o), *status, "{what}: {}", message());
        assert!(o.untouched(), "{what}: outputs written");
        let m = message();
        assert!(m.contains(msg), "{what}: message {m:?} lacks {msg:?}");
        assert_eq!(medley_last_cuda_error(), 0);
    }
}

#[test]
fn struct_and_output_failures_leave_outputs_untouched() {
    let f = Fixture::new();
    let cfg = f.config(medley_mode::Linear);
    let ms = f.models();
    let mut o = Outs::new();
    let mut d = o.desc();
    // Null models, config, out.
    // SAFETY: in every call below each non-null pointer refers to a live
    // buffer of at least the length given with it.
    unsafe {
        assert_eq!(
            medley_ensemble_combine(null(), 2, &cfg, 2, 5, &d, &mut o.rep),
            medley_status::NullArgument
        );
        assert!(message().contains("`models` is null"));
        assert_eq!(
            medley_ensemble_combine(ms.as_ptr(), 2, null(), 2, 5, &d, &mut o.rep),
            medley_status::NullArgument
        );
        assert_eq!(
            medley_ensemble_combine(ms.as_ptr(), 2, &cfg, 2, 5, null(), &mut o.rep),
            medley_status::NullArgument
        );
        // No models at all (a null list of length 0 is allowed).
        assert_eq!(
            medley_ensemble_combine(null(), 0, &cfg, 2, 5, &d, &mut o.rep),
            medley_status::BadShape
        );
        assert!(message().contains("`models` is empty"), "{}", message());
        // Too many models: refused before the list is read.
        assert_eq!(
            medley_ensemble_combine(ms.as_ptr(), 65, &cfg, 2, 5, &d, &mut o.rep),
            medley_status::BadShape
        );
        // A list length whose byte size overflows.
        assert_eq!(
            medley_ensemble_combine(ms.as_ptr(), usize::MAX / 8, &cfg, 2, 5, &d, &mut o.rep),
            medley_status::Overflow
        );
        // Output too short, strided output too short, argmax length.
        d.log_probs_len = 9;
        assert_eq!(
            medley_ensemble_combine(ms.as_ptr(), 2, &cfg, 2, 5, &d, &mut o.rep),
            medley_status::BadShape
        );
        assert!(
            message().contains("`out.log_probs`: `data` holds 9"),
            "{}",
            message()
        );
        d = o.desc();
        d.probs_stride = 6;
        assert_eq!(
            medley_ensemble_combine(ms.as_ptr(), 2, &cfg, 2, 5, &d, &mut o.rep),
            medley_status::BadShape
        );
        d = o.desc();
        d.argmax_len = 1;
        assert_eq!(
            medley_ensemble_combine(ms.as_ptr(), 2, &cfg, 2, 5, &d, &mut o.rep),
            medley_status::BadShape
        );
        // A null output with a nonzero length is "not requested"; with no
        // row output at all the call is unsupported.
        d = o.desc();
        d.log_probs = null_mut();
        d.probs = null_mut();
        assert_eq!(
            medley_ensemble_combine(ms.as_ptr(), 2, &cfg, 2, 5, &d, &mut o.rep),
            medley_status::Unsupported
        );
        // Overlaps: two outputs, an output and an input, the report.
        d = o.desc();
        d.probs = o.lp.as_mut_ptr();
        assert_eq!(
            medley_ensemble_combine(ms.as_ptr(), 2, &cfg, 2, 5, &d, &mut o.rep),
            medley_status::Overlap
        );
        assert!(message().contains("overlaps"), "{}", message());
        let mut inplace = f.a.clone();
        let mut ms2 = ms;
        ms2[0].logits.data = inplace.as_ptr().cast();
        d = o.desc();
        d.log_probs = inplace.as_mut_ptr();
        d.log_probs_len = 10;
        assert_eq!(
            medley_ensemble_combine(ms2.as_ptr(), 2, &cfg, 2, 5, &d, &mut o.rep),
            medley_status::Overlap
        );
        assert_eq!(inplace, f.a);
        // A report over an output: its struct_size (read first) is the
        // output's bits, not a layout; with a valid struct_size, the
        // report's bytes overlap the output.
        d = o.desc();
        assert_eq!(
            medley_ensemble_combine(ms.as_ptr(), 2, &cfg, 2, 5, &d, o.lz.as_mut_ptr().cast()),
            medley_status::StructSize
        );
        let mut shared = [0usize; 4];
        shared[0] = size_of::<medley_report>();
        d = o.desc();
        d.argmax = shared[1..].as_mut_ptr().cast();
        assert_eq!(
            medley_ensemble_combine(ms.as_ptr(), 2, &cfg, 2, 5, &d, shared.as_mut_ptr().cast()),
            medley_status::Overlap
        );
        assert_eq!(shared, [size_of::<medley_report>(), 0, 0, 0]);
        // A misaligned report pointer.
        assert_eq!(
            medley_ensemble_combine(
                ms.as_ptr(),
                2,
                &cfg,
                2,
                5,
                &d,
                (&mut o.rep as *mut medley_report).cast::<u8>().add(1).cast()
            ),
            medley_status::Misaligned
        );
    }
    assert!(o.untouched());
    // The report is optional.
    let d = o.desc();
    // SAFETY: as above.
    let s = unsafe { medley_ensemble_combine(ms.as_ptr(), 2, &cfg, 2, 5, &d, null_mut()) };
    assert_eq!(s, medley_status::Ok);
}

#[test]
fn topk_gating_matches_the_core_and_fails_cleanly() {
    let logits: Vec<f32> = (0..3 * 7).map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.3).collect();
    let r = rows_f32(&logits, 3, 7, 0);
    let (mut ids, mut w) = (vec![SENTINEL_ID; 6], vec![SENTINEL; 6]);
    let mut rep = init(medley_report_init);
    for renorm in [0u32, 1] {
        // SAFETY: buffers are live with the lengths given.
        let s = unsafe {
            medley_moe_topk_softmax(&r, 2, renorm, ids.as_mut_ptr(), 6, w.as_mut_ptr(), 6, &mut rep)
        };
        assert_eq!(s, medley_status::Ok);
        let (mut ids2, mut w2) = (vec![0u32; 6], vec![0.0f32; 6]);
        topk_softmax(
            Rows::dense(&logits[..], 3, 7).unwrap(),
            2,
            renorm != 0,
            &mut ids2,
            &mut w2,
        )
        .unwrap();
        assert_eq!(ids, ids2);
        assert_eq!(w, w2);
    }
    // Buffers as long as every length declared below (a declared length
    // past a buffer's end could overlap another allocation).
    let mut ids = vec![SENTINEL_ID; 24];
    let mut w = vec![SENTINEL; 24];
    let before = (ids.clone(), w.clone());
    let bad: [(usize, usize, usize, medley_status); 5] = [
        (0, 6, 6, medley_status::BadParameter),      // k = 0
        (8, 24, 24, medley_status::BadShape),        // k > E
        (2, 5, 6, medley_status::BadShape),          // ids_len
        (2, 6, usize::MAX, medley_status::Overflow), // weights_len bytes
        (2, 6, 5, medley_status::BadShape),
    ];
    for (k, il, wl, st) in bad {
        // SAFETY: the lengths that are read are within the buffers; the
        // overflowing one is refused before any access.
        let s =
            unsafe { medley_moe_topk_softmax(&r, k, 1, ids.as_mut_ptr(), il, w.as_mut_ptr(), wl, &mut rep) };
        assert_eq!(s, st, "k={k} ids_len={il} weights_len={wl}: {}", message());
        assert_eq!((ids.clone(), w.clone()), before);
    }
    // SAFETY: null logits struct, then null ids with a nonzero length.
    unsafe {
        assert_eq!(
            medley_moe_keep_topk_softmax(null(), 2, ids.as_mut_ptr(), 6, w.as_mut_ptr(), 6, null_mut()),
            medley_status::NullArgument
        );
        assert_eq!(
            medley_moe_keep_topk_softmax(&r, 2, null_mut(), 6, w.as_mut_ptr(), 6, null_mut()),
            medley_status::NullArgument
        );
        assert_eq!(
            medley_moe_keep_topk_softmax(&r, 2, ids.as_mut_ptr(), 6, ids.as_mut_ptr().cast(), 6, null_mut()),
            medley_status::Overlap
        );
    }
    assert_eq!((ids, w), before);
}

#[test]
fn status_names_messages_and_version() {
    assert_eq!(name(0), "MEDLEY_STATUS_OK");
    assert_eq!(name(7001), "MEDLEY_STATUS_NULL_ARGUMENT");
    assert_eq!(name(7006), "MEDLEY_STATUS_PANIC");
    assert_eq!(name(7100), "MEDLEY_STATUS_DRIVER");
    for unknown in [1, -1, 6999, 7000, 7099, i32::MIN, i32::MAX] {
        assert_eq!(name(unknown), "MEDLEY_STATUS_UNKNOWN");
    }
    // SAFETY: static string.
    let v = unsafe { CStr::from_ptr(medley_version()) };
    assert_eq!(v.to_str().unwrap(), env!("CARGO_PKG_VERSION"));
    // A fresh thread has no failure; truncation keeps the NUL and reports
    // the full length; a null buffer with a length is refused without
    // overwriting the recorded failure.
    std::thread::spawn(|| {
        assert_eq!(message(), "no error");
        let cfg = init(medley_ensemble_config_init);
        // SAFETY: null models with n_models 0 are allowed; out is null.
        let s = unsafe { medley_ensemble_combine(null(), 0, &cfg, 0, 0, null(), null_mut()) };
        assert_eq!(s, medley_status::NullArgument);
        let full = message();
        assert_eq!(full, "`out` is null");
        let mut small = [0x55 as c_char; 4];
        let mut n = 0;
        // SAFETY: small is writable for 4 bytes.
        let s = unsafe { medley_last_error_message(small.as_mut_ptr(), 4, &mut n) };
        assert_eq!(s, medley_status::Ok);
        assert_eq!(n, full.len());
        // SAFETY: NUL-terminated within the buffer.
        assert_eq!(unsafe { CStr::from_ptr(small.as_ptr()) }.to_bytes(), b"`ou");
        // SAFETY: a null buffer with a nonzero length is refused.
        let s = unsafe { medley_last_error_message(null_mut(), 4, null_mut()) };
        assert_eq!(s, medley_status::NullArgument);
        // SAFETY: length 0 with a null buffer only reports the length.
        let s = unsafe { medley_last_error_message(null_mut(), 0, &mut n) };
        assert_eq!(s, medley_status::Ok);
        assert_eq!(n, full.len());
        assert_eq!(message(), full);
    })
    .join()
    .unwrap();
}

#[cfg(feature = "cuda")]
#[test]
fn cuda_entry_points_check_arguments_and_report_the_driver() {
    let mut engine: *mut medley_cuda_engine = 0x1234 as *mut _;
    let probe = medley_cuda_probe();
    if probe != medley_status::Ok {
        // No usable driver here (the stub answers 34, a driver without a
        // device 100): engine creation fails the same way, leaving the
        // out-parameter alone.
        assert_eq!(probe, medley_status::Driver);
        let code = medley_last_cuda_error();
        assert!(code == 34 || code == 100, "cuInit returned {code}");
        assert!(
            std::env::var_os("MEDLEY_REQUIRE_GPU").is_none_or(|v| v != "1"),
            "MEDLEY_REQUIRE_GPU=1 but cuInit returned {code}"
        );
        eprintln!("no usable CUDA device (cuInit = {code}): GPU calls checked for their failures only");
        // SAFETY: the stream handle is never used (cuInit fails first);
        // engine is a valid out-pointer.
        let s = unsafe { medley_cuda_engine_new(null_mut(), &mut engine) };
        assert_eq!(s, medley_status::Driver);
        assert_eq!(medley_last_cuda_error(), code);
        assert_eq!(engine as usize, 0x1234);
        assert!(message().contains("cuInit returned"), "{}", message());
    }
    // Null handles and out-parameters, whatever the machine.
    // SAFETY: every pointer is null or valid; nothing is dereferenced.
    unsafe {
        assert_eq!(
            medley_cuda_engine_new(null_mut(), null_mut()),
            medley_status::NullArgument
        );
        assert_eq!(medley_last_cuda_error(), 0);
        assert_eq!(
            medley_cuda_engine_destroy(null_mut()),
            medley_status::NullArgument
        );
        // Engine options: checked before any driver call.
        let mut opts = init(medley_cuda_engine_options_init);
        assert_eq!(opts.modules, medley_cuda_modules::All as u32);
        let mut e2: *mut medley_cuda_engine = 0x5678 as *mut _;
        for bad in [0u32, 16, 0x8000_0000] {
            opts.modules = bad;
            assert_eq!(
                medley_cuda_engine_new_with(null_mut(), &opts, &mut e2),
                medley_status::BadParameter
            );
            assert_eq!(e2 as usize, 0x5678);
        }
        assert_eq!(
            medley_cuda_engine_new_with(null_mut(), null(), &mut e2),
            medley_status::NullArgument
        );
        opts.struct_size = 8;
        opts.modules = medley_cuda_modules::Ensemble as u32;
        assert_eq!(
            medley_cuda_engine_new_with(null_mut(), &opts, &mut e2),
            medley_status::StructSize
        );
        if probe != medley_status::Ok {
            opts.struct_size = size_of::<medley_cuda_engine_options>();
            assert_eq!(
                medley_cuda_engine_new_with(null_mut(), &opts, &mut e2),
                medley_status::Driver
            );
            assert_eq!(e2 as usize, 0x5678);
            // Not a JIT failure: no log.
            let mut buf = [1 as c_char; 8];
            let mut n = 9;
            assert_eq!(
                medley_cuda_last_jit_log(buf.as_mut_ptr(), buf.len(), &mut n),
                medley_status::Ok
            );
            assert_eq!((n, buf[0]), (0, 0));
        }
        assert_eq!(
            medley_cuda_last_jit_log(null_mut(), 1, null_mut()),
            medley_status::NullArgument
        );
        let mut bytes = 99usize;
        assert_eq!(
            medley_cuda_ensemble_workspace_bytes(null(), 1, 1, 1, 0, &mut bytes),
            medley_status::NullArgument
        );
        assert_eq!(bytes, 99);
        let cfg = init(medley_ensemble_config_init);
        let out = medley_cuda_ensemble_output {
            log_probs: 0,
            log_probs_len: 0,
            log_probs_stride: 0,
            probs: 0,
            probs_len: 0,
            probs_stride: 0,
            argmax: 0,
            argmax_len: 0,
            log_normalizer: 0,
            log_normalizer_len: 0,
            ..init(medley_cuda_ensemble_output_init)
        };
        assert_eq!(
            medley_cuda_ensemble_combine(null(), null_mut(), null(), 0, &cfg, 0, 0, &out, 0, 0, 0),
            medley_status::NullArgument
        );
        let rows = medley_cuda_rows {
            data: 0x1000,
            data_len: 4,
            dtype: 0,
            rows: 1,
            len: 4,
            stride: 0,
        };
        assert_eq!(
            medley_cuda_moe_topk_softmax(null(), null_mut(), &rows, 2, 1, 0x2000, 2, 0x3000, 2),
            medley_status::NullArgument
        );
        assert_eq!(
            medley_cuda_moe_keep_topk_softmax(null(), null_mut(), &rows, 2, 0x2000, 2, 0x3000, 2),
            medley_status::NullArgument
        );
    }
}

#[test]
fn has_cuda_matches_the_build() {
    assert_eq!(medley_has_cuda(), cfg!(feature = "cuda"));
    // The status numbers are the same in both builds.
    assert_eq!(medley_status::Driver as i32, 7100);
    assert_eq!(medley_status::DeviceUnsupported as i32, 7101);
    assert_eq!(medley_status::WrongContext as i32, 7102);
    assert_eq!(name(7100), "MEDLEY_STATUS_DRIVER");
}

#[test]
fn ties_merge_matches_the_core_and_fails_cleanly() {
    use medley_core::merge::gta::{GtaOptions, TaskParams, merge};
    let n = 12;
    let base: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
    let a: Vec<f32> = base
        .iter()
        .enumerate()
        .map(|(i, b)| b + ((i * 5 % 7) as f32 - 3.0) * 0.1)
        .collect();
    let c: Vec<f32> = base
        .iter()
        .enumerate()
        .map(|(i, b)| b - ((i * 3 % 5) as f32 - 2.0) * 0.2)
        .collect();
    let models = [
        medley_merge_model {
            data: a.as_ptr().cast(),
            data_len: n,
            weight: 0.6,
            density: 0.5,
        },
        medley_merge_model {
            data: c.as_ptr().cast(),
            data_len: n,
            weight: 0.4,
            density: 0.75,
        },
    ];
    let params = [
        TaskParams::new(0.6).with_density(0.5),
        TaskParams::new(0.4).with_density(0.75),
    ];
    for (opts, core_opts) in [
        (init(medley_ties_options_init), GtaOptions::ties()),
        (init(medley_ties_options_init_paper), GtaOptions::ties_paper()),
    ] {
        let mut len = 0usize;
        // SAFETY: live structs and out-pointer.
        let s = unsafe { medley_merge_ties_scratch_len(models.as_ptr(), 2, n, &opts, &mut len) };
        assert_eq!(s, medley_status::Ok);
        let mut scratch = vec![0u32; len];
        let mut out = vec![SENTINEL; n];
        // SAFETY: every buffer is live with the length given.
        let s = unsafe {
            medley_merge_ties(
                models.as_ptr(),
                2,
                base.as_ptr().cast(),
                n,
                medley_dtype::F32 as u32,
                &opts,
                out.as_mut_ptr().cast(),
                n,
                medley_dtype::F32 as u32,
                scratch.as_mut_ptr(),
                len,
            )
        };
        assert_eq!(s, medley_status::Ok, "{}", message());
        let mut want = vec![0.0f32; n];
        let mut sc = vec![0u32; len];
        merge(&[&a[..], &c[..]], &base, &params, &core_opts, &mut sc, &mut want).unwrap();
        assert_eq!(out, want);
    }
    // bf16 output of f32 inputs.
    let opts = init(medley_ties_options_init);
    let mut scratch = vec![0u32; 4096];
    let mut out16 = vec![0xFFFFu16; n];
    // SAFETY: as above.
    let s = unsafe {
        medley_merge_ties(
            models.as_ptr(),
            2,
            base.as_ptr().cast(),
            n,
            0,
            &opts,
            out16.as_mut_ptr().cast(),
            n,
            medley_dtype::Bf16 as u32,
            scratch.as_mut_ptr(),
            scratch.len(),
        )
    };
    assert_eq!(s, medley_status::Ok);
    assert!(out16.iter().all(|&x| x != 0xFFFF));
    // Failures: each leaves `out` untouched.
    let mut bad_density = models;
    bad_density[1].density = 0.0;
    let mut short = models;
    short[0].data_len = n - 1;
    let mut null_data = models;
    null_data[1].data = null();
    let mut bad_enum = opts;
    bad_enum.votes = 3;
    let mut bad_rows = opts;
    bad_rows.row_len = 5;
    let cases: [(
        &str,
        &[medley_merge_model],
        medley_ties_options,
        usize,
        medley_status,
    ); 7] = [
        ("density 0", &bad_density, opts, 4096, medley_status::BadParameter),
        ("short model", &short, opts, 4096, medley_status::BadShape),
        ("null data", &null_data, opts, 4096, medley_status::NullArgument),
        ("votes 3", &models, bad_enum, 4096, medley_status::BadParameter),
        ("row_len 5", &models, bad_rows, 4096, medley_status::BadParameter),
        ("scratch short", &models, opts, 10, medley_status::BadShape),
        ("no models", &[], opts, 4096, medley_status::BadShape),
    ];
    for (what, ms, o, slen, st) in cases {
        let mut out = vec![SENTINEL; n];
        // SAFETY: as above (every length is within its buffer).
        let s = unsafe {
            medley_merge_ties(
                ms.as_ptr(),
                ms.len(),
                base.as_ptr().cast(),
                n,
                0,
                &o,
                out.as_mut_ptr().cast(),
                n,
                0,
                scratch.as_mut_ptr(),
                slen,
            )
        };
        assert_eq!(s, st, "{what}: {}", message());
        assert!(out.iter().all(|&x| x == SENTINEL), "{what}: out written");
    }
    // Output aliasing the base.
    let mut inplace = base.clone();
    // SAFETY: as above.
    let s = unsafe {
        medley_merge_ties(
            models.as_ptr(),
            2,
            inplace.as_ptr().cast(),
            n,
            0,
            &opts,
            inplace.as_mut_ptr().cast(),
            n,
            0,
            scratch.as_mut_ptr(),
            scratch.len(),
        )
    };
    assert_eq!(s, medley_status::Overlap);
    assert_eq!(inplace, base);
}

/// With `MEDLEY_EXPECT_BROKEN_PTX=1` (the GPU machine's run of a library
/// built from a routing.ptx with an invalid instruction, see
/// tools/device/build.sh `BROKEN=1`): engine creation fails with the
/// driver's code, names the module, and `medley_cuda_last_jit_log` returns
/// the JIT's message. Without the variable, it checks nothing.
#[cfg(feature = "cuda")]
#[test]
fn broken_ptx_reports_the_jit_log_through_c() {
    if std::env::var_os("MEDLEY_EXPECT_BROKEN_PTX").is_none_or(|v| v != "1") {
        return;
    }
    assert_eq!(medley_cuda_probe(), medley_status::Ok, "needs a GPU");
    // Stream 0 needs a current context: the primary context of device 0,
    // through the driver API (libcuda, which medley-cuda links; the stub
    // has these symbols too).
    unsafe extern "C" {
        fn cuDeviceGet(dev: *mut i32, ordinal: i32) -> i32;
        fn cuDevicePrimaryCtxRetain(ctx: *mut *mut core::ffi::c_void, dev: i32) -> i32;
        fn cuCtxPushCurrent_v2(ctx: *mut core::ffi::c_void) -> i32;
    }
    let (mut dev, mut ctx) = (0i32, null_mut::<core::ffi::c_void>());
    // SAFETY: valid out-pointers; cuInit succeeded (medley_cuda_probe).
    unsafe {
        assert_eq!(cuDeviceGet(&mut dev, 0), 0);
        assert_eq!(cuDevicePrimaryCtxRetain(&mut ctx, dev), 0);
        assert_eq!(cuCtxPushCurrent_v2(ctx), 0);
    }
    let mut engine: *mut medley_cuda_engine = null_mut();
    // SAFETY: stream 0 with the current context (the Gpu's); engine is a
    // valid out-pointer.
    let s = unsafe { medley_cuda_engine_new(null_mut(), &mut engine) };
    assert_eq!(s, medley_status::Driver, "{}", message());
    assert!(engine.is_null());
    assert_eq!(medley_last_cuda_error(), 218, "CUDA_ERROR_INVALID_PTX");
    assert!(message().contains("routing.ptx"), "{}", message());
    let mut buf = [0 as c_char; 4096];
    let mut n = 0;
    // SAFETY: buf is writable for its length.
    let s = unsafe { medley_cuda_last_jit_log(buf.as_mut_ptr(), buf.len(), &mut n) };
    assert_eq!(s, medley_status::Ok);
    // SAFETY: NUL-terminated within the buffer.
    let log = unsafe { CStr::from_ptr(buf.as_ptr()) }
        .to_str()
        .unwrap()
        .to_string();
    assert!(n > 0 && log.contains("not_an_instruction"), "{log}");
    eprintln!("broken PTX through the C ABI: {}; JIT log: {log}", message());
}
