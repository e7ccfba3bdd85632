//! Several replicas of a model in one region, behind one [`Backend`]: each request goes to
//! the less loaded of two replicas (power of two choices), a replica that fails with a
//! capacity error, a 5xx or a timeout is ejected for a cool-down (its Retry-After, or a
//! default) and the request tries another, and the region's load is the sum of the
//! replicas still in service. Requests the model rejects (4xx) eject nothing.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::time::Instant;

use crate::{Backend, BackendError, ChunkStream, EngineLoad, GenerateRequest};

/// Cool-down of a failing replica whose error carried no Retry-After.
pub const DEFAULT_EJECTION: Duration = Duration::from_secs(5);

struct Replica {
    backend: Box<dyn Backend>,
    /// Until when it is out of service, in milliseconds after the pool's `epoch`; 0 when
    /// it is in service. Read by every request's choice without a lock.
    ejected_until_ms: AtomicU64,
}

impl Replica {
    fn in_service(&self, now_ms: u64) -> bool {
        self.ejected_until_ms.load(Ordering::Relaxed) <= now_ms
    }

    fn eject(&self, until_ms: u64) {
        self.ejected_until_ms
            .store(until_ms.max(1), Ordering::Relaxed);
    }

    fn reinstate(&self) {
        self.ejected_until_ms.store(0, Ordering::Relaxed);
    }

    fn pressure(&self) -> f64 {
        let l = self.backend.load();
        f64::from(l.running + l.waiting) / f64::from(l.slots.max(1))
    }
}

/// Milliseconds from `epoch` to `at`, rounded up (a replica ejected until a moment is
/// back in service at it).
fn ms_since(epoch: Instant, at: Instant) -> u64 {
    let since = at.saturating_duration_since(epoch);
    u64::try_from(since.as_millis())
        .unwrap_or(u64::MAX)
        .saturating_add(u64::from(!since.subsec_nanos().is_multiple_of(1_000_000)))
}

/// Replicas of one model in one region.
pub struct Pool {
    replicas: Vec<Arc<Replica>>,
    picks: AtomicU64,
    /// What the replicas' ejection times count from.
    epoch: Instant,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("replicas", &self.replicas.len())
            .finish()
    }
}

impl Pool {
    pub fn new(replicas: Vec<Box<dyn Backend>>) -> Pool {
        Pool {
            replicas: replicas
                .into_iter()
                .map(|backend| {
                    Arc::new(Replica {
                        backend,
                        ejected_until_ms: AtomicU64::new(0),
                    })
                })
                .collect(),
            picks: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    fn ms(&self, at: Instant) -> u64 {
        ms_since(self.epoch, at)
    }

    fn now_ms(&self) -> u64 {
        self.ms(Instant::now())
    }

    /// Probes every replica once: a failing one is ejected, an ejected one that answers
    /// again returns to service.
    pub async fn check_health(&self) {
        for r in &self.replicas {
            match r.backend.health().await {
                Ok(()) => r.reinstate(),
                Err(e) => {
                    tracing::debug!(error = %e, "replica failed its health check");
                    r.eject(self.ms(Instant::now() + DEFAULT_EJECTION));
                }
            }
        }
    }

    /// Replicas currently in service.
    pub fn in_service(&self) -> usize {
        let now = self.now_ms();
        self.replicas.iter().filter(|r| r.in_service(now)).count()
    }

    /// The order to try replicas in: the better of two candidates first, then the rest.
    fn order(&self) -> Vec<usize> {
        let now = self.now_ms();
        let mut live: Vec<usize> = (0..self.replicas.len())
            .filter(|&i| self.replicas[i].in_service(now))
            .collect();
        if live.is_empty() {
            // Every replica is cooling down: try them all rather than refuse blindly.
            live = (0..self.replicas.len()).collect();
        }
        let n = live.len() as u64;
        if n >= 2 {
            // Two distinct candidates, cycling deterministically through the pairs.
            let k = self.picks.fetch_add(1, Ordering::Relaxed);
            let a = (k % n) as usize;
            let b = ((k % n + 1 + (k / n) % (n - 1)) % n) as usize;
            let (x, y) = (live[a], live[b]);
            let first = if self.replicas[y].pressure() < self.replicas[x].pressure() {
                y
            } else {
                x
            };
            if let Some(pos) = live.iter().position(|&i| i == first) {
                live.swap(0, pos);
            }
        }
        live
    }
}

impl Backend for Pool {
    fn generate(
        &self,
        req: GenerateRequest,
    ) -> BoxFuture<'static, Result<ChunkStream, BackendError>> {
        let order: Vec<Arc<Replica>> = self
            .order()
            .into_iter()
            .map(|i| self.replicas[i].clone())
            .collect();
        let epoch = self.epoch;
        Box::pin(async move {
            let mut last = BackendError::Unavailable("no replica to try".into());
            for replica in order {
                match replica.backend.generate(req.clone()).await {
                    Ok(stream) => return Ok(stream),
                    // The request itself is wrong: another replica would say the same.
                    Err(e) if !e.retryable() => return Err(e),
                    Err(e) => {
                        if e.trips_cooldown() {
                            let wait = match &e {
                                BackendError::Capacity {
                                    retry_after: Some(d),
                                    ..
                                } => *d,
                                _ => DEFAULT_EJECTION,
                            };
                            replica.eject(ms_since(epoch, Instant::now() + wait));
                            tracing::debug!(error = %e, ?wait, "replica ejected");
                        }
                        last = e;
                    }
                }
            }
            Err(last)
        })
    }

    fn load(&self) -> EngineLoad {
        let now = self.now_ms();
        self.replicas
            .iter()
            .filter(|r| r.in_service(now))
            .map(|r| r.backend.load())
            .fold(EngineLoad::default(), |a, l| EngineLoad {
                slots: a.slots.saturating_add(l.slots),
                running: a.running.saturating_add(l.running),
                queue_limit: a.queue_limit.saturating_add(l.queue_limit),
                waiting: a.waiting.saturating_add(l.waiting),
            })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    /// A replica whose health check fails while `down` is set, and which refuses every
    /// request for capacity, asking for `retry_after`.
    struct Flaky {
        down: Arc<AtomicBool>,
        retry_after: Duration,
    }

    impl Backend for Flaky {
        fn generate(
            &self,
            _req: GenerateRequest,
        ) -> BoxFuture<'static, Result<ChunkStream, BackendError>> {
            let retry_after = self.retry_after;
            Box::pin(async move {
                Err(BackendError::Capacity {
                    message: "busy".into(),
                    retry_after: Some(retry_after),
                })
            })
        }

        fn load(&self) -> EngineLoad {
            EngineLoad {
                slots: 4,
                ..EngineLoad::default()
            }
        }

        fn health(&self) -> BoxFuture<'static, Result<(), BackendError>> {
            let down = self.down.load(Ordering::Relaxed);
            Box::pin(async move {
                if down {
                    Err(BackendError::Unavailable("down".into()))
                } else {
                    Ok(())
                }
            })
        }
    }

    fn pool(down: &Arc<AtomicBool>, retry_after: Duration) -> Pool {
        let replica = || -> Box<dyn Backend> {
            Box::new(Flaky {
                down: down.clone(),
                retry_after,
            })
        };
        Pool::new(vec![replica(), replica()])
    }

    #[tokio::test(start_paused = true)]
    async fn a_replica_that_fails_its_health_check_is_out_until_its_cool_down_ends_or_it_recovers()
    {
        let down = Arc::new(AtomicBool::new(true));
        let pool = pool(&down, Duration::from_secs(1));
        pool.check_health().await;
        assert_eq!(pool.in_service(), 0);
        assert_eq!(pool.load().slots, 0);
        tokio::time::advance(DEFAULT_EJECTION - Duration::from_millis(10)).await;
        assert_eq!(pool.in_service(), 0);
        tokio::time::advance(Duration::from_millis(10)).await;
        assert_eq!(pool.in_service(), 2);
        assert_eq!(pool.load().slots, 8);
        // Ejected again, then healthy before the cool-down ends: back at once.
        pool.check_health().await;
        assert_eq!(pool.in_service(), 0);
        down.store(false, Ordering::Relaxed);
        pool.check_health().await;
        assert_eq!(pool.in_service(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn replicas_refusing_for_capacity_are_ejected_for_their_retry_after() {
        let down = Arc::new(AtomicBool::new(false));
        let pool = pool(&down, Duration::from_millis(2500));
        let req = GenerateRequest {
            request_id: "r1".into(),
            model: "m".into(),
            messages: vec![crate::Message {
                role: "user".into(),
                content: "hi".into(),
            }],
            max_tokens: None,
            sampling: crate::Sampling::default(),
            stop: Vec::new(),
        };
        assert!(matches!(
            pool.generate(req).await,
            Err(BackendError::Capacity { .. })
        ));
        assert_eq!(pool.in_service(), 0);
        tokio::time::advance(Duration::from_millis(2499)).await;
        assert_eq!(pool.in_service(), 0);
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(pool.in_service(), 2);
    }
}
