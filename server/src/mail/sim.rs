//! Seeded simulation of several replicas writing one mailbox with no coordination: random
//! appends, flag changes and expunges, random syncs (merges) between replicas, long branches.
//! Every state a replica shows is a view a client may have seen; V1–V5 are checked between every
//! two comparable views of a schedule, and between random causally closed subsets of the final
//! log (views no replica happened to show). A failing schedule prints its seed; replay it with
//! `TERN_SIM_SEED=<seed> cargo test -p tern-server sim`.

use std::collections::BTreeSet;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::invariants::check_pair;
use super::view::{FlagAction, LogOp, MailOp, MailboxState, MessageId, compute, next_floors};
use crate::log::clock::{Dot, VersionVector, WriterId};

#[derive(Clone)]
struct Replica {
    writer: WriterId,
    seq: u64,
    ops: Vec<LogOp>,
    vv: VersionVector,
    lamport: u64,
    /// Kept up to date with `apply_next` where it applies, as `Mailbox` does.
    incremental: Option<MailboxState>,
}

impl Replica {
    fn state(&self) -> MailboxState {
        compute(&self.ops)
    }

    fn write(&mut self, op: MailOp, state: &MailboxState) {
        self.seq += 1;
        self.lamport += 1;
        let dot = Dot {
            writer: self.writer,
            seq: self.seq,
        };
        let (_, modseq_floor) = state.floors();
        let op = LogOp {
            dot,
            lamport: self.lamport,
            deps: self.vv.clone(),
            modseq_floor,
            op,
        };
        // Our own op follows everything we hold: the fast path must take it.
        let mut inc = self
            .incremental
            .take()
            .unwrap_or_else(|| compute(&self.ops));
        let applied = inc.apply_next(&op);
        assert!(applied, "apply_next refused a sequential op: {op:?}");
        self.incremental = Some(inc);
        self.ops.push(op);
        self.vv.include(dot);
    }

    fn receive(&mut self, from: &Replica) {
        let mut new: Vec<&LogOp> = from.ops.iter().filter(|o| !self.vv.covers(o.dot)).collect();
        new.sort_by_key(|o| o.id());
        let mut inc = self.incremental.take();
        for op in new {
            // Fast path only for an op that had seen everything we hold.
            inc = inc.filter(|_| op.deps == self.vv);
            if let Some(state) = inc.as_mut()
                && !state.apply_next(op)
            {
                inc = None;
            }
            self.ops.push(op.clone());
            self.lamport = self.lamport.max(op.lamport);
            self.vv.include(op.dot);
        }
        self.vv.merge(&from.vv);
        self.incremental = Some(inc.unwrap_or_else(|| compute(&self.ops)));
    }
}

/// Parameters of one family of schedules.
#[derive(Clone, Copy, Debug)]
pub struct SimConfig {
    pub replicas: usize,
    pub steps: usize,
    /// Probability that a step is a sync rather than a write: low values grow long branches.
    pub sync_rate: f64,
    pub random_views: usize,
}

/// Runs one schedule; `Err` names the seed, the step and the violated property.
pub fn run_schedule(seed: u64, cfg: SimConfig) -> Result<ScheduleStats, String> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut replicas: Vec<Replica> = (0..cfg.replicas)
        .map(|i| Replica {
            writer: WriterId(i as u64 + 1),
            seq: 0,
            ops: Vec::new(),
            vv: VersionVector::default(),
            lamport: 0,
            incremental: None,
        })
        .collect();
    let mut views: Vec<(VersionVector, MailboxState)> = Vec::new();
    let mut next_msg = 0u64;
    let flags = ["\\Seen", "\\Flagged", "\\Answered", "$Junk"];

    for _ in 0..cfg.steps {
        let r = rng.random_range(0..cfg.replicas);
        if cfg.replicas > 1 && rng.random_bool(cfg.sync_rate) {
            let from = (r + rng.random_range(1..cfg.replicas)) % cfg.replicas;
            let source = replicas[from].clone();
            replicas[r].receive(&source);
        } else {
            let state = replicas[r].state();
            let live: Vec<MessageId> = state.messages.values().map(|m| m.id.clone()).collect();
            let roll = rng.random_range(0..10);
            let op = if live.is_empty() || roll < 5 {
                next_msg += 1;
                MailOp::Add {
                    msg: MessageId(format!("m{next_msg}")),
                    flags: BTreeSet::new(),
                    uid_floor: state.uid_next,
                }
            } else if roll < 8 {
                let msg = live[rng.random_range(0..live.len())].clone();
                let action =
                    [FlagAction::Add, FlagAction::Remove, FlagAction::Set][rng.random_range(0..3)];
                let flag = flags[rng.random_range(0..flags.len())].to_string();
                MailOp::Flags {
                    msg,
                    action,
                    flags: BTreeSet::from([flag]),
                }
            } else {
                let msg = live[rng.random_range(0..live.len())].clone();
                MailOp::Expunge { msg }
            };
            replicas[r].write(op, &state);
        }
        let full = replicas[r].state();
        if replicas[r].incremental.as_ref() != Some(&full) {
            return Err(format!(
                "seed {seed}: replica {r}: incremental state {:?} differs from the full computation {full:?}",
                replicas[r].incremental
            ));
        }
        views.push((replicas[r].vv.clone(), full));
    }

    // Views no replica showed: random causally closed subsets of everything written.
    let mut all = replicas[0].clone();
    for other in replicas.iter().skip(1) {
        all.receive(other);
    }
    for _ in 0..cfg.random_views {
        let vv = random_closed_subset(&all.ops, &all.vv, &mut rng);
        let ops: Vec<LogOp> = all
            .ops
            .iter()
            .filter(|o| vv.covers(o.dot))
            .cloned()
            .collect();
        views.push((vv, compute(&ops)));
    }
    views.push((all.vv.clone(), all.state()));

    let mut pairs = 0;
    for (i, (vv_big, big)) in views.iter().enumerate() {
        let big_ops: Vec<LogOp> = all
            .ops
            .iter()
            .filter(|o| vv_big.covers(o.dot))
            .cloned()
            .collect();
        let headers: Vec<_> = big_ops.iter().map(LogOp::header).collect();
        if next_floors(&headers) != big.floors() {
            return Err(format!(
                "seed {seed}: view {i}: floors from headers {:?} differ from the full state {:?}",
                next_floors(&headers),
                big.floors()
            ));
        }
        for (j, (vv_small, small)) in views.iter().enumerate() {
            if i == j || !vv_small.le(vv_big) {
                continue;
            }
            pairs += 1;
            check_pair(small, big, &big_ops)
                .map_err(|e| format!("seed {seed} ({cfg:?}): views {j} ⊆ {i}: {e}"))?;
        }
    }
    let last = views.last().map(|(_, s)| s);
    Ok(ScheduleStats {
        pairs,
        renumbered: last.map_or(0, |s| s.renumbered),
        adds: next_msg as usize,
    })
}

#[derive(Debug, Default, Clone, Copy)]
pub struct ScheduleStats {
    pub pairs: usize,
    pub renumbered: usize,
    pub adds: usize,
}

/// A random causally closed subset of `ops` (whose closure is `top`).
fn random_closed_subset(ops: &[LogOp], top: &VersionVector, rng: &mut StdRng) -> VersionVector {
    let mut cut = VersionVector(
        top.0
            .iter()
            .map(|(&w, &s)| (w, rng.random_range(0..=s)))
            .collect(),
    );
    // Shrink until every included op has its dependencies included.
    loop {
        let mut changed = false;
        for op in ops {
            if cut.covers(op.dot) && !op.deps.le(&cut) {
                let e = cut.0.entry(op.dot.writer).or_insert(0);
                *e = op.dot.seq - 1;
                changed = true;
            }
        }
        if !changed {
            return cut;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedules() -> u64 {
        std::env::var("TERN_SIM_SCHEDULES")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(if cfg!(debug_assertions) { 500 } else { 10_000 })
    }

    fn run_family(name: &str, cfg: SimConfig, count: u64, salt: u64) {
        if let Some(seed) = std::env::var("TERN_SIM_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
        {
            run_schedule(seed, cfg).unwrap();
            return;
        }
        let mut total = ScheduleStats::default();
        for i in 0..count {
            let seed = salt.wrapping_mul(1_000_003).wrapping_add(i);
            match run_schedule(seed, cfg) {
                Ok(s) => {
                    total.pairs += s.pairs;
                    total.renumbered += s.renumbered;
                    total.adds += s.adds;
                }
                Err(e) => panic!("{name}: {e}\nreplay: TERN_SIM_SEED={seed}"),
            }
        }
        eprintln!(
            "{name}: {count} schedules, {} view pairs checked, {} of {} adds renumbered",
            total.pairs, total.renumbered, total.adds
        );
    }

    #[test]
    fn sim_short_branches_many_replicas() {
        let n = schedules();
        for replicas in 2..=5 {
            let cfg = SimConfig {
                replicas,
                steps: 24,
                sync_rate: 0.5,
                random_views: 6,
            };
            run_family(
                &format!("short branches, {replicas} replicas"),
                cfg,
                n / 4,
                replicas as u64,
            );
        }
    }

    #[test]
    fn sim_long_branches_stale_views() {
        let n = schedules();
        for replicas in [2, 3] {
            let cfg = SimConfig {
                replicas,
                steps: 40,
                sync_rate: 0.1,
                random_views: 10,
            };
            run_family(
                &format!("long branches, {replicas} replicas"),
                cfg,
                n / 10,
                100 + replicas as u64,
            );
        }
    }

    #[test]
    fn flag_only_concurrency_never_renumbers() {
        let mut a = Replica {
            writer: WriterId(1),
            seq: 0,
            ops: vec![],
            vv: VersionVector::default(),
            lamport: 0,
            incremental: None,
        };
        let s = a.state();
        a.write(
            MailOp::Add {
                msg: MessageId("m".into()),
                flags: BTreeSet::new(),
                uid_floor: s.uid_next,
            },
            &s,
        );
        let mut b = a.clone();
        b.writer = WriterId(2);
        b.seq = 0;
        for (r, flag) in [(&mut a, "\\Seen"), (&mut b, "\\Flagged")] {
            let s = r.state();
            r.write(
                MailOp::Flags {
                    msg: MessageId("m".into()),
                    action: FlagAction::Add,
                    flags: BTreeSet::from([flag.to_string()]),
                },
                &s,
            );
        }
        let before = a.state();
        a.receive(&b);
        let after = a.state();
        assert_eq!(after.uid_of(&MessageId("m".into())), Some(1));
        assert_eq!(after.renumbered, 0);
        assert_eq!(after.messages[&1].flags.len(), 2);
        assert!(after.highest_modseq > before.highest_modseq);
        check_pair(&before, &after, &a.ops).unwrap();
    }
}
