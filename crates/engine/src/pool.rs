//! Several replicas of a model in one region, behind one [`Backend`]: each request goes to
//! the less loaded of two replicas (power of two choices), a replica that fails with a
//! capacity error, a 5xx or a timeout is ejected for a cool-down (its Retry-After, or a
//! default) and the request tries another, and the region's load is the sum of the
//! replicas still in service. Requests the model rejects (4xx) eject nothing.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::time::Instant;

use crate::{Backend, BackendError, ChunkStream, EngineLoad, GenerateRequest};

/// Cool-down of a failing replica whose error carried no Retry-After.
pub const DEFAULT_EJECTION: Duration = Duration::from_secs(5);

struct Replica {
    backend: Box<dyn Backend>,
    ejected_until: Mutex<Option<Instant>>,
}

impl Replica {
    fn in_service(&self, now: Instant) -> bool {
        self.ejected_until
            .lock()
            .map(|g| g.is_none_or(|t| t <= now))
            .unwrap_or(true)
    }

    fn eject(&self, until: Instant) {
        if let Ok(mut g) = self.ejected_until.lock() {
            *g = Some(until);
        }
    }

    fn pressure(&self) -> f64 {
        let l = self.backend.load();
        f64::from(l.running + l.waiting) / f64::from(l.slots.max(1))
    }
}

/// Replicas of one model in one region.
pub struct Pool {
    replicas: Vec<Arc<Replica>>,
    picks: AtomicU64,
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
                        ejected_until: Mutex::new(None),
                    })
                })
                .collect(),
            picks: AtomicU64::new(0),
        }
    }

    /// Probes every replica once: a failing one is ejected, an ejected one that answers
    /// again returns to service.
    pub async fn check_health(&self) {
        for r in &self.replicas {
            match r.backend.health().await {
                Ok(()) => {
                    if let Ok(mut g) = r.ejected_until.lock() {
                        *g = None;
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "replica failed its health check");
                    r.eject(Instant::now() + DEFAULT_EJECTION);
                }
            }
        }
    }

    /// Replicas currently in service.
    pub fn in_service(&self) -> usize {
        let now = Instant::now();
        self.replicas.iter().filter(|r| r.in_service(now)).count()
    }

    /// The order to try replicas in: the better of two candidates first, then the rest.
    fn order(&self) -> Vec<usize> {
        let now = Instant::now();
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
                            replica.eject(Instant::now() + wait);
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
        let now = Instant::now();
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
