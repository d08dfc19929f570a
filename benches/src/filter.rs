//! The benchmark filter of this run's command line, read the way criterion
//! reads it, so a benchmark file can skip building the inputs of groups the
//! filter leaves out (criterion only skips running them: building the
//! rotating GPU inputs of every shape took most of a filtered run).
//!
//! Only the command lines whose filter is certain are read: `[--bench]
//! [FILTER] [--exact]` plus flags that take no value. Anything else (an
//! option with a value such as `--save-baseline NAME`, `--list`, two
//! positional arguments, a filter that is not a valid regex) selects
//! everything, so inputs are never skipped for a benchmark that runs.

use regex::Regex;
use std::sync::OnceLock;

/// Which benchmark ids this run selects.
#[derive(Debug)]
pub enum Filter {
    /// Every id (no filter, or a command line this module does not read).
    All,
    /// Ids in which the regex finds a match (criterion's `FILTER`).
    Regex(Regex),
    /// Exactly this id (`FILTER --exact`).
    Exact(String),
}

/// Flags criterion (and cargo's bench runner) accept without a value and
/// that do not change which benchmarks run.
const PLAIN_FLAGS: [&str; 8] = [
    "--bench",
    "--noplot",
    "--quiet",
    "--verbose",
    "-v",
    "--nocapture",
    "--show-output",
    "--discard-baseline",
];

impl Filter {
    /// The filter of a command line (`args` without the program name).
    pub fn from_args<I: IntoIterator<Item = String>>(args: I) -> Filter {
        let mut positional = Vec::new();
        let mut exact = false;
        for a in args {
            if a == "--exact" {
                exact = true;
            } else if PLAIN_FLAGS.contains(&a.as_str()) {
            } else if a.starts_with('-') {
                return Filter::All;
            } else {
                positional.push(a);
            }
        }
        match positional.as_slice() {
            [] => Filter::All,
            [f] if exact => Filter::Exact(f.clone()),
            [f] => Regex::new(f).map_or(Filter::All, Filter::Regex),
            _ => Filter::All,
        }
    }

    /// Whether this run selects the benchmark `id` (criterion's full id,
    /// `group/function/parameter`).
    pub fn matches(&self, id: &str) -> bool {
        match self {
            Filter::All => true,
            Filter::Regex(r) => r.is_match(id),
            Filter::Exact(e) => e == id,
        }
    }

    /// Whether this run selects any of `ids`.
    pub fn any<S: AsRef<str>, I: IntoIterator<Item = S>>(&self, ids: I) -> bool {
        ids.into_iter().any(|id| self.matches(id.as_ref()))
    }

    /// Whether this run selects any benchmark `group/name` of `group`.
    pub fn any_in(&self, group: &str, names: &[&str]) -> bool {
        self.any(names.iter().map(|n| format!("{group}/{n}")))
    }
}

/// This process's filter ([`Filter::from_args`] of its command line).
pub fn filter() -> &'static Filter {
    static F: OnceLock<Filter> = OnceLock::new();
    F.get_or_init(|| Filter::from_args(std::env::args().skip(1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(args: &[&str]) -> Filter {
        Filter::from_args(args.iter().map(|s| s.to_string()))
    }

    #[test]
    fn reads_the_filter_as_criterion_does() {
        let id = "cuda/ensemble/M2_B1_V32000/linear+unc/v2";
        let r = f(&["--bench", "cuda/ensemble/M[28]_B(1|64|256)_V.*/.*/v2$"]);
        assert!(matches!(r, Filter::Regex(_)));
        assert!(r.matches(id));
        assert!(!r.matches("cuda/ensemble/M2_B1_V32000/linear+unc/v1"));
        assert!(!r.matches("cuda/ensemble/M4_B1_V32000/linear/v2"));
        assert!(r.any(["cuda/sample/M2_B1_V32000/linear/greedy", id]));
        assert!(!r.any(["cuda/sample/M2_B1_V32000/linear/greedy"]));
        assert!(r.any_in("cuda/ensemble/M2_B1_V32000", &["linear/v1", "linear+unc/v2"]));
        assert!(!r.any_in("cuda/ensemble/M2_B1_V32000", &["linear/v1"]));
        // A substring match, as criterion's regex filter.
        assert!(f(&["--bench", "cuda/"]).matches(id));
        assert!(!f(&["--bench", "merge/"]).matches(id));
        let e = f(&["--bench", id, "--exact"]);
        assert!(e.matches(id) && !e.matches("cuda/ensemble/M2_B1_V32000/linear+unc/v2x"));
    }

    #[test]
    fn selects_everything_when_unsure() {
        for args in [
            &[][..],
            &["--bench"][..],
            &["--bench", "--save-baseline", "main", "cuda/"][..],
            &["--list"][..],
            &["--bench", "a", "b"][..],
            &["--bench", "("][..],
        ] {
            let r = f(args);
            assert!(matches!(r, Filter::All), "{args:?}: {r:?}");
            assert!(r.matches("anything") && r.any(["x"]));
        }
        assert!(!f(&["--bench", "x"]).any(Vec::<String>::new()));
    }
}
