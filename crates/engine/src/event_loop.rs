//! Which event loop the current thread belongs to, for keeping connections where their
//! sockets are watched.
//!
//! A socket is registered with the I/O driver of the runtime that opened it. The threads of
//! a work-stealing runtime share one driver, so any of them may use its connections; a
//! single-threaded runtime has a driver of its own, and a connection it opened should only
//! be used on it, or every event on that socket would have to cross threads.

use std::cell::Cell;
use std::sync::Mutex;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

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

thread_local! {
    /// Bumped whenever a connection of this loop reads or writes.
    static ACTIVITY: Cell<u64> = const { Cell::new(0) };
    /// The loop's busy-poll task while it waits for activity.
    static POLLER: Cell<Option<Waker>> = const { Cell::new(None) };
}

/// Notes that a connection served by this thread's loop read or wrote something.
pub fn touch() {
    ACTIVITY.with(|a| a.set(a.get().wrapping_add(1)));
    if let Some(w) = POLLER.with(Cell::take) {
        w.wake();
    }
}

fn activity() -> u64 {
    ACTIVITY.with(Cell::get)
}

/// Keeps a single-threaded loop polling its sockets, instead of sleeping, for `window`
/// after each [`touch`]: the next event (the backend's answer, the client's next request)
/// is then picked up without the thread being put to sleep and woken again. Costs a core
/// while traffic flows; idle loops sleep as usual. Runs forever; spawn it on the loop.
pub async fn busy_poll(window: Duration) {
    loop {
        let seen = activity();
        std::future::poll_fn(|cx| {
            if activity() == seen {
                POLLER.with(|p| p.set(Some(cx.waker().clone())));
                Poll::Pending
            } else {
                Poll::Ready(())
            }
        })
        .await;
        let mut seen = activity();
        let mut until = Instant::now() + window;
        loop {
            // A yielded task runs again only after the runtime polled its I/O driver.
            tokio::task::yield_now().await;
            let now = activity();
            if now != seen {
                seen = now;
                until = Instant::now() + window;
            } else if Instant::now() >= until {
                break;
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// How often the loop running this test went to sleep while `f` ran.
    async fn sleeps_during(f: impl std::future::Future<Output = ()>) -> u64 {
        let metrics = tokio::runtime::Handle::current().metrics();
        let before = metrics.worker_park_count(0);
        f.await;
        metrics.worker_park_count(0) - before
    }

    fn single_threaded() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    async fn ten_timers() {
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    #[test]
    fn a_busy_polling_loop_stays_awake_after_activity_and_sleeps_when_idle() {
        let runtime = single_threaded();
        runtime.block_on(async {
            tokio::spawn(busy_poll(Duration::from_secs(5)));
            tokio::task::yield_now().await;
            // No connection did anything: every timer puts the loop to sleep.
            assert!(sleeps_during(ten_timers()).await >= 10);
            // Right after activity the loop polls instead: the timers fire without it
            // ever sleeping.
            touch();
            assert_eq!(sleeps_during(ten_timers()).await, 0);
        });

        let runtime = single_threaded();
        runtime.block_on(async {
            tokio::spawn(busy_poll(Duration::from_millis(5)));
            tokio::task::yield_now().await;
            touch();
            // Once the window is over, the loop sleeps again.
            let slept = sleeps_during(async {
                tokio::time::sleep(Duration::from_millis(100)).await;
            })
            .await;
            assert!(slept >= 1, "slept {slept} times");
        });
    }
}
