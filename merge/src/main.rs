//! `medley`: the command line over `medley_merge`.

use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{HumanBytes, ProgressBar, ProgressDrawTarget, ProgressStyle};
use medley_merge::{MergeOptions, Plan, PlanOptions, Progress, VocabPolicy};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

#[derive(Parser, Debug)]
#[command(
    name = "medley",
    version,
    about = "Combine models: merge whole checkpoints from a mergekit configuration"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Merge the models of a mergekit YAML configuration into OUT.
    ///
    /// Inputs are local folders (config.json plus model.safetensors or
    /// sharded safetensors with model.safetensors.index.json) or single
    /// .safetensors files. OUT is written all at once: a failed or
    /// interrupted run leaves no output folder.
    Merge {
        /// The mergekit configuration (YAML).
        config: PathBuf,
        /// The output folder (must not exist, unless --overwrite).
        out: PathBuf,
        /// Worker threads (default: one per core).
        #[arg(short = 'j', long)]
        threads: Option<usize>,
        /// Replace OUT if it exists.
        #[arg(long)]
        overwrite: bool,
        /// Largest output shard: bytes, or with a suffix K, M, G (10^3,
        /// 10^6, 10^9; also KB, MB, GB, and B = 10^9 as in mergekit's "5B").
        #[arg(long, default_value = "5G", value_parser = parse_size)]
        out_shard_size: u64,
        /// Seed of DARE's and DELLA's random masks (overrides the
        /// configuration's `random_seed`; default 0).
        #[arg(long)]
        random_seed: Option<u64>,
        /// When embedding matrices differ in vocabulary size: `error`
        /// (default) or `base` (merge the rows all models share, take the
        /// rest from the base model).
        #[arg(long, value_enum, default_value_t = Vocab::Error)]
        vocab_mismatch: Vocab,
        /// Merge models whose config.json names different architectures.
        #[arg(long)]
        allow_crimes: bool,
        /// Do not copy tokenizer files.
        #[arg(long)]
        no_copy_tokenizer: bool,
        /// Elements per chunk of work (memory per thread is about this
        /// times (models + 2) x 4 bytes).
        #[arg(long, default_value_t = medley_merge::exec::DEFAULT_CHUNK, hide = true)]
        chunk_elements: usize,
        /// No progress bar and no summary line.
        #[arg(short, long)]
        quiet: bool,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Vocab {
    Error,
    Base,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim().to_ascii_uppercase();
    let mut num = t.as_str();
    let mut mult = 1.0;
    for (suffix, m) in [
        ("GB", 1e9),
        ("MB", 1e6),
        ("KB", 1e3),
        ("G", 1e9),
        ("M", 1e6),
        ("K", 1e3),
        ("B", 1e9),
    ] {
        if let Some(n) = t.strip_suffix(suffix) {
            (num, mult) = (n, m);
            break;
        }
    }
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a size (for example 5G, 500M, 2000000)"))?;
    if !(v.is_finite() && v >= 1.0) {
        return Err(format!("`{s}`: a shard size must be at least one byte"));
    }
    Ok((v * mult) as u64)
}

static CANCEL: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    CANCEL.store(true, Ordering::SeqCst);
}

fn install_signals() {
    // SAFETY: `on_sigint` only stores to an atomic (async-signal-safe);
    // SIGINT, SIGTERM and SIGHUP (terminal closed) all cancel the merge,
    // which then removes its temporary folder.
    // Ignoring SIGXFSZ turns "file size limit exceeded" into an EFBIG
    // error on the write, which is reported and cleaned up like a full disk.
    unsafe {
        libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_sigint as *const () as libc::sighandler_t);
        libc::signal(libc::SIGHUP, on_sigint as *const () as libc::sighandler_t);
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
}

fn peak_rss_bytes() -> u64 {
    // SAFETY: getrusage writes one `rusage` we own.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; RUSAGE_SELF is always valid.
    let r = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    if r == 0 { u.ru_maxrss as u64 * 1024 } else { 0 }
}

struct Bar {
    bar: ProgressBar,
    done: AtomicUsize,
    total: AtomicUsize,
}

impl Progress for Bar {
    fn advance(&self, bytes: u64) {
        self.bar.inc(bytes);
    }
    fn tensor_done(&self, _: &str) {
        let d = self.done.fetch_add(1, Ordering::Relaxed) + 1;
        self.bar
            .set_message(format!("{d}/{} tensors", self.total.load(Ordering::Relaxed)));
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    install_signals();
    match cli.cmd {
        Cmd::Merge {
            config,
            out,
            threads,
            overwrite,
            out_shard_size,
            random_seed,
            vocab_mismatch,
            allow_crimes,
            no_copy_tokenizer,
            chunk_elements,
            quiet,
        } => {
            let opts = MergeOptions {
                threads,
                overwrite,
                shard_bytes: out_shard_size,
                chunk: chunk_elements,
                copy_tokenizer: !no_copy_tokenizer,
                plan: PlanOptions {
                    random_seed,
                    vocab: match vocab_mismatch {
                        Vocab::Error => VocabPolicy::Error,
                        Vocab::Base => VocabPolicy::Base,
                    },
                    config_dir: None,
                    allow_crimes,
                },
            };
            let tty = std::io::stderr().is_terminal() && !quiet;
            let bar = Bar {
                bar: ProgressBar::hidden(),
                done: AtomicUsize::new(0),
                total: AtomicUsize::new(0),
            };
            let mut on_plan = |p: &Plan| {
                if !quiet {
                    for n in &p.notes {
                        eprintln!("note: {n}");
                    }
                }
                let total: u64 = p.tensors.iter().map(|t| t.bytes()).sum();
                bar.total.store(p.tensors.len(), Ordering::Relaxed);
                if tty {
                    bar.bar.set_length(total);
                    bar.bar.set_style(
                        ProgressStyle::with_template(
                            "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta} {msg}",
                        )
                        .expect("a valid template"),
                    );
                    bar.bar.set_message(format!("0/{} tensors", p.tensors.len()));
                    bar.bar.set_draw_target(ProgressDrawTarget::stderr());
                }
            };
            let r = medley_merge::merge(&config, &out, &opts, &CANCEL, &bar, &mut on_plan);
            bar.bar.finish_and_clear();
            match r {
                Ok(rep) => {
                    if !quiet {
                        eprintln!(
                            "merged {} tensors, {} in {} shard(s) into {} in {:.1} s; peak memory {}",
                            rep.tensors,
                            HumanBytes(rep.bytes),
                            rep.shards,
                            rep.output.display(),
                            rep.wall.as_secs_f64(),
                            HumanBytes(peak_rss_bytes())
                        );
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    if !matches!(e, medley_merge::MergeError::Cancelled) {
                        eprintln!("nothing was written to {}", out.display());
                    }
                    ExitCode::from(if matches!(e, medley_merge::MergeError::Cancelled) {
                        130
                    } else {
                        1
                    })
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes() {
        assert_eq!(super::parse_size("5G"), Ok(5_000_000_000));
        assert_eq!(super::parse_size("5B"), Ok(5_000_000_000));
        assert_eq!(super::parse_size("30MB"), Ok(30_000_000));
        assert_eq!(super::parse_size("1.5gb"), Ok(1_500_000_000));
        assert_eq!(super::parse_size("4096"), Ok(4096));
        assert_eq!(super::parse_size("500k"), Ok(500_000));
        assert!(super::parse_size("0").is_err());
        assert!(super::parse_size("lots").is_err());
    }
}
