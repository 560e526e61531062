//! `bitvla`: the command-line entry point (benchmarks now; run, convert, replay as they land).

use anyhow::Context;
use bitvla_ros::bench::kernels as kbench;
use bitvla_ros::kernels::KernelKind;
use clap::{Args, Parser, Subcommand};
use std::io::Write;

#[derive(Parser)]
#[command(
    name = "bitvla",
    version,
    about = "Ternary BitVLA policies for ROS 2 robots"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Performance benchmarks (JSON lines with --json).
    #[command(subcommand)]
    Bench(Bench),
}

#[derive(Subcommand)]
enum Bench {
    /// Ternary GEMM on the real BitVLA shapes vs the f32 `gemm` crate, with the int8 peak
    /// calibrated in the same run.
    Kernels(KernelsArgs),
}

#[derive(Args)]
struct KernelsArgs {
    /// Print one JSON object per line (header, one line per shape and thread count, summaries).
    #[arg(long)]
    json: bool,
    /// Thread counts to measure (default: 1 and all available cores).
    #[arg(long, value_delimiter = ',')]
    threads: Vec<usize>,
    /// Interleaved repetitions per side (median reported).
    #[arg(long, default_value_t = 7)]
    reps: usize,
    /// Kernel to measure (scalar, avx2, avx512vnni, neon-sdot, neon-smull); default: the best.
    #[arg(long)]
    kernel: Option<String>,
    /// LLM tokens (M of the LLM shapes).
    #[arg(long, default_value_t = 625)]
    llm_tokens: usize,
    /// Vision tokens (M of the ViT shapes: 2 images × 256 patches).
    #[arg(long, default_value_t = 512)]
    vit_tokens: usize,
    /// Only the shapes whose layer name or MxKxN label contains this text.
    #[arg(long)]
    filter: Option<String>,
    /// Seconds per peak-calibration repetition.
    #[arg(long, default_value_t = 0.1)]
    calib_seconds: f64,
}

fn main() -> anyhow::Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    match Cli::parse().command {
        Command::Bench(Bench::Kernels(args)) => bench_kernels(args),
    }
}

fn bench_kernels(args: KernelsArgs) -> anyhow::Result<()> {
    let kernel = match &args.kernel {
        Some(name) => KernelKind::from_name(name).with_context(|| {
            format!(
                "unknown kernel {name:?}; supported here: {}",
                KernelKind::supported()
                    .iter()
                    .map(|k| k.name())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })?,
        None => KernelKind::selected(),
    };
    let available = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut threads = if args.threads.is_empty() {
        vec![1, available]
    } else {
        args.threads.clone()
    };
    threads.dedup();
    anyhow::ensure!(
        threads.iter().all(|&t| t >= 1),
        "--threads values must be >= 1"
    );
    let shapes: Vec<_> = kbench::bitvla_shapes(args.llm_tokens, args.vit_tokens)
        .into_iter()
        .filter(|s| {
            args.filter
                .as_ref()
                .is_none_or(|f| s.layer.contains(f.as_str()) || s.label().contains(f.as_str()))
        })
        .collect();
    anyhow::ensure!(!shapes.is_empty(), "no shape matches --filter");
    let opts = kbench::Options {
        shapes,
        threads,
        reps: args.reps,
        kernel,
        calib_seconds: args.calib_seconds,
    };
    let stdout = std::io::stdout();
    let json = args.json;
    let mut failed: Option<std::io::Error> = None;
    let mut emit = |line: &serde_json::Value| {
        let mut out = stdout.lock();
        let res = if json {
            writeln!(out, "{line}")
        } else {
            print_human(&mut out, line)
        };
        if let Err(e) = res {
            failed.get_or_insert(e);
        }
    };
    kbench::run(&opts, &mut emit)?;
    if let Some(e) = failed {
        return Err(e).context("writing benchmark output");
    }
    Ok(())
}

fn print_human(out: &mut impl Write, line: &serde_json::Value) -> std::io::Result<()> {
    let f = |k: &str| line.get(k).and_then(|v| v.as_f64());
    match line.get("kind").and_then(|v| v.as_str()) {
        Some("header") => {
            writeln!(out, "cpu: {}", line["cpu"].as_str().unwrap_or("?"))?;
            writeln!(out, "features: {}", line["features"])?;
            writeln!(
                out,
                "kernel: {}   commit: {}   load average: {}",
                line["kernel"].as_str().unwrap_or("?"),
                line["commit"].as_str().unwrap_or("?"),
                line["loadavg_1m"]
            )?;
            writeln!(
                out,
                "{:<24} {:>16} {:>3} {:>9} {:>8} {:>9} {:>6} {:>9} {:>8}  noisy",
                "layer", "MxKxN", "thr", "ms", "GOP/s", "peak", "eff", "f32 GF/s", "speedup"
            )
        }
        Some("result") => writeln!(
            out,
            "{:<24} {:>16} {:>3} {:>9.2} {:>8.1} {:>9.1} {:>6.3} {:>9.1} {:>7.2}x  {}",
            line["layer"].as_str().unwrap_or("?"),
            line["shape"].as_str().unwrap_or("?"),
            line["threads"],
            f("median_ms").unwrap_or(f64::NAN),
            f("gops").unwrap_or(f64::NAN),
            f("peak_gops").unwrap_or(f64::NAN),
            f("efficiency").unwrap_or(f64::NAN),
            f("f32_gflops").unwrap_or(f64::NAN),
            f("speedup_vs_f32").unwrap_or(f64::NAN),
            if line["noisy"].as_bool() == Some(true) {
                line["noise_reasons"].to_string()
            } else {
                String::new()
            },
        ),
        Some("summary") => writeln!(
            out,
            "threads {}: median efficiency {:.3} (min {:.3}), median speedup vs f32 {:.2}x (min {:.2}x){}{}",
            line["threads"],
            f("median_efficiency").unwrap_or(f64::NAN),
            f("min_efficiency").unwrap_or(f64::NAN),
            f("median_speedup_vs_f32").unwrap_or(f64::NAN),
            f("min_speedup_vs_f32").unwrap_or(f64::NAN),
            match line["time_ratio_vs_1_thread"].as_array() {
                Some(r) if !r.is_empty() =>
                    format!(", time vs 1 thread {}", line["time_ratio_vs_1_thread"]),
                _ => String::new(),
            },
            if line["any_noisy"].as_bool() == Some(true) {
                "  [NOISY]"
            } else {
                ""
            },
        ),
        _ => writeln!(out, "{line}"),
    }
}
