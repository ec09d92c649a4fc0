//! Exhaustive model check of the UID/MODSEQ rule with stateright.
//!
//! A few replicas write one mailbox with no coordination: appends, flag changes and expunges of
//! messages live in their own view, and full syncs ("receive everything that replica has"), in
//! every interleaving, until a global budget of ops is written. Ops are built exactly as in
//! `sim.rs`: dot, Lamport time, deps = everything the writer has seen, floors from the writer's
//! view.
//!
//! The property is stronger than "the views the replicas showed are consistent": in every
//! reachable state, every causally closed subset of all the ops written (a view some server may
//! hold after quorum reads) is computed, and V1–V5 are checked for every pair `S ⊆ O` of them.
//! It also checks that a view does not depend on the order its ops are read in, and that the
//! floors computed from the plaintext headers alone (`next_floors`) match the full state.
//!
//! Reductions, both sound for that property:
//! - it depends only on the set `U` of ops written, so its result is cached per `U`;
//! - syncs are only explored while ops remain to be written. A sync changes what later writes
//!   see, but not `U`, and any view a sync could still build is a down-set of `U`, which the
//!   property enumerates anyway.
//!
//! `cargo test -p tern-server --profile ci mail::model` runs every configuration; a debug build
//! runs only the smallest one (3 replicas × 3 ops).

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::Instant;

use stateright::{Checker, HasDiscoveries, Model, Property};

use super::invariants::check_pair;
use super::view::{FlagAction, LogOp, MailOp, MailboxState, MessageId, compute, next_floors};
use crate::log::clock::{Dot, VersionVector, WriterId};

/// The flag changes a replica may make to a live message: two flag names, every action.
const FLAG_CHANGES: [(FlagAction, &str); 3] = [
    (FlagAction::Add, "\\Seen"),
    (FlagAction::Remove, "\\Seen"),
    (FlagAction::Set, "\\Flagged"),
];

/// A deliberate bug in how writers fill in their ops, to show the check can fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    /// Every op claims `modseq_floor = 1`, whatever its writer had seen.
    ModseqFloorOne,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct State {
    /// Every op written (the union of the replicas), sorted by dot.
    ops: Vec<LogOp>,
    /// `seen[r][w]`: how many ops of writer `w` replica `r` holds. A replica's ops are the ops
    /// of `ops` this covers, always a causally closed set.
    seen: Vec<Vec<u8>>,
}

fn writer(r: usize) -> WriterId {
    WriterId(r as u64 + 1)
}

impl State {
    fn covers(&self, r: usize, dot: Dot) -> bool {
        u64::from(self.seen[r][dot.writer.0 as usize - 1]) >= dot.seq
    }

    fn view(&self, r: usize) -> Vec<LogOp> {
        self.ops
            .iter()
            .filter(|o| self.covers(r, o.dot))
            .cloned()
            .collect()
    }

    fn version_vector(&self, r: usize) -> VersionVector {
        VersionVector(
            self.seen[r]
                .iter()
                .enumerate()
                .filter(|&(_, &n)| n > 0)
                .map(|(w, &n)| (writer(w), u64::from(n)))
                .collect(),
        )
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Action {
    Append {
        replica: usize,
    },
    Flags {
        replica: usize,
        msg: MessageId,
        action: FlagAction,
        flag: &'static str,
    },
    Expunge {
        replica: usize,
        msg: MessageId,
    },
    /// DELETE of the mailbox.
    ExpungeAll {
        replica: usize,
    },
    /// An expunged message moved back (MOVE keeps the id): a new instance.
    Readd {
        replica: usize,
        msg: MessageId,
    },
    Sync {
        to: usize,
        from: usize,
    },
}

/// What the property needs to know of one set `U` of ops written.
#[derive(Clone, Debug, Default)]
struct Summary {
    /// The first violation found, between two causally closed subsets of `U`.
    violation: Option<String>,
    /// Causally closed subsets of `U`, and pairs `S ⊆ O` of them checked.
    views: usize,
    pairs: usize,
    /// Messages renumbered in the view of all of `U`.
    renumbered: usize,
    /// Two concurrent flag changes of one message.
    concurrent_flags: bool,
    /// A flag change concurrent with an expunge of the same message.
    flags_race_expunge: bool,
    readded: bool,
    expunge_all_races_add: bool,
}

fn concurrent(a: &LogOp, b: &LogOp) -> bool {
    !a.deps.covers(b.dot) && !b.deps.covers(a.dot)
}

fn target(op: &MailOp) -> Option<&MessageId> {
    match op {
        MailOp::Add { msg, .. } | MailOp::Flags { msg, .. } | MailOp::Expunge { msg } => Some(msg),
        MailOp::ExpungeAll => None,
    }
}

fn dots(ops: &[LogOp]) -> String {
    let names: Vec<String> = ops
        .iter()
        .map(|o| format!("w{}.{}", o.dot.writer.0, o.dot.seq))
        .collect();
    format!("{{{}}}", names.join(" "))
}

/// Checks V1–V5 between every two causally closed subsets `S ⊆ O` of `all` (a causally
/// closed set of at most 31 ops), that each view is independent of the order of its ops, and
/// that its header-only floors match.
fn summarise(all: &[LogOp]) -> Summary {
    assert!(all.len() < 32, "too many ops to enumerate their subsets");
    // past[i]: the ops op i depends on, as a bit set over `all`.
    let past: Vec<u32> = all
        .iter()
        .map(|o| {
            all.iter()
                .enumerate()
                .filter(|(_, p)| o.deps.covers(p.dot))
                .fold(0, |m, (j, _)| m | 1 << j)
        })
        .collect();
    let mut summary = Summary::default();
    let mut views: Vec<(u32, Vec<LogOp>, MailboxState)> = Vec::new();
    for set in 0..1u32 << all.len() {
        let closed = (0..all.len()).all(|i| set & 1 << i == 0 || past[i] & !set == 0);
        if !closed {
            continue;
        }
        let ops: Vec<LogOp> = (0..all.len())
            .filter(|&i| set & 1 << i != 0)
            .map(|i| all[i].clone())
            .collect();
        let state = compute(&ops);
        let mut reversed = ops.clone();
        reversed.reverse();
        if summary.violation.is_none() && compute(&reversed) != state {
            summary.violation = Some(format!("view {} depends on read order", dots(&ops)));
        }
        let headers: Vec<_> = ops.iter().map(LogOp::header).collect();
        if summary.violation.is_none() && next_floors(&headers) != state.floors() {
            summary.violation = Some(format!(
                "view {}: floors from headers {:?}, from the full state {:?}",
                dots(&ops),
                next_floors(&headers),
                state.floors()
            ));
        }
        views.push((set, ops, state));
    }
    summary.views = views.len();
    for (big_set, big_ops, big) in &views {
        for (small_set, small_ops, small) in &views {
            if small_set & !big_set != 0 {
                continue;
            }
            summary.pairs += 1;
            if summary.violation.is_none()
                && let Err(e) = check_pair(small, big, big_ops)
            {
                summary.violation = Some(format!(
                    "views {} ⊆ {}: {e}\n  small: {small:?}\n  big: {big:?}",
                    dots(small_ops),
                    dots(big_ops)
                ));
            }
        }
    }
    if let Some((_, _, whole)) = views.last() {
        summary.renumbered = whole.renumbered;
    }
    for (i, a) in all.iter().enumerate() {
        for b in &all[i + 1..] {
            if let (MailOp::Add { msg: x, .. }, MailOp::Add { msg: y, .. }) = (&a.op, &b.op)
                && x == y
            {
                summary.readded = true;
            }
            if concurrent(a, b)
                && matches!(
                    (&a.op, &b.op),
                    (MailOp::ExpungeAll, MailOp::Add { .. })
                        | (MailOp::Add { .. }, MailOp::ExpungeAll)
                )
            {
                summary.expunge_all_races_add = true;
            }
            if !concurrent(a, b) || target(&a.op) != target(&b.op) {
                continue;
            }
            match (&a.op, &b.op) {
                (MailOp::Flags { .. }, MailOp::Flags { .. }) => summary.concurrent_flags = true,
                (MailOp::Flags { .. }, MailOp::Expunge { .. })
                | (MailOp::Expunge { .. }, MailOp::Flags { .. }) => {
                    summary.flags_race_expunge = true
                }
                _ => {}
            }
        }
    }
    summary
}

struct Mailbox {
    replicas: usize,
    budget: usize,
    fault: Option<Fault>,
    /// `summarise` of every set of ops met so far.
    summaries: Mutex<HashMap<Vec<LogOp>, Summary>>,
}

impl Mailbox {
    fn new(replicas: usize, budget: usize, fault: Option<Fault>) -> Self {
        Mailbox {
            replicas,
            budget,
            fault,
            summaries: Mutex::new(HashMap::new()),
        }
    }

    fn with_summary<T>(&self, ops: &[LogOp], f: impl FnOnce(&Summary) -> T) -> T {
        if let Some(s) = self.summaries.lock().unwrap().get(ops) {
            return f(s);
        }
        let s = summarise(ops);
        let out = f(&s);
        self.summaries.lock().unwrap().insert(ops.to_vec(), s);
        out
    }

    fn write(&self, state: &mut State, r: usize, op: impl FnOnce(&MailboxState, Dot) -> MailOp) {
        let view_ops = state.view(r);
        let view = compute(&view_ops);
        let dot = Dot {
            writer: writer(r),
            seq: u64::from(state.seen[r][r]) + 1,
        };
        let lamport = view_ops.iter().map(|o| o.lamport).max().unwrap_or(0) + 1;
        let (_, modseq_floor) = view.floors();
        let modseq_floor = match self.fault {
            Some(Fault::ModseqFloorOne) => 1,
            None => modseq_floor,
        };
        state.ops.push(LogOp {
            dot,
            lamport,
            deps: state.version_vector(r),
            modseq_floor,
            op: op(&view, dot),
        });
        state.ops.sort_by_key(|o| o.dot);
        state.seen[r][r] += 1;
    }
}

impl Model for Mailbox {
    type State = State;
    type Action = Action;

    fn init_states(&self) -> Vec<State> {
        vec![State {
            ops: Vec::new(),
            seen: vec![vec![0; self.replicas]; self.replicas],
        }]
    }

    fn actions(&self, state: &State, actions: &mut Vec<Action>) {
        if state.ops.len() >= self.budget {
            return;
        }
        for replica in 0..self.replicas {
            actions.push(Action::Append { replica });
            let view = compute(&state.view(replica));
            for m in view.messages.values() {
                for (action, flag) in FLAG_CHANGES {
                    actions.push(Action::Flags {
                        replica,
                        msg: m.id.clone(),
                        action,
                        flag,
                    });
                }
                actions.push(Action::Expunge {
                    replica,
                    msg: m.id.clone(),
                });
            }
            if !view.messages.is_empty() {
                actions.push(Action::ExpungeAll { replica });
            }
            for id in view.uids.keys() {
                if view.uid_of(id).is_none() {
                    actions.push(Action::Readd {
                        replica,
                        msg: id.clone(),
                    });
                }
            }
        }
        for to in 0..self.replicas {
            for from in 0..self.replicas {
                if to != from && (0..self.replicas).any(|w| state.seen[from][w] > state.seen[to][w])
                {
                    actions.push(Action::Sync { to, from });
                }
            }
        }
    }

    fn next_state(&self, last: &State, action: Action) -> Option<State> {
        let mut state = last.clone();
        match action {
            Action::Append { replica } => {
                self.write(&mut state, replica, |view, dot| MailOp::Add {
                    msg: MessageId(format!("m{}.{}", dot.writer.0, dot.seq)),
                    flags: BTreeSet::new(),
                    uid_floor: view.uid_next,
                })
            }
            Action::Flags {
                replica,
                msg,
                action,
                flag,
            } => self.write(&mut state, replica, |_, _| MailOp::Flags {
                msg,
                action,
                flags: BTreeSet::from([flag.to_string()]),
            }),
            Action::Expunge { replica, msg } => {
                self.write(&mut state, replica, |_, _| MailOp::Expunge { msg })
            }
            Action::ExpungeAll { replica } => {
                self.write(&mut state, replica, |_, _| MailOp::ExpungeAll)
            }
            Action::Readd { replica, msg } => {
                self.write(&mut state, replica, |view, _| MailOp::Add {
                    msg,
                    flags: BTreeSet::new(),
                    uid_floor: view.uid_next,
                })
            }
            Action::Sync { to, from } => {
                for w in 0..self.replicas {
                    state.seen[to][w] = state.seen[to][w].max(last.seen[from][w]);
                }
            }
        }
        Some(state)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        let mut properties = vec![
            Property::always(ALL_VIEWS, |m: &Mailbox, s: &State| {
                m.with_summary(&s.ops, |x| x.violation.is_none())
            }),
            Property::sometimes(
                "concurrent appends are renumbered",
                |m: &Mailbox, s: &State| m.with_summary(&s.ops, |x| x.renumbered > 0),
            ),
            Property::sometimes(
                "a message gets concurrent flag changes",
                |m: &Mailbox, s: &State| m.with_summary(&s.ops, |x| x.concurrent_flags),
            ),
            Property::sometimes(
                "a flag change races an expunge",
                |m: &Mailbox, s: &State| m.with_summary(&s.ops, |x| x.flags_race_expunge),
            ),
        ];
        if self.budget >= 3 {
            properties.push(Property::sometimes(
                "a message moves away and back",
                |m: &Mailbox, s: &State| m.with_summary(&s.ops, |x| x.readded),
            ));
            properties.push(Property::sometimes(
                "a mailbox delete races an append",
                |m: &Mailbox, s: &State| m.with_summary(&s.ops, |x| x.expunge_all_races_add),
            ));
        }
        if self.replicas >= 3 && self.budget >= 3 {
            properties.push(Property::sometimes(
                "three concurrent appends are renumbered",
                |m: &Mailbox, s: &State| m.with_summary(&s.ops, |x| x.renumbered >= 3),
            ));
        }
        properties
    }
}

const ALL_VIEWS: &str = "V1-V5 between all causally closed views";

fn describe(o: &LogOp) -> String {
    let deps: Vec<String> = o
        .deps
        .0
        .iter()
        .map(|(w, n)| format!("w{}:{n}", w.0))
        .collect();
    format!(
        "w{}.{} lamport {} deps {{{}}} modseq_floor {} {:?}",
        o.dot.writer.0,
        o.dot.seq,
        o.lamport,
        deps.join(" "),
        o.modseq_floor,
        o.op
    )
}

struct Outcome {
    states: usize,
    unions: usize,
    /// A path to a state whose ops have a violation, and the smallest such set of ops met.
    violation: Option<String>,
}

fn run(replicas: usize, budget: usize, fault: Option<Fault>) -> Outcome {
    let started = Instant::now();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let checker = Mailbox::new(replicas, budget, fault)
        .checker()
        .threads(threads)
        .finish_when(HasDiscoveries::AnyFailures)
        .spawn_bfs()
        .join();
    let summaries = checker.model().summaries.lock().unwrap();
    let views: usize = summaries.values().map(|s| s.views).sum();
    let pairs: usize = summaries.values().map(|s| s.pairs).sum();
    eprintln!(
        "model {replicas} replicas × {budget} ops{}: {} states ({} generated), {} op sets, \
         {views} views, {pairs} view pairs, {:.1?}",
        fault.map_or(String::new(), |f| format!(" with {f:?}")),
        checker.unique_state_count(),
        checker.state_count(),
        summaries.len(),
        started.elapsed(),
    );
    let violation = checker.discovery(ALL_VIEWS).map(|path| {
        let (ops, summary) = summaries
            .iter()
            .filter(|(_, s)| s.violation.is_some())
            .min_by_key(|(ops, _)| (ops.len(), dots(ops)))
            .expect("a violation is cached");
        let ops: Vec<String> = ops.iter().map(|o| format!("  {}", describe(o))).collect();
        format!(
            "a state with a violation: {path}smallest set of ops with a violation:\n{}\n{}",
            ops.join("\n"),
            summary.violation.as_deref().unwrap_or_default()
        )
    });
    let outcome = Outcome {
        states: checker.unique_state_count(),
        unions: summaries.len(),
        violation,
    };
    drop(summaries);
    if outcome.violation.is_none() {
        checker.assert_properties();
    }
    outcome
}

fn check(replicas: usize, budget: usize) {
    let outcome = run(replicas, budget, None);
    if let Some(v) = outcome.violation {
        panic!("{replicas} replicas × {budget} ops: counterexample\n{v}");
    }
    assert!(outcome.states > 1 && outcome.unions > 1);
}

#[test]
fn three_replicas_three_ops() {
    check(3, 3);
}

#[test]
fn three_replicas_four_ops() {
    if cfg!(debug_assertions) {
        eprintln!("3 replicas × 4 ops: run with --profile ci");
        return;
    }
    check(3, 4);
}

#[test]
fn two_replicas_five_ops() {
    if cfg!(debug_assertions) {
        eprintln!("2 replicas × 5 ops: run with --profile ci");
        return;
    }
    check(2, 5);
}

/// Larger configurations on demand: `TERN_MODEL=4x4,2x6` (replicas x ops). In the `ci`
/// profile 4x4 takes about a minute and 3 GiB, 2x6 about 5 minutes and 14 GiB.
#[test]
fn configurations_from_env() {
    let Ok(list) = std::env::var("TERN_MODEL") else {
        return;
    };
    for config in list.split(',').filter(|c| !c.is_empty()) {
        let parsed = config
            .split_once('x')
            .and_then(|(r, n)| Some((r.trim().parse().ok()?, n.trim().parse().ok()?)));
        let Some((replicas, budget)) = parsed else {
            panic!("TERN_MODEL: {config:?} is not REPLICASxOPS");
        };
        check(replicas, budget);
    }
}

/// The check is not vacuous: writers that record a wrong floor are caught.
#[test]
fn a_wrong_floor_is_caught() {
    let outcome = run(2, 3, Some(Fault::ModseqFloorOne));
    let violation = outcome
        .violation
        .expect("the model check missed a wrong floor");
    assert!(violation.contains("V4"), "{violation}");
}
