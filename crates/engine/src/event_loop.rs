//! Which event loop the current thread belongs to, for keeping connections where their
//! sockets are watched.
//!
//! A socket is registered with the I/O driver of the runtime that opened it. The threads of
//! a work-stealing runtime share one driver, so any of them may use its connections; a
//! single-threaded runtime has a driver of its own, and a connection it opened should only
//! be used on it, or every event on that socket would have to cross threads.

use std::cell::{Cell, RefCell};
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
/// client holding its connections). The threads of the work-stealing runtime (loop 0)
/// share one value under a lock; a dedicated loop runs on one thread, so its value is
/// that thread's own and reaching it takes no lock another loop could hold.
pub struct PerLoop<T: Send> {
    shared: Mutex<Option<T>>,
    /// Each dedicated loop's value, with the loop it was made for (a thread that ends
    /// may pass its slot to a later one).
    own: thread_local::ThreadLocal<RefCell<Option<(usize, T)>>>,
}

impl<T: Send> std::fmt::Debug for PerLoop<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PerLoop")
    }
}

impl<T: Send> Default for PerLoop<T> {
    fn default() -> Self {
        PerLoop {
            shared: Mutex::new(None),
            own: thread_local::ThreadLocal::new(),
        }
    }
}

impl<T: Send> PerLoop<T> {
    /// Runs `f` on the current loop's value, made with `make` if the loop has none yet;
    /// `None` if a panic poisoned the lock, or if `f` calls `with` on the same value.
    pub fn with<R>(&self, make: impl FnOnce() -> T, f: impl FnOnce(&mut T) -> R) -> Option<R> {
        let me = current();
        if me == 0 {
            let mut shared = self.shared.lock().ok()?;
            return Some(f(shared.get_or_insert_with(make)));
        }
        let mut own = self.own.get_or_default().try_borrow_mut().ok()?;
        if own.as_ref().is_none_or(|(l, _)| *l != me) {
            *own = Some((me, make()));
        }
        own.as_mut().map(|(_, value)| f(value))
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

    /// The value `with` hands to a thread marked as running `loop_id` (0: not marked).
    fn value_on(values: &std::sync::Arc<PerLoop<u32>>, loop_id: usize, make: u32) -> u32 {
        let values = values.clone();
        std::thread::spawn(move || {
            if loop_id != 0 {
                enter(loop_id);
            }
            values.with(|| make, |v| *v).unwrap()
        })
        .join()
        .unwrap()
    }

    #[test]
    fn each_loop_has_its_own_value_and_the_shared_runtime_one_for_all_its_threads() {
        let values = std::sync::Arc::new(PerLoop::default());
        // The work-stealing runtime's threads (never marked) share the first one made.
        assert_eq!(value_on(&values, 0, 1), 1);
        assert_eq!(value_on(&values, 0, 2), 1);
        // A dedicated loop's value is made by and for it, and kept on its thread.
        let values_1 = values.clone();
        let loop_1 = std::thread::spawn(move || {
            enter(1);
            let first = values_1.with(|| 10, |v| std::mem::replace(v, 11)).unwrap();
            let again = values_1.with(|| 12, |v| *v).unwrap();
            // The thread now runs another loop: that loop's value is its own.
            enter(2);
            let other = values_1.with(|| 20, |v| *v).unwrap();
            (first, again, other)
        });
        assert_eq!(loop_1.join().unwrap(), (10, 11, 20));
        assert_eq!(value_on(&values, 3, 30), 30);
        assert_eq!(value_on(&values, 0, 3), 1);
        // `f` calling `with` on the same value gets nothing rather than a second borrow.
        let nested = std::thread::spawn(move || {
            enter(4);
            values.with(|| 40, |_| values.with(|| 41, |v| *v)).unwrap()
        });
        assert_eq!(nested.join().unwrap(), None);
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
