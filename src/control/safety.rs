//! The safety gate every command passes: holds (no command, or a zero command, per output mode)
//! for stale cameras, a missing instruction, an engaged e-stop, a missing chunk or non-finite
//! values, and per-axis clamps on what does pass.

#[derive(Debug, Clone, PartialEq)]
pub struct SafetyConfig {
    /// Per-dimension bound on |action| after un-normalization (empty: no clamp).
    pub max_abs: Vec<f32>,
    /// A camera frame older than this holds the output.
    pub stale_after_s: f64,
}

impl Default for SafetyConfig {
    fn default() -> Self {
        Self {
            max_abs: Vec::new(),
            stale_after_s: 0.5,
        }
    }
}

/// The state of the inputs at one tick.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct SafetyInputs {
    /// Stamp of the newest camera frame (all cameras: the oldest of their newest frames).
    pub newest_frame: Option<f64>,
    pub has_instruction: bool,
    pub estop: bool,
}

/// Why no command goes out this tick.
#[derive(Debug, Clone, PartialEq)]
pub enum Hold {
    EStop,
    NoInstruction,
    NoCamera,
    StaleCamera {
        age_s: f64,
    },
    NoChunk,
    NonFinite {
        dim: usize,
    },
    /// ee_pose mode without a current end-effector pose to apply the delta to.
    NoPose,
    /// A joint mode without the current positions of the commanded joints.
    NoJointState,
}

impl Hold {
    /// A stable name for counting holds (reports, diagnostics).
    pub fn kind(&self) -> &'static str {
        match self {
            Hold::EStop => "estop",
            Hold::NoInstruction => "no_instruction",
            Hold::NoCamera => "no_camera",
            Hold::StaleCamera { .. } => "stale_camera",
            Hold::NoChunk => "no_chunk",
            Hold::NonFinite { .. } => "non_finite",
            Hold::NoPose => "no_ee_pose",
            Hold::NoJointState => "no_joint_state",
        }
    }
}

impl std::fmt::Display for Hold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Hold::EStop => write!(f, "e-stop engaged"),
            Hold::NoInstruction => write!(f, "waiting for an instruction"),
            Hold::NoCamera => write!(f, "no camera frame yet"),
            Hold::StaleCamera { age_s } => write!(f, "camera frame is {age_s:.2} s old"),
            Hold::NoChunk => write!(f, "waiting for the first action chunk"),
            Hold::NonFinite { dim } => write!(f, "non-finite action value in dimension {dim}"),
            Hold::NoPose => write!(f, "no current end-effector pose on the ee_pose topic yet"),
            Hold::NoJointState => write!(
                f,
                "no current position for every commanded joint on the joint_states topic"
            ),
        }
    }
}

impl SafetyConfig {
    /// The command to send for `action` at `now`, clamped, or the reason to hold.
    pub fn gate(
        &self,
        now: f64,
        inputs: SafetyInputs,
        action: Option<&[f32]>,
    ) -> Result<Vec<f32>, Hold> {
        if inputs.estop {
            return Err(Hold::EStop);
        }
        if !inputs.has_instruction {
            return Err(Hold::NoInstruction);
        }
        let frame = inputs.newest_frame.ok_or(Hold::NoCamera)?;
        let age_s = now - frame;
        if age_s > self.stale_after_s {
            return Err(Hold::StaleCamera { age_s });
        }
        let action = action.ok_or(Hold::NoChunk)?;
        if let Some(dim) = action.iter().position(|v| !v.is_finite()) {
            return Err(Hold::NonFinite { dim });
        }
        Ok(action
            .iter()
            .enumerate()
            .map(|(i, &v)| match self.max_abs.get(i) {
                Some(&m) => v.clamp(-m, m),
                None => v,
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok_inputs() -> SafetyInputs {
        SafetyInputs {
            newest_frame: Some(9.9),
            has_instruction: true,
            estop: false,
        }
    }

    #[test]
    fn holds_in_priority_order() {
        let s = SafetyConfig::default();
        let a = [0.1f32, 0.2];
        let gate = |i: SafetyInputs, a: Option<&[f32]>| s.gate(10.0, i, a);
        assert_eq!(
            gate(
                SafetyInputs {
                    estop: true,
                    ..ok_inputs()
                },
                Some(&a)
            ),
            Err(Hold::EStop)
        );
        assert_eq!(
            gate(
                SafetyInputs {
                    has_instruction: false,
                    ..ok_inputs()
                },
                Some(&a)
            ),
            Err(Hold::NoInstruction)
        );
        assert_eq!(
            gate(
                SafetyInputs {
                    newest_frame: None,
                    ..ok_inputs()
                },
                Some(&a)
            ),
            Err(Hold::NoCamera)
        );
        assert!(matches!(
            gate(
                SafetyInputs {
                    newest_frame: Some(9.0),
                    ..ok_inputs()
                },
                Some(&a)
            ),
            Err(Hold::StaleCamera { .. })
        ));
        assert_eq!(gate(ok_inputs(), None), Err(Hold::NoChunk));
        assert_eq!(
            gate(ok_inputs(), Some(&[0.0, f32::NAN])),
            Err(Hold::NonFinite { dim: 1 })
        );
        assert_eq!(gate(ok_inputs(), Some(&a)), Ok(a.to_vec()));
    }

    #[test]
    fn clamps_per_axis() {
        let s = SafetyConfig {
            max_abs: vec![0.5, 0.1],
            ..Default::default()
        };
        assert_eq!(
            s.gate(10.0, ok_inputs(), Some(&[2.0, -3.0, 7.0])),
            Ok(vec![0.5, -0.1, 7.0])
        );
    }
}
