//! Watching a run: queue depths once a second, the drain check, and the progress line.
//!
//! Contract: runs on the coordinator (main) thread, between the start signal and the stop
//! signal. It reads only the broker's queue info (through the admin `Client`) and the relaxed
//! counters the load threads bump; it owns the samples and decides when the run is over: every
//! producer done, publishing over, consumers started, and every queue seen with nothing ready
//! and nothing unacked; or the abort flag; or `drain_timeout_s` past the last publishing phase.
//!
//! Faults handled: a depth query the broker does not answer (that tick is skipped, the run goes
//! on), queues that never drain (a line says so, and the run ends without `drained_at_s`).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use weir_client::Client;

use super::{Sample, Shared};
use crate::scenario::Kind;

/// What watching a run found.
pub(super) struct Watched {
    /// Queue depth once a second, and once more when drained.
    pub(super) samples: Vec<Sample>,
    /// When every queue was first seen empty after publishing ended.
    pub(super) drained_at_s: Option<f64>,
    /// Stopped by the abort flag.
    pub(super) aborted: bool,
    /// When the run ended, s since the epoch.
    pub(super) end_s: f64,
}

/// Samples and draws progress until the run is over (see the module's contract).
pub(super) async fn watch(
    admin: &Client,
    shared: &Shared,
    epoch: Instant,
    publishing_end_s: f64,
    consumers_start_s: f64,
    show_progress: bool,
) -> Watched {
    let s = &shared.scenario;
    let (abort, phase_starts, queue_names) =
        (&shared.abort, &shared.phase_starts, &shared.queue_names);
    let progress = Progress::new(show_progress);
    let mut samples = Vec::new();
    let mut drained_at_s = None;
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut next_sample = 0.0;
    let mut phase_shown = usize::MAX;
    let mut last_depth = (0u64, 0u64, None);
    let mut aborted = false;
    loop {
        tick.tick().await;
        let now_s = epoch.elapsed().as_secs_f64();
        if abort.load(Ordering::Relaxed) {
            aborted = true;
            break;
        }
        let phase = phase_starts.iter().rposition(|p| *p <= now_s).unwrap_or(0);
        if phase != phase_shown && now_s >= 0.0 {
            phase_shown = phase;
            let p = &s.phases[phase];
            let what = if s.kind == Kind::Max {
                "closed loop".to_string()
            } else if p.mean_rate() == 0.0 {
                "quiet".to_string()
            } else {
                format!("{:.0} msgs/s mean", p.mean_rate())
            };
            progress.line(&format!(
                "phase {} ({}): {} for up to {:.1} s",
                phase, p.name, what, p.duration_s
            ));
        }
        let producers_done = shared.producers_done.load(Ordering::Relaxed) >= s.producers;
        let checking_drain =
            producers_done && now_s >= publishing_end_s && now_s >= consumers_start_s;
        if now_s >= next_sample || checking_drain {
            let d = depth(admin, queue_names).await;
            if let Some(d) = d {
                last_depth = d;
                if now_s >= next_sample {
                    samples.push(Sample {
                        t_s: now_s,
                        ready: d.0,
                        unacked: d.1,
                        oldest_ready_age_ms: d.2,
                    });
                    next_sample = (now_s.floor() + 1.0).max(next_sample + 1.0);
                }
                if checking_drain && d.0 == 0 && d.1 == 0 {
                    drained_at_s = Some(now_s);
                    samples.push(Sample {
                        t_s: now_s,
                        ready: 0,
                        unacked: 0,
                        oldest_ready_age_ms: None,
                    });
                    break;
                }
            }
        }
        progress.update(
            &s.phases[phase].name,
            now_s,
            shared.sent.load(Ordering::Relaxed),
            shared.confirmed.load(Ordering::Relaxed),
            shared.delivered.load(Ordering::Relaxed),
            last_depth,
        );
        if now_s > publishing_end_s.max(consumers_start_s) + s.drain_timeout_s {
            progress.line(&format!(
                "the queues did not drain within drain_timeout_s = {} s of the last publishing phase",
                s.drain_timeout_s
            ));
            break;
        }
    }
    let end_s = epoch.elapsed().as_secs_f64();
    progress.finish();
    Watched {
        samples,
        drained_at_s,
        aborted,
        end_s,
    }
}

/// (ready, unacked, oldest ready age) over the queues; `None` if the broker did not answer.
async fn depth(admin: &Client, queues: &[String]) -> Option<(u64, u64, Option<u64>)> {
    let (mut ready, mut unacked, mut oldest) = (0, 0, None::<u64>);
    for q in queues {
        let info = admin.queue_info(q).await.ok()?;
        ready += info.messages_ready;
        unacked += info.messages_unacked;
        if let Some(a) = info.oldest_ready_age_ms {
            oldest = Some(oldest.map_or(a, |o: u64| o.max(a)));
        }
    }
    Some((ready, unacked, oldest))
}

/// The live line (indicatif), or plain lines at phase changes when stdout is not a terminal.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
}

impl Progress {
    fn new(enabled: bool) -> Progress {
        let bar = enabled.then(|| {
            let bar = indicatif::ProgressBar::with_draw_target(
                None,
                indicatif::ProgressDrawTarget::stdout(),
            );
            if let Ok(style) = indicatif::ProgressStyle::with_template("{spinner} {msg}") {
                bar.set_style(style);
            }
            bar
        });
        Progress { bar }
    }

    fn line(&self, text: &str) {
        match &self.bar {
            Some(bar) => bar.println(text),
            None => println!("{text}"),
        }
    }

    fn update(
        &self,
        phase: &str,
        t: f64,
        sent: u64,
        confirmed: u64,
        delivered: u64,
        depth: (u64, u64, Option<u64>),
    ) {
        if let Some(bar) = &self.bar {
            bar.set_message(format!(
                "{t:6.1} s  {phase:<10} sent {sent:>9}  confirmed {confirmed:>9}  delivered {delivered:>9}  \
                 ready {:>8}  unacked {:>6}  oldest {}",
                depth.0,
                depth.1,
                depth
                    .2
                    .map_or("-".to_string(), |ms| format!("{:.1} s", ms as f64 / 1000.0))
            ));
            bar.tick();
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
