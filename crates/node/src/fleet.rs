//! This node's view of every region's load and health, fed by peer telemetry, by its own
//! engines and by the outcome of requests (cool-downs). The router reads a copy of it per
//! request; nothing here decides anything.

use std::time::Instant;

use arc_swap::ArcSwap;

use crisp_catalog::{Catalog, RegionIx};
use crisp_routing::{Load, RegionView};

use crate::backbone::wire::LoadReport;

#[derive(Clone, Debug, Default)]
struct RegionState {
    reachable: bool,
    observed_at_ms: u64,
    /// Indexed by the catalog's model index.
    loads: Vec<Option<Load>>,
    cooldown_until_ms: Vec<u64>,
}

/// The fleet as this node sees it. Every request reads it, without a lock; a report, a
/// cool-down or a change of reachability writes a new copy of one region's state.
#[derive(Debug)]
pub struct FleetView {
    epoch: Instant,
    regions: Vec<ArcSwap<RegionState>>,
}

/// One region's state, for display.
#[derive(Clone, Debug)]
pub struct RegionSummary {
    pub reachable: bool,
    pub age_ms: Option<u64>,
    pub loads: Vec<Option<Load>>,
    pub cooldown_ms: Vec<u64>,
}

impl FleetView {
    pub fn new(regions: usize, models: usize) -> FleetView {
        let state = RegionState {
            reachable: false,
            observed_at_ms: 0,
            loads: vec![None; models],
            cooldown_until_ms: vec![0; models],
        };
        FleetView {
            epoch: Instant::now(),
            regions: (0..regions)
                .map(|_| ArcSwap::from_pointee(state.clone()))
                .collect(),
        }
    }

    /// Milliseconds since this view was created: the clock handed to the router.
    pub fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn with<R>(&self, region: RegionIx, f: impl FnOnce(&RegionState) -> R) -> Option<R> {
        let slot = self.regions.get(usize::from(region))?;
        Some(f(&slot.load()))
    }

    /// Changes one region's state: `change` is applied to a copy that then replaces it
    /// (again to a fresh copy if another change came in between, so none is lost).
    fn update(&self, region: RegionIx, change: impl Fn(&mut RegionState)) {
        if let Some(slot) = self.regions.get(usize::from(region)) {
            slot.rcu(|current| {
                let mut next = RegionState::clone(current);
                change(&mut next);
                next
            });
        }
    }

    /// Views of every region for one model, with `local` standing for this node's own
    /// region (always reachable, always fresh).
    pub fn views(
        &self,
        model: usize,
        local: RegionIx,
        local_load: Option<Load>,
    ) -> Vec<RegionView> {
        let now = self.now_ms();
        (0..self.regions.len())
            .map(|i| {
                let ix = RegionIx::try_from(i).unwrap_or(RegionIx::MAX);
                self.with(ix, |s| {
                    let cooldown_until_ms = s.cooldown_until_ms.get(model).copied().unwrap_or(0);
                    if ix == local {
                        RegionView {
                            reachable: true,
                            observed_at_ms: now,
                            load: local_load,
                            cooldown_until_ms,
                        }
                    } else {
                        RegionView {
                            reachable: s.reachable,
                            observed_at_ms: s.observed_at_ms,
                            load: s.loads.get(model).copied().flatten(),
                            cooldown_until_ms,
                        }
                    }
                })
                .unwrap_or(RegionView {
                    reachable: false,
                    observed_at_ms: 0,
                    load: None,
                    cooldown_until_ms: 0,
                })
            })
            .collect()
    }

    /// Takes a peer's load report; models it does not mention are not served there.
    pub fn apply_report(&self, catalog: &Catalog, region: RegionIx, report: &LoadReport) {
        let now = self.now_ms();
        self.update(region, |s| {
            s.reachable = true;
            s.observed_at_ms = now;
            s.loads.iter_mut().for_each(|l| *l = None);
            for m in &report.models {
                if let Some(ix) = catalog.model_ix(&m.model)
                    && let Some(slot) = s.loads.get_mut(ix)
                {
                    *slot = Some(Load {
                        slots: m.slots,
                        running: m.running,
                        queue_limit: m.queue_limit,
                        waiting: m.waiting,
                    });
                }
            }
        });
    }

    pub fn set_reachable(&self, region: RegionIx, reachable: bool) {
        self.update(region, |s| s.reachable = reachable);
    }

    /// Puts a region in cool-down for a model after a capacity error.
    pub fn cool_down(&self, region: RegionIx, model: usize, for_ms: u64) {
        let until = self.now_ms().saturating_add(for_ms);
        self.update(region, |s| {
            if let Some(c) = s.cooldown_until_ms.get_mut(model) {
                *c = (*c).max(until);
            }
        });
    }

    /// A copy of one region's state, for display.
    pub fn summary(&self, region: RegionIx) -> Option<RegionSummary> {
        let now = self.now_ms();
        self.with(region, |s| RegionSummary {
            reachable: s.reachable,
            age_ms: (s.observed_at_ms > 0).then(|| now.saturating_sub(s.observed_at_ms)),
            loads: s.loads.clone(),
            cooldown_ms: s
                .cooldown_until_ms
                .iter()
                .map(|&u| u.saturating_sub(now))
                .collect(),
        })
    }
}
