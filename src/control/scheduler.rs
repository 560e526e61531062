//! Chunk scheduling: one action per control tick from the current chunk, time-aligned to the
//! observation it was predicted from, and the next observation requested early enough (from the
//! measured inference latency) that the arm does not stall between chunks.

use std::collections::VecDeque;

#[derive(Debug, Clone, PartialEq)]
pub struct SchedulerConfig {
    /// Seconds per control tick (1 / control rate; LIBERO's policies were trained at 20 Hz).
    pub control_dt: f64,
    /// Execute at most this many actions of a chunk (0: all).
    pub actions_per_chunk: usize,
    /// Skip, in a new chunk, as many actions as the arm executed since its observation was
    /// taken (the previous chunk kept running during inference), as real-time chunking does. An
    /// arm that held still during inference skips nothing, however long inference took: on a
    /// CPU a full-size call takes seconds, far longer than a chunk lasts. Off replays every
    /// chunk from its first action.
    pub align_to_observation: bool,
    /// Extra seconds of lead when deciding to ask for the next chunk.
    pub replan_margin_s: f64,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            control_dt: 0.05,
            actions_per_chunk: 0,
            align_to_observation: true,
            replan_margin_s: 0.05,
        }
    }
}

#[derive(Debug, Clone)]
struct Active {
    id: u64,
    actions: Vec<Vec<f32>>,
    next: usize,
}

/// What one control tick does.
#[derive(Debug, Clone, PartialEq)]
pub struct Tick {
    /// The action for this tick, if a chunk is being executed.
    pub action: Option<Vec<f32>>,
    /// (chunk id, index in the chunk) of that action.
    pub source: Option<(u64, usize)>,
    /// Submit the newest observation now (the caller then calls [`ChunkScheduler::requested`]).
    pub request_observation: bool,
}

#[derive(Debug, Clone)]
pub struct ChunkScheduler {
    config: SchedulerConfig,
    active: Option<Active>,
    outstanding: bool,
    /// Actions output since the last observation was requested.
    executed_since_request: usize,
    latencies: VecDeque<f64>,
    /// Chunks that arrived with every action already in the past.
    pub stale_chunks: u64,
}

impl ChunkScheduler {
    pub fn new(config: SchedulerConfig) -> Self {
        Self {
            config,
            active: None,
            outstanding: false,
            executed_since_request: 0,
            latencies: VecDeque::new(),
            stale_chunks: 0,
        }
    }

    /// The latency the scheduler plans with: the largest of the last 16 measured (conservative:
    /// asking early costs a little freshness, asking late stalls the arm).
    pub fn expected_latency(&self) -> Option<f64> {
        self.latencies.iter().copied().reduce(f64::max)
    }

    /// The caller submitted an observation for a new chunk.
    pub fn requested(&mut self) {
        self.outstanding = true;
        self.executed_since_request = 0;
    }

    /// A new chunk for the observation requested last, `latency_s` after its call started.
    pub fn accept(&mut self, id: u64, actions: Vec<Vec<f32>>, latency_s: f64) {
        self.outstanding = false;
        if latency_s.is_finite() && latency_s >= 0.0 {
            self.latencies.push_back(latency_s);
            if self.latencies.len() > 16 {
                self.latencies.pop_front();
            }
        }
        let usable = match self.config.actions_per_chunk {
            0 => actions.len(),
            n => n.min(actions.len()),
        };
        let skip = if self.config.align_to_observation {
            self.executed_since_request
        } else {
            0
        };
        if skip >= usable {
            self.stale_chunks += 1;
            return;
        }
        let mut actions = actions;
        actions.truncate(usable);
        self.active = Some(Active {
            id,
            actions,
            next: skip,
        });
    }

    /// Drops the current chunk (new instruction, e-stop, hold) and any outstanding request.
    pub fn cancel(&mut self) {
        self.active = None;
        self.outstanding = false;
    }

    /// Actions left in the current chunk.
    pub fn remaining(&self) -> usize {
        self.active.as_ref().map_or(0, |a| a.actions.len() - a.next)
    }

    pub fn tick(&mut self) -> Tick {
        let mut tick = Tick {
            action: None,
            source: None,
            request_observation: false,
        };
        if let Some(a) = &mut self.active {
            tick.action = Some(a.actions[a.next].clone());
            tick.source = Some((a.id, a.next));
            a.next += 1;
            self.executed_since_request += 1;
            if a.next == a.actions.len() {
                self.active = None;
            }
        }
        if !self.outstanding {
            let time_left = self.remaining() as f64 * self.config.control_dt;
            let lead =
                self.expected_latency().unwrap_or(f64::INFINITY) + self.config.replan_margin_s;
            tick.request_observation = time_left <= lead;
        }
        tick
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(n: usize) -> Vec<Vec<f32>> {
        (0..n).map(|i| vec![i as f32]).collect()
    }

    #[test]
    fn first_tick_requests_and_chunks_play_in_order() {
        let mut s = ChunkScheduler::new(SchedulerConfig::default());
        let t = s.tick();
        assert!(t.request_observation && t.action.is_none());
        s.requested();
        assert!(!s.tick().request_observation, "one request at a time");
        s.accept(1, chunk(8), 0.01);
        let played: Vec<f32> = (0..8).map(|_| s.tick().action.unwrap()[0]).collect();
        assert_eq!(played, (0..8).map(|i| i as f32).collect::<Vec<_>>());
        assert_eq!(s.tick().action, None);
    }

    #[test]
    fn chunks_skip_what_the_arm_executed_since_their_observation() {
        let mut s = ChunkScheduler::new(SchedulerConfig::default());
        s.requested();
        // The arm held still during a long first inference: nothing is skipped.
        s.accept(1, chunk(8), 5.0);
        assert_eq!(s.tick().source, Some((1, 0)));
        // The next observation is taken now; two more actions run during its inference.
        s.requested();
        s.tick();
        s.tick();
        s.accept(2, chunk(8), 0.1);
        assert_eq!(s.tick().source, Some((2, 2)));
        // A chunk whose whole horizon was executed meanwhile is discarded.
        s.requested();
        for _ in 0..4 {
            s.tick();
        }
        s.accept(3, chunk(4), 0.3);
        assert_eq!(s.stale_chunks, 1);
        assert_eq!(
            s.tick().source,
            Some((2, 7)),
            "the previous chunk continues"
        );
    }

    #[test]
    fn the_next_chunk_is_requested_one_latency_ahead() {
        let config = SchedulerConfig {
            align_to_observation: false,
            replan_margin_s: 0.0,
            ..Default::default()
        };
        let mut s = ChunkScheduler::new(config);
        s.requested();
        // 0.2 s latency at 20 Hz: ask when 4 ticks (0.2 s) or fewer remain.
        s.accept(1, chunk(8), 0.2);
        let requests: Vec<bool> = (0..8).map(|_| s.tick().request_observation).collect();
        assert_eq!(
            requests,
            [false, false, false, true, true, true, true, true]
        );
    }

    #[test]
    fn actions_per_chunk_and_cancel() {
        let config = SchedulerConfig {
            actions_per_chunk: 3,
            ..Default::default()
        };
        let mut s = ChunkScheduler::new(config);
        s.requested();
        s.accept(7, chunk(8), 0.0);
        assert_eq!(s.remaining(), 3);
        s.tick();
        s.cancel();
        assert_eq!(s.remaining(), 0);
        assert!(s.tick().request_observation);
    }
}
