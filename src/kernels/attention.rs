//! Multi-head attention with grouped KV heads and a full (bidirectional) mask, in f32:
//! `softmax(Q_h K_gᵀ / √d) V_g` per query head h with KV head g = h / (heads / kv_heads).
//!
//! Heads run in parallel on the current rayon pool; each head's products run single-threaded in
//! the `gemm` crate and its softmax rows in a fixed order, so results are identical for any
//! thread count.

use super::f32_linear::{SendPtr, View, matmul_strided};
use super::ops::softmax_rows;
use super::{KernelError, Result};
use rayon::prelude::*;

/// Shape of one attention call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionShape {
    /// Tokens (queries = keys).
    pub tokens: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl AttentionShape {
    fn validate(&self) -> Result<()> {
        let s = self;
        if s.tokens == 0
            || s.heads == 0
            || s.kv_heads == 0
            || s.head_dim == 0
            || !s.heads.is_multiple_of(s.kv_heads)
        {
            return Err(KernelError::Invalid(format!(
                "attention: invalid shape {s:?} (all non-zero, heads a multiple of kv_heads)"
            )));
        }
        Ok(())
    }
}

/// `q`: tokens × (heads·d), `k`, `v`: tokens × (kv_heads·d), `out`: tokens × (heads·d), all
/// row-major (the layout of the projections). `scratch` holds the score matrix of the
/// single-threaded path (parallel workers use their own).
pub fn attention(
    shape: AttentionShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    scratch: &mut Vec<f32>,
) -> Result<()> {
    attention_masked(shape, false, q, k, v, out, scratch)
}

/// [`attention`] with an optional causal mask (query i sees keys 0..=i). BitVLA itself is
/// bidirectional; the causal form exists to show that tests can tell the two apart.
pub fn attention_masked(
    shape: AttentionShape,
    causal: bool,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    scratch: &mut Vec<f32>,
) -> Result<()> {
    shape.validate()?;
    let AttentionShape {
        tokens: l,
        heads,
        kv_heads,
        head_dim: d,
    } = shape;
    let (q_width, kv_width) = (heads * d, kv_heads * d);
    for (what, len, expected) in [
        ("attention q", q.len(), l * q_width),
        ("attention k", k.len(), l * kv_width),
        ("attention v", v.len(), l * kv_width),
        ("attention out", out.len(), l * q_width),
    ] {
        if len != expected {
            return Err(KernelError::LengthMismatch {
                what,
                expected,
                got: len,
            });
        }
    }
    let group = heads / kv_heads;
    let scale = 1.0 / (d as f32).sqrt();
    let dst = SendPtr(out.as_mut_ptr());
    // One l × l score buffer per worker, not per head: the LLM's 20 heads × 625² scores would
    // be 31 MB at once.
    let head = |scores: &mut Vec<f32>, h: usize| -> Result<()> {
        // Sized once per worker, never zeroed: the Q·Kᵀ product overwrites every element (gemm
        // with read_dst = false), and zeroing 1.5 MB per head cost 1% of a forward.
        if scores.len() < l * l {
            scores.resize(l * l, 0.0);
        }
        let scores = &mut scores[..l * l];
        let g = h / group;
        let dst = &dst;
        // SAFETY: Q_h is the l × d block at column h·d (row stride heads·d); K_gᵀ is d × l read
        // from the l × d block at column g·d of k; scores is this head's own l × l buffer.
        unsafe {
            matmul_strided(
                l,
                l,
                d,
                scores.as_mut_ptr(),
                l,
                View {
                    ptr: q.as_ptr().add(h * d),
                    row_stride: q_width as isize,
                    col_stride: 1,
                },
                View {
                    ptr: k.as_ptr().add(g * d),
                    row_stride: 1,
                    col_stride: kv_width as isize,
                },
                scale,
                false,
            );
        }
        if causal {
            for (i, row) in scores.chunks_exact_mut(l).enumerate() {
                row[i + 1..].fill(f32::NEG_INFINITY);
            }
        }
        softmax_rows(scores, l)?;
        // SAFETY: V_g is the l × d block at column g·d of v; the destination is the l × d block
        // at column h·d of out, written by this head only.
        unsafe {
            matmul_strided(
                l,
                d,
                l,
                dst.0.add(h * d),
                q_width,
                View {
                    ptr: scores.as_ptr(),
                    row_stride: l as isize,
                    col_stride: 1,
                },
                View {
                    ptr: v.as_ptr().add(g * d),
                    row_stride: kv_width as isize,
                    col_stride: 1,
                },
                1.0,
                false,
            );
        }
        Ok(())
    };
    if rayon::current_num_threads() == 1 {
        (0..heads).try_for_each(|h| head(scratch, h))
    } else {
        // One buffer per worker thread that lives across calls: `try_for_each_init` would
        // allocate (and fault in) a fresh 1.5 MB buffer for every split of the head range.
        thread_local! {
            static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        (0..heads)
            .into_par_iter()
            .try_for_each(|h| SCORES.with_borrow_mut(|scores| head(scores, h)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize, seed: u64) -> Vec<f32> {
        crate::kernels::pseudo_random(len, seed, 2.0)
    }

    fn reference(shape: AttentionShape, q: &[f32], k: &[f32], v: &[f32]) -> Vec<f64> {
        let AttentionShape {
            tokens: l,
            heads,
            kv_heads,
            head_dim: d,
        } = shape;
        let mut out = vec![0f64; l * heads * d];
        for h in 0..heads {
            let g = h / (heads / kv_heads);
            for i in 0..l {
                let s: Vec<f64> = (0..l)
                    .map(|j| {
                        (0..d)
                            .map(|t| {
                                f64::from(q[i * heads * d + h * d + t])
                                    * f64::from(k[j * kv_heads * d + g * d + t])
                            })
                            .sum::<f64>()
                            / (d as f64).sqrt()
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for t in 0..d {
                    out[i * heads * d + h * d + t] = (0..l)
                        .map(|j| e[j] / z * f64::from(v[j * kv_heads * d + g * d + t]))
                        .sum();
                }
            }
        }
        out
    }

    #[test]
    fn matches_f64_reference_and_thread_counts_agree() {
        for shape in [
            AttentionShape {
                tokens: 1,
                heads: 1,
                kv_heads: 1,
                head_dim: 1,
            },
            AttentionShape {
                tokens: 37,
                heads: 4,
                kv_heads: 1,
                head_dim: 16,
            },
            AttentionShape {
                tokens: 21,
                heads: 20,
                kv_heads: 5,
                head_dim: 128,
            },
            AttentionShape {
                tokens: 50,
                heads: 16,
                kv_heads: 16,
                head_dim: 72,
            },
        ] {
            let (l, hd, kvd) = (
                shape.tokens,
                shape.heads * shape.head_dim,
                shape.kv_heads * shape.head_dim,
            );
            let (q, k, v) = (data(l * hd, 1), data(l * kvd, 2), data(l * kvd, 3));
            let expect = reference(shape, &q, &k, &v);
            let mut first: Option<Vec<f32>> = None;
            for threads in [1, 2, 3] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let mut out = vec![0.0; l * hd];
                let mut scratch = Vec::new();
                pool.install(|| attention(shape, &q, &k, &v, &mut out, &mut scratch))
                    .unwrap();
                for (a, b) in out.iter().zip(&expect) {
                    assert!((f64::from(*a) - b).abs() < 2e-5, "{shape:?}: {a} vs {b}");
                }
                match &first {
                    None => first = Some(out),
                    Some(f) => assert!(f.iter().zip(&out).all(|(a, b)| a.to_bits() == b.to_bits())),
                }
            }
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        let shape = AttentionShape {
            tokens: 2,
            heads: 3,
            kv_heads: 2,
            head_dim: 4,
        };
        let mut s = Vec::new();
        assert!(
            attention(
                shape,
                &[0.0; 24],
                &[0.0; 16],
                &[0.0; 16],
                &mut [0.0; 24],
                &mut s
            )
            .is_err()
        );
        let shape = AttentionShape {
            tokens: 2,
            heads: 2,
            kv_heads: 1,
            head_dim: 4,
        };
        assert!(
            attention(
                shape,
                &[0.0; 16],
                &[0.0; 7],
                &[0.0; 8],
                &mut [0.0; 16],
                &mut s
            )
            .is_err()
        );
    }
}
