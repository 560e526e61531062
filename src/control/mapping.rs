//! From a policy action to an arm command. BitVLA's LIBERO actions are end-effector deltas for
//! robosuite's OSC_POSE controller (§5.11 of the model spec): dimensions 0–2 translation and 3–5
//! rotation (axis-angle, world/base frame) in [−1, 1], scaled to ±0.05 m and ±0.5 rad per control
//! step, then the gripper. Scales are parameters; another robot sets its own.

use nalgebra::{Isometry3, Translation3, UnitQuaternion, Vector3};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EeScales {
    /// Metres per unit of action per control step.
    pub position_m: f64,
    /// Radians per unit of action per control step.
    pub rotation_rad: f64,
}

impl Default for EeScales {
    fn default() -> Self {
        Self {
            position_m: 0.05,
            rotation_rad: 0.5,
        }
    }
}

fn delta(action: &[f32], scales: EeScales) -> Option<(Vector3<f64>, Vector3<f64>)> {
    let a: Vec<f64> = action.get(..6)?.iter().map(|&v| f64::from(v)).collect();
    Some((
        Vector3::new(a[0], a[1], a[2]) * scales.position_m,
        Vector3::new(a[3], a[4], a[5]) * scales.rotation_rad,
    ))
}

/// The delta as a twist (linear m/s, angular rad/s) held for one control step of `dt` seconds
/// (MoveIt Servo `speed_units`). None when the action has fewer than 6 dimensions.
pub fn twist(action: &[f32], scales: EeScales, dt: f64) -> Option<([f64; 3], [f64; 3])> {
    let (p, r) = delta(action, scales)?;
    let (v, w) = (p / dt, r / dt);
    Some(([v.x, v.y, v.z], [w.x, w.y, w.z]))
}

/// The end-effector pose after applying the delta to `current` (both in the base frame):
/// position + Δp, rotation exp(Δω)·R (world-frame axis-angle, as OSC_POSE).
pub fn pose_target(
    current: &Isometry3<f64>,
    action: &[f32],
    scales: EeScales,
) -> Option<Isometry3<f64>> {
    let (p, r) = delta(action, scales)?;
    let rotation = UnitQuaternion::from_scaled_axis(r) * current.rotation;
    let translation = Translation3::from(current.translation.vector + p);
    Some(Isometry3::from_parts(translation, rotation))
}

/// Clamps a pose's position into the box [min, max] (metres, base frame).
pub fn clamp_to_workspace(pose: &mut Isometry3<f64>, min: [f64; 3], max: [f64; 3]) {
    let t = &mut pose.translation.vector;
    for i in 0..3 {
        t[i] = t[i].clamp(min[i], max[i]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::f64::consts::FRAC_PI_2;

    #[test]
    fn twist_scales_a_step_to_velocity() {
        let (v, w) = twist(
            &[1.0, -0.5, 0.0, 0.0, 0.0, 0.2, 1.0],
            EeScales::default(),
            0.05,
        )
        .unwrap();
        assert!((v[0] - 1.0).abs() < 1e-12 && (v[1] + 0.5).abs() < 1e-12);
        assert!((w[2] - 2.0).abs() < 1e-6);
        assert!(twist(&[0.0; 5], EeScales::default(), 0.05).is_none());
    }

    #[test]
    fn pose_deltas_rotate_in_the_world_frame() {
        // Current: rotated 90° about z. A world-frame +90° about x then maps the tool's y axis.
        let current = Isometry3::from_parts(
            Translation3::new(0.4, 0.0, 0.3),
            UnitQuaternion::from_scaled_axis(Vector3::z() * FRAC_PI_2),
        );
        let scales = EeScales {
            position_m: 0.1,
            rotation_rad: FRAC_PI_2,
        };
        let next = pose_target(&current, &[1.0, 0.0, -1.0, 1.0, 0.0, 0.0], scales).unwrap();
        assert!((next.translation.vector - Vector3::new(0.5, 0.0, 0.2)).norm() < 1e-12);
        // Tool x axis: z-rotation sends it to world y; then world-x rotation sends y to z.
        let tool_x = next.rotation * Vector3::x();
        assert!((tool_x - Vector3::z()).norm() < 1e-12, "{tool_x}");
        let mut far = next;
        clamp_to_workspace(&mut far, [0.0, -0.1, 0.25], [0.45, 0.1, 0.8]);
        assert!((far.translation.vector - Vector3::new(0.45, 0.0, 0.25)).norm() < 1e-12);
    }
}
