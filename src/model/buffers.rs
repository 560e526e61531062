//! The activation buffers of a forward pass, kept by the policy between calls.

use crate::kernels::QuantizedActivations;

/// Buffers that the vision tower and the language model fill layer after layer (and that the
/// smaller stages reuse for their quantized activations). A [`super::policy::Policy`] keeps one
/// set between calls: a control loop's forward passes then neither allocate these buffers nor
/// fault their pages in again. Every buffer is resized to what a layer needs and entirely
/// overwritten before it is read, so nothing carries over from one call, or one stage, to the
/// next.
#[derive(Debug, Default)]
pub struct ForwardBuffers {
    /// The int8 activations of the ternary layers.
    pub qa: QuantizedActivations,
    /// The ViT's flattened patches.
    pub(crate) cols: Vec<f32>,
    /// The q, k and v projections; q's buffer, free once the attention has run, then takes
    /// the output of the layer's projections that feed a residual add (out_proj, o_proj, fc2,
    /// down_proj).
    pub(crate) qkv: [Vec<f32>; 3],
    /// The attention output.
    pub(crate) attn: Vec<f32>,
    /// The MLP's hidden activations: the ViT's fc1 output, the LLM's relu(gate)² · up.
    pub(crate) hidden: Vec<f32>,
}

/// `buffer` resized to `len` values (none zeroed that it already holds: the caller overwrites
/// them all).
pub(crate) fn sized(buffer: &mut Vec<f32>, len: usize) -> &mut [f32] {
    buffer.resize(len, 0.0);
    &mut buffer[..]
}
