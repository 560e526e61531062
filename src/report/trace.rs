//! What a replay did, tick by tick and call by call, kept for the HTML report: bounded in memory
//! (camera thumbnails are thinned as the replay goes, so an hour-long bag keeps a few hundred).

use crate::control::core::{CommandMode, CoreConfig};
use image::RgbImage;

/// At most this many policy calls keep thumbnails; past it every other one is dropped and only
/// every `2^k`-th call is kept from then on.
pub const MAX_THUMBNAIL_CALLS: usize = 300;
/// Thumbnail size bound [px] (aspect kept).
pub const THUMBNAIL_MAX: (u32, u32) = (160, 120);
const THUMBNAIL_JPEG_QUALITY: u8 = 70;

/// One control tick.
#[derive(Debug, Clone)]
pub struct TickPoint {
    /// Bag time, seconds after the bag's first message.
    pub t_s: f64,
    /// The policy action executed this tick (un-normalized, gated), None while held.
    pub action: Option<Vec<f32>>,
    /// The command published this tick (a hold command included), None when none went out.
    pub command: Option<Vec<f64>>,
    /// Why the node held (`Hold::kind`), None when it executed an action.
    pub hold: Option<&'static str>,
    /// Sequence number of the chunk the action came from.
    pub chunk: Option<u64>,
}

/// One policy call.
#[derive(Debug, Clone)]
pub struct CallPoint {
    pub id: u64,
    /// Bag time of the observation (the tick that asked), seconds after the first message.
    pub t_s: f64,
    /// Wall time of the call, once its chunk was taken.
    pub latency_ms: Option<f64>,
    /// The first action of the chunk it returned.
    pub first_action: Option<Vec<f32>>,
    /// The call's error, when it failed.
    pub error: Option<String>,
    /// JPEG thumbnails of the observation's images (camera order), when this call kept them.
    pub thumbnails: Vec<Vec<u8>>,
}

/// The commanded end-effector path and what its coordinates mean.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum EeFrame {
    /// `ee_pose` mode: the commanded positions, in the command frame.
    Absolute,
    /// `ee_delta_twist` mode: the commanded linear velocity integrated over the control period,
    /// relative to where the end effector was at the first command.
    Integrated,
}

#[derive(Debug, Clone)]
pub struct Trace {
    /// Names of the policy's action dimensions.
    pub action_names: Vec<String>,
    /// Names of the command's values (twist, pose or joint fields).
    pub command_names: Vec<String>,
    pub control_period_s: f64,
    /// The camera topics the policy sees, in observation order.
    pub cameras: Vec<String>,
    pub ticks: Vec<TickPoint>,
    /// The recorded actions (`--recorded-topic`): bag time and values.
    pub recorded: Vec<(f64, Vec<f64>)>,
    pub calls: Vec<CallPoint>,
    /// Thumbnails are kept for every `thumbnail_every`-th call.
    pub thumbnail_every: usize,
    pub ee_frame: Option<EeFrame>,
    /// The commanded end-effector positions: bag time and (x, y, z).
    pub ee_path: Vec<(f64, [f64; 3])>,
    /// Thumbnails that could not be made (the first error).
    pub thumbnail_error: Option<String>,
}

impl Trace {
    pub fn new(
        action_names: Vec<String>,
        command_names: Vec<String>,
        control_period_s: f64,
        cameras: Vec<String>,
        ee_frame: Option<EeFrame>,
    ) -> Self {
        Self {
            action_names,
            command_names,
            control_period_s,
            cameras,
            ticks: Vec::new(),
            recorded: Vec::new(),
            calls: Vec::new(),
            thumbnail_every: 1,
            ee_frame,
            ee_path: Vec::new(),
            thumbnail_error: None,
        }
    }

    /// The trace of a replay whose core runs `config`, for a policy with `action_dim` actions.
    pub fn for_core(config: &CoreConfig, action_dim: usize, cameras: Vec<String>) -> Self {
        let ee_frame = match config.mode {
            CommandMode::EeDeltaTwist => Some(EeFrame::Integrated),
            CommandMode::EePose => Some(EeFrame::Absolute),
            CommandMode::JointTrajectory | CommandMode::JointPositions => None,
        };
        Self::new(
            crate::bag::msgs::dimension_names(action_dim),
            config.mode.value_names(&config.joints.names),
            config.dt,
            cameras,
            ee_frame,
        )
    }

    /// A policy call on `images` at bag time `t_s`.
    pub fn on_call(&mut self, id: u64, t_s: f64, images: &[RgbImage]) {
        let keep = self.calls.len().is_multiple_of(self.thumbnail_every);
        let mut thumbnails = Vec::new();
        if keep {
            for img in images {
                match thumbnail_jpeg(img) {
                    Ok(jpeg) => thumbnails.push(jpeg),
                    Err(e) => {
                        self.thumbnail_error.get_or_insert(e);
                        thumbnails.clear();
                        break;
                    }
                }
            }
        }
        self.calls.push(CallPoint {
            id,
            t_s,
            latency_ms: None,
            first_action: None,
            error: None,
            thumbnails,
        });
        self.thin_thumbnails();
    }

    /// Keeps at most [`MAX_THUMBNAIL_CALLS`] calls with thumbnails: past it, every other kept
    /// one is dropped and the stride doubles.
    fn thin_thumbnails(&mut self) {
        let kept = self
            .calls
            .iter()
            .filter(|c| !c.thumbnails.is_empty())
            .count();
        if kept <= MAX_THUMBNAIL_CALLS {
            return;
        }
        self.thumbnail_every *= 2;
        let every = self.thumbnail_every;
        for (i, c) in self.calls.iter_mut().enumerate() {
            if !i.is_multiple_of(every) {
                c.thumbnails = Vec::new();
            }
        }
    }

    fn call_mut(&mut self, id: u64) -> Option<&mut CallPoint> {
        // Calls are answered in order: search from the end.
        self.calls.iter_mut().rev().find(|c| c.id == id)
    }

    /// The chunk of call `id` was taken.
    pub fn on_chunk(&mut self, id: u64, latency_s: f64, first_action: Option<&[f32]>) {
        if let Some(c) = self.call_mut(id) {
            c.latency_ms = Some(latency_s * 1e3);
            c.first_action = first_action.map(<[f32]>::to_vec);
        }
    }

    /// Call `id` failed.
    pub fn on_failure(&mut self, id: u64, error: &str) {
        if let Some(c) = self.call_mut(id) {
            c.error = Some(error.to_owned());
        }
    }

    pub fn on_tick(&mut self, tick: TickPoint) {
        if let Some(frame) = self.ee_frame
            && let Some(v) = &tick.command
            && v.len() >= 3
        {
            let p = match (frame, self.ee_path.last()) {
                (EeFrame::Absolute, _) => [v[0], v[1], v[2]],
                (EeFrame::Integrated, None) => [0.0; 3],
                (EeFrame::Integrated, Some((_, p))) => {
                    let dt = self.control_period_s;
                    [p[0] + v[0] * dt, p[1] + v[1] * dt, p[2] + v[2] * dt]
                }
            };
            self.ee_path.push((tick.t_s, p));
        }
        self.ticks.push(tick);
    }

    pub fn on_recorded(&mut self, t_s: f64, values: Vec<f64>) {
        self.recorded.push((t_s, values));
    }
}

/// `img` shrunk to fit [`THUMBNAIL_MAX`], as JPEG.
fn thumbnail_jpeg(img: &RgbImage) -> Result<Vec<u8>, String> {
    let (w, h) = img.dimensions();
    let (mw, mh) = THUMBNAIL_MAX;
    let scale = (f64::from(mw) / f64::from(w.max(1))).min(f64::from(mh) / f64::from(h.max(1)));
    let small = if scale < 1.0 {
        let tw = ((f64::from(w) * scale).round() as u32).max(1);
        let th = ((f64::from(h) * scale).round() as u32).max(1);
        image::imageops::thumbnail(img, tw, th)
    } else {
        img.clone()
    };
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, THUMBNAIL_JPEG_QUALITY)
        .encode_image(&small)
        .map_err(|e| format!("encoding a camera thumbnail: {e}"))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thumbnails_stay_bounded_and_evenly_spaced() {
        let img = RgbImage::from_fn(64, 48, |x, y| image::Rgb([x as u8, y as u8, 0]));
        let mut t = Trace::new(vec![], vec![], 0.05, vec!["/c".into()], None);
        for id in 0..1000 {
            t.on_call(id, id as f64 * 0.1, std::slice::from_ref(&img));
        }
        let kept: Vec<usize> = (0..t.calls.len())
            .filter(|&i| !t.calls[i].thumbnails.is_empty())
            .collect();
        assert!(kept.len() <= MAX_THUMBNAIL_CALLS, "{}", kept.len());
        assert!(kept.len() > MAX_THUMBNAIL_CALLS / 2, "{}", kept.len());
        assert!(kept.iter().all(|i| i % t.thumbnail_every == 0));
        assert_eq!(kept.len(), 1000_usize.div_ceil(t.thumbnail_every));
        let jpeg = &t.calls[0].thumbnails[0];
        let back = image::load_from_memory(jpeg).expect("a JPEG");
        assert_eq!((back.width(), back.height()), (64, 48));
    }

    #[test]
    fn twist_path_integrates_the_linear_velocity() {
        let mut t = Trace::new(vec![], vec![], 0.5, vec![], Some(EeFrame::Integrated));
        for i in 0..3 {
            t.on_tick(TickPoint {
                t_s: f64::from(i) * 0.5,
                action: None,
                command: Some(vec![0.1, 0.0, -0.2, 0.0, 0.0, 0.0]),
                hold: None,
                chunk: None,
            });
        }
        let last = t.ee_path.last().expect("a path").1;
        assert!((last[0] - 0.1).abs() < 1e-12 && (last[2] + 0.2).abs() < 1e-12);
    }
}
