//! The write gate: every store mutation holds it shared for the length of its sled calls,
//! and an online backup holds it exclusively while it copies, so the copy is one point in
//! time across all trees (a state a crash could also have left, which the store recovers
//! from by design).
//!
//! Shared entry is re-entrant per thread (a mutation that calls another one does not queue
//! behind a waiting backup, which would deadlock). A writer that has to wait for a backup
//! does so through `tokio::task::block_in_place` when it runs on a multi-threaded runtime's
//! worker, so other tasks on that worker (reads, waiting polls, event streams) keep going.

use std::cell::RefCell;
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard, TryLockError};

thread_local! {
    /// The gates (by address) this thread holds shared, once per entry.
    static HELD: RefCell<Vec<usize>> = const { RefCell::new(Vec::new()) };
}

#[derive(Default)]
pub struct Gate {
    lock: RwLock<()>,
}

/// Shared hold of the gate; the outermost one on a thread owns the lock guard.
pub struct Shared<'a> {
    gate: usize,
    _guard: Option<RwLockReadGuard<'a, ()>>,
}

impl Drop for Shared<'_> {
    fn drop(&mut self) {
        HELD.with(|held| {
            let mut held = held.borrow_mut();
            if let Some(at) = held.iter().rposition(|&gate| gate == self.gate) {
                held.swap_remove(at);
            }
        });
    }
}

impl Gate {
    /// Enters for a mutation; waits while a backup copies.
    pub fn shared(&self) -> Shared<'_> {
        let gate = self as *const Gate as usize;
        let nested = HELD.with(|held| held.borrow().contains(&gate));
        let guard = match nested {
            true => None,
            false => Some(self.acquire_shared()),
        };
        // Counted only once held: a wait that panics leaves no entry behind.
        HELD.with(|held| held.borrow_mut().push(gate));
        Shared {
            gate,
            _guard: guard,
        }
    }

    fn acquire_shared(&self) -> RwLockReadGuard<'_, ()> {
        match self.lock.try_read() {
            Ok(guard) => guard,
            Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(TryLockError::WouldBlock) => block_on_worker(|| {
                self.lock
                    .read()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
            }),
        }
    }

    /// Takes the gate exclusively: returns once every mutation in flight has finished, and
    /// keeps new ones waiting until the guard drops.
    pub fn exclusive(&self) -> RwLockWriteGuard<'_, ()> {
        block_on_worker(|| {
            self.lock
                .write()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
        })
    }
}

/// Runs a blocking wait, telling a multi-threaded tokio runtime to move this worker's
/// other tasks elsewhere meanwhile.
fn block_on_worker<T>(wait: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(wait)
        }
        _ => wait(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn shared_entries_nest_while_a_backup_waits() {
        let gate = Arc::new(Gate::default());
        let outer = gate.shared();
        let waiting = {
            let gate = gate.clone();
            std::thread::spawn(move || {
                let _exclusive = gate.exclusive();
            })
        };
        // Wait until the backup is queued (std's RwLock then turns new readers away); a
        // nested entry must not wait behind it.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while gate.lock.try_read().is_ok() && std::time::Instant::now() < deadline {
            std::thread::yield_now();
        }
        assert!(gate.lock.try_read().is_err(), "the backup queued");
        let inner = gate.shared();
        drop(inner);
        drop(outer);
        waiting.join().unwrap();
        let _again = gate.shared();
    }
}
