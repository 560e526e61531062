//! `bitvla bench forward`: warm policy calls on a model (e.g. `bitvla make-synthetic`), with the
//! int8 peak calibrated in the same run, the process's peak RSS, the load time, and the same
//! graph on the f32 GEMM path (ternary layers dequantized) interleaved with it.

use super::kernels::median;
use super::peak::{PeakLoop, calibrate};
use crate::kernels::KernelKind;
use crate::model::{Observation, Policy, PolicyOptions, StageTimings};
use serde::Serialize;
use std::path::PathBuf;
use std::time::Instant;

pub struct Options {
    pub model: PathBuf,
    pub threads: usize,
    pub reps: usize,
    /// Interleaved f32-path repetitions (0: skip the f32 comparison).
    pub f32_reps: usize,
    pub calib_seconds: f64,
    /// The packed-model cache a checkpoint directory loads through (None: quantized at load).
    pub cache_dir: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub kind: &'static str,
    pub model: String,
    pub cpu: String,
    pub kernel: String,
    pub threads: usize,
    pub commit: &'static str,
    pub tokens: usize,
    pub load_s: f64,
    /// The first call after the load, before anything else ran (what a robot's first
    /// instruction waits for: page faults on the weights, the pool's first wake-up, buffers
    /// allocated), and its ratio to the warm median.
    pub first_call_ms: f64,
    pub first_call_vs_median: f64,
    pub reps: usize,
    pub median_ms: f64,
    pub stages_median_ms: StageTimings,
    pub ternary_gops: f64,
    pub achieved_gops: f64,
    pub peak_gops: Option<f64>,
    /// Compute floor of the ternary work at the calibrated peak / measured forward time.
    pub efficiency: Option<f64>,
    /// The register-only vector int8 peak (VNNI/AVX2/NEON loop): the denominator of the
    /// efficiency target; equal to `peak_gops` except for the AMX kernel.
    pub vector_peak_gops: Option<f64>,
    pub efficiency_vs_vector_peak: Option<f64>,
    /// f32 FLOPs of the attention products, which the ternary floor leaves out.
    pub attention_gflop: f64,
    pub f32_peak_gflops: Option<f64>,
    /// (ternary work at the int8 peak + attention at the f32 FMA peak) / forward time.
    pub efficiency_with_attention: Option<f64>,
    pub weight_bytes: usize,
    /// `VmHWM` after loading and the ternary runs (before the f32 path is built).
    pub peak_rss_bytes: Option<u64>,
    pub rss_after_load_bytes: Option<u64>,
    pub hwm_after_load_bytes: Option<u64>,
    pub f32_median_ms: Option<f64>,
    /// Ternary forward time / f32-path forward time.
    pub time_ratio_vs_f32: Option<f64>,
    pub max_abs_action_diff_vs_f32: Option<f32>,
}

/// `VmHWM` / `VmRSS` of this process in bytes (Linux).
pub fn proc_status_bytes(key: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = text.lines().find(|l| l.starts_with(key))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn observation(policy: &Policy) -> Observation {
    let img = |seed: u32| {
        image::RgbImage::from_fn(224, 224, |x, y| {
            image::Rgb([
                (x * 7 + seed) as u8,
                (y * 5 + seed * 3) as u8,
                ((x ^ y) + seed) as u8,
            ])
        })
    };
    Observation {
        images: vec![img(1), img(2)],
        instruction: "pick up the black bowl and place it on the plate".into(),
        proprio: policy.proprio_dim().map(|d| vec![0.0; d]),
    }
}

fn stage_medians(all: &[StageTimings]) -> StageTimings {
    let m = |f: fn(&StageTimings) -> f64| median(&mut all.iter().map(f).collect::<Vec<_>>());
    StageTimings {
        preprocess_ms: m(|t| t.preprocess_ms),
        vision_ms: m(|t| t.vision_ms),
        projector_ms: m(|t| t.projector_ms),
        llm_ms: m(|t| t.llm_ms),
        action_head_ms: m(|t| t.action_head_ms),
        total_ms: m(|t| t.total_ms),
    }
}

pub fn run(opts: &Options) -> anyhow::Result<Report> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(opts.threads)
        .build()?;
    let t = Instant::now();
    let options = PolicyOptions {
        cache_dir: opts.cache_dir.clone(),
        ..Default::default()
    };
    let policy = pool.install(|| Policy::load(&opts.model, options))?;
    let load_s = t.elapsed().as_secs_f64();
    let rss_after_load_bytes = proc_status_bytes("VmRSS:");
    let hwm_after_load_bytes = proc_status_bytes("VmHWM:");
    let obs = observation(&policy);
    let kernel = KernelKind::selected();
    let peak_loop = PeakLoop::for_kernel(kernel);
    let vector_loop = PeakLoop::vector_for_kernel(kernel).filter(|&l| Some(l) != peak_loop);
    let (mut peaks, mut vector_peaks) = (Vec::new(), Vec::new());
    let calib = |peaks: &mut Vec<f64>, vector: &mut Vec<f64>| {
        if let Some(p) = peak_loop.and_then(|l| calibrate(l, &pool, opts.calib_seconds)) {
            peaks.push(p);
        }
        if let Some(p) = vector_loop.and_then(|l| calibrate(l, &pool, opts.calib_seconds)) {
            vector.push(p);
        }
    };
    let warm = pool.install(|| policy.predict(&obs))?;
    let first_call_ms = warm.timings.total_ms;
    calib(&mut peaks, &mut vector_peaks);
    let mut timings = Vec::new();
    for _ in 0..opts.reps.max(1) {
        let chunk = pool.install(|| policy.predict(&obs))?;
        timings.push(chunk.timings);
        calib(&mut peaks, &mut vector_peaks);
    }
    let peak_rss_bytes = proc_status_bytes("VmHWM:");
    let stages = stage_medians(&timings);
    let ops = policy.ternary_ops(warm.tokens, obs.images.len());
    let peak_gops = (!peaks.is_empty()).then(|| median(&mut peaks));
    let vector_peak_gops = if vector_loop.is_some() {
        (!vector_peaks.is_empty()).then(|| median(&mut vector_peaks))
    } else {
        peak_gops
    };
    let mut f32_peaks: Vec<f64> = (0..3)
        .filter_map(|_| calibrate(PeakLoop::F32Fma, &pool, opts.calib_seconds))
        .collect();
    let f32_peak_gflops = (!f32_peaks.is_empty()).then(|| median(&mut f32_peaks));
    let attention = policy.attention_flops(warm.tokens, obs.images.len());
    let seconds = stages.total_ms / 1e3;

    let (mut f32_median_ms, mut ratio, mut diff) = (None, None, None);
    if opts.f32_reps > 0 {
        let mut dense = pool.install(|| Policy::load(&opts.model, PolicyOptions::default()))?;
        dense.use_f32_gemms();
        // Interleaved: ternary, f32, ternary, f32, ...
        let (mut a, mut b) = (Vec::new(), Vec::new());
        let mut f32_chunk = None;
        for _ in 0..opts.f32_reps {
            a.push(pool.install(|| policy.predict(&obs))?.timings.total_ms);
            let c = pool.install(|| dense.predict(&obs))?;
            b.push(c.timings.total_ms);
            f32_chunk = Some(c);
        }
        let (ma, mb) = (median(&mut a), median(&mut b));
        f32_median_ms = Some(mb);
        ratio = Some(ma / mb);
        diff = f32_chunk.map(|c| {
            c.normalized
                .iter()
                .zip(&warm.normalized)
                .fold(0f32, |m, (x, y)| m.max((x - y).abs()))
        });
    }
    Ok(Report {
        kind: "forward",
        model: opts.model.display().to_string(),
        cpu: super::machine::cpu_model(),
        kernel: kernel.name().to_owned(),
        threads: pool.current_num_threads(),
        commit: env!("BITVLA_GIT_COMMIT"),
        tokens: warm.tokens,
        load_s,
        first_call_ms,
        first_call_vs_median: first_call_ms / stages.total_ms,
        reps: timings.len(),
        median_ms: stages.total_ms,
        stages_median_ms: stages,
        ternary_gops: ops / 1e9,
        achieved_gops: ops / seconds / 1e9,
        peak_gops,
        efficiency: peak_gops.map(|p| ops / 1e9 / p / seconds),
        vector_peak_gops,
        efficiency_vs_vector_peak: vector_peak_gops.map(|p| ops / 1e9 / p / seconds),
        attention_gflop: attention / 1e9,
        f32_peak_gflops,
        efficiency_with_attention: peak_gops
            .zip(f32_peak_gflops)
            .map(|(p, f)| (ops / 1e9 / p + attention / 1e9 / f) / seconds),
        weight_bytes: policy.weight_bytes(),
        peak_rss_bytes,
        rss_after_load_bytes,
        hwm_after_load_bytes,
        f32_median_ms,
        time_ratio_vs_f32: ratio,
        max_abs_action_diff_vs_f32: diff,
    })
}

impl Report {
    /// The report as a few lines for a terminal (`bitvla bench forward` without `--json`).
    pub fn print(&self, out: &mut impl std::io::Write) -> std::io::Result<()> {
        let s = &self.stages_median_ms;
        writeln!(
            out,
            "{} ({} threads, kernel {}, {} tokens)",
            self.model, self.threads, self.kernel, self.tokens
        )?;
        writeln!(
            out,
            "  first call after load {:.1} ms ({:.2}x the warm median)",
            self.first_call_ms, self.first_call_vs_median
        )?;
        writeln!(
            out,
            "  forward median {:.1} ms: preprocess {:.1}, vision {:.1}, projector {:.1}, llm {:.1}, head {:.1}",
            self.median_ms,
            s.preprocess_ms,
            s.vision_ms,
            s.projector_ms,
            s.llm_ms,
            s.action_head_ms
        )?;
        writeln!(
            out,
            "  ternary work {:.0} GOP -> {:.1} GOP/s; peak {} GOP/s; efficiency {}",
            self.ternary_gops,
            self.achieved_gops,
            self.peak_gops.map_or("?".into(), |p| format!("{p:.1}")),
            self.efficiency.map_or("?".into(), |e| format!("{e:.3}"))
        )?;
        if self.vector_peak_gops != self.peak_gops {
            writeln!(
                out,
                "  vector int8 peak {} GOP/s; efficiency against it {}",
                self.vector_peak_gops
                    .map_or("?".into(), |p| format!("{p:.1}")),
                self.efficiency_vs_vector_peak
                    .map_or("?".into(), |e| format!("{e:.3}"))
            )?;
        }
        writeln!(
            out,
            "  attention {:.0} GFLOP f32 (f32 peak {} GFLOP/s); efficiency counting it {}",
            self.attention_gflop,
            self.f32_peak_gflops
                .map_or("?".into(), |p| format!("{p:.0}")),
            self.efficiency_with_attention
                .map_or("?".into(), |e| format!("{e:.3}"))
        )?;
        writeln!(
            out,
            "  load {:.2} s; weights {:.0} MB; peak RSS {}",
            self.load_s,
            self.weight_bytes as f64 / 1e6,
            self.peak_rss_bytes
                .map_or("?".into(), |b| format!("{:.0} MB", b as f64 / 1e6))
        )?;
        if let (Some(f), Some(r)) = (self.f32_median_ms, self.time_ratio_vs_f32) {
            writeln!(
                out,
                "  f32-GEMM path {:.1} ms: ternary takes {:.3}x its time (max |action diff| {:?})",
                f, r, self.max_abs_action_diff_vs_f32
            )?;
        }
        Ok(())
    }
}
