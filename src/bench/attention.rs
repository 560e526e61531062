//! `bitvla bench attention`: the model's two attention shapes, every implementation this CPU
//! runs, interleaved call by call against the portable `gemm`-crate path, with the f32 FMA peak
//! calibrated in the same run.

use super::kernels::median;
use super::machine::OtherCpu;
use super::peak::{PeakLoop, calibrate};
use crate::kernels::attention::{AttentionImpl, AttentionShape, attention_with};
use crate::kernels::pseudo_random;
use std::time::Instant;

/// The LLM's attention (625 tokens, 20 heads over 5 KV heads of 128) and the vision tower's
/// (one image: 256 patches, 16 heads of 72).
pub const SHAPES: [(&str, AttentionShape); 2] = [
    (
        "llm",
        AttentionShape {
            tokens: 625,
            heads: 20,
            kv_heads: 5,
            head_dim: 128,
        },
    ),
    (
        "vision",
        AttentionShape {
            tokens: 256,
            heads: 16,
            kv_heads: 16,
            head_dim: 72,
        },
    ),
];

/// One JSON object per shape and thread count: the median time of each implementation, its
/// GFLOP/s (the two products, 4·L²·d per head), its efficiency against the f32 FMA peak and
/// its time relative to the `gemm` path.
pub fn run(
    thread_counts: &[usize],
    reps: usize,
    calib_seconds: f64,
) -> anyhow::Result<Vec<serde_json::Value>> {
    // The portable gemm path first: the baseline of `time_vs_gemm`.
    let impls = AttentionImpl::supported();
    let mut rows = Vec::new();
    for (name, shape) in SHAPES {
        let (l, d) = (shape.tokens, shape.head_dim);
        let q = pseudo_random(l * shape.heads * d, 1, 2.0);
        let k = pseudo_random(l * shape.kv_heads * d, 2, 2.0);
        let v = pseudo_random(l * shape.kv_heads * d, 3, 2.0);
        let mut out = vec![0f32; q.len()];
        let mut scratch = Vec::new();
        let gflop = 4.0 * (l * l * d * shape.heads) as f64 / 1e9;
        for &threads in thread_counts {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()?;
            let mut times = vec![Vec::new(); impls.len()];
            let mut peaks = Vec::new();
            let other = OtherCpu::start();
            for rep in 0..reps + 1 {
                if let Some(p) = calibrate(PeakLoop::F32Fma, &pool, calib_seconds) {
                    peaks.push(p);
                }
                for (i, &imp) in impls.iter().enumerate() {
                    let start = Instant::now();
                    pool.install(|| {
                        attention_with(imp, shape, false, &q, &k, &v, &mut out, &mut scratch)
                    })?;
                    // The first round warms caches and buffers.
                    if rep > 0 {
                        times[i].push(start.elapsed().as_secs_f64());
                    }
                }
            }
            let peak = median(&mut peaks);
            let medians: Vec<f64> = times.iter_mut().map(|t| median(t)).collect();
            let results: Vec<_> = impls
                .iter()
                .zip(&medians)
                .map(|(imp, &s)| {
                    serde_json::json!({
                        "impl": format!("{imp:?}"),
                        "ms": s * 1e3,
                        "gflops": gflop / s,
                        "efficiency": gflop / s / peak,
                        "time_vs_gemm": s / medians[0],
                    })
                })
                .collect();
            rows.push(serde_json::json!({
                "shape": name,
                "tokens": l, "heads": shape.heads, "kv_heads": shape.kv_heads, "head_dim": d,
                "threads": threads,
                "f32_peak_gflops": peak,
                "other_cpu_load": other.finish(),
                "results": results,
            }));
        }
    }
    Ok(rows)
}

/// [`run`]'s rows as a table for a terminal (`bitvla bench attention` without `--json`).
pub fn print_rows(
    out: &mut impl std::io::Write,
    rows: &[serde_json::Value],
    reps: usize,
) -> std::io::Result<()> {
    writeln!(
        out,
        "{}; medians of {reps} interleaved calls",
        super::machine::cpu_model()
    )?;
    for row in rows {
        for r in row["results"].as_array().into_iter().flatten() {
            writeln!(
                out,
                "{:<7} L={:<4} {:>2}x{:<3} thr {}  {:<7} {:>8.2} ms {:>6.0} GFLOP/s  eff {:.2}  time vs gemm {:.3}",
                row["shape"].as_str().unwrap_or(""),
                row["tokens"],
                row["heads"],
                row["head_dim"],
                row["threads"],
                r["impl"].as_str().unwrap_or(""),
                r["ms"].as_f64().unwrap_or(f64::NAN),
                r["gflops"].as_f64().unwrap_or(f64::NAN),
                r["efficiency"].as_f64().unwrap_or(f64::NAN),
                r["time_vs_gemm"].as_f64().unwrap_or(f64::NAN),
            )?;
        }
    }
    Ok(())
}
