//! Operational endpoints: health and the node's view of the fleet.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::Node;

pub async fn healthz(State(node): State<Arc<Node>>) -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok", "region": node.region_code()}))
}

#[derive(Serialize)]
struct FleetDoc {
    /// The node answering.
    region: String,
    regions: Vec<RegionDoc>,
}

#[derive(Serialize)]
struct RegionDoc {
    code: String,
    city: String,
    country: String,
    geographies: Vec<String>,
    /// Whether this node hears the region's telemetry (always true for itself).
    reachable: bool,
    /// Age of this node's view of the region, in milliseconds (0 for itself).
    age_ms: Option<u64>,
    models: Vec<ModelDoc>,
}

#[derive(Serialize)]
struct ModelDoc {
    model: String,
    slots: u32,
    running: u32,
    queue_limit: u32,
    waiting: u32,
    /// Milliseconds of cool-down left after a capacity error.
    cooldown_ms: u64,
    /// Generations admitted here since start (only for the answering node).
    #[serde(skip_serializing_if = "Option::is_none")]
    admitted: Option<u64>,
}

/// The node's view of every region: geography, capacity, load, health and freshness. With
/// access control, only for callers with an API key of this deployment: it tells how busy
/// each region is.
pub async fn fleet(State(node): State<Arc<Node>>, headers: HeaderMap) -> Response {
    if let Err(e) = super::openai::caller(&node, &headers) {
        let request_id = uuid::Uuid::new_v4().simple().to_string();
        return super::openai::error_response(&e, &request_id);
    }
    let catalog = &node.catalog;
    let local = node.load_report();
    let regions = catalog
        .regions
        .iter()
        .enumerate()
        .filter_map(|(i, r)| {
            let ix = crisp_catalog::RegionIx::try_from(i).ok()?;
            let summary = node.fleet.summary(ix)?;
            let is_self = ix == node.region;
            let models = catalog
                .models
                .iter()
                .enumerate()
                .filter_map(|(m, model)| {
                    let cooldown_ms = summary.cooldown_ms.get(m).copied().unwrap_or(0);
                    if is_self {
                        let l = local.models.iter().find(|l| l.model == model.id)?;
                        return Some(ModelDoc {
                            model: model.id.clone(),
                            slots: l.slots,
                            running: l.running,
                            queue_limit: l.queue_limit,
                            waiting: l.waiting,
                            cooldown_ms,
                            admitted: Some(node.admitted(&model.id)),
                        });
                    }
                    let l = summary.loads.get(m).copied().flatten()?;
                    Some(ModelDoc {
                        model: model.id.clone(),
                        slots: l.slots,
                        running: l.running,
                        queue_limit: l.queue_limit,
                        waiting: l.waiting,
                        cooldown_ms,
                        admitted: None,
                    })
                })
                .collect();
            Some(RegionDoc {
                code: r.code.clone(),
                city: r.city.clone(),
                country: r.country.clone(),
                geographies: catalog
                    .geographies_of(ix)
                    .into_iter()
                    .map(str::to_owned)
                    .collect(),
                reachable: is_self || summary.reachable,
                age_ms: if is_self { Some(0) } else { summary.age_ms },
                models,
            })
        })
        .collect();
    Json(
        serde_json::to_value(FleetDoc {
            region: node.region_code().to_owned(),
            regions,
        })
        .unwrap_or_default(),
    )
    .into_response()
}
