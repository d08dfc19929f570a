//! Exact top-k selection by magnitude in O(n), without allocation and
//! without sorting: a sampled band plus radix selection over the bits of
//! `|x|`.
//!
//! # The selection rule
//!
//! Elements are ranked by magnitude, largest first; among equal magnitudes
//! the **lower index ranks higher**. The top `k` of that total order are
//! kept, so exactly `k` elements survive whatever the ties. The magnitude
//! of `x` is compared through its *key* `x.to_bits() & 0x7fff_ffff`
//! ([`magnitude_key`]): for non-NaN values the key order is the order of
//! `|x|` (`-0.0` and `0.0` are equal), and a NaN ranks above `+inf`, so a
//! NaN in a task vector is kept and propagates into the merge rather than
//! vanishing silently.
//!
//! The result is a [`Threshold`] `(key, cutoff)`: element `i` is kept iff
//! `key_i > key`, or `key_i == key` and `i < cutoff`. A threshold is two
//! numbers, so applying it is an element-wise test that any chunk, thread or
//! GPU kernel evaluates on its own.
//!
//! # Passes
//!
//! [`TopK`] is a state machine fed the tensor in chunks, in order, once per
//! pass, with a caller work buffer of [`TopK::work_len`] `u32`s (the state
//! itself is a small `Copy` struct, so many selections can share passes).
//! Two strategies:
//!
//! - **Sampled** (the default for `n >= 2^20`): pass 1 reads only a sample,
//!   64 consecutive elements (four 64-byte lines of `f32`) at a pseudo-random
//!   offset in every group of 4096, i.e. 1/64 of the data and one place per
//!   16 KB (few TLB misses); the sample's quantiles (exact selections in
//!   cache) give a key band that contains the k-th key with a margin of 8
//!   standard deviations of the sample quantile. Pass 2 reads everything
//!   once, counts the keys above the band and collects the keys and indices
//!   inside it (a few percent of `n`); the exact answer is then selected
//!   among the candidates, in cache. **2 passes**, one of them 1/64 of a
//!   pass. If the candidates overflow their buffer (a huge tie at the
//!   threshold), the band's histogram narrows the k-th key to one bin and
//!   radix passes finish inside it (1 to 3 more); if the band misses
//!   (data whose sample is unrepresentative) the radix passes start over.
//! - **Radix** (small `n`, and the fallback): a pass histograms one radix
//!   digit of the keys whose higher digits match the prefix found so far;
//!   digits are bits 30..20 (2048 bins), 19..10 and 9..0 (1024 bins each).
//!   After the third pass the k-th key `T` is known exactly, with how many
//!   elements equal to `T` must be kept; if not all of them, a fourth pass
//!   finds the index of the last equal element to keep. At most **4
//!   passes** (3 when the k-th magnitude is not tied, fewer when a bucket
//!   boundary falls exactly at `k`).
//!
//! So a selection takes 2 passes when sampling works and at most 2 + 4
//! otherwise; none when `k == 0` or `k == n`. Which elements a pass
//! needs is [`TopK::wants_all`]: during the sample pass, a caller that
//! computes values on the fly can [`skip`](TopK::skip) everything outside
//! [`sample_ranges`]. Whatever the strategy and the chunking, the threshold
//! selects the same exact set.
//!
//! ```
//! use medley_core::merge::select::{top_k, magnitude_key};
//! let x = [0.5f32, -2.0, 1.0, 2.0, -0.25, 1.0];
//! let t = top_k(&x, 3).unwrap();
//! let kept: Vec<usize> = (0..x.len()).filter(|&i| t.keeps(i as u64, x[i])).collect();
//! // |-2.0| and |2.0| first, then the first of the two 1.0s.
//! assert_eq!(kept, [1, 2, 3]);
//! assert!(t.keeps_key(2, magnitude_key(1.0)));
//! ```

use crate::element::Element;
use crate::error::{Error, ensure};
use crate::math::sqrt_f64;

/// Length of one radix histogram (the whole work buffer of the radix
/// strategy).
pub const HIST_LEN: usize = 2048;

/// Most elements a selection handles (counts and indices are `u32`).
pub const MAX_LEN: u64 = u32::MAX as u64;

/// Smallest `n` for which [`TopK::new`] samples.
pub const SAMPLE_MIN: u64 = 1 << 20;

/// Elements per sampling group, and sampled elements per group.
const GROUP: u64 = 4096;
const SBLOCK: u64 = 64;
/// Band half-width in standard deviations of the sample quantile.
const Z: f64 = 8.0;

/// Keys per tile of the band pass.
const BAND_TILE: usize = 1024;
/// Length of the band pass's tile buffer (keys and flags).
pub(crate) const BAND_BUF: usize = 2 * BAND_TILE;

/// Bit shift and width of each radix digit, most significant first.
const DIGITS: [(u32, u32); 3] = [(20, 11), (10, 10), (0, 10)];

/// Start of the sampled block of group `g`.
#[inline]
fn sample_block(g: u64) -> u64 {
    g * GROUP + ((g.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 58) & 63) * SBLOCK
}

/// The sampled index ranges within `start..end`, in order (each at most 64
/// long). Depends only on the global indices.
pub fn sample_ranges(start: u64, end: u64) -> impl Iterator<Item = (u64, u64)> {
    let g0 = start / GROUP;
    let g1 = end.div_ceil(GROUP);
    (g0..g1).filter_map(move |g| {
        let b = sample_block(g);
        let (lo, hi) = (b.max(start), (b + SBLOCK).min(end));
        (lo < hi).then_some((lo, hi))
    })
}

/// Sample capacity for `n` elements.
fn sample_cap(n: u64) -> u64 {
    n.div_ceil(GROUP) * SBLOCK
}

/// Candidate capacity for `n` elements: twice the widest band the margin
/// can produce (`2 Z sqrt(q (1-q) / s) <= Z / sqrt(s)` of `n`), plus slack
/// for ties at the band's edges.
fn cand_cap(n: u64) -> u64 {
    let s = sample_cap(n).max(1) as f64;
    let frac = (Z / sqrt_f64(s)).min(1.0);
    ((2.0 * frac * n as f64) as u64 + 4096).min(n)
}

/// The ranking key of `x`: its bits without the sign. Ordered like `|x|`
/// for non-NaN values; NaN keys are above `+inf`'s.
#[inline(always)]
pub fn magnitude_key(x: f32) -> u32 {
    x.to_bits() & 0x7fff_ffff
}

/// The outcome of a selection: element `i` with key `k_i` is kept iff
/// `k_i > key`, or `k_i == key` and `i < cutoff`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Threshold {
    key: u32,
    cutoff: u64,
}

impl Threshold {
    /// Keeps nothing (`k = 0`).
    pub const NONE: Threshold = Threshold {
        key: u32::MAX,
        cutoff: 0,
    };
    /// Keeps everything (`k = n`).
    pub const ALL: Threshold = Threshold {
        key: 0,
        cutoff: u64::MAX,
    };

    /// The key of the k-th ranked element (`u32::MAX` for [`Threshold::NONE`]).
    pub fn key(&self) -> u32 {
        self.key
    }

    /// Elements whose key equals [`key`](Self::key) are kept iff their
    /// index is below this (`u64::MAX` when all of them are kept).
    pub fn cutoff(&self) -> u64 {
        self.cutoff
    }

    /// Whether the element at global `index` with key `key` is kept.
    #[inline(always)]
    pub fn keeps_key(&self, index: u64, key: u32) -> bool {
        key > self.key || (key == self.key && index < self.cutoff)
    }

    /// Whether the element at global `index` with value `x` is kept.
    #[inline(always)]
    pub fn keeps(&self, index: u64, x: f32) -> bool {
        self.keeps_key(index, magnitude_key(x))
    }

    /// For the index range `start..end`: `Some(m)` if the rule there is
    /// simply "keep iff key >= m" (the tie cutoff is outside the range),
    /// `None` if the cutoff falls inside it. Lets kernels test a tile
    /// without per-element index comparisons.
    #[inline]
    pub fn min_key_in(&self, start: u64, end: u64) -> Option<u32> {
        if self.cutoff >= end {
            Some(self.key)
        } else if self.cutoff <= start {
            Some(self.key.saturating_add(1))
        } else {
            None
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Sample,
    Band,
    /// Radix pass over the keys matching `prefix` above the `free` low bits.
    Radix {
        free: u8,
    },
    Tie,
    Done,
}

/// Exact selection state for keeping the `k` largest magnitudes of `n`
/// values (see the module documentation for the rule, the strategies and
/// the passes).
///
/// Protocol: while [`is_done`](Self::is_done) is false, feed every element
/// once, in order, through [`feed`](Self::feed) (any chunk sizes; or
/// [`skip`](Self::skip) elements while [`wants_all`](Self::wants_all) is
/// false), then call [`end_pass`](Self::end_pass). Then
/// [`threshold`](Self::threshold) is the answer. The work buffer (at least
/// [`work_len`](Self::work_len) long) must be the same one throughout and
/// must not be touched in between.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TopK {
    n: u64,
    k: u64,
    phase: Phase,
    sampled: bool,
    /// Elements fed (or skipped) in this pass.
    fed: u64,
    /// Radix: digits fixed so far, in place; elements still to take among
    /// those matching it. Tie: `prefix` is the threshold key.
    prefix: u32,
    need: u64,
    eq_seen: u64,
    /// Sample pass: samples recorded.
    nsample: u64,
    /// Band pass: keys in `lo_key..=hi_key` are candidates, above counted,
    /// and histogrammed by `key >> band_shift`.
    band_shift: u8,
    lo_key: u32,
    hi_key: u32,
    above: u64,
    ncand: u64,
    result: Threshold,
}

impl TopK {
    fn with(n: u64, k: u64, sampled: bool) -> Result<Self, Error> {
        ensure(
            n <= MAX_LEN,
            Error::TooLarge {
                arg: "n",
                index: 0,
                max: MAX_LEN as usize,
                got: n.min(usize::MAX as u64) as usize,
            },
        )?;
        ensure(k <= n, Error::OutOfRange { arg: "k", index: 0 })?;
        let (phase, result) = if k == 0 {
            (Phase::Done, Threshold::NONE)
        } else if k == n {
            (Phase::Done, Threshold::ALL)
        } else if sampled {
            (Phase::Sample, Threshold::NONE)
        } else {
            (Phase::Radix { free: 31 }, Threshold::NONE)
        };
        Ok(Self {
            n,
            k,
            phase,
            sampled: sampled && phase != Phase::Done,
            fed: 0,
            prefix: 0,
            need: k,
            eq_seen: 0,
            nsample: 0,
            band_shift: 0,
            lo_key: 0,
            hi_key: 0,
            above: 0,
            ncand: 0,
            result,
        })
    }

    /// A selection of the `k` largest magnitudes among `n` values; samples
    /// when `n >= SAMPLE_MIN`.
    ///
    /// Errors: [`Error::OutOfRange`] (`k`) if `k > n`; [`Error::TooLarge`]
    /// (`n`) if `n` exceeds [`MAX_LEN`].
    pub fn new(n: u64, k: u64) -> Result<Self, Error> {
        Self::with(n, k, n >= SAMPLE_MIN)
    }

    /// As [`new`](Self::new), choosing the strategy: sampled or radix only.
    pub fn with_strategy(n: u64, k: u64, sampled: bool) -> Result<Self, Error> {
        Self::with(n, k, sampled)
    }

    /// Work buffer length [`new`](Self::new) needs for `n` values (an upper
    /// bound for any `k`).
    pub fn work_len_for(n: u64) -> usize {
        if n >= SAMPLE_MIN {
            Self::sampled_len(n)
        } else {
            HIST_LEN
        }
    }

    fn sampled_len(n: u64) -> usize {
        HIST_LEN + (sample_cap(n) + 2 * cand_cap(n)) as usize
    }

    /// Work buffer length this selection needs: [`HIST_LEN`] for the radix
    /// strategy; with sampling, also the sample (`n/64`) and room for the
    /// candidates' keys and indices (`16 n / sqrt(n/64) + 4096` each, twice
    /// the widest band the margin allows): about 8% of `n` at `n = 2^24`,
    /// 28% at `2^20`.
    pub fn work_len(&self) -> usize {
        if self.sampled {
            Self::sampled_len(self.n)
        } else {
            HIST_LEN
        }
    }

    /// Number of values.
    pub fn n(&self) -> u64 {
        self.n
    }

    /// Number of values kept.
    pub fn k(&self) -> u64 {
        self.k
    }

    /// True once the threshold is known.
    pub fn is_done(&self) -> bool {
        self.phase == Phase::Done
    }

    /// False while the current pass only needs the elements in
    /// [`sample_ranges`] (the rest may be [`skip`](Self::skip)ped).
    pub fn wants_all(&self) -> bool {
        !matches!(self.phase, Phase::Sample | Phase::Done)
    }

    /// The threshold, once [`is_done`](Self::is_done).
    pub fn threshold(&self) -> Option<Threshold> {
        self.is_done().then_some(self.result)
    }

    /// Elements fed (or skipped) so far in the current pass.
    pub fn fed(&self) -> u64 {
        self.fed
    }

    fn check_work(&self, work: &[u32]) -> Result<(), Error> {
        let need = self.work_len();
        ensure(
            work.len() >= need,
            Error::BufferTooShort {
                arg: "work",
                needed: need,
                got: work.len(),
            },
        )
    }

    fn check_room(&self, len: usize) -> Result<(), Error> {
        ensure(
            self.fed + len as u64 <= self.n,
            Error::TooLarge {
                arg: "values",
                index: 0,
                max: (self.n - self.fed) as usize,
                got: len,
            },
        )
    }

    /// Feeds the next `values` of the current pass (their global indices
    /// continue from [`fed`](Self::fed)). Does nothing once done.
    ///
    /// Errors: [`Error::BufferTooShort`] (`work`); [`Error::TooLarge`]
    /// (`values`) if the pass would exceed `n` values. Nothing changes on
    /// error.
    pub fn feed(&mut self, values: &[f32], work: &mut [u32]) -> Result<(), Error> {
        if self.phase == Phase::Done {
            return Ok(());
        }
        self.check_work(work)?;
        self.check_room(values.len())?;
        self.feed_unchecked(values, work);
        Ok(())
    }

    /// Skips the next `len` elements of a pass that does not want them.
    ///
    /// Errors: [`Error::Unsupported`] if the pass wants every element;
    /// [`Error::TooLarge`] (`values`) past `n`.
    pub fn skip(&mut self, len: u64) -> Result<(), Error> {
        if self.phase == Phase::Done {
            return Ok(());
        }
        ensure(
            !self.wants_all(),
            Error::Unsupported {
                what: "skipping elements in a pass that needs them all",
            },
        )?;
        self.check_room(len.min(usize::MAX as u64) as usize)?;
        self.fed += len;
        Ok(())
    }

    /// [`skip`](Self::skip) after validation.
    #[inline]
    pub(crate) fn skip_unchecked(&mut self, len: u64) {
        if self.phase != Phase::Done {
            self.fed += len;
        }
    }

    /// [`feed`](Self::feed) after validation (shared by the merge methods,
    /// which validate once per chunk).
    #[inline]
    pub(crate) fn feed_unchecked(&mut self, values: &[f32], work: &mut [u32]) {
        if self.phase == Phase::Band {
            let mut tile = [0u32; BAND_BUF];
            self.feed_tiled(values, work, &mut tile);
        } else {
            self.feed_tiled(values, work, &mut []);
        }
    }

    /// [`feed_unchecked`](Self::feed_unchecked) with the band pass's tile
    /// buffer (at least [`BAND_BUF`] long in that pass) supplied by the
    /// caller, so that frequent small feeds do not initialize one each.
    #[inline]
    pub(crate) fn feed_tiled(&mut self, values: &[f32], work: &mut [u32], tile: &mut [u32]) {
        let start = self.fed;
        self.fed += values.len() as u64;
        match self.phase {
            Phase::Done => {}
            Phase::Sample => {
                let samples = &mut work[HIST_LEN..];
                for (lo, hi) in sample_ranges(start, start + values.len() as u64) {
                    let g = lo / GROUP;
                    let slot = (g * SBLOCK + (lo - sample_block(g))) as usize;
                    let src = &values[(lo - start) as usize..(hi - start) as usize];
                    for (d, &v) in samples[slot..slot + src.len()].iter_mut().zip(src) {
                        *d = magnitude_key(v);
                    }
                    self.nsample = self.nsample.max(slot as u64 + src.len() as u64);
                }
            }
            Phase::Band => self.band(
                start,
                values.len(),
                |j, k: &mut [u32]| {
                    for (k, &v) in k.iter_mut().zip(&values[j..]) {
                        *k = magnitude_key(v);
                    }
                },
                work,
                tile,
            ),
            Phase::Radix { free } => {
                let hist: &mut [u32; HIST_LEN] = (&mut work[..HIST_LEN]).try_into().expect("HIST_LEN");
                if start == 0 {
                    hist.fill(0);
                }
                radix_count(free, self.prefix, values.iter().map(|&v| magnitude_key(v)), hist);
            }
            Phase::Tie => {
                if self.eq_seen < self.need {
                    let t = self.prefix;
                    for (i, &v) in values.iter().enumerate() {
                        if magnitude_key(v) == t {
                            self.eq_seen += 1;
                            if self.eq_seen == self.need {
                                self.result = Threshold {
                                    key: t,
                                    cutoff: start + i as u64 + 1,
                                };
                                break;
                            }
                        }
                    }
                }
            }
        }
    }

    /// [`feed_unchecked`](Self::feed_unchecked) of the differences
    /// `x[j] - b[j]` (equal lengths), without materializing them in the
    /// band pass (the hot pass of the sampled strategy).
    #[inline]
    pub(crate) fn feed_diff_unchecked(&mut self, x: &[f32], b: &[f32], work: &mut [u32], tile: &mut [u32]) {
        let len = x.len().min(b.len());
        let (x, b) = (&x[..len], &b[..len]);
        match self.phase {
            Phase::Band => {
                let start = self.fed;
                self.fed += len as u64;
                self.band(
                    start,
                    len,
                    |j, k: &mut [u32]| {
                        for ((k, &x), &b) in k.iter_mut().zip(&x[j..]).zip(&b[j..]) {
                            *k = magnitude_key(x - b);
                        }
                    },
                    work,
                    tile,
                );
            }
            Phase::Done => self.fed += len as u64,
            _ => {
                let mut d = [0.0f32; 256];
                for (xc, bc) in x.chunks(256).zip(b.chunks(256)) {
                    let d = &mut d[..xc.len()];
                    for ((d, &x), &b) in d.iter_mut().zip(xc).zip(bc) {
                        *d = x - b;
                    }
                    self.feed_tiled(d, work, tile);
                }
            }
        }
    }

    /// The band pass over `len` keys at global `start` (`fill(j, keys)`
    /// writes the keys of elements `j..j + keys.len()`): count the keys above
    /// the band, collect and histogram those inside.
    #[inline(always)]
    fn band<F: FnMut(usize, &mut [u32])>(
        &mut self,
        start: u64,
        len: usize,
        mut fill: F,
        work: &mut [u32],
        tile: &mut [u32],
    ) {
        if start == 0 {
            work[..HIST_LEN].fill(0);
        }
        let mut t0 = 0;
        while t0 < len {
            let t1 = (t0 + BAND_TILE).min(len);
            fill(t0, &mut tile[..t1 - t0]);
            self.band_tile(start + t0 as u64, t1 - t0, work, tile);
            t0 = t1;
        }
    }

    /// One tile of the band pass: `n` keys (elements from global index
    /// `start`) at the front of `tile`, flags behind them.
    #[inline(never)]
    fn band_tile(&mut self, start: u64, n: usize, work: &mut [u32], tile: &mut [u32]) {
        let (lo_k, hi_k) = (self.lo_key, self.hi_key);
        let (sh, base) = (self.band_shift, self.lo_key >> self.band_shift);
        let cap = cand_cap(self.n) as usize;
        let (hist, rest) = work.split_at_mut(HIST_LEN);
        let rest = &mut rest[sample_cap(self.n) as usize..];
        let (ckeys, rest) = rest.split_at_mut(cap);
        let cidx = &mut rest[..cap];
        let (keys, fl) = tile.split_at_mut(BAND_TILE);
        let keys = &keys[..n];
        let fl = &mut fl[..n];
        // Keys are < 2^31: signed compares are exact (one SSE2 instruction
        // each). Branch-free and vectorized: count above, flag members.
        self.above += flag_band(keys, fl, lo_k as i32, hi_k as i32) as u64;
        // Members are rare (about 1 to 2%): test the flags 4 at a time.
        let mut ncand = self.ncand;
        let mut member = |j: usize| {
            let key = keys[j];
            let c = ncand as usize;
            if c < cap {
                ckeys[c] = key;
                cidx[c] = (start + j as u64) as u32;
            }
            ncand += 1;
            hist[((key >> sh) - base) as usize] += 1;
        };
        let whole = n - n % 16;
        for (qi, q) in fl[..whole].chunks_exact(16).enumerate() {
            let q: &[u32; 16] = q.try_into().expect("16");
            if q.iter().fold(0, |a, &f| a | f) != 0 {
                for (jj, &f) in q.iter().enumerate() {
                    if f != 0 {
                        member(qi * 16 + jj);
                    }
                }
            }
        }
        for (j, &f) in fl.iter().enumerate().skip(whole) {
            if f != 0 {
                member(j);
            }
        }
        self.ncand = ncand;
    }

    /// Ends the current pass. Does nothing once done.
    ///
    /// Errors: [`Error::BufferTooShort`] (`work`); [`Error::LengthMismatch`]
    /// (`values`) if the pass did not see exactly `n` values (nothing
    /// changes then; the pass can be completed and ended again).
    pub fn end_pass(&mut self, work: &mut [u32]) -> Result<(), Error> {
        if self.phase == Phase::Done {
            return Ok(());
        }
        self.check_work(work)?;
        ensure(
            self.fed == self.n,
            Error::LengthMismatch {
                arg: "values",
                index: 0,
                expected: self.n as usize,
                got: self.fed as usize,
            },
        )?;
        self.end_pass_unchecked(work);
        Ok(())
    }

    pub(crate) fn end_pass_unchecked(&mut self, work: &mut [u32]) {
        self.fed = 0;
        match self.phase {
            Phase::Done => {}
            Phase::Sample => self.plan_band(work),
            Phase::Band => self.finish_band(work),
            Phase::Radix { free } => {
                let hist: &mut [u32; HIST_LEN] = (&mut work[..HIST_LEN]).try_into().expect("HIST_LEN");
                self.radix_step(free, hist);
            }
            Phase::Tie => self.phase = Phase::Done,
        }
    }

    /// After the sample pass: the band from the sample's quantiles.
    fn plan_band(&mut self, work: &mut [u32]) {
        let s = self.nsample;
        let (hist, rest) = work.split_at_mut(HIST_LEN);
        let hist: &mut [u32; HIST_LEN] = hist.try_into().expect("HIST_LEN");
        let sample = &rest[..s as usize];
        let q = self.k as f64 / self.n as f64;
        let ks = q * s as f64;
        let margin = Z * sqrt_f64(s as f64 * q * (1.0 - q)) + 16.0;
        let hi_rank = ks - margin;
        let lo_rank = ks + margin;
        // Keys above the `hi_rank`-th largest sample key are surely kept;
        // keys below the `lo_rank`-th surely dropped.
        // (A band up to the largest key: 0x7fff_ffff covers NaN keys too.)
        self.hi_key = if hi_rank < 1.0 {
            0x7fff_ffff
        } else {
            select_keys(sample, hi_rank as u64, hist).key
        };
        self.lo_key = if lo_rank >= s as f64 {
            0
        } else {
            select_keys(sample, lo_rank as u64 + 1, hist).key
        };
        // Histogram shift: the band's keys fall in at most HIST_LEN bins.
        let mut sh = 0u8;
        while (self.hi_key >> sh) - (self.lo_key >> sh) >= HIST_LEN as u32 {
            sh += 1;
        }
        // Align the band to whole bins, so that a bin's keys are all inside
        // it (the histogram fallback relies on that).
        self.lo_key = (self.lo_key >> sh) << sh;
        self.hi_key |= ((1u64 << sh) - 1) as u32;
        self.band_shift = sh;
        self.above = 0;
        self.ncand = 0;
        self.phase = Phase::Band;
    }

    /// After the band pass: the exact answer among the candidates; or, when
    /// the candidates overflowed, continue from the band's histogram; or, if
    /// the band missed, the radix fallback.
    fn finish_band(&mut self, work: &mut [u32]) {
        let cap = cand_cap(self.n);
        let inside = self.above < self.k && self.above + self.ncand >= self.k;
        let (hist, rest) = work.split_at_mut(HIST_LEN);
        let hist: &mut [u32; HIST_LEN] = hist.try_into().expect("HIST_LEN");
        if !inside {
            self.phase = Phase::Radix { free: 31 };
            self.prefix = 0;
            self.need = self.k;
            return;
        }
        if self.ncand > cap {
            // Too many candidates (heavy ties, or an unlucky sample): the
            // band histogram narrows the k-th key to one bucket of
            // 2^band_shift keys; radix passes finish inside it.
            let sh = self.band_shift as u32;
            let bins = ((self.hi_key >> sh) - (self.lo_key >> sh)) as usize + 1;
            let mut need = self.k - self.above;
            let mut bin = 0;
            for b in (0..bins).rev() {
                let c = hist[b] as u64;
                if c >= need {
                    bin = b;
                    break;
                }
                need -= c;
            }
            self.prefix = ((self.lo_key >> sh) + bin as u32) << sh;
            self.need = need;
            if hist[bin] as u64 == need {
                self.result = Threshold {
                    key: self.prefix.max(self.lo_key),
                    cutoff: u64::MAX,
                };
                self.phase = Phase::Done;
            } else if sh == 0 {
                self.phase = Phase::Tie;
                self.eq_seen = 0;
            } else {
                self.phase = Phase::Radix { free: sh as u8 };
            }
            return;
        }
        let rest = &rest[sample_cap(self.n) as usize..];
        let (ckeys, cidx) = rest.split_at(cap as usize);
        let nc = self.ncand as usize;
        let t = select_keys(&ckeys[..nc], self.k - self.above, hist);
        self.result = if t.cutoff == u64::MAX {
            // Every candidate with key >= t.key is kept; nothing below the
            // band is.
            Threshold {
                key: t.key.max(self.lo_key),
                cutoff: u64::MAX,
            }
        } else {
            Threshold {
                key: t.key,
                cutoff: cidx[t.cutoff as usize - 1] as u64 + 1,
            }
        };
        self.phase = Phase::Done;
    }

    /// After the radix pass over the `free` low bits: fix its digit.
    fn radix_step(&mut self, free: u8, hist: &mut [u32; HIST_LEN]) {
        let w = digit_width(free);
        let shift = free as u32 - w;
        let mut above = 0u64;
        let mut bin = 0usize;
        for b in (0..1usize << w).rev() {
            let c = hist[b] as u64;
            if above + c >= self.need {
                bin = b;
                break;
            }
            above += c;
        }
        self.need -= above;
        self.prefix |= (bin as u32) << shift;
        let in_bin = hist[bin] as u64;
        if in_bin == self.need {
            // Every key of this bucket is kept: keep keys >= its lowest key.
            self.result = Threshold {
                key: self.prefix,
                cutoff: u64::MAX,
            };
            self.phase = Phase::Done;
        } else if shift == 0 {
            // prefix is the exact k-th key; some of its equals are dropped.
            self.phase = Phase::Tie;
            self.eq_seen = 0;
        } else {
            self.phase = Phase::Radix { free: shift as u8 };
        }
    }
}

/// Width of the radix digit taken when `free` low bits remain: 11 bits
/// (2048 bins) at most, so 31 bits take 11 + 11 + 9.
#[inline]
fn digit_width(free: u8) -> u32 {
    (free as u32).min(11)
}

/// Flags the keys in `lo..=hi` (1, else 0) and counts those above `hi`.
/// Keys are below 2^31, so signed compares are exact (one SSE2 instruction
/// each); separate slices let the loop vectorize.
#[inline(never)]
fn flag_band(keys: &[u32], flags: &mut [u32], lo: i32, hi: i32) -> u32 {
    let mut above = 0u32;
    for (&k, f) in keys.iter().zip(flags.iter_mut()) {
        let k = k as i32;
        above += (k > hi) as u32;
        *f = ((k >= lo) & (k <= hi)) as u32;
    }
    above
}

/// Histogram of the next radix digit (below `free` low bits) of the keys
/// matching `prefix` above them.
#[inline(always)]
fn radix_count<I: Iterator<Item = u32>>(free: u8, prefix: u32, keys: I, hist: &mut [u32; HIST_LEN]) {
    let w = digit_width(free);
    let shift = free as u32 - w;
    let mask = (1u32 << w) - 1;
    if free >= 31 {
        for key in keys {
            hist[((key >> shift) & mask) as usize] += 1;
        }
    } else {
        let hi = prefix >> free;
        for key in keys {
            if key >> free == hi {
                hist[((key >> shift) & mask) as usize] += 1;
            }
        }
    }
}

/// Exact radix selection of the `k` largest of in-memory `keys` (all
/// `<= 0x7fff_ffff`), ties to the lower position; cutoffs are positions.
fn select_keys(keys: &[u32], k: u64, hist: &mut [u32; HIST_LEN]) -> Threshold {
    let mut sel = TopK::with(keys.len() as u64, k.min(keys.len() as u64), false).expect("in-memory keys fit");
    while !sel.is_done() {
        match sel.phase {
            Phase::Radix { free } => {
                hist.fill(0);
                radix_count(free, sel.prefix, keys.iter().copied(), hist);
                sel.radix_step(free, hist);
            }
            Phase::Tie => {
                let t = sel.prefix;
                let mut seen = 0;
                for (i, &key) in keys.iter().enumerate() {
                    if key == t {
                        seen += 1;
                        if seen == sel.need {
                            sel.result = Threshold {
                                key: t,
                                cutoff: i as u64 + 1,
                            };
                            break;
                        }
                    }
                }
                sel.phase = Phase::Done;
            }
            _ => unreachable!("radix strategy"),
        }
    }
    sel.result
}

/// Checks the histogram length and views it as an array.
#[inline]
pub(crate) fn hist_of(hist: &mut [u32]) -> Result<&mut [u32; HIST_LEN], Error> {
    let got = hist.len();
    hist.get_mut(..HIST_LEN)
        .and_then(|h| h.try_into().ok())
        .ok_or(Error::BufferTooShort {
            arg: "hist",
            needed: HIST_LEN,
            got,
        })
}

/// Tile size of the one-shot selection's conversion buffer.
const TILE: usize = 2048;

/// One-shot selection of the `k` largest magnitudes of `values` (exactly
/// `k` kept, ties to the lower index; see the module documentation), with
/// the radix strategy: at most 4 reads of `values`, the histogram on the
/// stack.
///
/// Errors: as [`TopK::new`] with `n = values.len()`.
pub fn top_k<T: Element>(values: &[T], k: usize) -> Result<Threshold, Error> {
    let mut sel = TopK::with_strategy(values.len() as u64, k as u64, false)?;
    let mut hist = [0u32; HIST_LEN];
    let mut buf = [0.0f32; TILE];
    while !sel.is_done() {
        for c in values.chunks(TILE) {
            let t = crate::merge::as_f32(c, &mut buf);
            sel.feed_unchecked(t, &mut hist);
        }
        sel.end_pass_unchecked(&mut hist);
    }
    Ok(sel.result)
}

/// `floor(fraction * n)` computed in `f64`, as Python's `int(d * n)` does
/// (so `k` agrees with mergekit for the same `fraction`). `fraction` must be
/// finite and in `[0, 1]`.
#[inline]
pub fn count_of(fraction: f64, n: usize) -> usize {
    let v = fraction * n as f64;
    // Truncation toward zero: `as` saturates and truncates.
    (v as u64).min(n as u64) as usize
}

/// Stable ascending ranks by key within one row, ties broken so that the
/// **lower index ranks higher** (consistent with [`TopK`]): writes
/// `rank[j]` in `1..=len` (1 = smallest magnitude). An LSD radix sort of the
/// 31-bit keys in 3 passes (11, 10, 10 bits): O(len), no comparison sort.
///
/// `keys`, `idx`, `keys2`, `idx2` and `rank` all have the row's length;
/// `hist` has [`HIST_LEN`] entries. `keys` is clobbered.
pub(crate) fn ranks_ascending(
    keys: &mut [u32],
    idx: &mut [u32],
    keys2: &mut [u32],
    idx2: &mut [u32],
    rank: &mut [u32],
    hist: &mut [u32; HIST_LEN],
) {
    let len = keys.len();
    // Start from descending index order, so that a stable ascending sort
    // puts equal keys with lower indices later (higher rank).
    for (j, v) in idx.iter_mut().enumerate() {
        *v = (len - 1 - j) as u32;
    }
    // keys is in index order; permute it to descending index order.
    keys.reverse();
    let mut src_is_first = true;
    for &(shift, width) in DIGITS.iter().rev() {
        let mask = (1u32 << width) - 1;
        let bins = 1usize << width;
        let (sk, si, dk, di) = if src_is_first {
            (&*keys, &*idx, &mut *keys2, &mut *idx2)
        } else {
            (&*keys2, &*idx2, &mut *keys, &mut *idx)
        };
        let h = &mut hist[..bins];
        h.fill(0);
        for &k in sk.iter() {
            h[((k >> shift) & mask) as usize] += 1;
        }
        let mut start = 0u32;
        for c in h.iter_mut() {
            let n = *c;
            *c = start;
            start += n;
        }
        for (&k, &i) in sk.iter().zip(si.iter()) {
            let b = ((k >> shift) & mask) as usize;
            let p = h[b] as usize;
            h[b] += 1;
            dk[p] = k;
            di[p] = i;
        }
        src_is_first = !src_is_first;
    }
    // Three passes: the sorted order ends in the second buffers.
    let order = if src_is_first { &*idx } else { &*idx2 };
    for (pos, &i) in order.iter().enumerate() {
        rank[i as usize] = pos as u32 + 1;
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::vec::Vec;

    fn naive(values: &[f32], k: usize) -> Vec<bool> {
        let mut order: Vec<usize> = (0..values.len()).collect();
        order.sort_by(|&a, &b| {
            magnitude_key(values[b])
                .cmp(&magnitude_key(values[a]))
                .then(a.cmp(&b))
        });
        let mut keep = std::vec![false; values.len()];
        for &i in &order[..k] {
            keep[i] = true;
        }
        keep
    }

    #[test]
    fn matches_sorted_reference_with_ties() {
        let vals: Vec<f32> = (0..3000).map(|i| ((i * 37) % 23) as f32 * 0.5 - 5.0).collect();
        for k in [0, 1, 2, 5, 130, 1499, 1500, 2999, 3000] {
            let t = top_k(&vals, k).unwrap();
            let want = naive(&vals, k);
            for (i, &w) in want.iter().enumerate() {
                assert_eq!(t.keeps(i as u64, vals[i]), w, "k {k} i {i}");
            }
        }
    }

    #[test]
    fn ranks_are_a_permutation_with_index_tiebreak() {
        let vals: Vec<f32> = (0..777).map(|i| ((i * 13) % 17) as f32 - 8.0).collect();
        let len = vals.len();
        let mut keys: Vec<u32> = vals.iter().map(|&v| magnitude_key(v)).collect();
        let (mut idx, mut k2, mut i2, mut rank) = (
            std::vec![0u32; len],
            std::vec![0u32; len],
            std::vec![0u32; len],
            std::vec![0u32; len],
        );
        let mut hist = [0u32; HIST_LEN];
        ranks_ascending(&mut keys, &mut idx, &mut k2, &mut i2, &mut rank, &mut hist);
        // Descending rank order = top-k order.
        let mut order: Vec<usize> = (0..len).collect();
        order.sort_by(|&a, &b| {
            magnitude_key(vals[b])
                .cmp(&magnitude_key(vals[a]))
                .then(a.cmp(&b))
        });
        for (pos, &i) in order.iter().enumerate() {
            assert_eq!(rank[i] as usize, len - pos);
        }
    }
}
