//! Which event loop the current thread belongs to, for keeping connections where their
//! sockets are watched.
//!
//! A socket is registered with the I/O driver of the runtime that opened it. The threads of
//! a work-stealing runtime share one driver, so any of them may use its connections; a
//! single-threaded runtime has a driver of its own, and a connection it opened should only
//! be used on it, or every event on that socket would have to cross threads.

use std::cell::Cell;
use std::sync::Mutex;

thread_local! {
    static EVENT_LOOP: Cell<usize> = const { Cell::new(0) };
}

/// Marks this thread as running event loop `id` (a dedicated single-threaded runtime).
/// Threads that never call this share loop 0, the work-stealing runtime.
pub fn enter(id: usize) {
    EVENT_LOOP.with(|l| l.set(id));
}

/// The event loop of the current thread: 0 unless [`enter`] said otherwise.
pub fn current() -> usize {
    EVENT_LOOP.with(Cell::get)
}

/// A value per event loop, made on first use by a loop (a pool of its connections, a
/// client holding its connections). Few loops exist, so a short list under one lock.
#[derive(Debug)]
pub struct PerLoop<T>(Mutex<Vec<(usize, T)>>);

impl<T> Default for PerLoop<T> {
    fn default() -> Self {
        PerLoop(Mutex::new(Vec::new()))
    }
}

impl<T> PerLoop<T> {
    /// Runs `f` on the current loop's value, made with `make` if the loop has none yet;
    /// `None` if a panic poisoned the lock.
    pub fn with<R>(&self, make: impl FnOnce() -> T, f: impl FnOnce(&mut T) -> R) -> Option<R> {
        let me = current();
        let mut all = self.0.lock().ok()?;
        let i = match all.iter().position(|(l, _)| *l == me) {
            Some(i) => i,
            None => {
                all.push((me, make()));
                all.len() - 1
            }
        };
        all.get_mut(i).map(|(_, value)| f(value))
    }
}
