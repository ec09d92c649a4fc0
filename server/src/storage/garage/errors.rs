//! Turning what Garage (or the network) answered into typed [`StorageError`]s.
//!
//! Garage's K2V API answers errors with a JSON body `{"code", "message", "region", "path"}`; its S3
//! API with the usual XML, which the SDK parses into a code and a message. Both go through
//! [`from_status`], so the two APIs report the same condition the same way.

use std::time::Duration;

use serde::Deserialize;

use crate::storage::error::StorageError;

/// Names the thing an error is about, for messages an operator can act on.
#[derive(Debug, Clone)]
pub(crate) struct ErrCtx<'a> {
    pub endpoint: &'a str,
    pub bucket: &'a str,
    pub key_id: &'a str,
}

#[derive(Deserialize)]
struct ErrorBody {
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    message: Option<String>,
}

/// Longest piece of an unexpected body quoted in an error.
const QUOTE_MAX: usize = 300;

/// Code and message of a K2V error body. S3's XML errors are understood too (a K2V endpoint
/// configured with the S3 API's address gets those). Any other body (a proxy's HTML page,
/// garbage) is quoted, shortened, as the message.
pub(crate) fn parse_error_body(body: &[u8]) -> (Option<String>, String) {
    if let Ok(e) = serde_json::from_slice::<ErrorBody>(body)
        && (e.code.is_some() || e.message.is_some())
    {
        return (e.code, e.message.unwrap_or_default());
    }
    let text = String::from_utf8_lossy(body);
    if let Some(code) = xml_element(&text, "Code") {
        let message = xml_element(&text, "Message").unwrap_or_default();
        return (Some(code), message);
    }
    (None, quote(body))
}

/// The text of the first `<name>…</name>` in an S3 XML error, with the XML escapes Garage uses
/// undone.
fn xml_element(text: &str, name: &str) -> Option<String> {
    let open = format!("<{name}>");
    let close = format!("</{name}>");
    let start = text.find(&open)? + open.len();
    let len = text[start..].find(&close)?;
    let raw = &text[start..start + len];
    Some(
        raw.replace("&apos;", "'")
            .replace("&quot;", "\"")
            .replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&amp;", "&"),
    )
}

/// A body as text, cut to [`QUOTE_MAX`] characters.
pub(crate) fn quote(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    match text.char_indices().nth(QUOTE_MAX) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_string(),
    }
}

fn is_code(code: Option<&str>, names: &[&str]) -> bool {
    code.is_some_and(|c| names.contains(&c))
}

/// The error for an unexpected HTTP status. Callers handle the statuses they expect (404 for a
/// missing item, 304 for a poll timeout) before coming here.
pub(crate) fn from_status(
    ctx: &ErrCtx<'_>,
    status: u16,
    code: Option<&str>,
    message: &str,
) -> StorageError {
    let described = match code {
        Some(c) if !message.is_empty() => format!("{c}: {message}"),
        Some(c) => c.to_string(),
        None if !message.is_empty() => format!("HTTP {status}: {message}"),
        None => format!("HTTP {status}"),
    };
    if is_code(code, &["NoSuchBucket"]) {
        return StorageError::NoSuchBucket(ctx.bucket.to_string());
    }
    let forbidden = status == 403
        || is_code(
            code,
            &[
                "AccessDenied",
                "InvalidAccessKeyId",
                "SignatureDoesNotMatch",
                "Forbidden",
                "AuthorizationHeaderMalformed",
            ],
        );
    if forbidden {
        // A valid key that was not granted this bucket gets "Operation is not allowed for this
        // key" from Garage: from the operator's side that is a bucket problem, not a bad key.
        if message.contains("not allowed") {
            return StorageError::NoSuchBucket(ctx.bucket.to_string());
        }
        let detail = if is_code(code, &["AuthorizationHeaderMalformed"]) {
            format!(
                "{described} (check that the region is Garage's s3_region and that the endpoint \
                 is the right API: K2V and S3 listen on different ports)"
            )
        } else {
            described
        };
        return StorageError::BadCredentials {
            key_id: ctx.key_id.to_string(),
            detail,
        };
    }
    // Garage answers 503 ServiceUnavailable when it cannot reach enough nodes (quorum, RPC
    // timeouts); older versions sent a 500 whose message names the quorum.
    if status == 503
        || is_code(code, &["ServiceUnavailable"])
        || message.to_ascii_lowercase().contains("quorum")
    {
        return StorageError::Quorum(described);
    }
    if status == 400 {
        return StorageError::Invalid(described);
    }
    StorageError::Backend(format!("HTTP {status} from {}: {described}", ctx.endpoint))
}

/// The message of an error and all its sources, without repeating a source that its parent
/// already quoted (hyper and reqwest often do).
pub(crate) fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let msg = s.to_string();
        if !out.contains(&msg) {
            out.push_str(": ");
            out.push_str(&msg);
        }
        cur = s.source();
    }
    out
}

/// A transport error of the K2V HTTP client.
pub(crate) fn from_reqwest(
    e: &reqwest::Error,
    endpoint: &str,
    timeout: Duration,
    connect_timeout: Duration,
) -> StorageError {
    if e.is_connect() {
        let detail = if e.is_timeout() {
            format!("no TCP connection within {connect_timeout:?}")
        } else {
            chain(e)
        };
        return StorageError::Unreachable {
            endpoint: endpoint.to_string(),
            detail,
        };
    }
    if e.is_timeout() {
        return StorageError::Timeout(timeout);
    }
    if e.is_builder() {
        return StorageError::Invalid(chain(e));
    }
    // The connection broke after it was made (node killed, reset): the node is gone for now.
    StorageError::Unreachable {
        endpoint: endpoint.to_string(),
        detail: chain(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> ErrCtx<'static> {
        ErrCtx {
            endpoint: "http://127.0.0.1:3904",
            bucket: "mail",
            key_id: "GK123",
        }
    }

    #[test]
    fn parses_garage_json_error_bodies() {
        let body = br#"{"code": "AccessDenied", "message": "Forbidden: Invalid signature", "region": "garage", "path": "/mail"}"#;
        let (code, message) = parse_error_body(body);
        assert_eq!(code.as_deref(), Some("AccessDenied"));
        assert_eq!(message, "Forbidden: Invalid signature");

        let (code, message) = parse_error_body(b"<html>bad gateway</html>");
        assert_eq!(code, None);
        assert_eq!(message, "<html>bad gateway</html>");

        let long = "x".repeat(1000);
        let (_, message) = parse_error_body(long.as_bytes());
        assert!(message.chars().count() <= QUOTE_MAX + 1);

        let xml = br#"<?xml version="1.0" encoding="UTF-8"?><Error><Code>AuthorizationHeaderMalformed</Code><Message>unexpected scope: &apos;x/k2v&apos;</Message></Error>"#;
        let (code, message) = parse_error_body(xml);
        assert_eq!(code.as_deref(), Some("AuthorizationHeaderMalformed"));
        assert_eq!(message, "unexpected scope: 'x/k2v'");

        let (code, message) = parse_error_body(&[0xff, 0xfe, b'{']);
        assert_eq!(code, None);
        assert!(!message.is_empty());
    }

    #[test]
    fn maps_statuses_to_typed_errors() {
        let c = ctx();
        assert!(matches!(
            from_status(&c, 403, Some("AccessDenied"), "Forbidden: No such key: GKx"),
            StorageError::BadCredentials { key_id, .. } if key_id == "GK123"
        ));
        assert!(matches!(
            from_status(&c, 403, None, ""),
            StorageError::BadCredentials { .. }
        ));
        assert!(matches!(
            from_status(&c, 403, Some("SignatureDoesNotMatch"), "x"),
            StorageError::BadCredentials { .. }
        ));
        assert!(matches!(
            from_status(&c, 400, Some("AuthorizationHeaderMalformed"), "unexpected scope"),
            StorageError::BadCredentials { detail, .. } if detail.contains("region")
        ));
        assert!(matches!(
            from_status(&c, 403, Some("AccessDenied"), "Forbidden: Operation is not allowed for this key."),
            StorageError::NoSuchBucket(b) if b == "mail"
        ));
        assert!(matches!(
            from_status(&c, 404, Some("NoSuchBucket"), "Bucket not found: mail"),
            StorageError::NoSuchBucket(_)
        ));
        assert!(matches!(
            from_status(
                &c,
                503,
                Some("ServiceUnavailable"),
                "Internal error: Could not reach quorum of 2"
            ),
            StorageError::Quorum(_)
        ));
        assert!(matches!(
            from_status(
                &c,
                500,
                Some("InternalError"),
                "Could not reach quorum of 2 (sets=[...])"
            ),
            StorageError::Quorum(_)
        ));
        let e = from_status(&c, 500, Some("InternalError"), "disk on fire");
        assert!(
            matches!(&e, StorageError::Backend(m) if m.contains("InternalError: disk on fire"))
        );
        assert!(!e.is_transient());
        assert!(matches!(
            from_status(&c, 400, Some("InvalidRequest"), "Bad request: Invalid causality token"),
            StorageError::Invalid(m) if m.contains("causality")
        ));
    }

    #[test]
    fn chain_does_not_repeat_sources() {
        #[derive(Debug)]
        struct Outer(std::io::Error);
        impl std::fmt::Display for Outer {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "request failed: {}", self.0)
            }
        }
        impl std::error::Error for Outer {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let e = Outer(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "connection refused",
        ));
        assert_eq!(chain(&e), "request failed: connection refused");
    }
}
