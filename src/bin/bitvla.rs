//! `bitvla`: the command-line entry point (benchmarks now; run, convert, replay as they land).

use anyhow::Context;
use bitvla_ros::bench::kernels as kbench;
use bitvla_ros::kernels::KernelKind;
use bitvla_ros::model::tiny::{TinyShape, make_tiny};
use bitvla_ros::model::{GripperMapping, Observation, Policy, PolicyOptions};
use bitvla_ros::obs::ImageOptions;
use bitvla_ros::params::NodeParams;
use clap::{Args, Parser, Subcommand};
use std::io::Write;
use std::path::PathBuf;

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
    /// The main job on an embedded default: a tiny random checkpoint (published layout) and a
    /// synthetic episode bag, replayed through the node's logic with the report printed;
    /// `--model` runs a real checkpoint instead.
    Demo(DemoArgs),
    /// Run the policy once on image files and print the action chunk.
    Run(RunArgs),
    /// Write a small random checkpoint in the published BitVLA layout (tests, demos).
    MakeTiny(MakeTinyCommand),
    /// Write a full-size packed model with random weights and the real shapes (benchmarks).
    MakeSynthetic(MakeTinyArgs),
    /// Convert a published checkpoint directory into one packed file (ternary codes
    /// pre-quantized, loads in about a second).
    Convert(ConvertArgs),
    /// Replay a rosbag2 bag (MCAP or sqlite3) through the node's exact logic, offline: what
    /// the node would have commanded, as an output bag and a report.
    Replay(ReplayArgs),
    /// Write a small synthetic episode bag (two cameras, instructions, joint states, expert
    /// actions) for demos, tests and benchmarks.
    MakeEpisode(MakeEpisodeArgs),
}

#[derive(Args)]
struct ReplayArgs {
    /// The bag: a rosbag2 directory, a .mcap or a .db3 file.
    #[arg(long)]
    bag: PathBuf,
    /// Checkpoint directory or packed .bitvla file.
    #[arg(long)]
    model: PathBuf,
    /// The node's parameter file (its `bitvla_node: ros__parameters:` block): topics, command
    /// mode, rates, safety limits. Default: the node's defaults.
    #[arg(long)]
    params: Option<PathBuf>,
    /// Output bag: a directory (rosbag2 MCAP with metadata.yaml), or a path ending in .mcap.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Write the report as JSON to this file.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Write the report as a self-contained HTML page (charts, camera thumbnails) to this file.
    #[arg(long)]
    html: Option<PathBuf>,
    /// Pace by the bag clock and run inference on the node's worker thread (measured latency).
    #[arg(long)]
    realtime: bool,
    /// When a chunk is used: fixed:MS after its observation (deterministic) or measured.
    /// Default: the parameter file's fixed_latency_s when set, else fixed:100.
    #[arg(long)]
    latency: Option<bitvla_ros::replay::LatencyModel>,
    /// A previous output bag: exit non-zero when any command differs by more than --tolerance.
    #[arg(long)]
    expect: Option<PathBuf>,
    #[arg(long, default_value_t = 1e-6)]
    tolerance: f64,
    /// Topic of the actions executed when the bag was recorded (compared with the predictions).
    #[arg(long)]
    recorded_topic: Option<String>,
    /// An instruction in force from the start (for bags recorded without one).
    #[arg(long)]
    instruction: Option<String>,
    /// Inference threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    #[command(flatten)]
    cache: CacheArgs,
    /// Print the report as JSON instead of the summary.
    #[arg(long)]
    json: bool,
}

/// The packed-model cache, for a checkpoint directory (a packed file is mapped as it is).
#[derive(Args, Clone, Default)]
struct CacheArgs {
    /// Quantize the checkpoint directory at load instead of using the packed-model cache.
    #[arg(long)]
    no_cache: bool,
    /// The packed-model cache directory (default: the parameter file's packed_cache_dir, else
    /// $BITVLA_CACHE_DIR, else ~/.cache/bitvla_ros/packed).
    #[arg(long)]
    cache_dir: Option<PathBuf>,
}

impl CacheArgs {
    /// The cache to load through, with `params`' settings under the flags.
    fn dir(&self, params: &NodeParams) -> Option<PathBuf> {
        if self.no_cache {
            None
        } else if let Some(d) = &self.cache_dir {
            Some(d.clone())
        } else {
            params.cache_dir()
        }
    }
}

#[derive(Args)]
struct MakeEpisodeArgs {
    /// Output bag directory (or .mcap file).
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 3.0)]
    duration_s: f64,
    #[arg(long, default_value_t = 320)]
    width: u32,
    #[arg(long, default_value_t = 240)]
    height: u32,
    #[arg(long, default_value_t = 10.0)]
    camera_hz: f64,
    /// Only the third-person camera.
    #[arg(long)]
    no_wrist: bool,
}

#[derive(Args)]
struct ConvertArgs {
    /// Checkpoint directory (config.json, safetensors, .pt sidecars, statistics, tokenizer).
    #[arg(long)]
    model: PathBuf,
    /// The packed file to write.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
struct RunArgs {
    /// Checkpoint directory (as published on the hub, or from `bitvla make-tiny`).
    #[arg(long)]
    model: PathBuf,
    /// Third-person camera image (PNG or JPEG).
    #[arg(long)]
    image: PathBuf,
    /// Wrist camera image.
    #[arg(long)]
    wrist_image: Option<PathBuf>,
    #[arg(long)]
    instruction: String,
    /// Raw proprioception, comma-separated (8 values for the LIBERO checkpoints).
    #[arg(long, value_delimiter = ',', allow_hyphen_values = true)]
    proprio: Option<Vec<f32>>,
    /// dataset_statistics.json key (required when the file has several).
    #[arg(long)]
    unnorm_key: Option<String>,
    /// Gripper output: raw (network value, 1 = open) or libero (-1 = open, +1 = close).
    #[arg(long, default_value = "raw")]
    gripper: GripperMapping,
    /// Rotate the images by 180 degrees first (LIBERO's simulator cameras).
    #[arg(long)]
    rotate_180: bool,
    /// Skip the 90%-area center crop.
    #[arg(long)]
    no_center_crop: bool,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    #[command(flatten)]
    cache: CacheArgs,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct DemoArgs {
    /// A checkpoint directory or packed file (default: the tiny random model).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Write the replay's output bag here (default: none).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Where to write the HTML report.
    #[arg(long, default_value = "bitvla-demo-report.html")]
    html: PathBuf,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct MakeTinyArgs {
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Args)]
struct MakeTinyCommand {
    #[command(flatten)]
    common: MakeTinyArgs,
    /// The published shapes instead (a ~5.7 GB bf16 checkpoint, e.g. to measure `convert`).
    #[arg(long)]
    full_size: bool,
}

#[derive(Subcommand)]
enum Bench {
    /// Ternary GEMM on the real BitVLA shapes vs the f32 `gemm` crate, with the int8 peak
    /// calibrated in the same run.
    Kernels(KernelsArgs),
    /// Warm policy calls on a model (e.g. from `bitvla make-synthetic`): time per stage,
    /// efficiency against the calibrated int8 peak, peak RSS, and the f32-GEMM path of the same
    /// graph for comparison.
    Forward(ForwardArgs),
    /// Reading and decoding a bag's 640x480 rgb8 image stream (uncompressed and zstd chunks).
    Bag(BagBenchArgs),
    /// The machine's register-only peaks, interleaved: the int8 loop of the selected GEMM
    /// kernel, f32 FMA, and AMX-INT8 `tdpbusd` where the CPU and OS allow it.
    Peaks(PeaksArgs),
    /// The model's attention shapes on every implementation this CPU runs, interleaved
    /// against the portable `gemm`-crate path, with the f32 FMA peak calibrated in the same run.
    Attention(AttentionArgs),
}

#[derive(Args)]
struct AttentionArgs {
    /// Thread counts to measure (default: 1 and all available cores).
    #[arg(long, value_delimiter = ',')]
    threads: Vec<usize>,
    /// Interleaved calls per implementation (median reported).
    #[arg(long, default_value_t = 9)]
    reps: usize,
    /// Seconds per peak-calibration repetition.
    #[arg(long, default_value_t = 0.05)]
    calib_seconds: f64,
    /// Print one JSON object per line.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct PeaksArgs {
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 0.3)]
    seconds: f64,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct BagBenchArgs {
    /// Size of the image stream [MB].
    #[arg(long, default_value_t = 1024)]
    size_mb: usize,
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ForwardArgs {
    /// A checkpoint directory or packed file.
    #[arg(long)]
    model: PathBuf,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Timed ternary calls (median reported).
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Interleaved calls of the f32-GEMM path (0 skips it; it needs about 11 GB for the
    /// full-size model).
    #[arg(long, default_value_t = 3)]
    f32_reps: usize,
    #[arg(long, default_value_t = 0.1)]
    calib_seconds: f64,
    /// Load a checkpoint directory through this packed-model cache (default: quantize it at
    /// load, which is what `load_s` then measures); run twice to time a cached start.
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    #[arg(long)]
    json: bool,
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
    /// Kernel to measure (scalar, amx-int8, avx512vnni, avxvnni, avx512vnni-ymm, avx2, neon-sdot,
    /// neon-smull); default: the best.
    #[arg(long)]
    kernel: Option<String>,
    /// A second kernel timed in the same visits (e.g. avx2 against avxvnni): speedup_vs_versus.
    #[arg(long)]
    versus: Option<String>,
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
    bitvla_ros::process::tune_malloc();
    let result = dispatch(Cli::parse().command);
    // A checkpoint directory converted into the packed-model cache by this run: in place
    // before the process exits, or the next run converts it again.
    bitvla_ros::model::cache::finish_pending();
    result
}

fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Bench(Bench::Kernels(args)) => bench_kernels(args),
        Command::Run(args) => run(args),
        Command::Demo(args) => demo(args),
        Command::Bench(Bench::Forward(args)) => bench_forward(args),
        Command::Bench(Bench::Peaks(args)) => bench_peaks(args),
        Command::Bench(Bench::Attention(args)) => bench_attention(args),
        Command::Bench(Bench::Bag(args)) => {
            let report = bitvla_ros::bench::bag::run(&bitvla_ros::bench::bag::Options {
                size_mb: args.size_mb,
                reps: args.reps,
                dir: std::env::temp_dir().join(format!("bitvla-bench-bag-{}", std::process::id())),
            })?;
            if args.json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                report.print(&mut std::io::stdout().lock())?;
            }
            Ok(())
        }
        Command::MakeSynthetic(args) => {
            let t = std::time::Instant::now();
            let bytes = bitvla_ros::model::synthetic::make_synthetic(&args.out, args.seed)
                .with_context(|| format!("writing {}", args.out.display()))?;
            println!(
                "wrote a full-size synthetic BitVLA model to {} ({:.2} GB) in {:.1} s",
                args.out.display(),
                bytes as f64 / 1e9,
                t.elapsed().as_secs_f64()
            );
            Ok(())
        }
        Command::Convert(args) => {
            let t = std::time::Instant::now();
            let report = bitvla_ros::model::packed::convert(&args.model, &args.out)
                .with_context(|| format!("converting {}", args.model.display()))?;
            println!(
                "wrote {} ({:.1} MB, {} tensors, {} ternary) in {:.1} s; left out (unused): {}",
                args.out.display(),
                report.bytes as f64 / 1e6,
                report.tensors,
                report.ternary,
                t.elapsed().as_secs_f64(),
                if report.skipped.is_empty() {
                    "none".to_owned()
                } else {
                    report.skipped.join(", ")
                }
            );
            Ok(())
        }
        Command::Replay(args) => replay(args),
        Command::MakeEpisode(args) => {
            let spec = bitvla_ros::bag::episode::EpisodeSpec {
                duration_s: args.duration_s,
                width: args.width,
                height: args.height,
                camera_hz: args.camera_hz,
                wrist: !args.no_wrist,
                ..Default::default()
            };
            let (path, n) = bitvla_ros::bag::episode::write_episode(&args.out, &spec)?;
            println!(
                "wrote a synthetic episode ({n} messages) to {}",
                path.display()
            );
            Ok(())
        }
        Command::MakeTiny(MakeTinyCommand {
            common: args,
            full_size,
        }) => {
            let shape = if full_size {
                bitvla_ros::model::synthetic::full_shape()
            } else {
                TinyShape::default()
            };
            make_tiny(&args.out, args.seed, shape)
                .with_context(|| format!("writing the model to {}", args.out.display()))?;
            println!("wrote a random BitVLA checkpoint to {}", args.out.display());
            Ok(())
        }
    }
}

const DEMO_PARAMS: &str = include_str!("../../config/replay_demo.yaml");

/// The main job on an embedded default: a tiny random checkpoint and a synthetic episode bag,
/// replayed through the node's logic with the report printed.
fn demo(args: DemoArgs) -> anyhow::Result<()> {
    let scratch = std::env::temp_dir().join(format!("bitvla-demo-{}", std::process::id()));
    std::fs::remove_dir_all(&scratch).ok();
    let result = (|| {
        let model = match &args.model {
            Some(m) => m.clone(),
            None => {
                let dir = scratch.join("tiny-model");
                make_tiny(&dir, 0, TinyShape::default()).context("writing the tiny demo model")?;
                println!(
                    "demo: a tiny random BitVLA checkpoint (published layout, random weights: the \
                     actions mean nothing); --model runs a real one"
                );
                dir
            }
        };
        let spec = bitvla_ros::bag::episode::EpisodeSpec::default();
        let (bag, n) = bitvla_ros::bag::episode::write_episode(&scratch.join("episode"), &spec)?;
        println!(
            "demo: a synthetic {:.0} s episode ({n} messages: {}x{} rgb8 camera, JPEG wrist camera, \
             two instructions, joint states, expert actions)",
            spec.duration_s, spec.width, spec.height
        );
        let params = NodeParams::from_yaml_str(DEMO_PARAMS)
            .map_err(|e| anyhow::anyhow!("embedded demo parameters: {e}"))?;
        replay_with(
            ReplayArgs {
                bag,
                model,
                params: None,
                // Without --out no output bag: it would be deleted with the scratch directory.
                out: args.out.clone(),
                report: None,
                html: Some(args.html.clone()),
                realtime: false,
                latency: None,
                expect: None,
                tolerance: 1e-6,
                recorded_topic: Some(bitvla_ros::bag::episode::ACTION_TOPIC.into()),
                instruction: None,
                threads: None,
                // The scratch tiny model is not worth a cache entry.
                cache: CacheArgs {
                    no_cache: args.model.is_none(),
                    cache_dir: None,
                },
                json: args.json,
            },
            params,
            Some("embedded: config/replay_demo.yaml"),
        )
    })();
    std::fs::remove_dir_all(&scratch).ok();
    result
}

fn replay(args: ReplayArgs) -> anyhow::Result<()> {
    let params = match &args.params {
        Some(path) => NodeParams::from_yaml_file(path)?,
        None => NodeParams::default(),
    };
    let label = args.params.as_ref().map(|p| p.display().to_string());
    replay_with(args, params, label.as_deref())
}

/// `params_file` names where `params` came from (None: the node's defaults).
fn replay_with(
    args: ReplayArgs,
    params: NodeParams,
    params_file: Option<&str>,
) -> anyhow::Result<()> {
    use bitvla_ros::replay::{ReplayOptions, compare_with, replay, summary};
    let gripper: GripperMapping = params.gripper.parse().map_err(anyhow::Error::msg)?;
    let unnorm_key = (!params.unnorm_key.is_empty()).then(|| params.unnorm_key.clone());
    let image_options = ImageOptions {
        rotate_180: params.rotate_180,
        center_crop: true,
    };
    let policy = Policy::load(
        &args.model,
        PolicyOptions {
            unnorm_key,
            gripper,
            image_options: vec![image_options; 2],
            cache_dir: args.cache.dir(&params),
            ..Default::default()
        },
    )
    .with_context(|| format!("loading the policy from {}", args.model.display()))?;
    let bag = bitvla_ros::bag::BagReader::open(&args.bag)?;
    // Compare against the previous output before a new one could replace it.
    let previous = args
        .expect
        .as_ref()
        .map(|p| bitvla_ros::bag::BagReader::open(p))
        .transpose()
        .context("opening the --expect bag")?;
    let mut writer = args
        .out
        .as_ref()
        .map(|p| bitvla_ros::bag::BagWriter::create(p))
        .transpose()?;
    let threads = args
        .threads
        .or(usize::try_from(params.threads).ok().filter(|&t| t > 0))
        .unwrap_or(0);
    let latency = args.latency.unwrap_or(if params.fixed_latency_s > 0.0 {
        bitvla_ros::replay::LatencyModel::Fixed(params.fixed_latency_s)
    } else {
        bitvla_ros::replay::LatencyModel::Fixed(0.1)
    });
    let opts = ReplayOptions {
        params,
        latency,
        realtime: args.realtime,
        recorded_topic: args.recorded_topic.clone(),
        instruction: args.instruction.clone(),
        threads,
        progress: !args.json,
        trace: args.html.is_some(),
    };
    let html_params = opts.params.clone();
    let stop = bitvla_ros::process::stop_flag();
    let outcome = replay(&bag, policy, &opts, writer.as_mut(), stop);
    // Whatever happened, a started output bag is closed into a valid file.
    let written = writer.map(|w| w.finish()).transpose();
    let mut outcome = outcome?;
    let written = written.context("finishing the output bag")?;
    if let Some(previous) = &previous {
        outcome.report.expect = Some(compare_with(
            previous,
            &outcome.command_topic,
            &outcome.commands,
            args.tolerance,
        )?);
    }
    if let Some(path) = &written {
        outcome.report.output = path.display().to_string();
    }
    if let (Some(path), Some(trace)) = (&args.html, &outcome.trace) {
        let ctx = bitvla_ros::report::html::Context {
            model: &args.model.display().to_string(),
            params_file,
            params: &html_params,
        };
        let page = bitvla_ros::report::html::render(&outcome.report, trace, &ctx)
            .map_err(|e| anyhow::anyhow!("the HTML report: {e}"))?;
        std::fs::write(path, page)
            .with_context(|| format!("writing the HTML report {}", path.display()))?;
        outcome.report.html = path.display().to_string();
    }
    let report = &outcome.report;
    if let Some(path) = &args.report {
        std::fs::write(path, serde_json::to_string_pretty(report)? + "\n")
            .with_context(|| format!("writing the report {}", path.display()))?;
    }
    if args.json {
        println!("{}", serde_json::to_string(report)?);
    } else {
        print!("{}", summary(report));
        if let Some(path) = &written {
            println!("output bag: {}", path.display());
        }
        if !report.html.is_empty() {
            println!("HTML report: {}", report.html);
        }
    }
    if report.expect.as_ref().is_some_and(|e| !e.passed) {
        anyhow::bail!("the commands differ from the expected output (see above)");
    }
    if report.interrupted {
        anyhow::bail!("interrupted: the output bag holds the commands up to the interruption");
    }
    Ok(())
}

/// The thread counts a benchmark measures: those requested, or 1 and all available cores.
fn thread_counts(requested: &[usize]) -> anyhow::Result<Vec<usize>> {
    let available = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut threads = if requested.is_empty() {
        vec![1, available]
    } else {
        requested.to_vec()
    };
    threads.dedup();
    anyhow::ensure!(
        threads.iter().all(|&t| t >= 1),
        "--threads values must be >= 1"
    );
    Ok(threads)
}

fn bench_attention(args: AttentionArgs) -> anyhow::Result<()> {
    let threads = thread_counts(&args.threads)?;
    let rows = bitvla_ros::bench::attention::run(&threads, args.reps.max(1), args.calib_seconds)?;
    if args.json {
        for row in rows {
            println!("{row}");
        }
    } else {
        bitvla_ros::bench::attention::print_rows(
            &mut std::io::stdout().lock(),
            &rows,
            args.reps.max(1),
        )?;
    }
    Ok(())
}

fn bench_peaks(args: PeaksArgs) -> anyhow::Result<()> {
    let report = bitvla_ros::bench::peak::report(args.reps, args.seconds)?;
    if args.json {
        println!("{report}");
    } else {
        bitvla_ros::bench::peak::print_report(&mut std::io::stdout().lock(), &report)?;
    }
    Ok(())
}

fn bench_forward(args: ForwardArgs) -> anyhow::Result<()> {
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let report = bitvla_ros::bench::forward::run(&bitvla_ros::bench::forward::Options {
        model: args.model.clone(),
        threads,
        reps: args.reps,
        f32_reps: args.f32_reps,
        calib_seconds: args.calib_seconds,
        cache_dir: args.cache_dir.clone(),
    })
    .with_context(|| format!("benchmarking {}", args.model.display()))?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        report.print(&mut std::io::stdout().lock())?;
    }
    Ok(())
}

fn load_image(path: &std::path::Path) -> anyhow::Result<image::RgbImage> {
    Ok(image::ImageReader::open(path)
        .with_context(|| format!("opening {}", path.display()))?
        .with_guessed_format()
        .with_context(|| format!("reading {}", path.display()))?
        .decode()
        .with_context(|| format!("decoding {} (PNG or JPEG expected)", path.display()))?
        .to_rgb8())
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    let mut images = vec![load_image(&args.image)?];
    if let Some(w) = &args.wrist_image {
        images.push(load_image(w)?);
    }
    run_on(args, images)
}

fn run_on(args: RunArgs, images: Vec<image::RgbImage>) -> anyhow::Result<()> {
    let image_options = ImageOptions {
        rotate_180: args.rotate_180,
        center_crop: !args.no_center_crop,
    };
    let options = PolicyOptions {
        unnorm_key: args.unnorm_key.clone(),
        gripper: args.gripper,
        image_options: vec![image_options; 2],
        cache_dir: args.cache.dir(&NodeParams::default()),
        ..Default::default()
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(args.threads.unwrap_or(0))
        .build()
        .context("starting the worker threads")?;
    let t = std::time::Instant::now();
    let policy = pool
        .install(|| Policy::load(&args.model, options))
        .with_context(|| format!("loading the model from {}", args.model.display()))?;
    let load_s = t.elapsed().as_secs_f64();
    let obs = Observation {
        images,
        instruction: args.instruction.clone(),
        proprio: args.proprio.clone(),
    };
    let chunk = pool.install(|| policy.predict(&obs))?;
    if args.json {
        let mut v = serde_json::to_value(&chunk)?;
        v["load_s"] = serde_json::json!(load_s);
        println!("{v}");
    } else {
        println!(
            "{} steps x {} dims (unnorm key {}, gripper {}, L = {} tokens, load {:.2} s, predict {:.1} ms)",
            chunk.horizon,
            chunk.action_dim,
            chunk.unnorm_key,
            chunk.gripper,
            chunk.tokens,
            load_s,
            chunk.timings.total_ms
        );
        for t in 0..chunk.horizon {
            let row = chunk.step(t).unwrap_or_default();
            let cells: Vec<String> = row.iter().map(|v| format!("{v:>9.5}")).collect();
            println!("  t={t}: {}", cells.join(" "));
        }
        let tm = chunk.timings;
        println!(
            "  stages (ms): preprocess {:.1}, vision {:.1}, projector {:.1}, llm {:.1}, head {:.1}",
            tm.preprocess_ms, tm.vision_ms, tm.projector_ms, tm.llm_ms, tm.action_head_ms
        );
    }
    Ok(())
}

fn bench_kernels(args: KernelsArgs) -> anyhow::Result<()> {
    let named = |name: &str| {
        KernelKind::from_name(name).with_context(|| {
            format!(
                "unknown kernel {name:?}; supported here: {}",
                KernelKind::supported()
                    .iter()
                    .map(|k| k.name())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
    };
    let kernel = match &args.kernel {
        Some(name) => named(name)?,
        None => KernelKind::selected(),
    };
    let versus = args.versus.as_deref().map(named).transpose()?;
    let threads = thread_counts(&args.threads)?;
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
        versus,
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
            kbench::print_human(&mut out, line)
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
