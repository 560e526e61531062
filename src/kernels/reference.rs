//! The ground truth for every GEMM kernel: a plain triple loop over unpacked codes, with int32
//! accumulation and the epilogue of the math contract. Independent of the packed layouts (it reads
//! codes back through `TernaryMatrix::code` / `QuantizedActivations::code`), so a layout bug in the
//! packers or kernels cannot hide in it.

use super::{QuantizedActivations, TernaryMatrix};

/// Exact Σ_k q[m,k]·t[n,k], row-major `m × n`.
pub fn matmul_i32(a: &QuantizedActivations, w: &TernaryMatrix) -> Vec<i32> {
    let (m, n, k) = (a.rows(), w.rows(), w.cols());
    let q: Vec<i32> = (0..m * k)
        .map(|i| i32::from(a.code(i / k, i % k).unwrap_or(0)))
        .collect();
    let t: Vec<i32> = w.unpack_codes().into_iter().map(i32::from).collect();
    let mut out = vec![0i32; m * n];
    for row in 0..m {
        for col in 0..n {
            let mut acc = 0i32;
            for kk in 0..k {
                acc += q[row * k + kk] * t[col * k + kk];
            }
            out[row * n + col] = acc;
        }
    }
    out
}

/// The f32 outputs: `(acc as f32) · (γ[n] · d[m]) (+ b[n])`.
pub fn matmul_f32(a: &QuantizedActivations, w: &TernaryMatrix, bias: Option<&[f32]>) -> Vec<f32> {
    let n = w.rows();
    matmul_i32(a, w)
        .into_iter()
        .enumerate()
        .map(|(i, acc)| {
            let (row, col) = (i / n, i % n);
            let y = acc as f32 * (w.column_scales()[col] * a.row_dequant()[row]);
            match bias {
                Some(b) => y + b[col],
                None => y,
            }
        })
        .collect()
}
