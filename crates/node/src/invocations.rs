//! Model invocation logging: full request and response bodies, only in the source region,
//! only when configured for it. Records (the managed service's `ModelInvocationLog`
//! schema, plus `inferenceRegion`) are appended to a local file, batched every second into
//! gzip JSON lines under `<prefix>/AWSLogs/<account>/BedrockModelInvocationLogs/<region>/
//! YYYY/MM/DD/HH/`, and shipped to the region's object store; a body over the size
//! threshold goes to its own object, referenced by path. The destination of a forwarded
//! request never logs anything of it: logging happens only at the API edge.
//!
//! A thread of the log's own appends the records: the ones waiting at the same time are
//! written together and flushed to disk with one `fdatasync` (a request's answer waits
//! for its record), so no request task blocks on the disk and concurrent requests share
//! a flush.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, mpsc};

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
    /// Guards `open.jsonl` between the writer's appends and the packing into batches.
    open: Arc<Mutex<()>>,
    writer: mpsc::Sender<Job>,
}

/// A record for the writer thread: the record, the bodies too large to go in it (each
/// referenced from it once written) and the request waiting for it.
struct Job {
    record: Value,
    bodies: Vec<LargeBody>,
    done: tokio::sync::oneshot::Sender<()>,
}

struct LargeBody {
    /// `input` or `output`.
    which: &'static str,
    /// Its object key, relative to the store's root.
    key: String,
    bytes: Vec<u8>,
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
        let open = Arc::new(Mutex::new(()));
        let (writer, jobs) = mpsc::channel::<Job>();
        let (at, guard) = (dir.to_owned(), open.clone());
        std::thread::Builder::new()
            .name("invocation log".into())
            .spawn(move || write_loop(&at, &guard, &jobs))
            .map_err(|e| format!("cannot start the invocation log's writer: {e}"))?;
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
            open,
            writer,
        })
    }

    /// Where a large body goes, relative to the store's root.
    fn body_key(&self, hour: &str, request_id: &str, which: &str) -> String {
        format!("{}/{hour}/data/{request_id}-{which}.json", self.base)
    }

    /// Appends a record to the local log; returns once it is on disk.
    pub async fn record(&self, inv: &Invocation<'_>) {
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
        let mut bodies = Vec::new();
        for (slot, body, which) in [
            (&mut input, &inv.input, "input"),
            (&mut output, &inv.output, "output"),
        ] {
            let bytes = serde_json::to_vec(body).unwrap_or_default();
            if bytes.len() > self.large_body_bytes {
                bodies.push(LargeBody {
                    which,
                    key: self.body_key(&hour, inv.request_id, which),
                    bytes,
                });
            } else {
                slot[format!("{which}BodyJson")] = body.clone();
            }
        }
        // What the caller asked to be recorded with the call: Converse's
        // `requestMetadata`, OpenAI's `metadata`.
        let metadata = ["requestMetadata", "metadata"]
            .iter()
            .find_map(|k| inv.input.get(k).filter(|v| v.is_object()))
            .cloned();
        let mut record = json!({
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
        if let Some(metadata) = metadata {
            record["requestMetadata"] = metadata;
        }
        let (done, written) = tokio::sync::oneshot::channel();
        let job = Job {
            record,
            bodies,
            done,
        };
        if self.writer.send(job).is_err() {
            tracing::error!("the invocation log's writer has stopped");
            return;
        }
        let _ = written.await;
    }

    /// Batches the open file into a gzip object and ships everything ready.
    pub async fn flush(&self) {
        let (dir, base, open) = (self.dir.clone(), self.base.clone(), self.open.clone());
        let _ = tokio::task::spawn_blocking(move || pack(&dir, &base, &open)).await;
        let Ok(mut entries) = tokio::fs::read_dir(self.dir.join("ready")).await else {
            return;
        };
        while let Ok(Some(e)) = entries.next_entry().await {
            let name = e.file_name().to_string_lossy().into_owned();
            let key = object_store::path::Path::from(name.replace("__", "/"));
            let Ok(bytes) = tokio::fs::read(e.path()).await else {
                continue;
            };
            match self.store.put(&key, PutPayload::from(bytes)).await {
                Ok(_) => {
                    let _ = tokio::fs::remove_file(e.path()).await;
                }
                Err(err) => {
                    tracing::warn!(object = %key, error = %err, "invocation log store unavailable; will retry");
                    break;
                }
            }
        }
    }
}

/// The writer thread: each batch is what waits when it wakes, its large bodies written to
/// files of their own first (a record names a body's object only once it is written),
/// then its records appended to `open.jsonl` and flushed with one `fdatasync`, then every
/// request in it answered.
fn write_loop(dir: &Path, open: &Mutex<()>, jobs: &mpsc::Receiver<Job>) {
    while let Ok(first) = jobs.recv() {
        let mut batch = vec![first];
        while batch.len() < 4096
            && let Ok(job) = jobs.try_recv()
        {
            batch.push(job);
        }
        let mut lines = Vec::new();
        for job in &mut batch {
            for body in job.bodies.drain(..) {
                let local = dir.join("ready").join(body.key.replace('/', "__"));
                match std::fs::write(&local, &body.bytes) {
                    Ok(()) => {
                        job.record[body.which][format!("{}BodyS3Path", body.which)] =
                            json!(body.key);
                    }
                    Err(e) => {
                        tracing::error!(file = %local.display(), error = %e, "cannot write an invocation body");
                    }
                }
            }
            if serde_json::to_writer(&mut lines, &job.record).is_ok() {
                lines.push(b'\n');
            }
        }
        let written = {
            let _guard = open.lock().unwrap_or_else(|p| p.into_inner());
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.join("open.jsonl"))
                .and_then(|mut f| f.write_all(&lines).and_then(|()| f.sync_data()))
        };
        if let Err(e) = written {
            tracing::error!(error = %e, "cannot write the invocation log");
        }
        for job in batch {
            let _ = job.done.send(());
        }
    }
}

/// Packs `open.jsonl` into a gzip batch in `ready/`, named for its object. The file is
/// only renamed under the lock, so the writer waits for a rename, not for the packing; a
/// batch left half-packed by a crash is packed first.
fn pack(dir: &Path, base: &str, open: &Mutex<()>) {
    let taken = dir.join("packing.jsonl");
    if !taken.exists() {
        let _guard = open.lock().unwrap_or_else(|p| p.into_inner());
        if std::fs::rename(dir.join("open.jsonl"), &taken).is_err() {
            return;
        }
    }
    let Ok(text) = std::fs::read(&taken) else {
        return;
    };
    if text.is_empty() {
        let _ = std::fs::remove_file(&taken);
        return;
    }
    let now = time::OffsetDateTime::now_utc();
    let key = format!(
        "{base}/{}/{}-{}.json.gz",
        hour_path(now),
        now.unix_timestamp(),
        uuid::Uuid::new_v4().simple()
    );
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let packed = gz.write_all(&text).and_then(|()| gz.finish());
    if let Ok(bytes) = packed
        && std::fs::write(dir.join("ready").join(key.replace('/', "__")), bytes).is_ok()
    {
        let _ = std::fs::remove_file(&taken);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn each_record_is_on_disk_once_its_call_returns_also_when_many_share_a_flush() {
        let dir = tempfile::tempdir().unwrap();
        let store = tempfile::tempdir().unwrap();
        let url = format!("file://{}", store.path().display());
        let log = Arc::new(
            InvocationLog::new(dir.path(), &url, "000000000000", "eu-west-1", 64).unwrap(),
        );
        let calls = (0..64).map(|i| {
            let (log, at) = (log.clone(), dir.path().to_owned());
            tokio::spawn(async move {
                let id = format!("req-{i}");
                // Every eighth input is too large for the record and goes to its own file.
                let text = "x".repeat(if i % 8 == 0 { 100 } else { 1 });
                log.record(&Invocation {
                    request_id: &id,
                    operation: "Converse",
                    model_id: "m",
                    principal: Some("alice"),
                    inference_region: "eu-west-1",
                    input: json!({"text": text}),
                    output: json!({"text": "ok"}),
                    input_tokens: 1,
                    output_tokens: 1,
                })
                .await;
                let written = std::fs::read_to_string(at.join("open.jsonl")).unwrap();
                assert!(
                    written.contains(&format!("\"{id}\"")),
                    "{id} not written when its call returned"
                );
            })
        });
        for call in futures::future::join_all(calls).await {
            call.unwrap();
        }
        let text = std::fs::read_to_string(dir.path().join("open.jsonl")).unwrap();
        let records: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(records.len(), 64);
        for i in 0..64 {
            let id = format!("req-{i}");
            let mine: Vec<&Value> = records
                .iter()
                .filter(|r| r["requestId"] == id.as_str())
                .collect();
            assert_eq!(mine.len(), 1, "{id}");
            let input = &mine[0]["input"];
            if i % 8 == 0 {
                let key = input["inputBodyS3Path"].as_str().unwrap();
                let local = dir.path().join("ready").join(key.replace('/', "__"));
                assert_eq!(
                    std::fs::read(local).unwrap(),
                    serde_json::to_vec(&json!({"text": "x".repeat(100)})).unwrap()
                );
                assert!(input.get("inputBodyJson").is_none());
            } else {
                assert_eq!(input["inputBodyJson"], json!({"text": "x"}));
            }
        }
    }
}
