//! The ABI policy of ffi/README.md, tested through the C entry points:
//! versioned structs (`struct_size`) of an older layout are accepted and
//! read no further than their size, a newer layout is accepted only with a
//! zero tail, other sizes are refused with `MEDLEY_STATUS_STRUCT_SIZE`
//! before anything is written; the `_init` functions write exactly
//! `struct_size` bytes; the uncertainty outputs of layout 2 equal the
//! core's.

use core::ffi::{CStr, c_char};
use core::ptr::null_mut;
use medley_core::Rows;
use medley_core::ensemble::{Config, Model, Output, combine};
use medley_ffi::*;

const SENTINEL: f32 = -12345.0;

fn message() -> String {
    let mut buf = [0 as c_char; 512];
    // SAFETY: buf is writable for its length.
    let s = unsafe { medley_last_error_message(buf.as_mut_ptr(), buf.len(), null_mut()) };
    assert_eq!(s, medley_status::Ok);
    // SAFETY: NUL-terminated within the buffer.
    unsafe { CStr::from_ptr(buf.as_ptr()) }
        .to_str()
        .unwrap()
        .to_string()
}

fn init<T>(f: unsafe extern "C" fn(*mut T, usize) -> medley_status) -> T {
    let mut v = std::mem::MaybeUninit::<T>::zeroed();
    // SAFETY: v is writable for size_of::<T>() bytes.
    assert_eq!(unsafe { f(v.as_mut_ptr(), size_of::<T>()) }, medley_status::Ok);
    // SAFETY: every byte written (zeroed before).
    unsafe { v.assume_init() }
}

/// Two models, 3 rows, vocabulary 6, with a masked token and a NaN-free
/// spread of probabilities.
struct Fixture {
    a: Vec<f32>,
    b: Vec<f32>,
    w: [f32; 2],
}

const R: usize = 3;
const V: usize = 6;

impl Fixture {
    fn new() -> Self {
        let a = (0..R * V).map(|i| ((i * 7 % 11) as f32) * 0.4 - 1.5).collect();
        let mut b: Vec<f32> = (0..R * V).map(|i| ((i * 5 % 13) as f32) * 0.3 - 2.0).collect();
        b[4] = f32::NEG_INFINITY;
        Fixture { a, b, w: [0.6, 0.4] }
    }

    fn models(&self) -> [medley_model; 2] {
        let m = |d: &[f32]| medley_model {
            logits: medley_rows {
                data: d.as_ptr().cast(),
                data_len: d.len(),
                dtype: medley_dtype::F32 as u32,
                rows: R,
                len: V,
                stride: 0,
            },
            temperature: 1.0,
        };
        [m(&self.a), m(&self.b)]
    }

    fn config(&self, mode: medley_mode) -> medley_ensemble_config {
        let mut c = init(medley_ensemble_config_init);
        c.mode = mode as u32;
        c.weights = self.w.as_ptr();
        c.weights_len = 2;
        c
    }
}

/// Output buffers: log-probs and the four per-row uncertainty outputs.
struct Outs {
    lp: Vec<f32>,
    unc: [Vec<f32>; 4],
}

impl Outs {
    fn new() -> Self {
        Outs {
            lp: vec![SENTINEL; R * V],
            unc: std::array::from_fn(|_| vec![SENTINEL; R]),
        }
    }

    fn desc(&mut self) -> medley_ensemble_output {
        let mut o = init(medley_ensemble_output_init);
        o.log_probs = self.lp.as_mut_ptr();
        o.log_probs_len = self.lp.len();
        let [e, t, m, d] = &mut self.unc;
        (o.entropy, o.entropy_len) = (e.as_mut_ptr(), R);
        (o.top1_prob, o.top1_prob_len) = (t.as_mut_ptr(), R);
        (o.margin, o.margin_len) = (m.as_mut_ptr(), R);
        (o.disagreement, o.disagreement_len) = (d.as_mut_ptr(), R);
        o
    }

    fn untouched(&self) -> bool {
        self.lp
            .iter()
            .chain(self.unc.iter().flatten())
            .all(|&x| x == SENTINEL)
    }
}

/// The bytes of a struct, as the `u64` words a caller of that size would
/// allocate (8-byte aligned), the first `size` bytes of `v`, zero past it.
fn words<T>(v: &T, size: usize) -> Vec<u64> {
    let mut w = vec![0u64; size.div_ceil(8)];
    let n = size.min(size_of::<T>());
    // SAFETY: n bytes readable in v and writable in w (w has >= size
    // bytes); distinct memory.
    unsafe { core::ptr::copy_nonoverlapping((v as *const T).cast::<u8>(), w.as_mut_ptr().cast::<u8>(), n) };
    w[0] = size as u64;
    w
}

fn combine_with(
    f: &Fixture,
    cfg: *const medley_ensemble_config,
    out: *const medley_ensemble_output,
) -> medley_status {
    let ms = f.models();
    // SAFETY: every pointer refers to live memory of the sizes declared.
    unsafe { medley_ensemble_combine(ms.as_ptr(), 2, cfg, R, V, out, null_mut()) }
}

#[test]
fn abi_version_is_the_headers() {
    assert_eq!(medley_abi_version(), MEDLEY_ABI_VERSION);
    assert_eq!(MEDLEY_ABI_VERSION, (1 << 16) | 1);
    assert_eq!((MEDLEY_ABI_VERSION_MAJOR, MEDLEY_ABI_VERSION_MINOR), (1, 1));
}

#[test]
fn uncertainty_outputs_equal_the_cores() {
    let f = Fixture::new();
    let mut o = Outs::new();
    let d = o.desc();
    let cfg = f.config(medley_mode::Linear);
    assert_eq!(combine_with(&f, &cfg, &d), medley_status::Ok, "{}", message());
    let ms = [
        Model::new(Rows::dense(&f.a[..], R, V).unwrap()),
        Model::new(Rows::dense(&f.b[..], R, V).unwrap()),
    ];
    let mut want: [Vec<f32>; 4] = std::array::from_fn(|_| vec![0.0; R]);
    let mut lp = vec![0.0f32; R * V];
    {
        let [e, t, m, dis] = &mut want;
        let out = Output {
            log_probs: Some(medley_core::RowsMut::dense(&mut lp, R, V).unwrap()),
            entropy: Some(e),
            top1_prob: Some(t),
            margin: Some(m),
            disagreement: Some(dis),
            ..Default::default()
        };
        combine(&ms, &Config::linear(&f.w), out).unwrap();
    }
    assert_eq!(o.lp, lp);
    assert_eq!(o.unc, want);
    assert!(o.unc[0].iter().all(|h| h.is_finite() && *h > 0.0));
    // Disagreement is defined for linear mixtures only.
    let mut o = Outs::new();
    let d = o.desc();
    let cfg = f.config(medley_mode::LogLinear);
    assert_eq!(combine_with(&f, &cfg, &d), medley_status::Unsupported);
    assert!(o.untouched());
    // Without disagreement, log-linear gives the other three.
    let mut d = o.desc();
    d.disagreement = null_mut();
    assert_eq!(combine_with(&f, &cfg, &d), medley_status::Ok, "{}", message());
    assert!(o.unc[3].iter().all(|&x| x == SENTINEL));
    assert!(o.unc[1].iter().all(|&p| p > 0.0 && p <= 1.0));
}

#[test]
fn an_older_output_layout_is_accepted_and_read_no_further() {
    let f = Fixture::new();
    let cfg = f.config(medley_mode::Linear);
    let mut o = Outs::new();
    let full = o.desc();
    // A caller compiled against layout 1: 88 bytes, no uncertainty
    // fields. The words past 88 bytes do not exist in its allocation (the
    // vector holds exactly 11 words), so reading them would be a bug that
    // Miri and ASan catch; the uncertainty outputs stay untouched.
    let v1 = words(&full, MEDLEY_ENSEMBLE_OUTPUT_SIZE_V1);
    assert_eq!(v1.len(), 11);
    let p = v1.as_ptr().cast::<medley_ensemble_output>();
    assert_eq!(combine_with(&f, &cfg, p), medley_status::Ok, "{}", message());
    assert!(o.lp.iter().all(|&x| x != SENTINEL));
    assert!(o.unc.iter().flatten().all(|&x| x == SENTINEL));
    // Layout 2 at its own size writes them.
    let v2 = words(&full, MEDLEY_ENSEMBLE_OUTPUT_SIZE_V2);
    let p = v2.as_ptr().cast::<medley_ensemble_output>();
    assert_eq!(combine_with(&f, &cfg, p), medley_status::Ok);
    assert!(o.unc.iter().flatten().all(|&x| x != SENTINEL));
}

#[test]
fn a_newer_layout_needs_a_zero_tail() {
    let f = Fixture::new();
    let cfg = f.config(medley_mode::Linear);
    let mut o = Outs::new();
    let full = o.desc();
    // 32 bytes more than this library knows, all zero: accepted.
    let big = words(&full, MEDLEY_ENSEMBLE_OUTPUT_SIZE_V2 + 32);
    assert_eq!(
        combine_with(&f, &cfg, big.as_ptr().cast()),
        medley_status::Ok,
        "{}",
        message()
    );
    // A field this library lacks is set: refused, nothing written.
    let mut o = Outs::new();
    let full = o.desc();
    let mut big = words(&full, MEDLEY_ENSEMBLE_OUTPUT_SIZE_V2 + 32);
    big[19 + 2] = 1;
    assert_eq!(
        combine_with(&f, &cfg, big.as_ptr().cast()),
        medley_status::StructSize
    );
    assert!(o.untouched());
    let m = message();
    assert!(m.contains("byte 168") && m.contains("does not have"), "{m}");
    // The same for the config.
    let mut cfg_big = words(&cfg, MEDLEY_ENSEMBLE_CONFIG_SIZE_V1 + 8);
    let d = o.desc();
    assert_eq!(
        combine_with(&f, cfg_big.as_ptr().cast(), &d),
        medley_status::Ok,
        "{}",
        message()
    );
    let mut o = Outs::new();
    let d = o.desc();
    cfg_big[8] = 0xFF;
    assert_eq!(
        combine_with(&f, cfg_big.as_ptr().cast(), &d),
        medley_status::StructSize
    );
    assert!(o.untouched());
}

#[test]
fn unknown_sizes_are_refused_before_any_work() {
    let f = Fixture::new();
    let cfg = f.config(medley_mode::Linear);
    for size in [0usize, 8, 80, 87, 89, 96, 151, 153, 4097, usize::MAX] {
        let mut o = Outs::new();
        let full = o.desc();
        // Enough words for the declared size where it is small; for the
        // huge ones the library must refuse before reading past 8 bytes.
        let mut w = words(&full, size.clamp(8, 200));
        w[0] = size as u64;
        assert_eq!(
            combine_with(&f, &cfg, w.as_ptr().cast()),
            medley_status::StructSize,
            "struct_size {size}"
        );
        assert!(o.untouched(), "struct_size {size} wrote outputs");
        assert!(message().contains("struct_size"), "{}", message());
        let mut c = words(&cfg, size.clamp(8, 200));
        c[0] = size as u64;
        let d = o.desc();
        // The config has one layout (64 bytes): smaller sizes and huge ones
        // are refused (larger ones with a zero tail are a newer header).
        if !(MEDLEY_ENSEMBLE_CONFIG_SIZE_V1..=4096).contains(&size) {
            assert_eq!(
                combine_with(&f, c.as_ptr().cast(), &d),
                medley_status::StructSize,
                "config struct_size {size}"
            );
            assert!(o.untouched());
        }
    }
    assert_eq!(
        name(medley_status::StructSize as i32),
        "MEDLEY_STATUS_STRUCT_SIZE"
    );
}

fn name(s: i32) -> String {
    // SAFETY: static NUL-terminated string.
    unsafe { CStr::from_ptr(medley_status_name(s)) }
        .to_str()
        .unwrap()
        .to_string()
}

#[test]
fn init_writes_exactly_struct_size_bytes() {
    // Layout 1 of the output: 88 bytes written, the rest untouched.
    let mut w = [0xABAB_ABAB_ABAB_ABABu64; 25];
    let p = w.as_mut_ptr().cast::<medley_ensemble_output>();
    assert_eq!(
        // SAFETY: w is writable for 200 bytes.
        unsafe { medley_ensemble_output_init(p, MEDLEY_ENSEMBLE_OUTPUT_SIZE_V1) },
        medley_status::Ok
    );
    assert_eq!(w[0], 88);
    assert!(w[1..11].iter().all(|&x| x == 0), "{w:x?}");
    assert!(w[11..].iter().all(|&x| x == 0xABAB_ABAB_ABAB_ABAB));
    // A newer caller's 200 bytes: defaults, then zeros to 200.
    // SAFETY: as above.
    assert_eq!(unsafe { medley_ensemble_output_init(p, 200) }, medley_status::Ok);
    assert_eq!(w[0], 200);
    assert!(w[1..25].iter().all(|&x| x == 0));
    // A bad size: refused, nothing written.
    let mut w = [7u64; 25];
    for size in [0usize, 16, 100, 5000] {
        // SAFETY: as above (refused before any write).
        let s = unsafe { medley_ensemble_output_init(w.as_mut_ptr().cast(), size) };
        assert_eq!(s, medley_status::StructSize, "{size}");
        assert!(w.iter().all(|&x| x == 7));
    }
    assert_eq!(
        // SAFETY: null is refused.
        unsafe { medley_ensemble_config_init(null_mut(), 64) },
        medley_status::NullArgument
    );
    // The config's defaults.
    let c = init(medley_ensemble_config_init);
    assert_eq!(c.struct_size, MEDLEY_ENSEMBLE_CONFIG_SIZE_V1);
    assert_eq!((c.mode, c.mask_rule, c.out_temperature), (0, 0, 1.0));
    assert_eq!(
        (c.plausibility_model, c.weights_len, c.device_weights),
        (-1, 0, 0)
    );
}

#[test]
fn the_report_is_written_up_to_its_size() {
    let f = Fixture::new();
    let cfg = f.config(medley_mode::Linear);
    let mut o = Outs::new();
    let d = o.desc();
    let ms = f.models();
    // A newer caller's report of 40 bytes: the library writes its 24.
    let mut rep = [40u64, 9, 9, 0, 0];
    // SAFETY: live buffers; rep is writable for 40 bytes.
    let s = unsafe { medley_ensemble_combine(ms.as_ptr(), 2, &cfg, R, V, &d, rep.as_mut_ptr().cast()) };
    assert_eq!(s, medley_status::Ok, "{}", message());
    assert_eq!(rep, [40, 0, 0, 0, 0]);
    // The tail past the library's layout belongs to the caller's newer
    // fields: never written, never checked. An unknown size is refused
    // before any work.
    let mut rep = [16u64, 9, 9];
    let mut o = Outs::new();
    let d = o.desc();
    // SAFETY: as above.
    let s = unsafe { medley_ensemble_combine(ms.as_ptr(), 2, &cfg, R, V, &d, rep.as_mut_ptr().cast()) };
    assert_eq!(s, medley_status::StructSize);
    assert_eq!(rep, [16, 9, 9]);
    assert!(o.untouched());
}
