//! [`RowStore`] on Garage's K2V API: signed HTTP + JSON, one shared connection pool.
//!
//! Keys are arbitrary UTF-8. Partition keys travel in the path and sort keys in the query, both
//! percent-encoded so that every byte outside RFC 3986's unreserved set is escaped (`/`, `+`,
//! `%`, `?`, spaces, non-ASCII); values travel as standard base64 in JSON, or raw for InsertItem.
//!
//! Garage routes `/<bucket>/<pk>` by path, so three partition keys cannot be put in a path: `""`
//! (the bucket-level endpoints would answer) and `"."`/`".."` (URL parsers drop dot segments, even
//! escaped ones). ReadItem, InsertItem and DeleteItem on such keys go through the batch endpoints,
//! which carry keys in JSON; PollItem and PollRange have no such form and reject them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::errors::{self, ErrCtx};
use super::retry::retrying;
use super::sign::{CONTENT_SHA256, Signer, sha256_hex};
use crate::storage::config::GarageConfig;
use crate::storage::error::{Result, StorageError};
use crate::storage::row::{
    CausalityToken, DeleteRange, IndexEntry, IndexPage, InsertOp, Item, ItemPage, KeyRange,
    PollRange, RangeChanges, ReadRange, RowStore,
};

/// Everything but RFC 3986's unreserved characters is escaped: what SigV4 expects on the wire,
/// and what Garage decodes back (it reads `+` in a query as a space, so `+` must be escaped too).
const KEY_ESCAPE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

const CAUSALITY_HEADER: &str = "x-garage-causality-token";

/// Garage's bounds on a poll's wait, in seconds.
const POLL_MIN_SECS: u64 = 1;
const POLL_MAX_SECS: u64 = 600;

pub(crate) fn escape(s: &str) -> String {
    utf8_percent_encode(s, KEY_ESCAPE).to_string()
}

/// Can this partition key be carried in a URL path? See the module doc.
fn path_safe(partition_key: &str) -> bool {
    !matches!(partition_key, "" | "." | "..")
}

/// Whole seconds Garage should wait for a poll: rounded up, within Garage's bounds.
fn poll_secs(timeout: Duration) -> u64 {
    let secs = timeout.as_secs() + u64::from(timeout.subsec_nanos() > 0);
    secs.clamp(POLL_MIN_SECS, POLL_MAX_SECS)
}

/// The row store on a Garage cluster. Cheap to clone: clones share one connection pool.
#[derive(Clone)]
pub struct GarageRows {
    inner: Arc<K2v>,
}

impl std::fmt::Debug for GarageRows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GarageRows")
            .field("endpoint", &self.inner.endpoint)
            .field("bucket", &self.inner.bucket)
            .finish_non_exhaustive()
    }
}

struct K2v {
    http: reqwest::Client,
    /// `scheme://host:port`, no trailing slash.
    endpoint: String,
    bucket: String,
    key_id: String,
    signer: Signer,
    request_timeout: Duration,
    connect_timeout: Duration,
    max_retries: u32,
}

/// One K2V request, kept whole so it can be signed and sent again on a retry.
struct Call<'a> {
    op: &'static str,
    method: Method,
    partition_key: Option<&'a str>,
    /// `(name, None)` is a bare keyword such as `?search`.
    query: Vec<(&'static str, Option<String>)>,
    headers: Vec<(&'static str, String)>,
    body: Bytes,
    timeout: Duration,
}

impl<'a> Call<'a> {
    fn new(op: &'static str, method: Method, timeout: Duration) -> Self {
        Call {
            op,
            method,
            partition_key: None,
            query: Vec::new(),
            headers: vec![("accept", "application/json".to_string())],
            body: Bytes::new(),
            timeout,
        }
    }

    fn partition(mut self, partition_key: &'a str) -> Self {
        self.partition_key = Some(partition_key);
        self
    }

    fn param(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.query.push((name, Some(value.into())));
        self
    }

    fn opt_param(self, name: &'static str, value: Option<&str>) -> Self {
        match value {
            Some(v) => self.param(name, v),
            None => self,
        }
    }

    fn keyword(mut self, name: &'static str) -> Self {
        self.query.push((name, None));
        self
    }

    fn header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    fn json(mut self, body: &impl Serialize) -> Result<Self> {
        let body = serde_json::to_vec(body).map_err(|e| {
            StorageError::Invalid(format!("cannot encode {} request: {e}", self.op))
        })?;
        self.body = Bytes::from(body);
        self.headers
            .push(("content-type", "application/json".to_string()));
        Ok(self)
    }
}

struct Reply {
    status: StatusCode,
    token: Option<String>,
    body: Bytes,
}

/// Builds the request URL: endpoint, escaped bucket and partition key, escaped query.
fn build_url(
    endpoint: &str,
    bucket: &str,
    partition_key: Option<&str>,
    query: &[(&str, Option<String>)],
) -> String {
    let mut url = format!("{endpoint}/{}", escape(bucket));
    if let Some(pk) = partition_key {
        url.push('/');
        url.push_str(&escape(pk));
    }
    for (i, (name, value)) in query.iter().enumerate() {
        url.push(if i == 0 { '?' } else { '&' });
        url.push_str(name);
        if let Some(v) = value {
            url.push('=');
            url.push_str(&escape(v));
        }
    }
    url
}

/// How an item is named in errors.
fn item_key(partition_key: &str, sort_key: &str) -> String {
    format!("K2V item ({partition_key:?}, {sort_key:?})")
}

// ---- JSON shapes of the K2V API (doc/drafts/k2v-spec.md; src/api/k2v/batch.rs in Garage) ----

fn is_false(b: &bool) -> bool {
    !*b
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SearchJson<'a> {
    partition_key: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    prefix: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    start: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    end: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    limit: Option<u64>,
    #[serde(skip_serializing_if = "is_false")]
    reverse: bool,
    #[serde(skip_serializing_if = "is_false")]
    single_item: bool,
    #[serde(skip_serializing_if = "is_false")]
    conflicts_only: bool,
    #[serde(skip_serializing_if = "is_false")]
    tombstones: bool,
}

impl<'a> From<&'a ReadRange> for SearchJson<'a> {
    fn from(s: &'a ReadRange) -> Self {
        SearchJson {
            partition_key: &s.partition_key,
            prefix: s.range.prefix.as_deref(),
            start: s.range.start.as_deref(),
            end: s.range.end.as_deref(),
            limit: s.range.limit,
            reverse: s.range.reverse,
            single_item: s.single_item,
            conflicts_only: s.conflicts_only,
            tombstones: s.tombstones,
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PageJson {
    items: Vec<ItemJson>,
    #[serde(default)]
    more: bool,
    #[serde(default)]
    next_start: Option<String>,
}

#[derive(Deserialize)]
struct ItemJson {
    sk: String,
    ct: String,
    v: Vec<Option<String>>,
}

#[derive(Serialize)]
struct InsertJson<'a> {
    pk: &'a str,
    sk: &'a str,
    ct: Option<&'a str>,
    v: Option<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct DeleteJson<'a> {
    partition_key: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    prefix: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    start: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    end: Option<&'a str>,
    #[serde(skip_serializing_if = "is_false")]
    single_item: bool,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct DeletedJson {
    deleted_items: u64,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct IndexJson {
    partition_keys: Vec<IndexEntryJson>,
    #[serde(default)]
    more: bool,
    #[serde(default)]
    next_start: Option<String>,
}

/// Garage keeps these counters as signed integers that may dip below zero while they converge.
#[derive(Deserialize)]
struct IndexEntryJson {
    pk: String,
    #[serde(default)]
    entries: i64,
    #[serde(default)]
    conflicts: i64,
    #[serde(default)]
    values: i64,
    #[serde(default)]
    bytes: i64,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PollRangeJson<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    prefix: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    start: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    end: Option<&'a str>,
    timeout: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    seen_marker: Option<&'a str>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PollRangeReplyJson {
    seen_marker: String,
    items: Vec<ItemJson>,
}

fn decode_values(key: &str, values: Vec<Option<String>>) -> Result<Vec<Option<Vec<u8>>>> {
    values
        .into_iter()
        .map(|v| {
            v.map(|s| {
                B64.decode(s.as_bytes())
                    .map_err(|e| StorageError::corrupt(key, format!("value is not base64: {e}")))
            })
            .transpose()
        })
        .collect()
}

fn decode_item(partition_key: &str, item: ItemJson) -> Result<Item> {
    let values = decode_values(&item_key(partition_key, &item.sk), item.v)?;
    Ok(Item {
        sort_key: item.sk,
        token: CausalityToken(item.ct),
        values,
    })
}

fn decode_page(partition_key: &str, page: PageJson) -> Result<ItemPage> {
    Ok(ItemPage {
        items: page
            .items
            .into_iter()
            .map(|i| decode_item(partition_key, i))
            .collect::<Result<_>>()?,
        more: page.more,
        next_start: page.next_start,
    })
}

fn parse_json<T: DeserializeOwned>(what: &str, body: &[u8]) -> Result<T> {
    serde_json::from_slice(body).map_err(|e| {
        StorageError::corrupt(
            what,
            format!(
                "unexpected JSON from Garage: {e}; body: {}",
                errors::quote(body)
            ),
        )
    })
}

/// ReadItem and PollItem answer with a JSON list of values and the token in a header.
fn decode_single(partition_key: &str, sort_key: &str, reply: Reply) -> Result<Item> {
    let key = item_key(partition_key, sort_key);
    let token = reply
        .token
        .ok_or_else(|| StorageError::corrupt(&key, "no X-Garage-Causality-Token in the answer"))?;
    let values: Vec<Option<String>> = parse_json(&key, &reply.body)?;
    Ok(Item {
        sort_key: sort_key.to_string(),
        token: CausalityToken(token),
        values: decode_values(&key, values)?,
    })
}

impl GarageRows {
    pub(crate) fn new(cfg: &GarageConfig, endpoint: String) -> Result<GarageRows> {
        let http = reqwest::Client::builder()
            .connect_timeout(cfg.connect_timeout())
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(50))
            // Garage speaks HTTP/1.1 on plain TCP; polls hold a connection each, so the pool
            // grows with concurrent polls and shrinks when they go idle.
            .http1_only()
            .build()
            .map_err(|e| {
                StorageError::Invalid(format!("K2V HTTP client: {}", errors::chain(&e)))
            })?;
        Ok(GarageRows {
            inner: Arc::new(K2v {
                http,
                endpoint,
                bucket: cfg.bucket.clone(),
                key_id: cfg.access_key_id.clone(),
                signer: Signer::new(&cfg.access_key_id, &cfg.secret_access_key, &cfg.region),
                request_timeout: cfg.request_timeout(),
                connect_timeout: cfg.connect_timeout(),
                max_retries: cfg.max_retries,
            }),
        })
    }

    /// A cheap authenticated call (ReadIndex, limit 1): proves the endpoint answers, the key is
    /// known and the signature checks, and the key may use the bucket.
    pub(crate) async fn check(&self) -> Result<()> {
        self.read_index(KeyRange {
            limit: Some(1),
            ..Default::default()
        })
        .await
        .map(|_| ())
    }
}

impl K2v {
    fn ctx(&self) -> ErrCtx<'_> {
        ErrCtx {
            endpoint: &self.endpoint,
            bucket: &self.bucket,
            key_id: &self.key_id,
        }
    }

    /// Signs and sends `call` once, and reads the whole answer.
    async fn send_once(&self, call: &Call<'_>) -> Result<Reply> {
        let url = build_url(
            &self.endpoint,
            &self.bucket,
            call.partition_key,
            &call.query,
        );
        // Sign exactly what reqwest will put on the wire.
        let url = reqwest::Url::parse(&url)
            .map_err(|e| StorageError::Invalid(format!("K2V URL {url:?}: {e}")))?;
        let body_sha256 = sha256_hex(&call.body);
        let mut signed: Vec<(&str, &str)> =
            call.headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
        signed.push((CONTENT_SHA256, &body_sha256));
        let auth = self
            .signer
            .sign(call.method.as_str(), url.as_str(), &signed, &body_sha256)?;

        let mut req = self
            .http
            .request(call.method.clone(), url.clone())
            .timeout(call.timeout)
            .body(call.body.clone());
        for (name, value) in signed.iter() {
            req = req.header(*name, *value);
        }
        for (name, value) in &auth {
            req = req.header(name.as_str(), value.as_str());
        }

        let started = Instant::now();
        let transport = |e: reqwest::Error| {
            errors::from_reqwest(&e, &self.endpoint, call.timeout, self.connect_timeout)
        };
        let result = async {
            let resp = req.send().await.map_err(transport)?;
            let status = resp.status();
            let token = resp
                .headers()
                .get(CAUSALITY_HEADER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let body = resp.bytes().await.map_err(transport)?;
            Ok(Reply {
                status,
                token,
                body,
            })
        }
        .await;
        let latency_ms = started.elapsed().as_secs_f64() * 1000.0;
        match &result {
            Ok(r) => tracing::debug!(
                op = call.op,
                method = %call.method,
                path = url.path(),
                status = r.status.as_u16(),
                latency_ms,
                "k2v"
            ),
            Err(e) => tracing::debug!(
                op = call.op,
                method = %call.method,
                path = url.path(),
                error = %e,
                latency_ms,
                "k2v failed"
            ),
        }
        // A quorum failure is an answer, but a transient one: surface it as an error here so
        // that `send` can retry it.
        match result {
            Ok(reply) if reply.status.is_server_error() => {
                let e = self.status_error(&reply);
                if e.is_transient() { Err(e) } else { Ok(reply) }
            }
            other => other,
        }
    }

    /// Sends `call`, retrying transient failures when `retry` (see `retry.rs` for which calls).
    async fn send(&self, call: Call<'_>, retry: bool) -> Result<Reply> {
        let retries = if retry { self.max_retries } else { 0 };
        retrying(retries, call.op, || self.send_once(&call)).await
    }

    fn status_error(&self, reply: &Reply) -> StorageError {
        let (code, message) = errors::parse_error_body(&reply.body);
        errors::from_status(
            &self.ctx(),
            reply.status.as_u16(),
            code.as_deref(),
            &message,
        )
    }

    /// Accepts only `ok` statuses; anything else becomes a typed error.
    fn expect(&self, reply: Reply, ok: &[StatusCode]) -> Result<Reply> {
        if ok.contains(&reply.status) {
            Ok(reply)
        } else {
            Err(self.status_error(&reply))
        }
    }

    /// Is this a 404 for a missing item (not for a missing bucket)?
    fn is_missing_item(&self, reply: &Reply) -> bool {
        if reply.status != StatusCode::NOT_FOUND {
            return false;
        }
        let (code, _) = errors::parse_error_body(&reply.body);
        code.as_deref() != Some("NoSuchBucket")
    }

    fn poll_http_timeout(&self, secs: u64) -> Duration {
        Duration::from_secs(secs) + self.request_timeout
    }
}

#[async_trait]
impl RowStore for GarageRows {
    async fn read_item(&self, partition_key: &str, sort_key: &str) -> Result<Option<Item>> {
        let k = &self.inner;
        if !path_safe(partition_key) {
            let mut search = ReadRange::partition(partition_key);
            search.range.start = Some(sort_key.to_string());
            search.single_item = true;
            search.tombstones = true;
            let page = self.read_range(search).await?;
            return Ok(page.items.into_iter().find(|i| i.sort_key == sort_key));
        }
        let call = Call::new("ReadItem", Method::GET, k.request_timeout)
            .partition(partition_key)
            .param("sort_key", sort_key);
        let reply = k.send(call, true).await?;
        if k.is_missing_item(&reply) {
            return Ok(None);
        }
        let reply = k.expect(reply, &[StatusCode::OK])?;
        decode_single(partition_key, sort_key, reply).map(Some)
    }

    async fn insert_item(
        &self,
        partition_key: &str,
        sort_key: &str,
        token: Option<&CausalityToken>,
        value: Vec<u8>,
    ) -> Result<()> {
        let k = &self.inner;
        if !path_safe(partition_key) {
            return self
                .insert_batch(vec![InsertOp {
                    partition_key: partition_key.to_string(),
                    sort_key: sort_key.to_string(),
                    token: token.cloned(),
                    value: Some(value),
                }])
                .await;
        }
        let mut call = Call::new("InsertItem", Method::PUT, k.request_timeout)
            .partition(partition_key)
            .param("sort_key", sort_key)
            .header("content-type", "application/octet-stream");
        if let Some(t) = token {
            call = call.header(CAUSALITY_HEADER, t.as_str());
        }
        call.body = Bytes::from(value);
        let reply = k.send(call, true).await?;
        k.expect(reply, &[StatusCode::NO_CONTENT, StatusCode::OK])
            .map(|_| ())
    }

    async fn delete_item(
        &self,
        partition_key: &str,
        sort_key: &str,
        token: &CausalityToken,
    ) -> Result<()> {
        let k = &self.inner;
        if !path_safe(partition_key) {
            return self
                .insert_batch(vec![InsertOp {
                    partition_key: partition_key.to_string(),
                    sort_key: sort_key.to_string(),
                    token: Some(token.clone()),
                    value: None,
                }])
                .await;
        }
        let call = Call::new("DeleteItem", Method::DELETE, k.request_timeout)
            .partition(partition_key)
            .param("sort_key", sort_key)
            .header(CAUSALITY_HEADER, token.as_str());
        let reply = k.send(call, true).await?;
        k.expect(reply, &[StatusCode::NO_CONTENT, StatusCode::OK])
            .map(|_| ())
    }

    async fn insert_batch(&self, ops: Vec<InsertOp>) -> Result<()> {
        if ops.is_empty() {
            return Ok(());
        }
        let k = &self.inner;
        let items: Vec<InsertJson<'_>> = ops
            .iter()
            .map(|op| InsertJson {
                pk: &op.partition_key,
                sk: &op.sort_key,
                ct: op.token.as_ref().map(CausalityToken::as_str),
                v: op.value.as_ref().map(|v| B64.encode(v)),
            })
            .collect();
        let call = Call::new("InsertBatch", Method::POST, k.request_timeout).json(&items)?;
        let reply = k.send(call, true).await?;
        k.expect(reply, &[StatusCode::NO_CONTENT, StatusCode::OK])
            .map(|_| ())
    }

    async fn read_batch(&self, searches: Vec<ReadRange>) -> Result<Vec<ItemPage>> {
        if searches.is_empty() {
            return Ok(Vec::new());
        }
        let k = &self.inner;
        let body: Vec<SearchJson<'_>> = searches.iter().map(SearchJson::from).collect();
        let call = Call::new("ReadBatch", Method::POST, k.request_timeout)
            .keyword("search")
            .json(&body)?;
        let reply = k.send(call, true).await?;
        let reply = k.expect(reply, &[StatusCode::OK])?;
        let what = format!("ReadBatch in bucket {:?}", k.bucket);
        let pages: Vec<PageJson> = parse_json(&what, &reply.body)?;
        if pages.len() != searches.len() {
            return Err(StorageError::corrupt(
                what,
                format!("{} results for {} searches", pages.len(), searches.len()),
            ));
        }
        pages
            .into_iter()
            .zip(&searches)
            .map(|(page, s)| decode_page(&s.partition_key, page))
            .collect()
    }

    async fn delete_batch(&self, ranges: Vec<DeleteRange>) -> Result<Vec<u64>> {
        if ranges.is_empty() {
            return Ok(Vec::new());
        }
        let k = &self.inner;
        let body: Vec<DeleteJson<'_>> = ranges
            .iter()
            .map(|r| DeleteJson {
                partition_key: &r.partition_key,
                prefix: r.prefix.as_deref(),
                start: r.start.as_deref(),
                end: r.end.as_deref(),
                single_item: r.single_item,
            })
            .collect();
        let call = Call::new("DeleteBatch", Method::POST, k.request_timeout)
            .keyword("delete")
            .json(&body)?;
        let reply = k.send(call, true).await?;
        let reply = k.expect(reply, &[StatusCode::OK])?;
        let what = format!("DeleteBatch in bucket {:?}", k.bucket);
        let counts: Vec<DeletedJson> = parse_json(&what, &reply.body)?;
        if counts.len() != ranges.len() {
            return Err(StorageError::corrupt(
                what,
                format!("{} results for {} ranges", counts.len(), ranges.len()),
            ));
        }
        Ok(counts.into_iter().map(|c| c.deleted_items).collect())
    }

    async fn read_index(&self, range: KeyRange) -> Result<IndexPage> {
        let k = &self.inner;
        let mut call = Call::new("ReadIndex", Method::GET, k.request_timeout)
            .opt_param("prefix", range.prefix.as_deref())
            .opt_param("start", range.start.as_deref())
            .opt_param("end", range.end.as_deref());
        if let Some(limit) = range.limit {
            call = call.param("limit", limit.to_string());
        }
        if range.reverse {
            call = call.param("reverse", "true");
        }
        let reply = k.send(call, true).await?;
        let reply = k.expect(reply, &[StatusCode::OK])?;
        let index: IndexJson =
            parse_json(&format!("ReadIndex of bucket {:?}", k.bucket), &reply.body)?;
        let count = |n: i64| u64::try_from(n).unwrap_or(0);
        Ok(IndexPage {
            partitions: index
                .partition_keys
                .into_iter()
                .map(|e| IndexEntry {
                    partition_key: e.pk,
                    entries: count(e.entries),
                    conflicts: count(e.conflicts),
                    values: count(e.values),
                    bytes: count(e.bytes),
                })
                .collect(),
            more: index.more,
            next_start: index.next_start,
        })
    }

    async fn poll_item(
        &self,
        partition_key: &str,
        sort_key: &str,
        token: &CausalityToken,
        timeout: Duration,
    ) -> Result<Option<Item>> {
        let k = &self.inner;
        if !path_safe(partition_key) {
            return Err(StorageError::Invalid(format!(
                "PollItem cannot address partition key {partition_key:?} on Garage"
            )));
        }
        let secs = poll_secs(timeout);
        let call = Call::new("PollItem", Method::GET, k.poll_http_timeout(secs))
            .partition(partition_key)
            .param("sort_key", sort_key)
            .param("causality_token", token.as_str())
            .param("timeout", secs.to_string());
        let reply = k.send(call, false).await?;
        if reply.status == StatusCode::NOT_MODIFIED {
            return Ok(None);
        }
        let reply = k.expect(reply, &[StatusCode::OK])?;
        decode_single(partition_key, sort_key, reply).map(Some)
    }

    async fn poll_range(
        &self,
        partition_key: &str,
        range: &PollRange,
        seen_marker: Option<&str>,
        timeout: Duration,
    ) -> Result<Option<RangeChanges>> {
        let k = &self.inner;
        if !path_safe(partition_key) {
            return Err(StorageError::Invalid(format!(
                "PollRange cannot address partition key {partition_key:?} on Garage"
            )));
        }
        // Without a marker Garage answers at once with the whole range and a first marker, so
        // this call does not wait and can be retried like a read.
        let secs = poll_secs(timeout);
        let body = PollRangeJson {
            prefix: range.prefix.as_deref(),
            start: range.start.as_deref(),
            end: range.end.as_deref(),
            timeout: secs,
            seen_marker,
        };
        let call = Call::new("PollRange", Method::POST, k.poll_http_timeout(secs))
            .partition(partition_key)
            .keyword("poll_range")
            .json(&body)?;
        let reply = k.send(call, seen_marker.is_none()).await?;
        if reply.status == StatusCode::NOT_MODIFIED {
            return Ok(None);
        }
        let reply = k.expect(reply, &[StatusCode::OK])?;
        let what = format!("PollRange of partition {partition_key:?}");
        let changes: PollRangeReplyJson = parse_json(&what, &reply.body)?;
        Ok(Some(RangeChanges {
            seen_marker: changes.seen_marker,
            items: changes
                .items
                .into_iter()
                .map(|i| decode_item(partition_key, i))
                .collect::<Result<_>>()?,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_keys_for_path_and_query() {
        assert_eq!(escape("abc-_.~XYZ019"), "abc-_.~XYZ019");
        assert_eq!(
            escape("a b/c+d%e?f&g=h#i"),
            "a%20b%2Fc%2Bd%25e%3Ff%26g%3Dh%23i"
        );
        assert_eq!(escape("é☃"), "%C3%A9%E2%98%83");
        assert_eq!(escape(""), "");
    }

    #[test]
    fn builds_urls() {
        let q = vec![("sort_key", Some("x y+z".to_string()))];
        assert_eq!(
            build_url("http://127.0.0.1:3904", "mail", Some("/INBOX ü"), &q),
            "http://127.0.0.1:3904/mail/%2FINBOX%20%C3%BC?sort_key=x%20y%2Bz"
        );
        assert_eq!(
            build_url("http://h:1", "b", None, &[("search", None)]),
            "http://h:1/b?search"
        );
        assert_eq!(
            build_url(
                "http://h:1",
                "b",
                Some("p"),
                &[("poll_range", None), ("x", Some("?".into()))]
            ),
            "http://h:1/b/p?poll_range&x=%3F"
        );
        // reqwest must send exactly what is signed: parsing keeps the escaped form.
        let raw = build_url("http://127.0.0.1:3904", "mail", Some("a%b/../c"), &q);
        let parsed = reqwest::Url::parse(&raw).unwrap();
        assert_eq!(parsed.as_str(), raw);
    }

    #[test]
    fn path_unsafe_keys() {
        assert!(!path_safe(""));
        assert!(!path_safe("."));
        assert!(!path_safe(".."));
        assert!(path_safe("..."));
        assert!(path_safe(".a"));
        assert!(path_safe("/"));
    }

    #[test]
    fn poll_seconds_are_rounded_up_and_clamped() {
        assert_eq!(poll_secs(Duration::ZERO), 1);
        assert_eq!(poll_secs(Duration::from_millis(200)), 1);
        assert_eq!(poll_secs(Duration::from_millis(1500)), 2);
        assert_eq!(poll_secs(Duration::from_secs(30)), 30);
        assert_eq!(poll_secs(Duration::from_secs(3600)), 600);
    }

    #[test]
    fn decodes_batch_pages_with_siblings_and_tombstones() {
        let body = br#"[{"partitionKey":"p","prefix":null,"start":null,"end":null,"limit":2,
            "reverse":false,"singleItem":false,"conflictsOnly":false,"tombstones":true,
            "items":[{"sk":"a","ct":"T1","v":["aGVsbG8=","d29ybGQ="]},{"sk":"b","ct":"T2","v":[null]}],
            "more":true,"nextStart":"c"}]"#;
        let pages: Vec<PageJson> = parse_json("test", body).unwrap();
        let page = decode_page("p", pages.into_iter().next().unwrap()).unwrap();
        assert!(page.more);
        assert_eq!(page.next_start.as_deref(), Some("c"));
        assert_eq!(page.items.len(), 2);
        assert_eq!(page.items[0].sort_key, "a");
        assert_eq!(page.items[0].token, CausalityToken("T1".into()));
        assert_eq!(
            page.items[0].values,
            vec![Some(b"hello".to_vec()), Some(b"world".to_vec())]
        );
        assert!(page.items[1].is_tombstone());
    }

    #[test]
    fn corrupt_answers_name_the_key() {
        let item = ItemJson {
            sk: "s k".into(),
            ct: "T".into(),
            v: vec![Some("not base64!".into())],
        };
        match decode_item("pk", item) {
            Err(StorageError::Corrupt { key, detail }) => {
                assert!(key.contains("\"pk\"") && key.contains("\"s k\""), "{key}");
                assert!(detail.contains("base64"));
            }
            other => panic!("unexpected {other:?}"),
        }
        let r: Result<Vec<PageJson>> = parse_json("ReadBatch in bucket \"b\"", b"{not json");
        assert!(matches!(r, Err(StorageError::Corrupt { key, .. }) if key.contains("ReadBatch")));

        let reply = Reply {
            status: StatusCode::OK,
            token: None,
            body: Bytes::from_static(b"[]"),
        };
        assert!(matches!(
            decode_single("p", "s", reply),
            Err(StorageError::Corrupt { .. })
        ));
        let reply = Reply {
            status: StatusCode::OK,
            token: Some("T".into()),
            body: Bytes::from_static(br#"["AA==", null]"#),
        };
        let item = decode_single("p", "s", reply).unwrap();
        assert_eq!(item.values, vec![Some(vec![0u8]), None]);
        assert_eq!(item.sort_key, "s");
    }

    #[test]
    fn encodes_requests_in_garage_field_names() {
        let mut s = ReadRange::partition("p");
        s.range.start = Some("a".into());
        s.range.limit = Some(3);
        s.tombstones = true;
        let json = serde_json::to_value(SearchJson::from(&s)).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"partitionKey": "p", "start": "a", "limit": 3, "tombstones": true})
        );
        let poll = PollRangeJson {
            prefix: Some("x"),
            start: None,
            end: None,
            timeout: 5,
            seen_marker: Some("M"),
        };
        assert_eq!(
            serde_json::to_value(&poll).unwrap(),
            serde_json::json!({"prefix": "x", "timeout": 5, "seenMarker": "M"})
        );
        let ins = InsertJson {
            pk: "p",
            sk: "s",
            ct: None,
            v: None,
        };
        assert_eq!(
            serde_json::to_value(&ins).unwrap(),
            serde_json::json!({"pk": "p", "sk": "s", "ct": null, "v": null})
        );
        let index: IndexJson = parse_json(
            "t",
            br#"{"prefix":null,"start":null,"end":null,"limit":1,"reverse":false,
                "partitionKeys":[{"pk":"a","entries":2,"conflicts":0,"values":2,"bytes":-1}],
                "more":true,"nextStart":"b"}"#,
        )
        .unwrap();
        assert_eq!(index.partition_keys[0].bytes, -1);
        assert!(index.more);
    }
}
