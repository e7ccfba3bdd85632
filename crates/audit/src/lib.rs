//! The audit trail of a source region: one CloudTrail-shaped event per runtime call,
//! written to a local append-only log and fsynced (group commit) before the client's answer
//! completes; sealed into files; each sealed file listed, with its SHA-256, in a digest
//! that chains the previous digest and is signed with the region's node key. Anyone with
//! the deployment CA can verify the chain and every processing receipt in it.
//!
//! Only this crate decides the record bytes.

use std::borrow::Cow;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use crisp_transport::SignedReceipt;
use crisp_transport::tls::CaVerifier;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// The record format version (a stability promise).
pub const EVENT_VERSION: &str = "1.0";

/// An event's text: borrowed from what the node already holds when it writes one (no
/// copy per field and request), owned when it is read back from a file.
pub type Text<'a> = Cow<'a, str>;

fn is_empty(text: &Text<'_>) -> bool {
    text.is_empty()
}

/// Who called.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UserIdentity<'a> {
    #[serde(rename = "type")]
    pub kind: Text<'a>,
    pub principal_id: Text<'a>,
    pub account_id: Text<'a>,
    /// The credential the caller signed in with: an API key's ID (`k-...`) or a SigV4
    /// access key ID. A caller refused at sign-in is `Anonymous`, with the key it presented
    /// when that is known: a revoked API key's ID, or the access key ID a signature that
    /// does not hold names. Absent otherwise, and in events written before it was.
    #[serde(default, skip_serializing_if = "is_empty")]
    pub access_key_id: Text<'a>,
}

/// One runtime call, as kept in the source region. Never contains prompt text.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditEvent<'a> {
    pub event_version: Text<'a>,
    pub event_id: Text<'a>,
    pub event_time: Text<'a>,
    pub event_source: Text<'a>,
    /// `ChatCompletion` (OpenAI API), `Converse`, `ConverseStream`, `InvokeModel`, ...
    pub event_name: Text<'a>,
    /// The source region.
    pub aws_region: Text<'a>,
    pub user_identity: UserIdentity<'a>,
    #[serde(rename = "sourceIPAddress")]
    pub source_ip_address: Text<'a>,
    pub user_agent: Text<'a>,
    #[serde(rename = "requestID")]
    pub request_id: Text<'a>,
    pub request_parameters: RequestParameters<'a>,
    pub additional_event_data: AdditionalEventData<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_code: Option<Text<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_message: Option<Text<'a>>,
    /// A management call (`CreateInferenceProfile`, `DeleteInferenceProfile`): it ran no
    /// model, so it has no inference region, tokens or cost.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub management_event: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestParameters<'a> {
    /// The model or profile ID as the client sent it; empty for an OpenAI-API call
    /// refused at sign-in, whose body (where it names the model) is not read from a
    /// caller that did not sign in.
    pub model_id: Text<'a>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AdditionalEventData<'a> {
    /// Where the model ran; always set when it ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inference_region: Option<Text<'a>>,
    /// The profile (or model) the request resolved to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profile_id: Option<Text<'a>>,
    /// Regions that refused before the one that ran it.
    #[serde(default)]
    pub regions_tried: Vec<Text<'a>>,
    #[serde(default)]
    pub input_tokens: u32,
    #[serde(default)]
    pub output_tokens: u32,
    /// US dollars, at the source region's price for the profile type.
    #[serde(default)]
    pub cost_usd: f64,
    /// The answer ended early (its client left, it broke off, the node stopped): the
    /// engine never reported its usage, so `outputTokens` is the tokens of the text it
    /// produced until then (`crisp_engine::count_chunk_tokens`; a streamed answer sent that text on;
    /// a whole answer's client that left got none, but the engine did the work),
    /// `inputTokens` is the
    /// prompt as crisp estimates it (the whole prompt was processed before the first
    /// chunk), and `costUsd` is the price of both.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub partial: bool,
    /// What went wrong in words that are the same whichever API the caller spoke
    /// (`capacity_exhausted` where `errorCode` says `ThrottlingException` or
    /// `capacity_exhausted`); absent for calls that completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_kind: Option<Text<'a>>,
    /// The application profile it came through, with its tags.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub application_profile: Option<Text<'a>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<(Text<'a>, Text<'a>)>,
    /// The destination's signed statement of where it ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub receipt: Option<SignedReceipt>,
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("the audit log cannot be written: {0}")]
    Io(String),
    #[error("the audit log has stopped")]
    Stopped,
}

/// A signer for digests: the region's node key, with its certificate.
pub trait Signer: Send + Sync + 'static {
    fn sign(&self, message: &[u8]) -> Vec<u8>;
    fn certificate_der(&self) -> Vec<u8>;
}

/// When to seal the open file.
#[derive(Clone, Copy, Debug)]
pub struct Sealing {
    pub max_bytes: u64,
    pub max_age: Duration,
}

impl Default for Sealing {
    fn default() -> Self {
        Sealing {
            max_bytes: 8 << 20,
            max_age: Duration::from_secs(300),
        }
    }
}

/// When an event counts as recorded, i.e. when `AuditLog::record` returns.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Durability {
    /// Once it is on disk (`fdatasync`): it survives a crash of the machine. Writes that
    /// wait at the same time share one flush.
    #[default]
    Fsync,
    /// Once it is written to the file (the operating system's page cache): it survives a
    /// crash of the process, and is flushed to disk within `flush_within` (and before
    /// its file is sealed).
    Write { flush_within: Duration },
}

/// A digest: signed, chained, listing one sealed file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DigestBody {
    pub sequence: u64,
    pub region: String,
    pub file: String,
    pub file_sha256: String,
    pub events: u64,
    /// SHA-256 of the previous digest document; empty for the first.
    pub previous_digest_sha256: String,
    pub previous_signature: String,
    /// When the file was sealed (RFC 3339, UTC); absent in digests of older versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed_at: Option<String>,
    /// Set when `fileSha256` is the hash of the file as it was found at sealing, not of
    /// the bytes the writer appended (which is what every other digest signs), with why:
    /// the file was left by a node that stopped without sealing it, or a write to it
    /// failed half-way. Whatever happened to such a file before its seal is not attested.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hashed_as_found: Option<String>,
    /// Set when the open file was deleted or replaced while its node wrote it, with what
    /// happened: the node wrote the events it had appended, read back from its open
    /// handle, under this digest's file name. `fileSha256` still signs what it appended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restored: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DigestDocument {
    /// The body as the exact JSON bytes that were signed.
    pub body: String,
    pub signature: String,
    pub certificate: String,
}

type Job = (Vec<u8>, tokio::sync::oneshot::Sender<Result<(), String>>);

/// The durable, append-only audit log of one region.
#[derive(Clone)]
pub struct AuditLog {
    tx: mpsc::Sender<Job>,
    writer: Arc<Mutex<Writer>>,
    durability: Durability,
    dir: PathBuf,
    /// `Durability::Write`: the events each thread is gathering for its next write.
    gathering: Arc<thread_local::ThreadLocal<Mutex<Gathering>>>,
}

/// Events recorded by one thread's tasks while the first of them yields once, so that
/// the tasks the thread runs next add theirs: one `write` for all of them
/// (`Durability::Write`). Per thread, so that waiting for the write wakes no other
/// thread.
#[derive(Default)]
struct Gathering {
    lines: Vec<u8>,
    events: u64,
    /// The batch being gathered: started by its first event, taken by its write.
    batch: Option<Arc<Batch>>,
}

/// One write's outcome, for every event in it.
#[derive(Default)]
struct Batch {
    result: OnceLock<Result<(), String>>,
    written: tokio::sync::Notify,
}

impl Batch {
    async fn written(&self) -> Result<(), AuditError> {
        loop {
            let written = self.written.notified();
            let mut written = std::pin::pin!(written);
            written.as_mut().enable();
            if let Some(result) = self.result.get() {
                return result.clone().map_err(AuditError::Io);
            }
            written.await;
        }
    }
}

/// The first event of a batch: writes the batch, also when the task that recorded it
/// is dropped before it does (the other events in it wait for that write).
struct Lead<'a> {
    log: &'a AuditLog,
    gathering: &'a Mutex<Gathering>,
    batch: Option<Arc<Batch>>,
}

impl Lead<'_> {
    fn write(&mut self) -> Result<(), String> {
        let Some(batch) = self.batch.take() else {
            return Ok(());
        };
        let result = self.log.write_gathered(self.gathering);
        let _ = batch.result.set(result.clone());
        batch.written.notify_waiters();
        result
    }
}

impl Drop for Lead<'_> {
    fn drop(&mut self) {
        let _ = self.write();
    }
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog").field("dir", &self.dir).finish()
    }
}

const OPEN: &str = "open.jsonl";

/// Present while the trail's node has stopped cleanly, with its open file sealed.
const STOPPED: &str = ".stopped";

/// The start of the `hashedAsFound` reason of a file found after a clean stop: its events
/// were written by something other than crisp.
const AFTER_CLEAN_STOP: &str = "found after its node had stopped cleanly with everything sealed";

/// Why a file's digest hashes it as found: see [`DigestBody::hashed_as_found`].
const LEFT_UNSEALED: &str = "left unsealed by a node that stopped without sealing it";
const WRITE_FAILED: &str = "a write to it failed part-way";

/// The start of the name a file found in place of the open file, while its node wrote
/// the one it had opened, is moved to: it holds no event crisp wrote.
const REPLACED: &str = "replaced-";

/// Opens the open file to append to it, and to read back what was appended should its
/// name be taken away (see [`Writer::check_open_file`]).
fn open_append(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .open(path)
}

/// The device and inode of an open file.
fn identity(file: &File) -> std::io::Result<(u64, u64)> {
    let m = file.metadata()?;
    Ok((m.dev(), m.ino()))
}

/// Says so, loudly, when the file just sealed at `path` is not what its writer wrote
/// (`written`, the digest of the appended bytes): something else changed it while it was
/// open. Its digest signs what was written, so verification reports the file as modified
/// either way; this is the early warning. Read back on a thread of its own: reading and
/// hashing a sealed file of 8 MiB takes milliseconds, and the seal happens under the
/// writer's lock, which every event being recorded waits for.
fn check_unchanged(path: PathBuf, written: String) {
    let check = move || match sha256_file(&path) {
        Ok(found) if found == written => {}
        Ok(_) => tracing::error!(
            file = %path.display(),
            "the audit file was changed by something other than this node before it was sealed; its digest signs what the node wrote, so `crisp audit verify` reports it as modified"
        ),
        Err(e) => tracing::warn!(
            error = %e,
            file = %path.display(),
            "cannot read back the sealed audit file"
        ),
    };
    if let Err(e) = std::thread::Builder::new()
        .name("audit-check".into())
        .spawn(check)
    {
        tracing::warn!(error = %e, "cannot start the read-back check of a sealed audit file");
    }
}

fn sha256_file(path: &Path) -> std::io::Result<String> {
    Ok(hex::encode(Sha256::digest(std::fs::read(path)?)))
}

struct Writer {
    dir: PathBuf,
    /// SHA-256 of the bytes this writer appended to the open file: what its seal signs, so
    /// an edit of the open file before the seal is not signed with it.
    written: Sha256,
    /// Why the open file's hash can only be taken from the disk (see
    /// [`DigestBody::hashed_as_found`]).
    hash_as_found: Option<String>,
    region: String,
    signer: Arc<dyn Signer>,
    sealing: Sealing,
    file: File,
    /// The device and inode of `file`: what `open.jsonl` must still name.
    identity: (u64, u64),
    /// Written since the last flush to disk.
    unflushed: bool,
    /// The last flush failed.
    flush_failed: bool,
    bytes: u64,
    events: u64,
    opened: Instant,
    sequence: u64,
    previous_sha: String,
    previous_sig: String,
    /// Held while this writer lives: one writer per trail, even across processes.
    /// The trail is marked as stopped cleanly ([`STOPPED`]).
    stopped_mark: bool,
    _lock: File,
}

impl Writer {
    fn open(
        dir: &Path,
        region: &str,
        signer: Arc<dyn Signer>,
        sealing: Sealing,
    ) -> std::io::Result<Writer> {
        std::fs::create_dir_all(dir.join("digests"))?;
        // A second writer would seal the file the first appends to: refuse it.
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(".lock"))?;
        // A writer that is just stopping (a restart) gets a moment to let go.
        let mut attempts = 0;
        while let Err(e) = lock.try_lock() {
            attempts += 1;
            if attempts > 40 {
                return Err(std::io::Error::other(format!(
                    "{} is already written by another node ({e}): run one node per region and data directory",
                    dir.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // Continue the chain where it ended.
        let mut sequence = 0;
        let mut previous_sha = String::new();
        let mut previous_sig = String::new();
        for (seq, path) in digests(dir)? {
            let text = std::fs::read(&path)?;
            if let Ok(doc) = serde_json::from_slice::<DigestDocument>(&text) {
                sequence = seq + 1;
                previous_sha = hex::encode(Sha256::digest(&text));
                previous_sig = doc.signature;
            }
        }
        let path = dir.join(OPEN);
        // A node killed while it appended leaves part of an event after the last newline:
        // that event was never recorded (its call was not answered), so it is cut off
        // rather than sealed as an unreadable line, and the digest says so.
        let cut = cut_partial_line(&path)?;
        let stopped_cleanly = dir.join(STOPPED).exists();
        if stopped_cleanly {
            std::fs::remove_file(dir.join(STOPPED))?;
        }
        let file = open_append(&path)?;
        let bytes = file.metadata()?.len();
        let events = if bytes > 0 {
            BufReader::new(File::open(&path)?).lines().count() as u64
        } else {
            0
        };
        let mut w = Writer {
            dir: dir.to_owned(),
            written: Sha256::new(),
            hash_as_found: (bytes > 0 || cut > 0).then(|| match cut {
                _ if stopped_cleanly => {
                    format!("{AFTER_CLEAN_STOP}: written by something other than crisp")
                }
                0 => LEFT_UNSEALED.to_owned(),
                n => format!(
                    "{LEFT_UNSEALED}; the {n} bytes of the event it was writing when it stopped were removed (that event was never recorded)"
                ),
            }),
            region: region.to_owned(),
            signer,
            sealing,
            identity: identity(&file)?,
            file,
            unflushed: false,
            flush_failed: false,
            bytes,
            events,
            opened: Instant::now(),
            sequence,
            previous_sha,
            previous_sig,
            stopped_mark: false,
            _lock: lock,
        };
        // A crash between sealing a file and writing its digest leaves the file without
        // one: its digest is written now, so the chain covers it and the next seal does
        // not take its name.
        let orphan = format!("audit-{:010}.jsonl", w.sequence);
        if dir.join(&orphan).exists() {
            let events = BufReader::new(File::open(dir.join(&orphan))?)
                .lines()
                .count() as u64;
            w.write_digest(orphan, events, Some(LEFT_UNSEALED.to_owned()))?;
        }
        if stopped_cleanly && w.events > 0 {
            tracing::error!(
                file = %path.display(),
                events = w.events,
                "the audit file holds events written while this node was stopped, after it had sealed everything it wrote; they are sealed as found and `crisp audit verify` reports them"
            );
        }
        if cut > 0 {
            tracing::warn!(
                file = %path.display(),
                bytes = cut,
                "removed the part of an audit event its node was writing when it stopped (that event was never recorded)"
            );
        }
        // Events left in the open file by a crash are sealed first, so a restart never
        // mixes two runs in one file.
        if w.events > 0 {
            w.seal()?;
        }
        w.hash_as_found = None;
        Ok(w)
    }

    /// Appends whole lines (`events` of them); they are flushed by [`Writer::flush`].
    fn append(&mut self, lines: &[u8], events: u64) -> std::io::Result<()> {
        // A flush that failed is retried first; while it fails, so do new events, and
        // the node learns that its log is failing.
        if self.flush_failed {
            self.flush()?;
        }
        if self.stopped_mark {
            std::fs::remove_file(self.dir.join(STOPPED))?;
            self.stopped_mark = false;
        }
        if let Err(e) = self.file.write_all(lines) {
            // Part of `lines` may be in the file: cut it back to the last whole event, so
            // the next event starts a line of its own and the file stays what was
            // written. Only if that fails is its content no longer known here.
            if self.file.set_len(self.bytes).is_err() {
                self.hash_as_found = Some(WRITE_FAILED.to_owned());
            }
            return Err(e);
        }
        self.written.update(lines);
        self.unflushed = true;
        self.bytes += lines.len() as u64;
        self.events += events;
        Ok(())
    }

    /// Flushes what was written to disk, then makes sure the open file still has its name
    /// (see [`Writer::check_open_file`]).
    fn flush(&mut self) -> std::io::Result<()> {
        if self.unflushed {
            self.flush_failed = true;
            self.file.sync_data()?;
            self.flush_failed = false;
            self.unflushed = false;
        }
        self.check_open_file()
    }

    /// Makes sure `open.jsonl` still names the file this writer appends to. If it was
    /// deleted or replaced, the events appended to it are still in the file (the open
    /// handle keeps it alive): they are read back and sealed under the next sealed name,
    /// so none is lost, and the digest says what happened. A file found in its place is
    /// moved aside (`replaced-N.jsonl`), out of what `usage` and `lookup` read, and
    /// verification reports it.
    fn check_open_file(&mut self) -> std::io::Result<()> {
        let path = self.dir.join(OPEN);
        let replaced = match std::fs::symlink_metadata(&path) {
            Ok(m) if (m.dev(), m.ino()) == self.identity => return Ok(()),
            Ok(_) => true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => return Err(e),
        };
        let what = if replaced {
            let aside = format!("{REPLACED}{:010}.jsonl", self.sequence);
            std::fs::rename(&path, self.dir.join(&aside))?;
            tracing::error!(
                file = %path.display(),
                moved_to = %self.dir.join(&aside).display(),
                "the open audit file was replaced by another file while this node wrote it; that file was moved aside, and `crisp audit verify` reports it"
            );
            format!(
                "{OPEN} was replaced by another file while its node wrote it (moved to {aside})"
            )
        } else {
            tracing::error!(
                file = %path.display(),
                events = self.events,
                "the open audit file was deleted while this node wrote it; the events it holds are restored from the node's open handle and sealed"
            );
            format!("{OPEN} was deleted while its node wrote it")
        };
        if self.bytes > 0 {
            let mut appended = vec![0; usize::try_from(self.bytes).map_err(std::io::Error::other)?];
            self.file.read_exact_at(&mut appended, 0)?;
            let name = format!("audit-{:010}.jsonl", self.sequence);
            let mut copy = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(self.dir.join(&name))?;
            copy.write_all(&appended)?;
            copy.sync_all()?;
            self.sign_sealed(
                name,
                Some(format!(
                    "{what}; the node wrote the events it had appended, read back from its open handle, to this file"
                )),
            )?;
        }
        self.start_file()
    }

    fn due(&self) -> bool {
        self.events > 0
            && (self.bytes >= self.sealing.max_bytes
                || self.opened.elapsed() >= self.sealing.max_age)
    }

    /// Renames the open file to its sealed name and writes its signed digest.
    fn seal(&mut self) -> std::io::Result<()> {
        // The flush may itself seal what was written, if the open file lost its name.
        self.flush()?;
        if self.bytes == 0 {
            return Ok(());
        }
        let name = format!("audit-{:010}.jsonl", self.sequence);
        std::fs::rename(self.dir.join(OPEN), self.dir.join(&name))?;
        self.sign_sealed(name, None)?;
        self.start_file()
    }

    /// Writes the digest of the file this writer's events were just sealed into: it signs
    /// what was appended, or the file as found when that is not known.
    fn sign_sealed(&mut self, name: String, restored: Option<String>) -> std::io::Result<()> {
        let (sha, as_found) = match self.hash_as_found.clone() {
            Some(why) => (sha256_file(&self.dir.join(&name))?, Some(why)),
            None => {
                let sha = hex::encode(self.written.clone().finalize());
                check_unchanged(self.dir.join(&name), sha.clone());
                (sha, None)
            }
        };
        self.write_digest_of(name, sha, self.events, as_found, restored)
    }

    /// Opens a new, empty open file.
    fn start_file(&mut self) -> std::io::Result<()> {
        self.written = Sha256::new();
        self.hash_as_found = None;
        self.file = open_append(&self.dir.join(OPEN))?;
        self.identity = identity(&self.file)?;
        self.bytes = 0;
        self.events = 0;
        self.opened = Instant::now();
        Ok(())
    }

    /// Writes the digest of the sealed file `name`, hashed as it is on disk, saying why.
    fn write_digest(
        &mut self,
        name: String,
        events: u64,
        why: Option<String>,
    ) -> std::io::Result<()> {
        let sha = sha256_file(&self.dir.join(&name))?;
        self.write_digest_of(name, sha, events, why, None)
    }

    /// Writes the signed digest of the sealed file `name` as the next link of the chain.
    fn write_digest_of(
        &mut self,
        name: String,
        file_sha256: String,
        events: u64,
        hashed_as_found: Option<String>,
        restored: Option<String>,
    ) -> std::io::Result<()> {
        let body = DigestBody {
            sequence: self.sequence,
            region: self.region.clone(),
            file: name,
            file_sha256,
            events,
            previous_digest_sha256: self.previous_sha.clone(),
            previous_signature: self.previous_sig.clone(),
            sealed_at: time::OffsetDateTime::now_utc()
                .format(&time::format_description::well_known::Rfc3339)
                .ok(),
            hashed_as_found,
            restored,
        };
        let body = serde_json::to_string(&body).map_err(std::io::Error::other)?;
        let doc = DigestDocument {
            signature: B64.encode(self.signer.sign(body.as_bytes())),
            certificate: B64.encode(self.signer.certificate_der()),
            body,
        };
        let text = serde_json::to_vec_pretty(&doc).map_err(std::io::Error::other)?;
        let path = self
            .dir
            .join("digests")
            .join(format!("digest-{:010}.json", self.sequence));
        let mut f = File::create(&path)?;
        f.write_all(&text)?;
        f.sync_all()?;
        File::open(&self.dir)?.sync_all()?;
        self.previous_sha = hex::encode(Sha256::digest(&text));
        self.previous_sig = doc.signature;
        self.sequence += 1;
        Ok(())
    }
}

/// Cuts what follows the last newline of `path` (a line being appended when its writer
/// died); returns how many bytes it removed. A missing file has none.
fn cut_partial_line(path: &Path) -> std::io::Result<u64> {
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let keep = text.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let cut = text.len() - keep;
    if cut > 0 {
        let f = OpenOptions::new().write(true).open(path)?;
        f.set_len(keep as u64)?;
        f.sync_all()?;
    }
    Ok(cut as u64)
}

fn digests(dir: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    let d = dir.join("digests");
    if !d.exists() {
        return Ok(out);
    }
    for e in std::fs::read_dir(d)? {
        let path = e?.path();
        let seq = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("digest-"))
            .and_then(|n| n.strip_suffix(".json"))
            .and_then(|n| n.parse::<u64>().ok());
        if let Some(seq) = seq {
            out.push((seq, path));
        }
    }
    out.sort();
    Ok(out)
}

impl AuditLog {
    /// Opens (or continues) the log in `dir`; an event is recorded once it is on disk.
    pub fn open(
        dir: &Path,
        region: &str,
        signer: Arc<dyn Signer>,
        sealing: Sealing,
    ) -> Result<AuditLog, AuditError> {
        Self::open_with(dir, region, signer, sealing, Durability::Fsync)
    }

    /// Opens (or continues) the log in `dir` with the given durability. A thread of its
    /// own flushes and seals; with [`Durability::Fsync`] it also writes, in group commits.
    pub fn open_with(
        dir: &Path,
        region: &str,
        signer: Arc<dyn Signer>,
        sealing: Sealing,
        durability: Durability,
    ) -> Result<AuditLog, AuditError> {
        let writer = Writer::open(dir, region, signer, sealing)
            .map_err(|e| AuditError::Io(e.to_string()))?;
        let writer = Arc::new(Mutex::new(writer));
        let (tx, rx) = mpsc::channel::<Job>();
        let shared = writer.clone();
        std::thread::Builder::new()
            .name(format!("audit-{region}"))
            .spawn(move || match durability {
                Durability::Fsync => commit_loop(&shared, &rx),
                Durability::Write { flush_within } => flush_loop(&shared, &rx, flush_within),
            })
            .map_err(|e| AuditError::Io(e.to_string()))?;
        Ok(AuditLog {
            tx,
            writer,
            durability,
            dir: dir.to_owned(),
            gathering: Arc::default(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Appends an event; resolves once it is recorded (see [`Durability`]).
    pub async fn record(&self, event: &AuditEvent<'_>) -> Result<(), AuditError> {
        if let Durability::Write { .. } = self.durability {
            return self.record_written(event).await;
        }
        // Sized for a typical event (about 600 bytes) so it is written without regrowing.
        let mut line = Vec::with_capacity(1024);
        serde_json::to_writer(&mut line, event).map_err(|e| AuditError::Io(e.to_string()))?;
        line.push(b'\n');
        let (done, wait) = tokio::sync::oneshot::channel();
        self.tx
            .send((line, done))
            .map_err(|_| AuditError::Stopped)?;
        wait.await
            .map_err(|_| AuditError::Stopped)?
            .map_err(AuditError::Io)
    }
}

impl AuditLog {
    /// `Durability::Write`: the event joins its thread's batch; the first event of a batch
    /// yields once, so that the tasks this thread runs next add theirs, and then writes
    /// them all. A write to the page cache takes microseconds: cheaper here than a
    /// hand-off to the log's thread and back.
    async fn record_written(&self, event: &AuditEvent<'_>) -> Result<(), AuditError> {
        let gathering = self.gathering.get_or_default();
        let (batch, first) = {
            let mut g = gathering.lock().map_err(|_| AuditError::Stopped)?;
            let start = g.lines.len();
            if g.lines.capacity() == 0 {
                // Sized for a few typical events (about 700 bytes each).
                g.lines.reserve(4096);
            }
            if let Err(e) = serde_json::to_writer(&mut g.lines, event) {
                g.lines.truncate(start);
                return Err(AuditError::Io(e.to_string()));
            }
            g.lines.push(b'\n');
            g.events += 1;
            match &g.batch {
                Some(batch) => (batch.clone(), false),
                None => {
                    let batch = Arc::new(Batch::default());
                    g.batch = Some(batch.clone());
                    (batch, true)
                }
            }
        };
        if !first {
            return batch.written().await;
        }
        let mut lead = Lead {
            log: self,
            gathering,
            batch: Some(batch),
        };
        tokio::task::yield_now().await;
        lead.write().map_err(AuditError::Io)
    }

    /// Writes what `gathering` holds, as one append.
    fn write_gathered(&self, gathering: &Mutex<Gathering>) -> Result<(), String> {
        let (mut lines, events) = {
            let mut g = gathering
                .lock()
                .map_err(|_| "the audit log has stopped".to_owned())?;
            g.batch = None;
            (std::mem::take(&mut g.lines), std::mem::take(&mut g.events))
        };
        let result = match self.writer.lock() {
            Ok(mut writer) => writer.append(&lines, events).map_err(|e| e.to_string()),
            Err(_) => Err("the audit log has stopped".to_owned()),
        };
        // The buffer is kept for the thread's next batch, unless one has started since.
        lines.clear();
        if let Ok(mut g) = gathering.lock()
            && g.lines.capacity() == 0
        {
            g.lines = lines;
        }
        result
    }

    /// Seals the open file now, if it holds events: a node that stops seals what it
    /// wrote, so its digest signs the bytes the node appended (a file left open is sealed
    /// at the next start as it is found then).
    ///
    /// It also marks the trail as stopped cleanly: events found in the open file at the
    /// next start were then written by something other than crisp, which `verify`
    /// reports. A write after this (a replaced node still draining) clears the mark.
    pub fn seal_now(&self) -> Result<(), AuditError> {
        let mut writer = self.writer.lock().map_err(|_| AuditError::Stopped)?;
        if writer.events > 0 {
            writer.seal().map_err(|e| AuditError::Io(e.to_string()))?;
        }
        File::create(writer.dir.join(STOPPED))
            .and_then(|f| f.sync_all())
            .map_err(|e| AuditError::Io(e.to_string()))?;
        writer.stopped_mark = true;
        Ok(())
    }
}

fn seal_if_due(writer: &mut Writer) {
    if writer.due()
        && let Err(e) = writer.seal()
    {
        tracing::error!(error = %e, "cannot seal the audit file");
    }
}

fn flush(writer: &mut Writer) {
    if let Err(e) = writer.flush() {
        tracing::error!(error = %e, "cannot flush the audit file");
    }
}

/// `Durability::Fsync`: writes what is queued in one batch, flushes it, then answers every
/// event in it. Requests that wait at the same time share one `fdatasync`.
fn commit_loop(writer: &Mutex<Writer>, rx: &mpsc::Receiver<Job>) {
    let tick = Duration::from_millis(500);
    loop {
        let first = match rx.recv_timeout(tick) {
            Ok(job) => job,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if let Ok(mut w) = writer.lock() {
                    // Nothing to flush: this checks the open file still has its name.
                    flush(&mut w);
                    seal_if_due(&mut w);
                }
                continue;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                // The log is dropped: a last check that the open file kept its name.
                if let Ok(mut w) = writer.lock() {
                    flush(&mut w);
                }
                return;
            }
        };
        let mut jobs = vec![first];
        while let Ok(job) = rx.try_recv() {
            jobs.push(job);
            if jobs.len() >= 4096 {
                break;
            }
        }
        let mut buf = Vec::with_capacity(jobs.iter().map(|(l, _)| l.len()).sum());
        for (line, _) in &jobs {
            buf.extend_from_slice(line);
        }
        let Ok(mut w) = writer.lock() else { return };
        let result = w
            .append(&buf, jobs.len() as u64)
            .and_then(|()| w.flush())
            .map_err(|e| e.to_string());
        for (_, done) in jobs {
            let _ = done.send(result.clone());
        }
        if result.is_ok() {
            seal_if_due(&mut w);
        }
    }
}

/// `Durability::Write`: events are written by `record`; this flushes whatever was written
/// every `flush_within`, and seals. At shutdown it flushes what is left.
fn flush_loop(writer: &Mutex<Writer>, rx: &mpsc::Receiver<Job>, flush_within: Duration) {
    let wait = flush_within.min(Duration::from_millis(500));
    loop {
        let stopping = matches!(
            rx.recv_timeout(wait),
            Err(mpsc::RecvTimeoutError::Disconnected)
        );
        let Ok(mut w) = writer.lock() else { return };
        flush(&mut w);
        if stopping {
            return;
        }
        seal_if_due(&mut w);
    }
}

/// One problem found by verification.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Finding {
    BadSignature {
        digest: String,
        why: String,
    },
    BrokenChain {
        digest: String,
    },
    /// The digest's signed body and signature are intact, but its bytes are not those
    /// the next digest chains to: it was rewritten around what was signed.
    RewrittenDigest {
        digest: String,
    },
    MissingFile {
        file: String,
    },
    ModifiedFile {
        file: String,
    },
    UnlistedFile {
        file: String,
    },
    MissingDigest {
        sequence: u64,
    },
    BadEvent {
        file: String,
        line: usize,
        why: String,
    },
    /// The file holds another number of events than its signed digest counted.
    EventCount {
        file: String,
        signed: u64,
        found: u64,
    },
    BadReceipt {
        file: String,
        request_id: String,
        why: String,
    },
    /// Events appeared in the open file while the node was stopped, after it had sealed
    /// everything it wrote.
    WrittenWhileStopped {
        file: String,
    },
    /// A file was put in place of the open file while its node wrote it; the node moved
    /// it aside. Its content was not written by crisp.
    ReplacedOpenFile {
        file: String,
    },
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Finding::BadSignature { digest, why } => {
                write!(f, "{digest}: signature not valid ({why})")
            }
            Finding::BrokenChain { digest } => write!(
                f,
                "{digest}: does not chain to the previous digest (a digest was removed, changed or inserted)"
            ),
            Finding::RewrittenDigest { digest } => write!(
                f,
                "{digest}: changed after it was sealed (its signed body is intact, but the next digest chains to other bytes)"
            ),
            Finding::MissingFile { file } => {
                write!(f, "{file}: listed in a digest but missing (deleted)")
            }
            Finding::ModifiedFile { file } => write!(
                f,
                "{file}: its SHA-256 differs from its digest (modified or swapped)"
            ),
            Finding::UnlistedFile { file } => {
                write!(f, "{file}: not listed in any digest (inserted)")
            }
            Finding::MissingDigest { sequence } => {
                write!(f, "digest {sequence}: missing (deleted)")
            }
            Finding::BadEvent { file, line, why } => {
                write!(f, "{file}:{line}: unreadable event ({why})")
            }
            Finding::EventCount {
                file,
                signed,
                found,
            } => write!(
                f,
                "{file}: holds {found} events, its signed digest counted {signed}"
            ),
            Finding::BadReceipt {
                file,
                request_id,
                why,
            } => write!(f, "{file}: request {request_id}: receipt not valid ({why})"),
            Finding::ReplacedOpenFile { file } => write!(
                f,
                "{file}: was put in place of {OPEN} while the node wrote it (inserted); the node moved it aside and sealed its own events under their digest"
            ),
            Finding::WrittenWhileStopped { file } => write!(
                f,
                "{file}: its events were written while the node was stopped, after it had sealed everything it wrote (inserted)"
            ),
        }
    }
}

/// What verification found and covered.
#[derive(Debug, Default)]
pub struct Report {
    pub findings: Vec<Finding>,
    pub files: usize,
    pub events: usize,
    pub receipts: usize,
    /// Events in the open file: recorded, not sealed yet, so not covered by any digest
    /// (their receipts are checked all the same).
    pub unsealed: usize,
    /// Sealed files whose digest hashed them as found, with why (see
    /// [`DigestBody::hashed_as_found`]): what happened to them before the seal is not
    /// attested.
    pub hashed_as_found: Vec<(String, String)>,
    /// Sealed files the node restored from its open handle after their open file was
    /// deleted or replaced, with what happened (see [`DigestBody::restored`]). Their
    /// digests still sign what the node appended.
    pub restored: Vec<(String, String)>,
    /// The newest digest's sequence number and when it was sealed: where the chain ends.
    /// Files sealed after it and deleted with their digests leave no gap in the chain;
    /// the region's object store, which keeps every digest shipped, tells.
    pub newest: Option<(u64, Option<String>)>,
}

/// Walks the digest chain of `dir` backwards from the newest, checking signatures (the
/// signer must be `region`'s certificate from the deployment CA), the chain, every file's
/// hash, unlisted files, and every receipt in every event.
pub fn verify(dir: &Path, ca: &CaVerifier, region: &str) -> std::io::Result<Report> {
    let mut report = Report::default();
    let digests = digests(dir)?;
    let mut listed = std::collections::HashSet::new();
    // What the newer digest (named) says the previous one is.
    let mut next_previous: Option<(String, String, String)> = None;
    let mut expected_seq: Option<u64> = None;
    for (seq, path) in digests.iter().rev() {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("?")
            .to_owned();
        if let Some(e) = expected_seq
            && *seq != e
        {
            for missing in (*seq + 1)..=e {
                report
                    .findings
                    .push(Finding::MissingDigest { sequence: missing });
            }
            // The newer digest points at a missing one: that is the finding above.
            next_previous = None;
        }
        expected_seq = seq.checked_sub(1);
        let text = std::fs::read(path)?;
        let sha = hex::encode(Sha256::digest(&text));
        let Ok(doc) = serde_json::from_slice::<DigestDocument>(&text) else {
            report.findings.push(Finding::BadSignature {
                digest: name,
                why: "unreadable".into(),
            });
            continue;
        };
        if let Some((newer, want_sha, want_sig)) = &next_previous {
            if want_sig != &doc.signature {
                report.findings.push(Finding::BrokenChain {
                    digest: newer.clone(),
                });
            } else if want_sha != &sha {
                // The newer digest chains to this one's signature: this one's bytes were
                // changed around what was signed.
                report.findings.push(Finding::RewrittenDigest {
                    digest: name.clone(),
                });
            }
        }
        let body = serde_json::from_str::<DigestBody>(&doc.body).ok();
        // The certificate must have been valid when the file was sealed (the signed seal
        // time; digests without one are checked at the time of verification), so an
        // expired or rotated-out certificate does not void the trail it signed.
        let at = body
            .as_ref()
            .and_then(|b| b.sealed_at.as_deref())
            .and_then(|t| {
                time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok()
            })
            .and_then(|t| u64::try_from(t.unix_timestamp()).ok());
        match check_signature(&doc, ca, region, at) {
            Ok(()) => {}
            Err(why) => report.findings.push(Finding::BadSignature {
                digest: name.clone(),
                why,
            }),
        }
        let Some(body) = body else {
            report.findings.push(Finding::BadSignature {
                digest: name,
                why: "unreadable body".into(),
            });
            continue;
        };
        if report.newest.is_none() {
            report.newest = Some((body.sequence, body.sealed_at.clone()));
        }
        next_previous = Some((
            name.clone(),
            body.previous_digest_sha256.clone(),
            body.previous_signature.clone(),
        ));
        if let Some(why) = &body.hashed_as_found {
            if why.starts_with(AFTER_CLEAN_STOP) {
                report.findings.push(Finding::WrittenWhileStopped {
                    file: body.file.clone(),
                });
            } else {
                report
                    .hashed_as_found
                    .push((body.file.clone(), why.clone()));
            }
        }
        if let Some(what) = &body.restored {
            report.restored.push((body.file.clone(), what.clone()));
        }
        listed.insert(body.file.clone());
        let file = dir.join(&body.file);
        match sha256_file(&file) {
            Err(_) => report.findings.push(Finding::MissingFile {
                file: body.file.clone(),
            }),
            Ok(h) if h != body.file_sha256 => report.findings.push(Finding::ModifiedFile {
                file: body.file.clone(),
            }),
            Ok(_) => {}
        }
        if let Ok(text) = std::fs::read(&file) {
            report.files += 1;
            let found = check_events(&text, &body.file, ca, &mut report, false);
            report.events += found;
            if found as u64 != body.events {
                report.findings.push(Finding::EventCount {
                    file: body.file.clone(),
                    signed: body.events,
                    found: found as u64,
                });
            }
        }
    }
    if let Some(e) = expected_seq {
        for missing in 0..=e {
            report
                .findings
                .push(Finding::MissingDigest { sequence: missing });
        }
    }
    if let Ok(open) = std::fs::read(dir.join(OPEN)) {
        report.unsealed = check_events(&open, OPEN, ca, &mut report, true);
    }
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if name.starts_with("audit-") && name.ends_with(".jsonl") && !listed.contains(&name) {
            report.findings.push(Finding::UnlistedFile { file: name });
        } else if name.starts_with(REPLACED) {
            report
                .findings
                .push(Finding::ReplacedOpenFile { file: name });
        }
    }
    Ok(report)
}

fn check_signature(
    doc: &DigestDocument,
    ca: &CaVerifier,
    region: &str,
    at: Option<u64>,
) -> Result<(), String> {
    let cert = B64.decode(&doc.certificate).map_err(|e| e.to_string())?;
    let sig = B64.decode(&doc.signature).map_err(|e| e.to_string())?;
    let at = at.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    });
    let id = ca.verify(&cert, at)?;
    if id.region != region {
        return Err(format!("signed by region {}, not {region}", id.region));
    }
    crisp_transport::receipt::verify_signature(&cert, doc.body.as_bytes(), &sig)
}

/// Checks the events of one file (its bytes) and their receipts; returns how many there
/// are. In a file still being written (`open`), a last line without its newline is being
/// appended and is left for later.
fn check_events(
    text: &[u8],
    name: &str,
    ca: &CaVerifier,
    report: &mut Report,
    open: bool,
) -> usize {
    let mut lines: Vec<&[u8]> = text.split(|&b| b == b'\n').collect();
    // What follows the last newline: nothing, or a line still being written.
    if lines.last().is_some_and(|l| l.is_empty() || open) {
        lines.pop();
    }
    for (i, line) in lines.iter().enumerate() {
        let event: AuditEvent = match serde_json::from_slice(line) {
            Ok(e) => e,
            Err(e) => {
                report.findings.push(Finding::BadEvent {
                    file: name.into(),
                    line: i + 1,
                    why: e.to_string(),
                });
                continue;
            }
        };
        let data = &event.additional_event_data;
        // An answer from another region is proven only by that region's receipt; work done
        // in the source region is attested by this file's signed digest.
        if data.receipt.is_none()
            && event.error_code.is_none()
            && let Some(region) = data.inference_region.as_deref()
            && region != event.aws_region
        {
            report.findings.push(Finding::BadReceipt {
                file: name.into(),
                request_id: event.request_id.to_string(),
                why: format!(
                    "the event says it ran in {region}, not in {}, but carries no receipt",
                    event.aws_region
                ),
            });
        }
        if let Some(r) = &data.receipt {
            report.receipts += 1;
            match r.verify(ca) {
                Ok(receipt) => {
                    let claimed = event
                        .additional_event_data
                        .inference_region
                        .as_deref()
                        .unwrap_or("");
                    if receipt.request_id != event.request_id {
                        // A receipt taken from another event.
                        report.findings.push(Finding::BadReceipt {
                            file: name.into(),
                            request_id: event.request_id.to_string(),
                            why: format!(
                                "the receipt is for request {}, not this one",
                                receipt.request_id
                            ),
                        });
                    } else if receipt.inference_region != claimed {
                        report.findings.push(Finding::BadReceipt {
                            file: name.into(),
                            request_id: event.request_id.to_string(),
                            why: format!(
                                "the receipt says it ran in {}, the event says {}",
                                receipt.inference_region,
                                if claimed.is_empty() {
                                    "nowhere"
                                } else {
                                    claimed
                                }
                            ),
                        });
                    } else if (receipt.input_tokens, receipt.output_tokens)
                        != (data.input_tokens, data.output_tokens)
                    {
                        // What the source bills must be what the region that ran it
                        // attested.
                        report.findings.push(Finding::BadReceipt {
                            file: name.into(),
                            request_id: event.request_id.to_string(),
                            why: format!(
                                "the receipt attests {} input and {} output tokens, the event records {} and {}",
                                receipt.input_tokens,
                                receipt.output_tokens,
                                data.input_tokens,
                                data.output_tokens
                            ),
                        });
                    }
                }
                Err(e) => report.findings.push(Finding::BadReceipt {
                    file: name.into(),
                    request_id: event.request_id.to_string(),
                    why: e.to_string(),
                }),
            }
        }
    }
    lines.len()
}

/// Every event in `dir` (sealed files in order, then the open one).
pub fn events(dir: &Path) -> std::io::Result<Vec<AuditEvent<'static>>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("audit-") && n.ends_with(".jsonl"))
        })
        .collect();
    files.sort();
    files.push(dir.join(OPEN));
    let mut out = Vec::new();
    for f in files {
        let Ok(file) = File::open(&f) else { continue };
        for line in BufReader::new(file).lines() {
            if let Ok(e) = serde_json::from_str::<AuditEvent>(&line?) {
                out.push(e);
            }
        }
    }
    Ok(out)
}
