//! The dedicated inference thread: a latest-observation mailbox in, results out.
//!
//! The caller (the ROS node's executor, or the replay's bag clock) never waits on inference: it
//! [`InferenceWorker::submit`]s an observation and keeps ticking; a newer observation replaces
//! one that has not started yet (the older one is counted as superseded, never queued), and each
//! finished call comes back on a channel with the observation's stamp and the measured latency.
//! The worker owns its rayon pool, so inference threads never compete with the caller's.

use crate::model::{ActionChunk, Observation, Policy};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

/// One policy call to make.
#[derive(Debug, Clone)]
pub struct Request {
    /// Caller-chosen id (e.g. a sequence number), returned with the result.
    pub id: u64,
    /// The observation's time in the caller's clock (seconds), returned with the result.
    pub stamp: f64,
    pub observation: Observation,
}

/// The outcome of one call.
#[derive(Debug)]
pub struct Response {
    pub id: u64,
    pub stamp: f64,
    /// The chunk, or the error message (bad input, non-finite actions): the worker keeps serving.
    pub result: Result<ActionChunk, String>,
    /// Wall-clock seconds from the start of the call to its end.
    pub latency_s: f64,
}

#[derive(Default)]
struct Mailbox {
    pending: Option<Request>,
    superseded: u64,
    shutdown: bool,
}

pub struct InferenceWorker {
    mailbox: Arc<(Mutex<Mailbox>, Condvar)>,
    results: Receiver<Response>,
    thread: Option<JoinHandle<()>>,
}

impl InferenceWorker {
    /// Starts the inference thread with a pool of `threads` workers (0: all cores).
    pub fn spawn(policy: Policy, threads: usize) -> std::io::Result<Self> {
        let mailbox = Arc::new((Mutex::new(Mailbox::default()), Condvar::new()));
        let (tx, results) = channel();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("bitvla-infer-{i}"))
            .build()
            .map_err(std::io::Error::other)?;
        let inbox = Arc::clone(&mailbox);
        let thread = std::thread::Builder::new()
            .name("bitvla-inference".into())
            .spawn(move || serve(&policy, &pool, &inbox, &tx))?;
        Ok(Self {
            mailbox,
            results,
            thread: Some(thread),
        })
    }

    /// Hands the worker the newest observation; replaces one still waiting.
    pub fn submit(&self, request: Request) {
        let (lock, wake) = &*self.mailbox;
        let mut m = lock.lock().unwrap_or_else(|p| p.into_inner());
        if m.pending.replace(request).is_some() {
            m.superseded += 1;
        }
        wake.notify_one();
    }

    /// Observations replaced before inference started on them.
    pub fn superseded(&self) -> u64 {
        let (lock, _) = &*self.mailbox;
        lock.lock().unwrap_or_else(|p| p.into_inner()).superseded
    }

    /// A finished call, if any (never blocks).
    pub fn try_recv(&self) -> Option<Response> {
        self.results.try_recv().ok()
    }

    /// Waits up to `timeout` for a finished call.
    pub fn recv_timeout(&self, timeout: std::time::Duration) -> Option<Response> {
        self.results.recv_timeout(timeout).ok()
    }
}

impl Drop for InferenceWorker {
    fn drop(&mut self) {
        {
            let (lock, wake) = &*self.mailbox;
            lock.lock().unwrap_or_else(|p| p.into_inner()).shutdown = true;
            wake.notify_all();
        }
        if let Some(t) = self.thread.take() {
            // A call in progress finishes first; its result is dropped with the channel.
            let _ = t.join();
        }
    }
}

/// One policy call on `pool`, timed (the worker's, and the replay's when it runs calls inline).
pub fn call(policy: &Policy, pool: &rayon::ThreadPool, request: &Request) -> Response {
    let start = Instant::now();
    let result = pool
        .install(|| policy.predict(&request.observation))
        .map_err(|e| e.to_string());
    Response {
        id: request.id,
        stamp: request.stamp,
        result,
        latency_s: start.elapsed().as_secs_f64(),
    }
}

fn serve(
    policy: &Policy,
    pool: &rayon::ThreadPool,
    mailbox: &(Mutex<Mailbox>, Condvar),
    results: &Sender<Response>,
) {
    let (lock, wake) = mailbox;
    loop {
        let request = {
            let mut m = lock.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                if m.shutdown {
                    return;
                }
                if let Some(r) = m.pending.take() {
                    break r;
                }
                m = wake.wait(m).unwrap_or_else(|p| p.into_inner());
            }
        };
        if results.send(call(policy, pool, &request)).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::PolicyOptions;
    use crate::model::tiny::{TinyShape, make_tiny};
    use std::time::Duration;

    fn observation(instruction: &str) -> Observation {
        let img = image::RgbImage::from_fn(224, 224, |x, y| image::Rgb([x as u8, y as u8, 3]));
        Observation {
            images: vec![img.clone(), img],
            instruction: instruction.into(),
            proprio: Some(vec![0.0; 8]),
        }
    }

    #[test]
    fn newest_observation_wins_and_errors_do_not_stop_the_worker() {
        let dir = std::env::temp_dir().join(format!("bitvla-runtime-{}", std::process::id()));
        make_tiny(&dir, 1, TinyShape::default()).unwrap();
        let policy = Policy::load(&dir, PolicyOptions::default()).unwrap();
        let expected = policy.predict(&observation("close the drawer")).unwrap();
        let worker = InferenceWorker::spawn(policy, 1).unwrap();

        worker.submit(Request {
            id: 1,
            stamp: 0.0,
            observation: observation(""),
        });
        let bad = worker.recv_timeout(Duration::from_secs(30)).unwrap();
        assert_eq!(bad.id, 1);
        assert!(bad.result.unwrap_err().contains("instruction is empty"));

        // A burst: at most the first starts before the rest arrive; the last always runs.
        for id in 2..=6 {
            worker.submit(Request {
                id,
                stamp: id as f64,
                observation: observation("close the drawer"),
            });
        }
        let mut seen = Vec::new();
        while seen.last() != Some(&6) {
            let r = worker.recv_timeout(Duration::from_secs(30)).unwrap();
            assert_eq!(r.stamp, r.id as f64);
            assert_eq!(r.result.unwrap().actions, expected.actions);
            seen.push(r.id);
        }
        assert_eq!(seen.len() as u64 + worker.superseded(), 5, "{seen:?}");
        drop(worker);
        std::fs::remove_dir_all(dir).ok();
    }
}
