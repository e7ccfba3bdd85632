//! The admin listener: Prometheus metrics, liveness, readiness and reload. Kept off the
//! client and peer listeners so it can be firewalled separately.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};

use crate::{Node, observe};

/// Renders the process's metrics in the Prometheus text format.
pub type MetricsRender = Arc<dyn Fn() -> String + Send + Sync>;

/// Reloads the process's configuration and answers what became of it: `Ok("reloaded")`,
/// `Ok("unchanged")`, or why the new configuration was refused.
pub type ConfigReload = Arc<
    dyn Fn() -> futures::future::BoxFuture<'static, Result<&'static str, String>> + Send + Sync,
>;

#[derive(Clone)]
struct Admin {
    node: Arc<Node>,
    render: Option<MetricsRender>,
    on_reload: Option<ConfigReload>,
}

pub fn router(
    node: Arc<Node>,
    render: Option<MetricsRender>,
    on_reload: Option<ConfigReload>,
) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/admin/reload", post(reload))
        .with_state(Admin {
            node,
            render,
            on_reload,
        })
}

async fn metrics(State(admin): State<Admin>) -> impl IntoResponse {
    observe::fleet_gauges(&admin.node);
    match &admin.render {
        Some(render) => (
            StatusCode::OK,
            [("content-type", "text/plain; version=0.0.4")],
            render(),
        ),
        None => (
            StatusCode::NOT_FOUND,
            [("content-type", "text/plain")],
            "no metrics recorder is installed in this process\n".to_owned(),
        ),
    }
}

/// Ready while serving and not draining; a draining node tells its load balancer to stop
/// sending it work before it stops accepting.
async fn readyz(State(admin): State<Admin>) -> impl IntoResponse {
    if admin.node.is_stopping() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n")
    } else {
        (StatusCode::OK, "ready\n")
    }
}

/// Reloads certificates and access files, then (through the process, which owns the
/// listeners) the configuration, and answers what became of each: 422 when anything new
/// was refused, so a deploy script that reloads learns that its change did not apply.
async fn reload(State(admin): State<Admin>) -> axum::response::Response {
    if admin.node.is_stopping() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(serde_json::json!({"error": "this node is stopping (draining): nothing was reloaded; reload the node that replaces it"})),
        )
            .into_response();
    }
    let mut report = admin.node.reload();
    if let Some(f) = &admin.on_reload {
        report.configuration = Some(f().await);
    }
    let status = if report.ok() {
        StatusCode::OK
    } else {
        StatusCode::UNPROCESSABLE_ENTITY
    };
    (status, axum::Json(report.to_json())).into_response()
}
