//! The packed-model cache: the first load of a checkpoint directory converts it, later loads map
//! the entry and predict exactly what the directory does; a rewritten checkpoint is converted
//! again, a copy shares the entry, concurrent loads leave one whole entry, damaged entries are
//! replaced, an unusable cache (no space, not a directory) only costs the cache, old entries are
//! evicted and abandoned pending files removed.

use bitvla_ros::model::cache::{self, CacheOutcome, KEEP};
use bitvla_ros::model::files::CheckpointFiles;
use bitvla_ros::model::tiny::{ScratchModel, TinyShape};
use bitvla_ros::model::{Observation, Policy, PolicyOptions};
use std::path::{Path, PathBuf};

/// A temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let d = std::env::temp_dir().join(format!("bitvla-cachedir-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Self(d)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn model(tag: &str, seed: u64) -> ScratchModel {
    ScratchModel::new(&format!("cache-{tag}"), seed, TinyShape::default()).unwrap()
}

fn with_ext(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == ext))
        .collect();
    v.sort();
    v
}

fn entries(dir: &Path) -> Vec<PathBuf> {
    with_ext(dir, "bitvla")
}

/// Files of the cache that are neither entries nor the index (pending, partial, temporary).
fn leftovers(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_none_or(|x| x != "bitvla") && !p.ends_with("index"))
        .collect()
}

fn prepare(model: &Path, dir: &Path) -> CacheOutcome {
    cache::prepare(&CheckpointFiles::find(model).unwrap(), dir).unwrap()
}

fn actions(policy: &Policy) -> Vec<f32> {
    let img = image::RgbImage::from_fn(224, 224, |x, y| image::Rgb([x as u8, y as u8, 7]));
    let obs = Observation {
        images: vec![img.clone(), img],
        instruction: "pick up the bowl".into(),
        proprio: Some(vec![0.1; 8]),
    };
    policy.predict(&obs).unwrap().actions
}

fn cached(dir: &Path) -> PolicyOptions {
    PolicyOptions {
        cache_dir: Some(dir.to_path_buf()),
        ..Default::default()
    }
}

#[test]
fn first_load_converts_later_loads_hit_and_predict_the_same() {
    let m = model("hit", 1);
    let c = TempDir::new("hit");
    let direct = actions(&Policy::load(&m, PolicyOptions::default()).unwrap());
    let first = Policy::load(&m, cached(&c.0)).unwrap();
    cache::finish_pending();
    assert_eq!(entries(&c.0).len(), 1, "{:?}", leftovers(&c.0));
    assert!(leftovers(&c.0).is_empty(), "{:?}", leftovers(&c.0));
    assert!(matches!(prepare(&m, &c.0), CacheOutcome::Hit(_)));
    let second = Policy::load(&m, cached(&c.0)).unwrap();
    // Bit for bit what the directory gives, from the pending file and from the entry.
    assert_eq!(actions(&first), direct);
    assert_eq!(actions(&second), direct);
}

#[test]
fn a_rewritten_checkpoint_is_converted_again_and_a_copy_shares_the_entry() {
    let m = model("rewrite", 2);
    let c = TempDir::new("rewrite");
    assert!(matches!(prepare(&m, &c.0), CacheOutcome::Converted(_)));
    cache::finish_pending();
    // A copy elsewhere: its stat key is new, its content is not: no second entry.
    let copy = TempDir::new("rewrite-copy");
    for e in std::fs::read_dir(&*m).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, copy.0.join(p.file_name().unwrap())).unwrap();
    }
    assert!(matches!(prepare(&copy.0, &c.0), CacheOutcome::Converted(_)));
    cache::finish_pending();
    assert_eq!(entries(&c.0).len(), 1);
    assert!(matches!(prepare(&copy.0, &c.0), CacheOutcome::Hit(_)));
    // The same file rewritten with other weights (a fine-tune saved over it): a new entry.
    let before = actions(&Policy::load(&m, cached(&c.0)).unwrap());
    let shard = m.join("model-00002-of-00002.safetensors");
    let mut data = std::fs::read(&shard).unwrap();
    let n = u64::from_le_bytes(data[..8].try_into().unwrap()) as usize;
    let len = data.len();
    // Negate every bf16 weight of the second half of the data (sign bits): finite, different.
    let half = 8 + n + (len - 8 - n) / 4 * 2;
    for i in (half + 1..len).step_by(2) {
        data[i] ^= 0x80;
    }
    std::fs::write(&shard, data).unwrap();
    assert!(matches!(prepare(&m, &c.0), CacheOutcome::Converted(_)));
    cache::finish_pending();
    assert_eq!(entries(&c.0).len(), 2);
    let after = Policy::load(&m, cached(&c.0)).unwrap();
    assert_eq!(
        actions(&after),
        actions(&Policy::load(&m, PolicyOptions::default()).unwrap())
    );
    assert_ne!(actions(&after), before);
}

#[test]
fn concurrent_first_loads_leave_one_whole_entry() {
    let m = model("concurrent", 3);
    let c = TempDir::new("concurrent");
    let direct = actions(&Policy::load(&m, PolicyOptions::default()).unwrap());
    let results: Vec<Vec<f32>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| s.spawn(|| actions(&Policy::load(&m, cached(&c.0)).unwrap())))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    cache::finish_pending();
    assert!(results.iter().all(|a| *a == direct));
    assert_eq!(entries(&c.0).len(), 1);
    assert!(leftovers(&c.0).is_empty(), "{:?}", leftovers(&c.0));
    // And from other processes: `bitvla` started twice at once on the same directory. (A test
    // cross-built for aarch64 runs under qemu-user, which cannot start an aarch64 child: that
    // part is skipped there, and says so.)
    let bin = env!("CARGO_BIN_EXE_bitvla");
    let runs_here = std::process::Command::new(bin)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !runs_here {
        eprintln!(
            "SKIPPED: the bitvla binary does not run here (an emulated cross build); the two-process check needs it"
        );
        return;
    }
    let c2 = TempDir::new("concurrent-procs");
    let img = c2.0.join("img.png");
    image::RgbImage::from_pixel(64, 64, image::Rgb([90, 20, 200]))
        .save(&img)
        .unwrap();
    let runs: Vec<_> = (0..2)
        .map(|_| {
            std::process::Command::new(bin)
                .args(["run", "--model"])
                .arg(&*m)
                .arg("--image")
                .arg(&img)
                .args([
                    "--instruction",
                    "pick",
                    "--proprio",
                    "0,0,0,0,0,0,0,0",
                    "--json",
                    "--cache-dir",
                ])
                .arg(c2.0.join("cache"))
                .output()
                .unwrap()
        })
        .collect();
    for r in &runs {
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    }
    assert_eq!(entries(&c2.0.join("cache")).len(), 1);
    assert!(leftovers(&c2.0.join("cache")).is_empty());
}

#[test]
fn a_damaged_entry_is_replaced() {
    let m = model("damaged", 4);
    let c = TempDir::new("damaged");
    let direct = actions(&Policy::load(&m, PolicyOptions::default()).unwrap());
    Policy::load(&m, cached(&c.0)).unwrap();
    cache::finish_pending();
    let entry = entries(&c.0).pop().unwrap();
    let len = std::fs::metadata(&entry).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&entry)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    // Still loads (from the directory), and the damaged entry is gone.
    assert_eq!(actions(&Policy::load(&m, cached(&c.0)).unwrap()), direct);
    assert!(!entry.exists());
    // The next load converts again.
    assert!(matches!(prepare(&m, &c.0), CacheOutcome::Converted(_)));
    cache::finish_pending();
    assert_eq!(entries(&c.0).len(), 1);
}

#[test]
fn an_unusable_cache_only_costs_the_cache() {
    let m = model("unusable", 5);
    let files = CheckpointFiles::find(&m).unwrap();
    let c = TempDir::new("unusable");
    // No space: checked before converting, nothing written.
    match cache::prepare_with(&files, &c.0, u64::MAX).unwrap() {
        CacheOutcome::Unusable(why) => assert!(why.contains("free"), "{why}"),
        other => panic!("{other:?}"),
    }
    assert!(entries(&c.0).is_empty() && leftovers(&c.0).is_empty());
    // The cache "directory" is a file: the policy loads from the checkpoint all the same.
    let file = c.0.join("not-a-dir");
    std::fs::write(&file, b"x").unwrap();
    assert!(matches!(
        cache::prepare(&files, &file).unwrap(),
        CacheOutcome::Unusable(_)
    ));
    let direct = actions(&Policy::load(&m, PolicyOptions::default()).unwrap());
    assert_eq!(actions(&Policy::load(&m, cached(&file)).unwrap()), direct);
    // A broken checkpoint is the checkpoint's error, not the cache's.
    std::fs::write(m.join("config.json"), b"{").unwrap();
    let err = Policy::load(&m, cached(&c.0))
        .err()
        .expect("an error")
        .to_string();
    assert!(err.contains("config.json"), "{err}");
}

#[test]
fn old_entries_are_evicted_and_abandoned_files_removed() {
    let c = TempDir::new("evict");
    let models: Vec<ScratchModel> = (0..KEEP as u64 + 1)
        .map(|i| model(&format!("evict{i}"), 10 + i))
        .collect();
    for m in &models {
        assert!(matches!(prepare(m, &c.0), CacheOutcome::Converted(_)));
        cache::finish_pending();
        // Distinct modification times for the least-recently-used order.
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(entries(&c.0).len(), KEEP);
    // The oldest one went; the newest are hits.
    assert!(matches!(
        prepare(&models[0], &c.0),
        CacheOutcome::Converted(_)
    ));
    cache::finish_pending();
    assert!(matches!(prepare(&models[KEEP], &c.0), CacheOutcome::Hit(_)));
    // A pending file of a process that is gone (pids stop at 2^22) is removed by the next load.
    let abandoned = c.0.join("0123.4194999-0.pending");
    std::fs::write(&abandoned, b"half a model").unwrap();
    let ours = c.0.join(format!("0123.{}-99.pending", std::process::id()));
    std::fs::write(&ours, b"in progress").unwrap();
    let m = model("evict-new", 99);
    assert!(matches!(prepare(&m, &c.0), CacheOutcome::Converted(_)));
    cache::finish_pending();
    assert!(!abandoned.exists());
    assert!(ours.exists(), "a live process's pending file stays");
}
