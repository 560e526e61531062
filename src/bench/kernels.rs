//! `bitvla bench kernels`: the ternary GEMM on the real BitVLA shapes against the `gemm` crate's
//! f32 GEMM on identical shapes, with the machine's int8 peak calibrated in the same run
//! (`shared/spec/kernels.md` §5). Baseline and candidate alternate (ABAB…) in rounds over all
//! shapes and thread counts, medians are reported, and a run is marked noisy when the machine
//! was busy.

use super::machine::{OtherCpu, OtherCpuTotal, cpu_features, cpu_model, loadavg_1m};
use super::peak::{PeakLoop, calibrate, rate_on_pool};
use crate::kernels::dispatch::tile_loop;
use crate::kernels::f32_linear::linear_gemm_parallel;
use crate::kernels::{
    KernelKind, QuantizedActivations, TernaryMatrix, pseudo_random, quantize_activations_for,
    ternary_matmul_with,
};
use serde::Serialize;
use std::time::Instant;

/// One GEMM shape of the model: M tokens, K inputs, N outputs.
#[derive(Debug, Clone, Serialize)]
pub struct Shape {
    pub layer: &'static str,
    pub m: usize,
    pub k: usize,
    pub n: usize,
    /// Whether the layer has a bias (the vision tower's BitLinears do).
    pub bias: bool,
}

impl Shape {
    pub fn label(&self) -> String {
        format!("{}x{}x{}", self.m, self.k, self.n)
    }
    pub fn ops(&self) -> f64 {
        2.0 * self.m as f64 * self.k as f64 * self.n as f64
    }
}

/// The distinct ternary GEMM shapes of one BitVLA forward (LLM at L = 625, ViT at 2 × 256 tokens).
pub fn bitvla_shapes(llm_tokens: usize, vit_tokens: usize) -> Vec<Shape> {
    let s = |layer, m, k, n, bias| Shape {
        layer,
        m,
        k,
        n,
        bias,
    };
    vec![
        s("llm q_proj/o_proj", llm_tokens, 2560, 2560, false),
        s("llm k_proj/v_proj", llm_tokens, 2560, 640, false),
        s("llm gate_proj/up_proj", llm_tokens, 2560, 6912, false),
        s("llm down_proj", llm_tokens, 6912, 2560, false),
        s("vit q/k/v/out_proj", vit_tokens, 1152, 1152, true),
        s("vit fc1", vit_tokens, 1152, 4304, true),
        s("vit fc2", vit_tokens, 4304, 1152, true),
    ]
}

#[derive(Debug, Clone)]
pub struct Options {
    pub shapes: Vec<Shape>,
    pub threads: Vec<usize>,
    pub reps: usize,
    pub kernel: KernelKind,
    /// A second ternary kernel timed in the same visits (quantization + GEMM, interleaved with
    /// the others): `speedup_vs_versus` is its time over the kernel's.
    pub versus: Option<KernelKind>,
    /// Seconds per calibration repetition.
    pub calib_seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Header {
    pub kind: &'static str,
    pub cpu: String,
    pub features: Vec<&'static str>,
    pub kernel: &'static str,
    pub commit: &'static str,
    pub threads_available: usize,
    pub loadavg_1m: Option<f64>,
    /// The smallest L1 data cache of the machine's cores, and the K chunk the vector kernels
    /// keep in it (16 · `dispatch::chunk_blocks()`).
    pub l1d_bytes: Option<usize>,
    pub k_chunk: usize,
}

/// One line of results: one shape at one thread count.
#[derive(Debug, Clone, Serialize)]
pub struct Record {
    pub kind: &'static str,
    pub shape: String,
    pub layer: &'static str,
    pub m: usize,
    pub k: usize,
    pub n: usize,
    pub threads: usize,
    pub kernel: &'static str,
    pub gops: f64,
    /// The peak of the kernel's own int8 instruction (for the AMX kernel: `tdpbusd` tiles).
    pub peak_gops: Option<f64>,
    pub efficiency: Option<f64>,
    /// The register-only vector int8 peak (VNNI `vpdpbusd`, AVX2 or NEON `sdot`): the
    /// denominator of the efficiency targets; equal to `peak_gops` except for the AMX kernel.
    pub vector_peak_gops: Option<f64>,
    pub efficiency_vs_vector_peak: Option<f64>,
    pub f32_gflops: f64,
    pub speedup_vs_f32: f64,
    pub median_ms: f64,
    /// The activation-quantization part of `median_ms` (its own median).
    pub quantize_median_ms: f64,
    /// The quantization run again right after another one, its input in the cache (a
    /// diagnostic). In the timed runs the baseline run before each one has evicted much of the
    /// input; against `quantize_median_ms`, this shows what reading it from memory costs. In the
    /// model, the input was just written by the layer before and q/k/v (and gate/up) share one
    /// quantization.
    pub quantize_warm_median_ms: f64,
    /// `efficiency` of the GEMM alone: the median over repetitions of the time without the
    /// quantization (a diagnostic; the targets count the quantization).
    pub gemm_only_efficiency: Option<f64>,
    /// The kernel's register tile alone on L1-resident operands (`dispatch::tile_loop`), calibrated
    /// with the peak, over `peak_gops`: the ceiling of the inner loop (a diagnostic; None for
    /// AMX).
    pub tile_loop_efficiency: Option<f64>,
    pub min_ms: f64,
    pub f32_median_ms: f64,
    pub f32_min_ms: f64,
    /// With `--versus`: the other kernel, its median time (quantization + GEMM, same visits)
    /// and its time over this kernel's.
    pub versus_kernel: Option<&'static str>,
    pub versus_median_ms: Option<f64>,
    pub speedup_vs_versus: Option<f64>,
    pub reps: usize,
    pub noisy: bool,
    pub noise_reasons: Vec<String>,
    pub loadavg_1m: Option<f64>,
    pub calib_spread: Option<f64>,
    pub other_cpu: Option<f64>,
}

/// Per-thread-count summary, and thread scaling per shape.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub kind: &'static str,
    pub threads: usize,
    pub median_efficiency: Option<f64>,
    pub min_efficiency: Option<f64>,
    pub median_efficiency_vs_vector_peak: Option<f64>,
    pub min_efficiency_vs_vector_peak: Option<f64>,
    /// Median of the shapes' `gemm_only_efficiency` (diagnostic: quantization excluded).
    pub median_gemm_only_efficiency: Option<f64>,
    /// Median of the shapes' `tile_loop_efficiency` (diagnostic).
    pub median_tile_loop_efficiency: Option<f64>,
    pub median_speedup_vs_f32: f64,
    pub min_speedup_vs_f32: f64,
    /// With `--versus`: the median and lowest of the shapes' `speedup_vs_versus`.
    pub median_speedup_vs_versus: Option<f64>,
    pub min_speedup_vs_versus: Option<f64>,
    /// t(threads) / t(1 thread) per shape (only for threads > 1).
    pub time_ratio_vs_1_thread: Vec<(String, f64)>,
    pub any_noisy: bool,
}

pub fn header(kernel: KernelKind) -> Header {
    Header {
        kind: "header",
        cpu: cpu_model(),
        features: cpu_features(),
        kernel: kernel.name(),
        commit: env!("BITVLA_GIT_COMMIT"),
        threads_available: std::thread::available_parallelism().map_or(1, |n| n.get()),
        loadavg_1m: loadavg_1m(),
        l1d_bytes: crate::kernels::l1d_bytes(),
        k_chunk: 16 * crate::kernels::dispatch::chunk_blocks(),
    }
}

pub fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        values[n / 2]
    } else {
        0.5 * (values[n / 2 - 1] + values[n / 2])
    }
}

fn random(len: usize, seed: u64) -> Vec<f32> {
    pseudo_random(len, seed, 1.0)
}

/// Inputs of one shape: f32 activations and weights (for both sides), the packed ternary weight.
struct Case {
    x: Vec<f32>,
    w: Vec<f32>,
    packed: TernaryMatrix,
    bias: Option<Vec<f32>>,
    q: QuantizedActivations,
    y: Vec<f32>,
}

impl Case {
    fn new(shape: &Shape) -> anyhow::Result<Self> {
        let x = random(shape.m * shape.k, 1);
        let w = random(shape.n * shape.k, 2);
        let packed = TernaryMatrix::from_f32(&w, shape.n, shape.k)?;
        Ok(Self {
            x,
            w,
            packed,
            bias: shape.bias.then(|| random(shape.n, 3)),
            q: QuantizedActivations::new(),
            y: vec![0.0; shape.m * shape.n],
        })
    }

    /// The candidate: activation quantization + ternary GEMM with the f32 epilogue. Returns the
    /// total time and its quantization part.
    fn ternary(&mut self, shape: &Shape, kernel: KernelKind) -> anyhow::Result<(f64, f64)> {
        let t = Instant::now();
        self.quantize(shape, kernel)?;
        let quantized = t.elapsed().as_secs_f64();
        let bias = self.bias.as_deref();
        ternary_matmul_with(kernel, &self.q, &self.packed, bias, &mut self.y)?;
        Ok((t.elapsed().as_secs_f64(), quantized))
    }

    /// The activation quantization alone, twice in a row; returns the second one's time, with its
    /// input in the cache (a diagnostic: in the timed runs, the baseline run before each one
    /// has evicted much of it).
    fn quantize_warm(&mut self, shape: &Shape, kernel: KernelKind) -> anyhow::Result<f64> {
        self.quantize(shape, kernel)?;
        let t = Instant::now();
        self.quantize(shape, kernel)?;
        Ok(t.elapsed().as_secs_f64())
    }

    fn quantize(&mut self, shape: &Shape, kernel: KernelKind) -> anyhow::Result<()> {
        let (k_padded, layout) = (self.packed.k_padded(), kernel.act_layout());
        quantize_activations_for(layout, &self.x, shape.m, shape.k, k_padded, &mut self.q)?;
        Ok(())
    }

    /// The baseline: f32 in, f32 out through the `gemm` crate.
    fn f32(&mut self, shape: &Shape) -> anyhow::Result<f64> {
        let t = Instant::now();
        linear_gemm_parallel(&self.x, shape.m, shape.k, &self.w, shape.n, &mut self.y)?;
        Ok(t.elapsed().as_secs_f64())
    }
}

/// Makes sure every worker of the current pool is awake (spinning for work, not asleep) when
/// the next timed run starts, as between a forward pass's back-to-back layers. A rayon worker
/// that finds no work for some tens of microseconds sleeps, and waking it costs the run that
/// needs it about 20 µs on the development machine's VM (traced per block: after the f32
/// baseline of ViT q/k/v, which leaves the second worker idle at its end, the next
/// quantization's first block started about 10 µs late and the second thread's about 22 µs;
/// 48 µs for the pass against 30 µs with the workers awake). Both sides get it, so neither
/// pays the other's idle tail.
fn wake_workers() {
    rayon::broadcast(|_| ());
}

/// One thread count's pool and its calibrations, repeated between the rounds.
struct Calibrated {
    threads: usize,
    pool: rayon::ThreadPool,
    /// The kernel's own int8 peak loop.
    peak: Vec<f64>,
    /// The vector int8 peak loop, when it differs from the kernel's (AMX).
    vector: Vec<f64>,
    /// The kernel's register tile on L1-resident operands.
    tile_loop: Vec<f64>,
}

impl Calibrated {
    fn calibrate(&mut self, peak: Option<PeakLoop>, vector: Option<PeakLoop>, opts: &Options) {
        let pool = &self.pool;
        if let Some(p) = peak.and_then(|l| calibrate(l, pool, opts.calib_seconds)) {
            self.peak.push(p);
        }
        if let Some(p) = vector.and_then(|l| calibrate(l, pool, opts.calib_seconds)) {
            self.vector.push(p);
        }
        if let Some(r) =
            tile_loop(opts.kernel).and_then(|run| rate_on_pool(pool, opts.calib_seconds, &run))
        {
            self.tile_loop.push(r);
        }
    }
}

/// The timings of one shape at one thread count, one per round.
#[derive(Default)]
struct Samples {
    ternary: Vec<f64>,
    quantize: Vec<f64>,
    quantize_warm: Vec<f64>,
    f32: Vec<f64>,
    versus: Vec<f64>,
    other_cpu: OtherCpuTotal,
}

/// Runs the benchmark; calls `emit` with each JSON-serializable line as it is produced.
///
/// The measurements go in rounds: each round visits every shape at every thread count once,
/// then calibrates the peaks again. A visit runs baseline, candidate and the quantization once
/// untimed, then once timed, so that every timed run finds the caches as a run right after the
/// same shape's would (as in a loop over one layer), and each timed side starts with the pool's
/// workers awake ([`wake_workers`]). A disturbance of the shared machine (another tenant for
/// 50 ms, a frequency change) then costs one repetition of each shape it overlaps rather than
/// every repetition of one shape, which the medians reject; and the 1- and N-thread times of a
/// shape, whose ratio is a target, are measured seconds apart rather than a whole pass over the
/// shapes apart.
pub fn run(
    opts: &Options,
    mut emit: impl FnMut(&serde_json::Value),
) -> anyhow::Result<Vec<Record>> {
    let supported = || {
        KernelKind::supported()
            .iter()
            .map(|k| k.name())
            .collect::<Vec<_>>()
            .join(", ")
    };
    for (kernel, flag) in [(Some(opts.kernel), "--kernel"), (opts.versus, "--versus")] {
        if let Some(k) = kernel {
            anyhow::ensure!(
                k.is_supported(),
                "kernel {k} ({flag}) is not supported by this CPU (it would stop on an illegal \
                 instruction); this CPU runs: {}",
                supported()
            );
        }
    }
    anyhow::ensure!(opts.reps >= 1, "--reps must be at least 1");
    let head = header(opts.kernel);
    // The load average includes whatever ran just before (often the build of this binary), so it
    // only decides noise when the direct measurement of other processes' CPU is unavailable.
    let load_at_start = head.loadavg_1m;
    emit(&serde_json::to_value(&head)?);
    let peak_loop = PeakLoop::for_kernel(opts.kernel);
    let vector_loop = PeakLoop::vector_for_kernel(opts.kernel).filter(|&l| Some(l) != peak_loop);
    let mut pools = opts
        .threads
        .iter()
        .map(|&threads| -> anyhow::Result<Calibrated> {
            Ok(Calibrated {
                threads,
                pool: rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()?,
                peak: Vec::new(),
                vector: Vec::new(),
                tile_loop: Vec::new(),
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut cases = opts
        .shapes
        .iter()
        .map(Case::new)
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut samples: Vec<Vec<Samples>> = (0..opts.shapes.len())
        .map(|_| (0..pools.len()).map(|_| Samples::default()).collect())
        .collect();
    // On stderr, hidden when it is not a terminal (the JSON lines go to stdout).
    let bar = indicatif::ProgressBar::new((opts.reps * opts.shapes.len() * pools.len()) as u64);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "bench kernels: round {msg} [{elapsed_precise}] {wide_bar} {pos}/{len} runs",
    ) {
        bar.set_style(style);
    }
    for p in &mut pools {
        p.calibrate(peak_loop, vector_loop, opts);
    }
    for round in 0..opts.reps {
        bar.set_message(format!("{}/{}", round + 1, opts.reps));
        for ((shape, case), shape_samples) in opts.shapes.iter().zip(&mut cases).zip(&mut samples) {
            for (p, s) in pools.iter().zip(shape_samples.iter_mut()) {
                let window = OtherCpu::start();
                p.pool.install(|| -> anyhow::Result<()> {
                    // Untimed; in the first round also the warm-up (page faults, pool start,
                    // frequency ramp).
                    case.f32(shape)?;
                    case.ternary(shape, opts.kernel)?;
                    case.quantize_warm(shape, opts.kernel)?;
                    if let Some(v) = opts.versus {
                        case.ternary(shape, v)?;
                        wake_workers();
                        s.versus.push(case.ternary(shape, v)?.0);
                        case.ternary(shape, opts.kernel)?;
                    }
                    wake_workers();
                    s.f32.push(case.f32(shape)?);
                    wake_workers();
                    let (total, quantization) = case.ternary(shape, opts.kernel)?;
                    s.ternary.push(total);
                    s.quantize.push(quantization);
                    s.quantize_warm
                        .push(case.quantize_warm(shape, opts.kernel)?);
                    Ok(())
                })?;
                s.other_cpu.add(&window);
                bar.inc(1);
            }
        }
        for p in &mut pools {
            p.calibrate(peak_loop, vector_loop, opts);
        }
    }
    bar.finish_and_clear();

    let mut records = Vec::new();
    for (pi, p) in pools.iter().enumerate() {
        let peak = (!p.peak.is_empty()).then(|| median(&mut p.peak.clone()));
        let spread = peak.map(|pk| {
            p.peak
                .iter()
                .map(|c| (c - pk).abs() / pk)
                .fold(0.0, f64::max)
        });
        let vector_peak = if vector_loop.is_some() {
            (!p.vector.is_empty()).then(|| median(&mut p.vector.clone()))
        } else {
            peak
        };
        let tile_loop_rate = (!p.tile_loop.is_empty()).then(|| median(&mut p.tile_loop.clone()));
        for (shape, shape_samples) in opts.shapes.iter().zip(&mut samples) {
            let s = &mut shape_samples[pi];
            let other_cpu = s.other_cpu.cores();
            let mut reasons = Vec::new();
            match other_cpu {
                Some(o) if o > 0.2 => reasons.push(format!("other processes used {o:.2} cores")),
                Some(_) => {}
                None => {
                    if let Some(l) = load_at_start.filter(|&l| l > 0.5) {
                        reasons.push(format!("load average {l:.2} > 0.5 at start"));
                    }
                }
            }
            if let Some(sp) = spread.filter(|&sp| sp > 0.10) {
                reasons.push(format!("calibration spread {:.0}% > 10%", sp * 100.0));
            }
            let mut gemm_only: Vec<f64> = s
                .ternary
                .iter()
                .zip(&s.quantize)
                .map(|(t, q)| t - q)
                .collect();
            let gemm_only_med = median(&mut gemm_only);
            let (t_med, f_med) = (median(&mut s.ternary), median(&mut s.f32));
            // `median` sorted them.
            let (t_min, f_min) = (s.ternary[0], s.f32[0]);
            let gops = shape.ops() / t_med / 1e9;
            let versus_med = (!s.versus.is_empty()).then(|| median(&mut s.versus));
            let record = Record {
                kind: "result",
                shape: shape.label(),
                layer: shape.layer,
                m: shape.m,
                k: shape.k,
                n: shape.n,
                threads: p.threads,
                kernel: opts.kernel.name(),
                gops,
                peak_gops: peak,
                efficiency: peak.map(|pk| gops / pk),
                vector_peak_gops: vector_peak,
                efficiency_vs_vector_peak: vector_peak.map(|pk| gops / pk),
                f32_gflops: shape.ops() / f_med / 1e9,
                speedup_vs_f32: f_med / t_med,
                median_ms: t_med * 1e3,
                quantize_median_ms: median(&mut s.quantize) * 1e3,
                quantize_warm_median_ms: median(&mut s.quantize_warm) * 1e3,
                gemm_only_efficiency: peak.map(|pk| shape.ops() / gemm_only_med / 1e9 / pk),
                tile_loop_efficiency: peak.zip(tile_loop_rate).map(|(pk, r)| r / pk),
                min_ms: t_min * 1e3,
                f32_median_ms: f_med * 1e3,
                f32_min_ms: f_min * 1e3,
                versus_kernel: opts.versus.map(KernelKind::name),
                versus_median_ms: versus_med.map(|v| v * 1e3),
                speedup_vs_versus: versus_med.map(|v| v / t_med),
                reps: opts.reps,
                noisy: !reasons.is_empty(),
                noise_reasons: reasons,
                loadavg_1m: loadavg_1m(),
                calib_spread: spread,
                other_cpu,
            };
            emit(&serde_json::to_value(&record)?);
            records.push(record);
        }
    }
    for summary in summarize(&records) {
        emit(&serde_json::to_value(summary)?);
    }
    Ok(records)
}

pub fn summarize(records: &[Record]) -> Vec<Summary> {
    let mut threads: Vec<usize> = records.iter().map(|r| r.threads).collect();
    threads.sort_unstable();
    threads.dedup();
    threads
        .into_iter()
        .map(|t| {
            let rs: Vec<&Record> = records.iter().filter(|r| r.threads == t).collect();
            let mut eff: Vec<f64> = rs.iter().filter_map(|r| r.efficiency).collect();
            let mut vec_eff: Vec<f64> = rs
                .iter()
                .filter_map(|r| r.efficiency_vs_vector_peak)
                .collect();
            let mut gemm_eff: Vec<f64> = rs.iter().filter_map(|r| r.gemm_only_efficiency).collect();
            let mut loop_eff: Vec<f64> = rs.iter().filter_map(|r| r.tile_loop_efficiency).collect();
            let mut speed: Vec<f64> = rs.iter().map(|r| r.speedup_vs_f32).collect();
            let mut versus: Vec<f64> = rs.iter().filter_map(|r| r.speedup_vs_versus).collect();
            let ratios = if t > 1 {
                rs.iter()
                    .filter_map(|r| {
                        records
                            .iter()
                            .find(|o| o.threads == 1 && o.shape == r.shape)
                            .map(|o| (r.shape.clone(), r.median_ms / o.median_ms))
                    })
                    .collect()
            } else {
                Vec::new()
            };
            Summary {
                kind: "summary",
                threads: t,
                median_efficiency: (!eff.is_empty()).then(|| median(&mut eff)),
                min_efficiency: eff.iter().cloned().reduce(f64::min),
                median_efficiency_vs_vector_peak: (!vec_eff.is_empty())
                    .then(|| median(&mut vec_eff)),
                min_efficiency_vs_vector_peak: vec_eff.iter().cloned().reduce(f64::min),
                median_gemm_only_efficiency: (!gemm_eff.is_empty()).then(|| median(&mut gemm_eff)),
                median_tile_loop_efficiency: (!loop_eff.is_empty()).then(|| median(&mut loop_eff)),
                median_speedup_vs_f32: median(&mut speed),
                min_speedup_vs_f32: speed.iter().cloned().fold(f64::INFINITY, f64::min),
                median_speedup_vs_versus: (!versus.is_empty()).then(|| median(&mut versus)),
                min_speedup_vs_versus: versus.iter().cloned().reduce(f64::min),
                time_ratio_vs_1_thread: ratios,
                any_noisy: rs.iter().any(|r| r.noisy),
            }
        })
        .collect()
}

/// One line of [`run`]'s output as a row of the terminal table (`bitvla bench kernels` without
/// `--json`).
pub fn print_human(out: &mut impl std::io::Write, line: &serde_json::Value) -> std::io::Result<()> {
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
                "L1d: {} bytes   K chunk of the vector kernels: {}",
                line["l1d_bytes"], line["k_chunk"]
            )?;
            writeln!(
                out,
                "{:<24} {:>16} {:>3} {:>9} {:>6} {:>6} {:>8} {:>9} {:>6} {:>7} {:>8} {:>9} {:>8}  noisy",
                "layer",
                "MxKxN",
                "thr",
                "ms",
                "quant",
                "q/warm",
                "GOP/s",
                "peak",
                "eff",
                "vec eff",
                "gemm eff",
                "f32 GF/s",
                "speedup"
            )
        }
        Some("result") => writeln!(
            out,
            "{:<24} {:>16} {:>3} {:>9.2} {:>5.1}% {:>6.2} {:>8.1} {:>9.1} {:>6.3} {:>7.3} {:>8.3} {:>9.1} {:>7.2}x  {}",
            line["layer"].as_str().unwrap_or("?"),
            line["shape"].as_str().unwrap_or("?"),
            line["threads"],
            f("median_ms").unwrap_or(f64::NAN),
            100.0 * f("quantize_median_ms").unwrap_or(f64::NAN)
                / f("median_ms").unwrap_or(f64::NAN),
            // The timed quantization against the same one with its input in the cache.
            f("quantize_median_ms").unwrap_or(f64::NAN)
                / f("quantize_warm_median_ms").unwrap_or(f64::NAN),
            f("gops").unwrap_or(f64::NAN),
            f("peak_gops").unwrap_or(f64::NAN),
            f("efficiency").unwrap_or(f64::NAN),
            f("efficiency_vs_vector_peak").unwrap_or(f64::NAN),
            f("gemm_only_efficiency").unwrap_or(f64::NAN),
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
            "threads {}: median efficiency {:.3} (min {:.3}); against the vector int8 peak {:.3} (min {:.3}); GEMM alone {:.3}; tile loop alone {}; median speedup vs f32 {:.2}x (min {:.2}x){}{}{}",
            line["threads"],
            f("median_efficiency").unwrap_or(f64::NAN),
            f("min_efficiency").unwrap_or(f64::NAN),
            f("median_efficiency_vs_vector_peak").unwrap_or(f64::NAN),
            f("min_efficiency_vs_vector_peak").unwrap_or(f64::NAN),
            f("median_gemm_only_efficiency").unwrap_or(f64::NAN),
            f("median_tile_loop_efficiency").map_or("n/a".to_string(), |e| format!("{e:.3}")),
            f("median_speedup_vs_f32").unwrap_or(f64::NAN),
            f("min_speedup_vs_f32").unwrap_or(f64::NAN),
            match (f("median_speedup_vs_versus"), f("min_speedup_vs_versus")) {
                (Some(med), Some(min)) =>
                    format!("; vs the other kernel {med:.2}x (min {min:.2}x)"),
                _ => String::new(),
            },
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A small run end to end: the header, one record per shape and thread count with the keys
    /// the protocol names, timings that add up, and the summaries.
    #[test]
    fn a_small_run_reports_every_shape_and_thread_count_with_consistent_timings() {
        let opts = Options {
            shapes: vec![Shape {
                layer: "test",
                m: 30,
                k: 100,
                n: 70,
                bias: true,
            }],
            threads: vec![1, 2],
            reps: 2,
            kernel: KernelKind::best(),
            versus: Some(KernelKind::Scalar),
            calib_seconds: 0.001,
        };
        let mut lines = Vec::new();
        let records = run(&opts, |line| lines.push(line.clone())).expect("the benchmark runs");
        assert_eq!(lines[0]["kind"], "header");
        assert_eq!(records.len(), 2);
        for r in &records {
            assert_eq!((r.shape.as_str(), r.reps), ("30x100x70", 2));
            for (what, v) in [
                ("median_ms", r.median_ms),
                ("quantize_median_ms", r.quantize_median_ms),
                ("quantize_warm_median_ms", r.quantize_warm_median_ms),
                ("f32_median_ms", r.f32_median_ms),
                ("speedup_vs_f32", r.speedup_vs_f32),
            ] {
                assert!(v.is_finite() && v > 0.0, "{what} = {v}");
            }
            assert!(r.quantize_median_ms <= r.median_ms);
            assert_eq!(r.versus_kernel, Some("scalar"));
            let versus = r.versus_median_ms.expect("the versus kernel is timed");
            let ratio = r.speedup_vs_versus.expect("and compared");
            assert!(
                (ratio - versus / r.median_ms).abs() < 1e-9 * ratio,
                "{ratio}"
            );
            assert!(r.min_ms <= r.median_ms);
            if let (Some(peak), Some(eff)) = (r.peak_gops, r.efficiency) {
                assert!((eff - r.gops / peak).abs() < 1e-9 * eff.max(1.0));
            }
        }
        let results: Vec<_> = lines.iter().filter(|l| l["kind"] == "result").collect();
        assert_eq!(results.len(), 2);
        for key in [
            "shape",
            "threads",
            "gops",
            "peak_gops",
            "efficiency",
            "f32_gflops",
            "speedup_vs_f32",
        ] {
            assert!(results.iter().all(|l| l.get(key).is_some()), "{key}");
        }
        let summaries: Vec<_> = lines.iter().filter(|l| l["kind"] == "summary").collect();
        assert_eq!(summaries.len(), 2);
        assert_eq!(summaries[1]["threads"], 2);
        assert_eq!(summaries[1]["time_ratio_vs_1_thread"][0][0], "30x100x70");
    }
}
