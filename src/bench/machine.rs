//! What the benchmark reports about the machine, and how it decides a run was noisy
//! (`shared/spec/kernels.md` §5.1, §5.4): CPU model and features, load average, and the CPU time
//! other processes used during a measurement window.

use std::time::Instant;

/// CPU model name (Linux `/proc/cpuinfo`), or the architecture.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name") || l.starts_with("Model"))
                .and_then(|l| l.split(':').nth(1))
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

/// The kernel-relevant CPU features detected at run time.
pub fn cpu_features() -> Vec<&'static str> {
    let mut out = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! probe {
            ($($f:tt),*) => {$(
                if std::arch::is_x86_feature_detected!($f) {
                    out.push($f);
                }
            )*};
        }
        probe!(
            "avx2",
            "fma",
            "avx512f",
            "avx512bw",
            "avx512vl",
            "avx512vnni",
            "avxvnni",
            "avx512bf16"
        );
    }
    #[cfg(target_arch = "aarch64")]
    {
        macro_rules! probe {
            ($($f:tt),*) => {$(
                if std::arch::is_aarch64_feature_detected!($f) {
                    out.push($f);
                }
            )*};
        }
        probe!("neon", "dotprod", "i8mm", "sve");
    }
    out
}

/// The 1-minute load average (Linux), if available.
pub fn loadavg_1m() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Jiffies per second for /proc accounting (USER_HZ is 100 on every Linux ABI).
const USER_HZ: f64 = 100.0;

fn total_busy_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let cpu: Vec<f64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...: busy = all but idle and iowait
    let busy: f64 = cpu
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, v)| v)
        .sum();
    Some(busy / USER_HZ)
}

fn own_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // fields after ")" start at field 3 (state); utime, stime are fields 14 and 15.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / USER_HZ)
}

/// Measures how many CPUs' worth of time *other* processes used between `start` and `finish`.
pub struct OtherCpu {
    wall: Instant,
    busy: Option<f64>,
    own: Option<f64>,
}

impl OtherCpu {
    pub fn start() -> Self {
        Self {
            wall: Instant::now(),
            busy: total_busy_seconds(),
            own: own_seconds(),
        }
    }
    /// Average number of cores used by other processes during the window (None if unknown).
    pub fn finish(&self) -> Option<f64> {
        let mut total = OtherCpuTotal::default();
        total.add(self);
        total.cores()
    }
}

/// The CPU time of other processes summed over several windows, for a measurement spread over
/// time (the kernel benchmark visits each shape once per round). /proc counts in 10 ms ticks,
/// so one short window says little, but the sums over all of a shape's windows are unbiased.
#[derive(Debug, Default, Clone)]
pub struct OtherCpuTotal {
    wall: f64,
    other: f64,
    /// A window could not be read (no /proc): the total is unknown.
    unknown: bool,
}

impl OtherCpuTotal {
    /// Adds the window from `window`'s start to now.
    pub fn add(&mut self, window: &OtherCpu) {
        self.wall += window.wall.elapsed().as_secs_f64();
        let busy = total_busy_seconds().zip(window.busy).map(|(b, b0)| b - b0);
        let own = own_seconds().zip(window.own).map(|(o, o0)| o - o0);
        match busy.zip(own) {
            Some((busy, own)) => self.other += busy - own,
            None => self.unknown = true,
        }
    }

    /// Average number of cores other processes used over the windows (None if unknown or if the
    /// windows add up to less than 50 ms).
    pub fn cores(&self) -> Option<f64> {
        (!self.unknown && self.wall > 0.05).then(|| (self.other / self.wall).max(0.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Windows add up: two of 30 ms make a measurement, one does not.
    #[test]
    #[cfg(target_os = "linux")]
    fn other_cpu_sums_its_windows() {
        let window = || {
            let w = OtherCpu::start();
            std::thread::sleep(std::time::Duration::from_millis(30));
            w
        };
        let mut total = OtherCpuTotal::default();
        total.add(&window());
        assert_eq!(total.cores(), None, "30 ms is too short to measure");
        total.add(&window());
        let cores = total.cores().expect("two windows make 60 ms");
        // Other processes of the machine may use any number of its CPUs.
        assert!(cores.is_finite() && cores >= 0.0, "{cores}");
    }
}
