//! `bitvla bench bag`: how fast a bag's image stream is read and decoded. Writes a bag of
//! 640x480 rgb8 frames (camera-like: a scene plus sensor noise) twice, with uncompressed and
//! with zstd chunks, then reads each one repeatedly, interleaved: a plain read of every message,
//! and the replay's path (read, CDR-decode the Image, convert to an RGB frame). Throughput is bag
//! bytes per second (the storage file's size over the pass's wall time), medians over the reps;
//! the files stay in the page cache after the first pass, so these are warm-cache numbers.

use crate::bag::episode::render;
use crate::bag::msgs::{Header, Image, decode};
use crate::bag::{BagReader, BagWriter};
use crate::bench::kernels::median;
use std::borrow::Cow;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Debug, Clone)]
pub struct Options {
    /// Approximate size of the image stream [MB].
    pub size_mb: usize,
    pub reps: usize,
    /// Scratch directory (removed afterwards).
    pub dir: PathBuf,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Variant {
    pub chunks: &'static str,
    pub frames: u64,
    pub file_mb: f64,
    pub write_mb_per_s: f64,
    pub read_mb_per_s: f64,
    pub read_decode_mb_per_s: f64,
    /// Image-stream bytes (frames as rgb8) decoded per second: the file's rate times its
    /// compression ratio.
    pub decoded_stream_mb_per_s: f64,
    pub read_s: Vec<f64>,
    pub read_decode_s: Vec<f64>,
    /// The most decompressed chunk data the reader held at once (it reads in log-time order,
    /// holding the chunks that overlap in time, not the file) [MB].
    pub peak_buffered_mb: f64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    pub bench: &'static str,
    pub width: u32,
    pub height: u32,
    pub image_stream_mb: f64,
    pub reps: usize,
    pub variants: Vec<Variant>,
}

const W: u32 = 640;
const H: u32 = 480;

fn frames() -> Vec<Vec<u8>> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    (0..8)
        .map(|i| {
            let mut px = render(W, H, f64::from(i) / 7.0, false);
            for p in &mut px {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                *p = p.wrapping_add((state & 7) as u8);
            }
            px
        })
        .collect()
}

fn write(path: &Path, n: u64, zstd: bool, pool: &[Vec<u8>]) -> anyhow::Result<f64> {
    let start = Instant::now();
    let mut w = BagWriter::create_with(path, zstd)?;
    for i in 0..n {
        let t = 1_000_000_000 + i * 33_333_333;
        w.write(
            "/camera/image_raw",
            t,
            &Image {
                header: Header::new(t as i64, "camera"),
                height: H,
                width: W,
                encoding: "rgb8".into(),
                is_bigendian: 0,
                step: W * 3,
                data: Cow::Borrowed(&pool[(i % pool.len() as u64) as usize]),
            },
        )?;
    }
    w.finish()?;
    Ok(start.elapsed().as_secs_f64())
}

fn read_pass(bag: &BagReader, decode_frames: bool) -> anyhow::Result<(f64, u64, u64)> {
    let start = Instant::now();
    let mut checksum = 0u64;
    let mut failed = None;
    let summary = bag.read(|m| {
        if decode_frames {
            let frame = decode::<Image>(m.data)
                .map_err(|e| e.to_string())
                .and_then(|img| {
                    crate::obs::decode_raw(
                        &img.encoding,
                        img.width,
                        img.height,
                        img.step as usize,
                        &img.data,
                    )
                    .map_err(|e| e.to_string())
                });
            match frame {
                Ok(f) => checksum += u64::from(f.as_raw()[f.as_raw().len() / 2]),
                Err(e) => {
                    failed = Some(e);
                    return ControlFlow::Break(());
                }
            }
        } else {
            checksum += u64::from(m.data[m.data.len() / 2]);
        }
        ControlFlow::Continue(())
    })?;
    if let Some(e) = failed {
        anyhow::bail!("decoding a frame: {e}");
    }
    Ok((
        start.elapsed().as_secs_f64(),
        checksum,
        summary.peak_buffered_bytes,
    ))
}

pub fn run(opts: &Options) -> anyhow::Result<Report> {
    let frame_bytes = (W * H * 3) as u64;
    let n = ((opts.size_mb as u64 * 1_000_000) / frame_bytes).max(1);
    let pool = frames();
    std::fs::create_dir_all(&opts.dir)?;
    let mut bags = Vec::new();
    for (name, zstd) in [("none", false), ("zstd", true)] {
        let path = opts.dir.join(format!("frames_{name}.mcap"));
        let _ = std::fs::remove_file(&path);
        let secs = write(&path, n, zstd, &pool)?;
        let size = std::fs::metadata(&path)?.len() as f64;
        bags.push((
            name,
            BagReader::open(&path)?,
            size,
            secs,
            Vec::new(),
            Vec::new(),
            0u64,
        ));
    }
    for _ in 0..opts.reps {
        for (_, bag, _, _, reads, decodes, peak) in &mut bags {
            let (read_s, _, read_peak) = read_pass(bag, false)?;
            let (decode_s, _, decode_peak) = read_pass(bag, true)?;
            reads.push(read_s);
            decodes.push(decode_s);
            *peak = (*peak).max(read_peak).max(decode_peak);
        }
    }
    let stream_mb = (n * frame_bytes) as f64 / 1e6;
    let variants = bags
        .into_iter()
        .map(|(name, _, size, write_s, mut reads, mut decodes, peak)| {
            let mb = size / 1e6;
            let decode_s = median(&mut decodes.clone());
            Variant {
                chunks: name,
                frames: n,
                file_mb: mb,
                write_mb_per_s: mb / write_s,
                read_mb_per_s: mb / median(&mut reads.clone()),
                read_decode_mb_per_s: mb / decode_s,
                decoded_stream_mb_per_s: stream_mb / decode_s,
                read_s: std::mem::take(&mut reads),
                read_decode_s: std::mem::take(&mut decodes),
                peak_buffered_mb: peak as f64 / 1e6,
            }
        })
        .collect();
    let _ = std::fs::remove_dir_all(&opts.dir);
    Ok(Report {
        bench: "bag",
        width: W,
        height: H,
        image_stream_mb: stream_mb,
        reps: opts.reps,
        variants,
    })
}

impl Report {
    /// The report as lines for a terminal (`bitvla bench bag` without `--json`).
    pub fn print(&self, out: &mut impl std::io::Write) -> std::io::Result<()> {
        writeln!(
            out,
            "{} MB image stream of {}x{} rgb8 frames, median of {} passes (warm cache):",
            self.image_stream_mb.round(),
            self.width,
            self.height,
            self.reps
        )?;
        for v in &self.variants {
            writeln!(
                out,
                "  {:>4} chunks: file {:.0} MB; write {:.0} MB/s; read {:.0} MB/s; read + decode to RGB {:.0} MB/s; chunk data held at most {:.1} MB",
                v.chunks,
                v.file_mb,
                v.write_mb_per_s,
                v.read_mb_per_s,
                v.read_decode_mb_per_s,
                v.peak_buffered_mb
            )?;
        }
        Ok(())
    }
}
