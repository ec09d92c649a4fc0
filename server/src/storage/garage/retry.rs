//! Bounded retries with exponential backoff and jitter, for calls that are safe to repeat.
//!
//! Which calls are retried, and why:
//! - K2V reads (ReadItem, ReadBatch, ReadIndex) and S3 reads: idempotent.
//! - S3 PutObject / UploadPart / DeleteObject / CopyObject: idempotent (the same bytes land at the
//!   same key; we hold the chunk being sent, so it can be sent again).
//! - K2V InsertItem / InsertBatch / DeleteItem / DeleteBatch: retried too. A retry after an
//!   attempt that was in fact applied writes the same value again under the same token; Garage
//!   deduplicates identical concurrent values on read, so the item looks as if written once. The
//!   only visible difference is a writer that read our first attempt and wrote in between: it then
//!   sees our retried value as a sibling of its own, exactly as if the two writes had been
//!   concurrent — which, from our side (no answer yet), they were. K2V callers must already handle
//!   siblings, and Garage itself warns that an error on a write does not mean it was not applied,
//!   so a retry adds no state the caller could not see without it.
//! - PollItem / PollRange: not retried. They wait by design; a caller loops on them anyway, and a
//!   retry would silently stretch the caller's timeout.
//! - S3 CompleteMultipartUpload: not retried (a retry after a success fails with NoSuchUpload);
//!   the whole put fails and the caller puts again.
//!
//! Only [`StorageError::is_transient`] errors are retried: a bad key or a missing bucket will not
//! heal in 50 ms.

use std::future::Future;
use std::time::Duration;

use rand::Rng;

use crate::storage::error::{Result, StorageError};

const BASE_DELAY: Duration = Duration::from_millis(50);
const MAX_DELAY: Duration = Duration::from_secs(2);

/// Delay before retry number `attempt` (0-based): 50 ms · 2^attempt capped at 2 s, with "equal
/// jitter" (half fixed, half random) so that clients failing together do not retry together.
pub(crate) fn backoff(attempt: u32) -> Duration {
    let exp = BASE_DELAY
        .saturating_mul(1u32.checked_shl(attempt.min(16)).unwrap_or(u32::MAX))
        .min(MAX_DELAY);
    let half = exp / 2;
    let jitter_ms = rand::rng().random_range(0..=half.as_millis() as u64);
    half + Duration::from_millis(jitter_ms)
}

/// Runs `call` until it succeeds, fails with a non-transient error, or `max_retries` retries have
/// been made. `what` names the call in logs.
pub(crate) async fn retrying<T, F, Fut>(max_retries: u32, what: &str, mut call: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let mut attempt = 0u32;
    loop {
        match call().await {
            Ok(v) => return Ok(v),
            Err(e) if e.is_transient() && attempt < max_retries => {
                let delay = backoff(attempt);
                tracing::debug!(
                    call = what,
                    attempt = attempt + 1,
                    delay_ms = delay.as_millis() as u64,
                    error = %e,
                    "transient storage error, retrying"
                );
                tokio::time::sleep(delay).await;
                attempt += 1;
            }
            Err(e) => return Err(with_attempts(e, attempt)),
        }
    }
}

/// Notes in the error how many attempts were made, so an operator reading "unreachable" knows it
/// was not a single blip.
fn with_attempts(e: StorageError, retries: u32) -> StorageError {
    if retries == 0 {
        return e;
    }
    match e {
        StorageError::Unreachable { endpoint, detail } => StorageError::Unreachable {
            endpoint,
            detail: format!("{detail} (after {} attempts)", retries + 1),
        },
        StorageError::Quorum(detail) => {
            StorageError::Quorum(format!("{detail} (after {} attempts)", retries + 1))
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn backoff_grows_and_is_bounded() {
        for attempt in 0..40 {
            let d = backoff(attempt);
            let exp = BASE_DELAY
                .saturating_mul(1u32.checked_shl(attempt.min(16)).unwrap_or(u32::MAX))
                .min(MAX_DELAY);
            assert!(
                d >= exp / 2 && d <= exp,
                "attempt {attempt}: {d:?} vs {exp:?}"
            );
        }
        assert!(backoff(0) <= Duration::from_millis(50));
        assert!(backoff(30) <= MAX_DELAY);
    }

    #[tokio::test]
    async fn retries_only_transient_errors_and_stops() {
        let calls = AtomicU32::new(0);
        let r: Result<()> = retrying(3, "test", || {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Err(StorageError::Quorum("down".into())) }
        })
        .await;
        assert_eq!(calls.load(Ordering::SeqCst), 4);
        assert!(matches!(r, Err(StorageError::Quorum(m)) if m.contains("after 4 attempts")));

        let calls = AtomicU32::new(0);
        let r: Result<()> = retrying(3, "test", || {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Err(StorageError::NoSuchBucket("b".into())) }
        })
        .await;
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert!(matches!(r, Err(StorageError::NoSuchBucket(_))));

        let calls = AtomicU32::new(0);
        let r = retrying(3, "test", || {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            async move {
                if n < 2 {
                    Err(StorageError::Timeout(Duration::from_secs(1)))
                } else {
                    Ok(n)
                }
            }
        })
        .await;
        assert_eq!(r.unwrap(), 2);
    }
}
