//! The agent's entry in the runtime's alarm index (what the timer reads), kept early, never
//! late: after each batch the agent's earliest schedule is re-derived; an earlier time is
//! written (and synced) before the commit, a later one only once the commit is durable.

use std::sync::{Arc, Mutex};

use crate::{address::AgentKey, error::Error, lock::lock, registry::Shared, storage::blocking};

/// The agent's entry, as this instance last wrote it.
pub(super) struct AlarmEntry {
    key: AgentKey,
    shared: Arc<Shared>,
    state: Arc<Mutex<IndexState>>,
    /// Write the entry after this batch even if it looks unchanged (the timer took it).
    refresh: bool,
}

impl AlarmEntry {
    /// The entry of `key`, as the index holds it now.
    pub(super) fn new(shared: Arc<Shared>, key: AgentKey) -> Self {
        let state = Arc::new(Mutex::new(IndexState {
            seq: 0,
            at: shared.alarms.get(&key),
        }));
        AlarmEntry {
            key,
            shared,
            state,
            refresh: false,
        }
    }

    /// The entry was removed with the agent's files: the next batch writes it again if the
    /// agent (made afresh) has a schedule. (Any raise computed before is not applied.)
    pub(super) fn removed(&self) {
        let mut state = lock(&self.state);
        state.seq += 1;
        state.at = None;
    }

    /// The timer took the entry (an alarm event runs): write it after this batch, whatever it
    /// looks like.
    pub(super) fn refresh(&mut self) {
        self.refresh = true;
    }

    /// Before the commit of a batch whose schedule's earliest time is `earliest`: if that is
    /// earlier than the entry, writes the entry now (synced); if later (or gone), returns the
    /// raise to apply once the commit is durable.
    pub(super) async fn before_commit(
        &mut self,
        earliest: Option<u64>,
    ) -> Result<Option<Raise>, Error> {
        let refresh = std::mem::take(&mut self.refresh);
        let (seq, indexed) = {
            let state = lock(&self.state);
            (state.seq, state.at)
        };
        match IndexPlan::of(earliest, indexed, refresh) {
            IndexPlan::Keep => Ok(None),
            IndexPlan::LowerNow => {
                let (state, shared, key) =
                    (self.state.clone(), self.shared.clone(), self.key.clone());
                blocking(move || {
                    let mut state = lock(&state);
                    state.seq += 1;
                    shared.alarms.set(&key, earliest, true)?;
                    state.at = earliest;
                    Ok(())
                })
                .await?;
                Ok(None)
            }
            IndexPlan::RaiseWhenDurable => Ok(Some(Raise {
                key: self.key.clone(),
                shared: self.shared.clone(),
                state: self.state.clone(),
                seq,
                at: earliest,
            })),
        }
    }
}

/// What this agent last wrote to the alarm index, and a sequence number that every lowering
/// bumps, so that a raise computed before a lowering is not applied after it.
struct IndexState {
    seq: u64,
    at: Option<u64>,
}

/// What a batch does to the agent's alarm index entry, so that the index is early, never late:
/// the timer must never sleep past a row a durable commit made due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum IndexPlan {
    /// The schedule's earliest time is earlier than the entry: write it (synced) before the
    /// commit, so that no commit is durable while the index is late for it.
    LowerNow,
    /// Later, or gone (or the timer took the entry): write it only once the commit is durable,
    /// so that a batch that is lost never leaves the index late.
    RaiseWhenDurable,
    /// The entry is right.
    Keep,
}

impl IndexPlan {
    /// The plan for a schedule whose earliest time is `earliest`, given the entry `indexed`;
    /// `refresh`: write it even if it looks right (the timer took it).
    fn of(earliest: Option<u64>, indexed: Option<u64>, refresh: bool) -> Self {
        match (earliest, indexed) {
            (Some(new), Some(old)) if new < old => IndexPlan::LowerNow,
            (Some(_), None) => IndexPlan::LowerNow,
            (new, old) if new == old && !refresh => IndexPlan::Keep,
            _ => IndexPlan::RaiseWhenDurable,
        }
    }
}

/// A raise of the index entry, to apply once the batch that computed it is durable.
pub(super) struct Raise {
    key: AgentKey,
    shared: Arc<Shared>,
    state: Arc<Mutex<IndexState>>,
    seq: u64,
    at: Option<u64>,
}

impl Raise {
    /// Applies the raise unless a lowering came after it. Blocking.
    pub(super) fn apply(self) {
        let mut state = lock(&self.state);
        if state.seq != self.seq {
            return;
        }
        match self.shared.alarms.set(&self.key, self.at, false) {
            Ok(()) => state.at = self.at,
            Err(e) => tracing::warn!("could not update the alarm index (it stays early): {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::IndexPlan::{self, *};

    #[test]
    fn the_alarm_index_is_early_never_late() {
        // Earlier than the index, or new: written before the commit.
        assert_eq!(IndexPlan::of(Some(5), Some(9), false), LowerNow);
        assert_eq!(IndexPlan::of(Some(5), None, false), LowerNow);
        // Later, or gone: only once the commit is durable (until then the index stays early).
        assert_eq!(IndexPlan::of(Some(9), Some(5), false), RaiseWhenDurable);
        assert_eq!(IndexPlan::of(None, Some(5), false), RaiseWhenDurable);
        // Unchanged: nothing, unless the timer took the entry.
        assert_eq!(IndexPlan::of(Some(5), Some(5), false), Keep);
        assert_eq!(IndexPlan::of(None, None, false), Keep);
        assert_eq!(IndexPlan::of(Some(5), Some(5), true), RaiseWhenDurable);
        // Never lowered late: whatever the entry, an earlier time is written at once.
        for old in [None, Some(6), Some(u64::MAX)] {
            assert_eq!(IndexPlan::of(Some(5), old, true), LowerNow, "{old:?}");
        }
    }
}
