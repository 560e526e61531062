//! The packed-model cache: the first load of a published checkpoint directory converts it
//! (`bitvla convert`'s packed file) into a cache directory, and later loads map that file
//! (about a second instead of quantizing 2.4 B weights again).
//!
//! Keys:
//! - an entry is named by the **content** of the checkpoint: a BLAKE3 hash of every file the
//!   loader reads (names, sizes, bytes), of the packed format and of this build's version (a
//!   new version re-converts, so a change of the quantizer can never serve stale codes);
//! - hashing 5.6 GB takes seconds, so a **stat key** (each file's name, size, modification time,
//!   inode and device) remembers which content hash a directory had: a restart with unchanged
//!   files finds its entry without reading the weights, and a file written since (a fine-tune
//!   saved over the old one) changes its stat key (ccache's "direct mode").
//!
//! The first load converts into a pending file of this process and loads from it at once; a
//! background thread then hashes the content, syncs the file to disk and renames it into place
//! (or drops it when an identical checkpoint already has an entry). So the first start costs a
//! conversion plus a packed load, not a hash and a disk flush too. A process that exits before
//! the thread is done leaves no entry (its pending file is removed by the next load);
//! short-lived commands wait for it with [`finish_pending`].
//!
//! Safety:
//! - concurrent writers each convert into their own temporary file, synced to disk and renamed
//!   over the entry atomically: a reader sees no entry or a whole one, never a torn file;
//! - a full disk (checked before converting, and any write error while converting) and an
//!   unusable cache directory only cost the cache: the model then loads from the directory, with
//!   a warning that says why;
//! - an entry that does not load (damaged, truncated) is removed and the directory converted
//!   again;
//! - the cache keeps the [`KEEP`] most recently used entries and deletes older ones.

use super::files::CheckpointFiles;
use super::packed::{self, FORMAT};
use super::{ModelError, Result};
use std::fs;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// Entries kept (most recently used first); older ones are deleted after a conversion.
pub const KEEP: usize = 3;
const ENTRY_EXT: &str = "bitvla";
const PENDING_EXT: &str = "pending";
const INDEX_DIR: &str = "index";

/// The cache directory when none is given: `$BITVLA_CACHE_DIR`, else
/// `$XDG_CACHE_HOME/bitvla_ros/packed`, else `~/.cache/bitvla_ros/packed`.
pub fn default_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("BITVLA_CACHE_DIR").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(d));
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|d| !d.is_empty())
                .map(|h| PathBuf::from(h).join(".cache"))
        })?;
    Some(base.join("bitvla_ros").join("packed"))
}

/// What [`prepare`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum CacheOutcome {
    /// The packed file of this checkpoint was in the cache.
    Hit(PathBuf),
    /// It was not: the directory was converted into this pending file, which a background
    /// thread moves into the cache ([`finish_pending`] waits for it).
    Converted(PathBuf),
    /// The cache could not be used (the reason); load from the directory.
    Unusable(String),
}

/// Background threads still moving converted files into the cache, and their signal.
static PENDING: (std::sync::Mutex<usize>, std::sync::Condvar) =
    (std::sync::Mutex::new(0), std::sync::Condvar::new());

fn pending_count() -> std::sync::MutexGuard<'static, usize> {
    PENDING.0.lock().unwrap_or_else(|e| e.into_inner())
}

/// Waits until every conversion of this process is in the cache (or given up): call before a
/// short-lived process exits.
pub fn finish_pending() {
    let mut n = pending_count();
    if *n > 0 {
        log::info!("packed-model cache: finishing the new entry (hash, sync to disk)");
    }
    while *n > 0 {
        n = PENDING.1.wait(n).unwrap_or_else(|e| e.into_inner());
    }
}

/// Every file the loader reads, in a fixed order.
fn inputs(files: &CheckpointFiles) -> Vec<&Path> {
    let mut v: Vec<&Path> = vec![&files.config, &files.statistics, &files.tokenizer];
    v.extend(files.weights.iter().map(PathBuf::as_path));
    v.push(&files.action_head);
    if let Some(p) = &files.proprio_projector {
        v.push(p);
    }
    v
}

fn version_tag(h: &mut blake3::Hasher) {
    h.update(FORMAT.as_bytes());
    h.update(b"\0bitvla_ros ");
    h.update(env!("CARGO_PKG_VERSION").as_bytes());
    h.update(b"\0");
}

fn file_name(p: &Path) -> &[u8] {
    p.file_name().map_or(&[][..], |n| n.as_encoded_bytes())
}

/// The stat key: names, sizes, modification times, inodes, devices (no file is read).
fn stat_key(files: &CheckpointFiles) -> std::io::Result<String> {
    let mut h = blake3::Hasher::new();
    version_tag(&mut h);
    for p in inputs(files) {
        let m = fs::metadata(p)?;
        h.update(file_name(p));
        for v in [
            m.len(),
            m.mtime() as u64,
            m.mtime_nsec() as u64,
            m.ino(),
            m.dev(),
        ] {
            h.update(&v.to_le_bytes());
        }
    }
    Ok(h.finalize().to_hex().to_string())
}

/// The content key: every byte of every input file, read in pieces (not mapped: the pages do
/// not join the resident set) and hashed in parallel.
pub fn content_key(files: &CheckpointFiles) -> std::io::Result<String> {
    use std::io::Read;
    let mut h = blake3::Hasher::new();
    version_tag(&mut h);
    let mut buf = vec![0u8; 16 << 20];
    for p in inputs(files) {
        let mut f = fs::File::open(p)?;
        let len = f.metadata()?.len();
        h.update(file_name(p));
        h.update(&len.to_le_bytes());
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            h.update_rayon(&buf[..n]);
        }
    }
    Ok(h.finalize().to_hex().to_string())
}

/// Bytes the packed file of `files` will take, about (its ternary codes are an eighth of the
/// bf16 weights; the rest is copied): the weights' size / 3 plus the sidecars, rounded up.
fn estimated_size(files: &CheckpointFiles) -> u64 {
    let size = |p: &Path| fs::metadata(p).map_or(0, |m| m.len());
    let weights: u64 = files.weights.iter().map(|p| size(p)).sum();
    let sidecars = size(&files.action_head) + files.proprio_projector.as_deref().map_or(0, size);
    weights / 3 + sidecars + (64 << 20)
}

/// Free bytes for an unprivileged writer on the file system of `dir`.
fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is a NUL-terminated path, s a valid out-pointer.
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return None;
    }
    Some(s.f_bavail as u64 * s.f_frsize as u64)
}

fn entry_path(dir: &Path, key: &str) -> PathBuf {
    dir.join(format!("{key}.{ENTRY_EXT}"))
}

/// Marks an entry as just used (its modification time orders the eviction).
fn touch(path: &Path) {
    if let Ok(f) = fs::File::options().append(true).open(path) {
        let _ = f.set_modified(SystemTime::now());
    }
}

/// `<pid>-<n>`: a name part no other writer (process, or thread of this one) uses.
fn writer_id() -> String {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{}-{n}", std::process::id())
}

/// Writes `text` to `path` atomically (a temporary file of this process, renamed).
fn write_atomic(path: &Path, text: &str) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp-{}", writer_id()));
    let mut f = fs::File::create(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    fs::rename(&tmp, path)
}

/// Finds or makes the packed file of the checkpoint `files` in `dir`. Errors are the
/// checkpoint's own (a tensor that does not quantize, a file that cannot be read); anything that
/// only concerns the cache comes back as [`CacheOutcome::Unusable`].
pub fn prepare(files: &CheckpointFiles, dir: &Path) -> Result<CacheOutcome> {
    prepare_with(files, dir, estimated_size(files))
}

/// [`prepare`] with the bytes the entry needs free (tests ask for more than any disk has).
pub fn prepare_with(files: &CheckpointFiles, dir: &Path, needed: u64) -> Result<CacheOutcome> {
    let unusable = |what: String| Ok(CacheOutcome::Unusable(what));
    let index = dir.join(INDEX_DIR);
    if let Err(e) = fs::create_dir_all(&index) {
        return unusable(format!(
            "cannot create the cache directory {}: {e}",
            index.display()
        ));
    }
    let stat = stat_key(files).map_err(|e| ModelError::file(&files.config, e))?;
    let stat_file = index.join(&stat);
    // Direct hit: unchanged files whose content key is known.
    if let Ok(key) = fs::read_to_string(&stat_file) {
        let entry = entry_path(dir, key.trim());
        if entry.is_file() {
            touch(&entry);
            return Ok(CacheOutcome::Hit(entry));
        }
    }
    remove_abandoned(dir);
    match free_bytes(dir) {
        Some(free) if free < needed => {
            return unusable(format!(
                "{:.1} GB free in {}, the packed model needs about {:.1} GB",
                free as f64 / 1e9,
                dir.display(),
                needed as f64 / 1e9
            ));
        }
        _ => {}
    }
    // A pending file of our own (process, and a counter for threads): concurrent writers never
    // share one, and each entry appears by an atomic rename.
    let pending = dir.join(format!("{stat}.{}.{PENDING_EXT}", writer_id()));
    let dir_of = files
        .config
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    if let Err(e) = packed::convert_files(&dir_of, files, &pending) {
        return match &e {
            // A file error naming the cache (a full disk, no permission) only costs the cache.
            ModelError::File { path, .. } if path.starts_with(dir) => {
                unusable(format!("writing {}: {e}", pending.display()))
            }
            _ => Err(e),
        };
    }
    let (files, dir, file) = (files.clone(), dir.to_path_buf(), pending.clone());
    *pending_count() += 1;
    let finisher = std::thread::Builder::new()
        .name("bitvla-cache".into())
        .spawn(move || {
            // SAFETY: setpriority on this thread (tid) only lowers its own priority.
            unsafe {
                libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 10);
            }
            if let Err(e) = finish(&files, &dir, &file, &stat_file) {
                log::warn!("packed-model cache: {} not kept: {e}", file.display());
                let _ = fs::remove_file(&file);
            }
            *pending_count() -= 1;
            PENDING.1.notify_all();
        });
    if let Err(e) = finisher {
        *pending_count() -= 1;
        log::warn!("packed-model cache: no thread to finish the entry: {e}");
    }
    Ok(CacheOutcome::Converted(pending))
}

/// Moves a converted `pending` file into the cache under its content key (or drops it when an
/// entry with that content exists), records the stat key, evicts old entries.
fn finish(
    files: &CheckpointFiles,
    dir: &Path,
    pending: &Path,
    stat_file: &Path,
) -> std::io::Result<()> {
    let key = content_key(files)?;
    let entry = entry_path(dir, &key);
    if entry.is_file() {
        // A copy of a checkpoint the cache already has.
        fs::remove_file(pending)?;
        touch(&entry);
    } else {
        fs::File::open(pending)?.sync_all()?;
        fs::rename(pending, &entry)?;
        if let Ok(d) = fs::File::open(dir) {
            d.sync_all()?;
        }
    }
    write_atomic(stat_file, &key)?;
    evict(dir, KEEP);
    Ok(())
}

/// Removes pending and partial files whose process is gone (killed before it finished).
fn remove_abandoned(dir: &Path) {
    let Ok(read) = fs::read_dir(dir) else { return };
    for p in read.filter_map(|e| e.ok()).map(|e| e.path()) {
        let Some(name) = p.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        // <stat>.<pid>-<n>.pending, or convert's <stat>.<pid>-<n>.partial-<pid>
        let pid = if name.ends_with(&format!(".{PENDING_EXT}")) || name.contains(".partial-") {
            name.split('.').nth(1).and_then(|s| s.split('-').next())
        } else {
            None
        };
        if let Some(pid) = pid.and_then(|p| p.parse::<u32>().ok())
            && !Path::new(&format!("/proc/{pid}")).exists()
        {
            log::info!(
                "packed-model cache: removing {} (its process is gone)",
                p.display()
            );
            let _ = fs::remove_file(&p);
        }
    }
}

/// Deletes all but the `keep` most recently used entries, and index records whose entry is gone.
pub fn evict(dir: &Path, keep: usize) {
    let Ok(read) = fs::read_dir(dir) else { return };
    let mut entries: Vec<(SystemTime, PathBuf)> = read
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == ENTRY_EXT))
        .filter_map(|p| Some((fs::metadata(&p).ok()?.modified().ok()?, p)))
        .collect();
    entries.sort_by_key(|e| std::cmp::Reverse(e.0));
    for (_, p) in entries.iter().skip(keep) {
        log::info!(
            "packed-model cache: removing the least recently used {}",
            p.display()
        );
        let _ = fs::remove_file(p);
    }
    if let Ok(read) = fs::read_dir(dir.join(INDEX_DIR)) {
        for e in read.filter_map(|e| e.ok()) {
            let stale = fs::read_to_string(e.path())
                .map(|key| !entry_path(dir, key.trim()).is_file())
                .unwrap_or(true);
            if stale {
                let _ = fs::remove_file(e.path());
            }
        }
    }
}

/// Removes an entry that did not load, so that the next load converts again.
pub fn discard(entry: &Path) {
    log::warn!(
        "packed-model cache: {} did not load; removed, the checkpoint directory is used",
        entry.display()
    );
    let _ = fs::remove_file(entry);
}
