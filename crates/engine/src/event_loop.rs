//! Which event loop the current thread belongs to, for keeping connections where their
//! sockets are watched.
//!
//! A socket is registered with the I/O driver of the runtime that opened it. The threads of
//! a work-stealing runtime share one driver, so any of them may use its connections; a
//! single-threaded runtime has a driver of its own, and a connection it opened should only
//! be used on it, or every event on that socket would have to cross threads.

use std::cell::Cell;

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
