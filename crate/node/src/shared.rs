//! A model shared between the JS thread and libuv's worker threads. libuv hands queued jobs to
//! several threads at once, so two calls that are not awaited would take the model's lock in
//! any order (`applyUpdate` before the `lossAndGrads` made just before it). Each async call
//! takes a turn when it is made, on the JS thread, and its worker waits for the calls made
//! before it: calls on one model run in the order they were made. A synchronous call (a getter,
//! a setter) waits for them on the JS thread, as it waited for the lock before.

use std::collections::BTreeSet;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

pub struct Shared<T> {
    model: Mutex<T>,
    turns: Mutex<Turns>,
    turn_done: Condvar,
}

#[derive(Default)]
struct Turns {
    /// The turn the next call gets.
    next: u64,
    /// The earliest turn not yet done: the one allowed to run.
    current: u64,
    /// Later turns done before `current` (calls dropped without running).
    done: BTreeSet<u64>,
}

impl<T> Shared<T> {
    pub fn new(model: T) -> Arc<Self> {
        Arc::new(Self { model: Mutex::new(model), turns: Mutex::default(), turn_done: Condvar::new() })
    }

    /// Runs a synchronous call (getters, setters) on the JS thread after the async calls made
    /// before it, as they left the model.
    pub fn now<R>(self: &Arc<Self>, f: impl FnOnce(&mut T) -> beit_core::Result<R>) -> beit_core::Result<R> {
        self.turn().run(f)
    }

    fn lock(&self) -> beit_core::Result<MutexGuard<'_, T>> {
        self.model.lock().map_err(|_| {
            beit_core::Error::Numeric(
                "this model is unusable: an earlier call failed inside native code while updating it".into(),
            )
        })
    }

    /// The next turn; taken on the JS thread when an async call is made.
    pub fn turn(self: &Arc<Self>) -> Turn<T> {
        let mut turns = self.turns();
        let number = turns.next;
        turns.next += 1;
        Turn { shared: self.clone(), number }
    }

    /// The turn counters; they stay consistent through a panic elsewhere (each update is one
    /// statement), so a poisoned lock is taken as it is.
    fn turns(&self) -> MutexGuard<'_, Turns> {
        self.turns.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One async call's place in its model's queue; done when dropped, run or not.
pub struct Turn<T> {
    shared: Arc<Shared<T>>,
    number: u64,
}

impl<T> Turn<T> {
    /// Waits until the calls made before this one are done, then runs `f` on the model.
    pub fn run<R>(self, f: impl FnOnce(&mut T) -> beit_core::Result<R>) -> beit_core::Result<R> {
        let mut turns = self.shared.turns();
        while turns.current != self.number {
            turns = self.shared.turn_done.wait(turns).unwrap_or_else(PoisonError::into_inner);
        }
        drop(turns);
        let mut model = self.shared.lock()?;
        f(&mut model)
    }
}

impl<T> Drop for Turn<T> {
    fn drop(&mut self) {
        let mut guard = self.shared.turns();
        let turns = &mut *guard;
        turns.done.insert(self.number);
        while turns.done.remove(&turns.current) {
            turns.current += 1;
        }
        drop(guard);
        self.shared.turn_done.notify_all();
    }
}
