//! Model invocation logging: full request and response bodies, only in the source region,
//! only when configured for it. Records (the managed service's `ModelInvocationLog`
//! schema, plus `inferenceRegion`) are appended to a local file, batched every second into
//! gzip JSON lines under `<prefix>/AWSLogs/<account>/BedrockModelInvocationLogs/<region>/
//! YYYY/MM/DD/HH/`, and shipped to the region's object store; a body over the size
//! threshold goes to its own object, referenced by path. The destination of a forwarded
//! request never logs anything of it: logging happens only at the API edge.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use serde_json::{Value, json};

/// One invocation's payloads, as the API edge saw them.
pub struct Invocation<'a> {
    pub request_id: &'a str,
    pub operation: &'a str,
    pub model_id: &'a str,
    pub principal: Option<&'a str>,
    pub inference_region: &'a str,
    pub input: Value,
    pub output: Value,
    pub input_tokens: u32,
    pub output_tokens: u32,
}

pub struct InvocationLog {
    dir: PathBuf,
    store: Arc<dyn ObjectStore>,
    /// `<prefix>/AWSLogs/<account>/BedrockModelInvocationLogs/<region>`
    base: String,
    account: String,
    region: String,
    large_body_bytes: usize,
    open: Mutex<()>,
}

impl std::fmt::Debug for InvocationLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InvocationLog")
            .field("dir", &self.dir)
            .field("base", &self.base)
            .finish()
    }
}

fn hour_path(t: time::OffsetDateTime) -> String {
    format!(
        "{:04}/{:02}/{:02}/{:02}",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour()
    )
}

impl InvocationLog {
    pub fn new(
        dir: &Path,
        url: &str,
        account: &str,
        region: &str,
        large_body_bytes: usize,
    ) -> Result<InvocationLog, String> {
        let parsed =
            url::Url::parse(url).map_err(|e| format!("invocation log store {url:?}: {e}"))?;
        let opts: Vec<(String, String)> = std::env::vars()
            .filter(|(k, _)| k.starts_with("AWS_"))
            .map(|(k, v)| (k.to_lowercase(), v))
            .collect();
        let (store, prefix) =
            object_store::parse_url_opts(&parsed, opts).map_err(|e| e.to_string())?;
        std::fs::create_dir_all(dir.join("ready")).map_err(|e| e.to_string())?;
        let prefix = prefix.as_ref().trim_matches('/');
        let head = if prefix.is_empty() {
            String::new()
        } else {
            format!("{prefix}/")
        };
        Ok(InvocationLog {
            dir: dir.to_owned(),
            store: Arc::from(store),
            base: format!("{head}AWSLogs/{account}/BedrockModelInvocationLogs/{region}"),
            account: account.to_owned(),
            region: region.to_owned(),
            large_body_bytes,
            open: Mutex::new(()),
        })
    }

    /// Where a large body goes, relative to the store's root.
    fn body_key(&self, hour: &str, request_id: &str, which: &str) -> String {
        format!("{}/{hour}/data/{request_id}-{which}.json", self.base)
    }

    /// Appends a record to the local log.
    pub fn record(&self, inv: &Invocation<'_>) {
        let now = time::OffsetDateTime::now_utc();
        let hour = hour_path(now);
        let mut input = json!({
            "inputContentType": "application/json",
            "inputTokenCount": inv.input_tokens,
        });
        let mut output = json!({
            "outputContentType": "application/json",
            "outputTokenCount": inv.output_tokens,
        });
        for (slot, body, which) in [
            (&mut input, &inv.input, "input"),
            (&mut output, &inv.output, "output"),
        ] {
            let bytes = serde_json::to_vec(body).unwrap_or_default();
            if bytes.len() > self.large_body_bytes {
                let key = self.body_key(&hour, inv.request_id, which);
                let local = self.dir.join("ready").join(key.replace('/', "__"));
                if std::fs::write(&local, &bytes).is_ok() {
                    slot[format!("{which}BodyS3Path")] = json!(key);
                }
            } else {
                slot[format!("{which}BodyJson")] = body.clone();
            }
        }
        let record = json!({
            "schemaType": "ModelInvocationLog",
            "schemaVersion": "1.0",
            "timestamp": now.format(&time::format_description::well_known::Rfc3339).unwrap_or_default(),
            "accountId": self.account,
            "identity": {"arn": inv.principal.map(|p| format!("arn:aws:iam::{}:user/{p}", self.account))},
            "region": self.region,
            "requestId": inv.request_id,
            "operation": inv.operation,
            "modelId": inv.model_id,
            "input": input,
            "output": output,
            "inferenceRegion": inv.inference_region,
        });
        let _guard = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("open.jsonl"));
        match file {
            Ok(mut f) => {
                let mut line = serde_json::to_vec(&record).unwrap_or_default();
                line.push(b'\n');
                if f.write_all(&line).and_then(|()| f.sync_data()).is_err() {
                    tracing::error!("cannot write the invocation log");
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot open the invocation log"),
        }
    }

    /// Batches the open file into a gzip object and ships everything ready.
    pub async fn flush(&self) {
        {
            let _guard = self.open.lock().unwrap_or_else(|p| p.into_inner());
            let open = self.dir.join("open.jsonl");
            if let Ok(text) = std::fs::read(&open)
                && !text.is_empty()
            {
                let now = time::OffsetDateTime::now_utc();
                let key = format!(
                    "{}/{}/{}-{}.json.gz",
                    self.base,
                    hour_path(now),
                    now.unix_timestamp(),
                    uuid::Uuid::new_v4().simple()
                );
                let mut gz =
                    flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
                let packed = gz.write_all(&text).and_then(|()| gz.finish());
                if let Ok(bytes) = packed
                    && std::fs::write(self.dir.join("ready").join(key.replace('/', "__")), bytes)
                        .is_ok()
                {
                    let _ = std::fs::remove_file(&open);
                }
            }
        }
        let Ok(entries) = std::fs::read_dir(self.dir.join("ready")) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let key = object_store::path::Path::from(name.replace("__", "/"));
            let Ok(bytes) = std::fs::read(e.path()) else {
                continue;
            };
            match self.store.put(&key, PutPayload::from(bytes)).await {
                Ok(_) => {
                    let _ = std::fs::remove_file(e.path());
                }
                Err(err) => {
                    tracing::warn!(object = %key, error = %err, "invocation log store unavailable; will retry");
                    break;
                }
            }
        }
    }
}
