//! Verifying AWS Signature Version 4 on incoming requests, so the AWS SDKs work unchanged.
//! The canonical request and signature are computed by the `aws-sigv4` crate from exactly
//! the headers the client signed; only the comparison happens here.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
use aws_sigv4::sign::v4;
use aws_smithy_runtime_api::client::identity::Identity;
use http::HeaderMap;
use subtle::ConstantTimeEq;

/// How far a request's `x-amz-date` may be from this node's clock.
pub const MAX_SKEW: Duration = Duration::from_secs(5 * 60);

/// Access key IDs and their secrets.
#[derive(Clone, Default)]
pub struct SigV4Keys {
    keys: HashMap<String, String>,
}

impl std::fmt::Debug for SigV4Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigV4Keys")
            .field("access_keys", &self.keys.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl SigV4Keys {
    pub fn new(pairs: impl IntoIterator<Item = (String, String)>) -> SigV4Keys {
        SigV4Keys {
            keys: pairs.into_iter().collect(),
        }
    }

    pub fn secret(&self, access_key: &str) -> Option<&str> {
        self.keys.get(access_key).map(String::as_str)
    }
}

/// Why a signature was not accepted, with the exception name the SDKs know.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SigV4Error {
    /// `UnrecognizedClientException`
    #[error("{0}")]
    Unrecognized(String),
    /// `InvalidSignatureException`
    #[error("{0}")]
    Invalid(String),
}

impl SigV4Error {
    pub fn exception(&self) -> &'static str {
        match self {
            SigV4Error::Unrecognized(_) => "UnrecognizedClientException",
            SigV4Error::Invalid(_) => "InvalidSignatureException",
        }
    }
}

/// The access key ID a request says it is signed with, whether or not the signature
/// holds: what the audit trail records of a refused caller. Only an ID's characters, at
/// most 128 of them, so a caller cannot write anything else into the trail.
pub fn presented_access_key(headers: &HeaderMap) -> Option<String> {
    let auth = headers.get("authorization")?.to_str().ok()?;
    let key = parse_authorization(auth)?.access_key;
    (!key.is_empty() && key.len() <= 128 && key.bytes().all(|b| b.is_ascii_alphanumeric()))
        .then(|| key.to_owned())
}

struct Authorization<'a> {
    access_key: &'a str,
    date: &'a str,
    region: &'a str,
    service: &'a str,
    signed_headers: Vec<&'a str>,
    signature: &'a str,
}

fn parse_authorization(value: &str) -> Option<Authorization<'_>> {
    let rest = value.strip_prefix("AWS4-HMAC-SHA256 ")?;
    let (mut credential, mut signed, mut signature) = (None, None, None);
    for part in rest.split(',') {
        let (k, v) = part.trim().split_once('=')?;
        match k {
            "Credential" => credential = Some(v),
            "SignedHeaders" => signed = Some(v),
            "Signature" => signature = Some(v),
            _ => {}
        }
    }
    let mut scope = credential?.split('/');
    let (access_key, date, region, service, terminator) = (
        scope.next()?,
        scope.next()?,
        scope.next()?,
        scope.next()?,
        scope.next()?,
    );
    if terminator != "aws4_request" || scope.next().is_some() {
        return None;
    }
    Some(Authorization {
        access_key,
        date,
        region,
        service,
        signed_headers: signed?.split(';').collect(),
        signature: signature?,
    })
}

fn parse_amz_date(s: &str) -> Option<SystemTime> {
    let format = time::macros::format_description!("[year][month][day]T[hour][minute][second]Z");
    let t = time::PrimitiveDateTime::parse(s, &format)
        .ok()?
        .assume_utc();
    let secs = u64::try_from(t.unix_timestamp()).ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
}

/// A part of the caller's credential, as an error message (and so the audit trail) shows
/// it: quoted, escaped, and cut at 64 characters, so a caller cannot write anything
/// else, or much, into either.
fn shown(part: &str) -> String {
    const MAX: usize = 64;
    match part.char_indices().nth(MAX) {
        Some((end, _)) => format!("{:?} (cut at {MAX} characters)", &part[..end]),
        None => format!("{part:?}"),
    }
}

/// An error and its causes, one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

/// Checks a request's SigV4 signature; returns the access key ID that signed it.
#[allow(clippy::too_many_arguments)]
pub fn verify(
    secret_of: &dyn Fn(&str) -> Option<String>,
    method: &str,
    authority: &str,
    path_and_query: &str,
    headers: &HeaderMap,
    body: &[u8],
    region: &str,
    now: SystemTime,
) -> Result<String, SigV4Error> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let auth = header("authorization")
        .ok_or_else(|| SigV4Error::Unrecognized("the request is not signed: send it with AWS Signature Version 4 credentials (an access key ID issued for this deployment)".into()))?;
    let auth = parse_authorization(auth).ok_or_else(|| {
        SigV4Error::Invalid(
            "the Authorization header is not a valid AWS4-HMAC-SHA256 signature".into(),
        )
    })?;
    let secret = secret_of(auth.access_key).ok_or_else(|| {
        SigV4Error::Unrecognized(format!(
            "The security token included in the request is invalid: access key {} is not known to this deployment",
            shown(auth.access_key)
        ))
    })?;
    if auth.service != "bedrock" {
        return Err(SigV4Error::Invalid(format!(
            "Credential should be scoped to correct service: 'bedrock', not {}",
            shown(auth.service)
        )));
    }
    if auth.region != region {
        return Err(SigV4Error::Invalid(format!(
            "Credential should be scoped to a valid region: this endpoint is region '{region}', the request was signed for {}",
            shown(auth.region)
        )));
    }
    let amz_date = header("x-amz-date")
        .ok_or_else(|| SigV4Error::Invalid("the request has no x-amz-date header".into()))?;
    let signed_at = parse_amz_date(amz_date).ok_or_else(|| {
        SigV4Error::Invalid(format!(
            "x-amz-date {} is not a valid date",
            shown(amz_date)
        ))
    })?;
    if !amz_date.starts_with(auth.date) {
        return Err(SigV4Error::Invalid(
            "the credential scope's date does not match x-amz-date".into(),
        ));
    }
    let skew = now
        .duration_since(signed_at)
        .unwrap_or_else(|e| e.duration());
    if skew > MAX_SKEW {
        return Err(SigV4Error::Invalid(format!(
            "Signature expired: {amz_date} is more than 5 minutes from this node's time; check the client's clock"
        )));
    }
    let mut signed: Vec<(&str, &str)> = Vec::with_capacity(auth.signed_headers.len());
    for name in &auth.signed_headers {
        let value = if *name == "host" {
            header("host").unwrap_or(authority)
        } else {
            header(name).ok_or_else(|| {
                SigV4Error::Invalid(format!(
                    "signed header {} is missing from the request",
                    shown(name)
                ))
            })?
        };
        signed.push((name, value));
    }
    let identity: Identity = Credentials::from_keys(auth.access_key, &secret, None).into();
    let mut settings = SigningSettings::default();
    settings.excluded_headers = None;
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name("bedrock")
        .time(signed_at)
        .settings(settings)
        .build()
        .map_err(|e| SigV4Error::Invalid(e.to_string()))?
        .into();
    let uri = format!("https://{authority}{path_and_query}");
    let signable = SignableRequest::new(method, uri, signed.into_iter(), SignableBody::Bytes(body))
        .map_err(|e| {
            SigV4Error::Invalid(format!("cannot canonicalise the request: {}", chain(&e)))
        })?;
    let (_, expected) = sign(signable, &params)
        .map_err(|e| {
            SigV4Error::Invalid(format!("cannot canonicalise the request: {}", chain(&e)))
        })?
        .into_parts();
    if bool::from(expected.as_bytes().ct_eq(auth.signature.as_bytes())) {
        Ok(auth.access_key.to_owned())
    } else {
        Err(SigV4Error::Invalid(
            "The request signature we calculated does not match the signature you provided. Check your AWS Secret Access Key and signing method.".into(),
        ))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const AKID: &str = "AKIATEST000000000001";
    const SECRET: &str = "test-secret";

    /// Signs like an SDK would, with aws-sigv4, at `at`.
    fn signed(at: SystemTime, region: &str, body: &[u8]) -> HeaderMap {
        let format =
            time::macros::format_description!("[year][month][day]T[hour][minute][second]Z");
        let secs = at.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
        let date = time::OffsetDateTime::from_unix_timestamp(i64::try_from(secs).unwrap())
            .unwrap()
            .format(&format)
            .unwrap();
        let identity: Identity = Credentials::from_keys(AKID, SECRET, None).into();
        let params = v4::SigningParams::builder()
            .identity(&identity)
            .region(region)
            .name("bedrock")
            .time(at)
            .settings(SigningSettings::default())
            .build()
            .unwrap()
            .into();
        let headers = [
            ("host", "node.example"),
            ("content-type", "application/json"),
        ];
        let req = SignableRequest::new(
            "POST",
            "https://node.example/model/eu.amazon.nova-lite-v1%3A0/converse",
            headers.into_iter(),
            SignableBody::Bytes(body),
        )
        .unwrap();
        let (instructions, _) = sign(req, &params).unwrap().into_parts();
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.insert(http::HeaderName::from_static(k), v.parse().unwrap());
        }
        for (k, v) in instructions.headers() {
            map.insert(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        assert_eq!(map.get("x-amz-date").unwrap().to_str().unwrap(), date);
        map
    }

    fn check(headers: &HeaderMap, body: &[u8], now: SystemTime) -> Result<String, SigV4Error> {
        let keys = SigV4Keys::new([(AKID.to_owned(), SECRET.to_owned())]);
        verify(
            &|k: &str| keys.secret(k).map(str::to_owned),
            "POST",
            "node.example",
            "/model/eu.amazon.nova-lite-v1%3A0/converse",
            headers,
            body,
            "eu-west-1",
            now,
        )
    }

    #[test]
    fn a_valid_signature_names_its_access_key() {
        let now = SystemTime::now();
        let h = signed(now, "eu-west-1", b"{}");
        assert_eq!(check(&h, b"{}", now).unwrap(), AKID);
    }

    #[test]
    fn tampered_bodies_old_signatures_and_other_regions_are_refused() {
        let now = SystemTime::now();
        let h = signed(now, "eu-west-1", b"{}");
        assert!(
            matches!(check(&h, b"{\"x\":1}", now), Err(SigV4Error::Invalid(m)) if m.contains("does not match"))
        );

        let old = now - Duration::from_secs(600);
        let h = signed(old, "eu-west-1", b"{}");
        assert!(
            matches!(check(&h, b"{}", now), Err(SigV4Error::Invalid(m)) if m.contains("Signature expired"))
        );
        let future = now + Duration::from_secs(600);
        let h = signed(future, "eu-west-1", b"{}");
        assert!(check(&h, b"{}", now).is_err());

        let h = signed(now, "us-east-1", b"{}");
        assert!(
            matches!(check(&h, b"{}", now), Err(SigV4Error::Invalid(m)) if m.contains("valid region"))
        );

        let mut h = signed(now, "eu-west-1", b"{}");
        h.remove("authorization");
        assert!(matches!(
            check(&h, b"{}", now),
            Err(SigV4Error::Unrecognized(_))
        ));
        h.insert("authorization", "Bearer x".parse().unwrap());
        assert!(matches!(check(&h, b"{}", now), Err(SigV4Error::Invalid(_))));
    }

    /// What a caller put in its credential reaches the error message (and the audit
    /// trail) quoted and cut short.
    #[test]
    fn credential_text_in_errors_is_quoted_and_cut() {
        let now = SystemTime::now();
        let mut h = signed(now, "eu-west-1", b"{}");
        let junk = format!("{}\" <b>", "A".repeat(5000));
        let auth = format!(
            "AWS4-HMAC-SHA256 Credential={junk}/20261205/eu-west-1/bedrock/aws4_request, SignedHeaders=host, Signature=00"
        );
        h.insert("authorization", auth.parse().unwrap());
        let Err(SigV4Error::Unrecognized(m)) = check(&h, b"{}", now) else {
            panic!("an unknown key must be unrecognized")
        };
        assert!(m.len() < 250, "{m}");
        assert!(
            m.contains(&format!("{:?} (cut at 64 characters)", "A".repeat(64))),
            "{m}"
        );
        assert_eq!(shown("a\"b"), r#""a\"b""#);
    }
}
