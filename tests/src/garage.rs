//! A real Garage for tests: one node or a three-zone cluster on loopback, in a fresh temp dir.
//!
//! [`Garage::single`] starts one node (replication factor 1) and [`Garage::three_node`] three
//! nodes in zones dc1/dc2/dc3 (replication factor 3, consistency mode "consistent"). Both apply a
//! layout, create an access key and a bucket the key may read, write and own, and return only
//! once every node reports the cluster healthy, so S3 and K2V calls work right away.
//!
//! Setup goes through Garage's admin API v2 over HTTP (JSON in and out, no CLI output parsing,
//! no extra process per step).
//!
//! Every Garage process dies with its [`Garage`]: `Drop` kills it (also when a test panics), and
//! each process is spawned with `PR_SET_PDEATHSIG` so the kernel kills it if the test process dies
//! without running destructors (SIGKILL, abort, or a `Garage` kept in a never-dropped static).
//! Set `TERN_KEEP_GARAGE=1` to keep the temp dir (configs, data, `garage.log`) for debugging.
//!
//! Latency trap: on a multi-node cluster over plain loopback, S3 calls take ~42 ms because Garage
//! does not set TCP_NODELAY and loopback's 64 KiB MTU meets delayed ACKs (K2V calls stay ~1 ms).
//! That is fine for correctness tests; timing-sensitive tests need the cluster in a network
//! namespace whose `lo` has MTU 1500 and `quickack 1` (see docs/testing.md), a later addition.

use std::fs::{self, File};
use std::io::{self, Read as _};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::{announce, cache, file_tail};

/// The S3 region Garage is configured with; K2V requests are signed for it too.
pub const REGION: &str = "garage";
/// The bucket every [`Garage`] starts with.
pub const DEFAULT_BUCKET: &str = "tern-test";
/// Name of the access key every [`Garage`] starts with.
const KEY_NAME: &str = "tern-test";
/// Capacity each node declares in the layout; only the ratio between nodes matters.
const NODE_CAPACITY: u64 = 1 << 30;
/// How long a node may take until its admin API answers (it normally takes ~0.1 s).
const NODE_START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a fresh cluster may take to connect, adopt its layout and report healthy.
const CLUSTER_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause between polls while waiting for Garage; its steps take milliseconds.
const POLL_INTERVAL: Duration = Duration::from_millis(10);
/// How long to wait for an RPC sent to a dead node only to make Garage notice it is dead.
const POKE_TIMEOUT: Duration = Duration::from_millis(200);
/// Attempts to start a node when its ports were taken by someone else in the meantime.
const PORT_ATTEMPTS: usize = 3;

/// What a node reports about itself (`GetNodeInfo`).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct NodeInfo {
    node_id: String,
    garage_version: String,
    db_engine: String,
}

/// The cluster health as one node sees it (`GetClusterHealth` of the admin API v2).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterHealth {
    /// `healthy`, `degraded` (some storage node unreachable, quorum everywhere) or `unavailable`.
    pub status: String,
    pub known_nodes: usize,
    pub connected_nodes: usize,
    pub storage_nodes: usize,
    pub storage_nodes_up: usize,
    pub partitions: usize,
    pub partitions_quorum: usize,
    pub partitions_all_ok: usize,
}

impl ClusterHealth {
    pub fn is_healthy(&self) -> bool {
        self.status == "healthy"
    }

    pub fn is_degraded(&self) -> bool {
        self.status == "degraded"
    }
}

/// Secrets and settings shared by all nodes of one cluster.
struct ClusterSettings {
    replication_factor: usize,
    rpc_secret: String,
    admin_token: String,
    metrics_token: String,
}

/// The four ports of one node.
#[derive(Debug, Clone, Copy)]
struct Ports {
    rpc: u16,
    s3: u16,
    k2v: u16,
    admin: u16,
}

impl Ports {
    fn allocate() -> Result<Self> {
        let [rpc, s3, k2v, admin] = free_ports()?;
        Ok(Self {
            rpc,
            s3,
            k2v,
            admin,
        })
    }
}

/// One Garage process: its files, ports and (while running) its child process.
pub struct GarageNode {
    /// Position in [`Garage::nodes`].
    pub index: usize,
    /// Layout zone: dc1, dc2, ...
    pub zone: String,
    /// Full hex node id, as the admin API and `garage node connect` use it.
    pub node_id: String,
    /// `http://127.0.0.1:PORT` of this node's S3 API.
    pub s3_endpoint: String,
    /// `http://127.0.0.1:PORT` of this node's K2V API.
    pub k2v_endpoint: String,
    /// `http://127.0.0.1:PORT` of this node's admin API.
    pub admin_endpoint: String,
    /// The node's RPC address, which other nodes connect to.
    pub rpc_addr: SocketAddr,
    pub config_path: PathBuf,
    /// Garage's stdout and stderr, appended across restarts.
    pub log_path: PathBuf,
    dir: PathBuf,
    ports: Ports,
    child: Option<Child>,
}

impl GarageNode {
    fn new(index: usize, zone: &str, root: &Path, settings: &ClusterSettings) -> Result<Self> {
        let dir = root.join(format!("node{index}"));
        for sub in ["meta", "data"] {
            fs::create_dir_all(dir.join(sub))
                .with_context(|| format!("cannot create {}", dir.join(sub).display()))?;
        }
        let mut node = Self {
            index,
            zone: zone.to_owned(),
            node_id: String::new(),
            s3_endpoint: String::new(),
            k2v_endpoint: String::new(),
            admin_endpoint: String::new(),
            rpc_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            config_path: dir.join("garage.toml"),
            log_path: dir.join("garage.log"),
            dir,
            ports: Ports::allocate()?,
            child: None,
        };
        node.write_config(settings)?;
        Ok(node)
    }

    /// Writes `garage.toml` for the current ports and updates the endpoint fields.
    fn write_config(&mut self, settings: &ClusterSettings) -> Result<()> {
        let Ports {
            rpc,
            s3,
            k2v,
            admin,
        } = self.ports;
        self.rpc_addr = SocketAddr::from(([127, 0, 0, 1], rpc));
        self.s3_endpoint = format!("http://127.0.0.1:{s3}");
        self.k2v_endpoint = format!("http://127.0.0.1:{k2v}");
        self.admin_endpoint = format!("http://127.0.0.1:{admin}");
        // lmdb: a single node is ready ~50 ms sooner than with sqlite, three nodes ~200 ms. Its
        // map is capped because the default (1 TiB of address space per node) adds up when
        // many test clusters run at once; test metadata stays far below the cap.
        // fsync is off: a test cluster's durability ends with the test anyway.
        // Scrubs are off: they are background disk reads that only slow tests down.
        let config = format!(
            r#"metadata_dir = {meta}
data_dir = {data}
db_engine = "lmdb"
lmdb_map_size = "4GiB"
metadata_fsync = false
data_fsync = false
disable_scrub = true
replication_factor = {replication_factor}
consistency_mode = "consistent"
rpc_bind_addr = "127.0.0.1:{rpc}"
rpc_public_addr = "127.0.0.1:{rpc}"
rpc_secret = "{rpc_secret}"

[s3_api]
s3_region = "{REGION}"
api_bind_addr = "127.0.0.1:{s3}"

[k2v_api]
api_bind_addr = "127.0.0.1:{k2v}"

[admin]
api_bind_addr = "127.0.0.1:{admin}"
admin_token = "{admin_token}"
metrics_token = "{metrics_token}"
"#,
            meta = toml_string(&self.dir.join("meta"))?,
            data = toml_string(&self.dir.join("data"))?,
            replication_factor = settings.replication_factor,
            rpc_secret = settings.rpc_secret,
            admin_token = settings.admin_token,
            metrics_token = settings.metrics_token,
        );
        fs::write(&self.config_path, config)
            .with_context(|| format!("cannot write {}", self.config_path.display()))
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Process id while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The last `lines` lines of this node's log.
    pub fn log_tail(&self, lines: usize) -> String {
        file_tail(&self.log_path, lines)
    }

    fn spawn(&mut self, bin: &Path) -> Result<()> {
        ensure!(
            self.child.is_none(),
            "garage node {} is already running",
            self.index
        );
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .with_context(|| format!("cannot open {}", self.log_path.display()))?;
        let log_err = log
            .try_clone()
            .with_context(|| format!("cannot reopen {}", self.log_path.display()))?;
        let mut command = Command::new(bin);
        command
            .arg("-c")
            .arg(&self.config_path)
            .arg("server")
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        // Garage reads settings such as GARAGE_RPC_SECRET from the environment; only the
        // config file written above may configure a test node.
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("GARAGE_") {
                command.env_remove(name);
            }
        }
        // A RUST_LOG meant for Tern (say "debug") would flood garage.log; use Garage's default
        // server filter unless TERN_GARAGE_LOG asks for another one.
        let filter = std::env::var("TERN_GARAGE_LOG")
            .unwrap_or_else(|_| "netapp=info,garage=info".to_owned());
        command.env("RUST_LOG", filter);
        let child = spawn_tied_to_process(command)
            .with_context(|| format!("cannot start {}", bin.display()))?;
        self.child = Some(child);
        Ok(())
    }

    /// Polls the admin API until it answers, failing early if the process exits.
    async fn wait_ready(&mut self, http: &reqwest::Client, token: &str) -> Result<NodeInfo> {
        let deadline = Instant::now() + NODE_START_TIMEOUT;
        let url = format!("{}/v2/GetNodeInfo?node=self", self.admin_endpoint);
        loop {
            let child = self
                .child
                .as_mut()
                .with_context(|| format!("garage node {} is not running", self.index))?;
            if let Some(status) = child
                .try_wait()
                .with_context(|| format!("cannot check on garage node {}", self.index))?
            {
                self.child = None;
                bail!(
                    "garage node {} exited during startup ({status}); last lines of {}:\n{}",
                    self.index,
                    self.log_path.display(),
                    self.log_tail(30)
                );
            }
            // Connection refused until the admin listener is up; that is the normal case.
            let last = match http.get(&url).bearer_auth(token).send().await {
                Ok(response) if response.status().is_success() => {
                    let body: Value = response
                        .json()
                        .await
                        .with_context(|| format!("GetNodeInfo of node {}: bad JSON", self.index))?;
                    return parse_self_node_info(&body)
                        .with_context(|| format!("GetNodeInfo of node {}: {body}", self.index));
                }
                Ok(response) => format!("answered {}", response.status()),
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() >= deadline {
                bail!(
                    "garage node {} did not answer GetNodeInfo on {} within \
                     {NODE_START_TIMEOUT:?} (last attempt: {last}); last lines of {}:\n{}",
                    self.index,
                    self.admin_endpoint,
                    self.log_path.display(),
                    self.log_tail(30)
                );
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// SIGKILL (a crash, as fault tests want) and reap. No-op when not running.
    fn kill(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        // Fails only if the process was already reaped, which `wait` below then reports.
        let _ = child.kill();
        child
            .wait()
            .with_context(|| format!("cannot reap garage node {}", self.index))?;
        Ok(())
    }

    fn log_suggests_port_conflict(&self) -> bool {
        let tail = self.log_tail(50);
        tail.contains("Address already in use") || tail.contains("os error 98")
    }
}

impl Drop for GarageNode {
    fn drop(&mut self) {
        // Nothing to report to from a destructor; the process is gone either way.
        let _ = self.kill();
    }
}

/// A running Garage cluster with a ready key and bucket.
///
/// The endpoint fields point at node 0; [`Garage::nodes`] has each node's own endpoints.
pub struct Garage {
    /// `http://127.0.0.1:PORT` (path-style addressing).
    pub s3_endpoint: String,
    pub k2v_endpoint: String,
    pub admin_endpoint: String,
    /// Bearer token for the admin API.
    pub admin_token: String,
    /// Bearer token for `/metrics` on the admin port.
    pub metrics_token: String,
    /// Always [`REGION`].
    pub region: String,
    pub access_key_id: String,
    pub secret_access_key: String,
    /// Always [`DEFAULT_BUCKET`]; the key may read, write and own it.
    pub bucket: String,
    // Declared before `dir` so that the processes die before their files are removed.
    nodes: Vec<GarageNode>,
    dir: Option<tempfile::TempDir>,
    bin: PathBuf,
    http: reqwest::Client,
}

impl Garage {
    /// One node, replication factor 1. Takes well under a second once Garage is built.
    pub async fn single() -> Result<Garage> {
        Self::start(&["dc1"]).await
    }

    /// Three nodes in zones dc1, dc2 and dc3, replication factor 3, consistency "consistent".
    ///
    /// All nodes listen on 127.0.0.1 with distinct ports. Mind the ~42 ms S3 latency on plain
    /// loopback described in the module docs.
    pub async fn three_node() -> Result<Garage> {
        Self::start(&["dc1", "dc2", "dc3"]).await
    }

    async fn start(zones: &[&str]) -> Result<Garage> {
        let started = Instant::now();
        let bin = tokio::task::spawn_blocking(cache::garage_binary)
            .await
            .context("the task locating the Garage binary panicked")??;
        let dir = tempfile::Builder::new()
            .prefix("tern-garage-")
            .tempdir()
            .context("cannot create a temp dir for Garage")?;
        let settings = ClusterSettings {
            replication_factor: zones.len(),
            rpc_secret: random_hex(32)?,
            admin_token: random_hex(16)?,
            metrics_token: random_hex(16)?,
        };
        let nodes = zones
            .iter()
            .enumerate()
            .map(|(index, zone)| GarageNode::new(index, zone, dir.path(), &settings))
            .collect::<Result<Vec<_>>>()?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .context("cannot build the HTTP client for Garage's admin API")?;
        let mut garage = Garage {
            s3_endpoint: nodes[0].s3_endpoint.clone(),
            k2v_endpoint: nodes[0].k2v_endpoint.clone(),
            admin_endpoint: nodes[0].admin_endpoint.clone(),
            admin_token: settings.admin_token.clone(),
            metrics_token: settings.metrics_token.clone(),
            region: REGION.to_owned(),
            access_key_id: String::new(),
            secret_access_key: String::new(),
            bucket: DEFAULT_BUCKET.to_owned(),
            nodes,
            dir: Some(dir),
            bin,
            http,
        };
        // From here on, dropping `garage` (also on an early `?`) kills whatever was started.
        garage.launch_all(&settings).await?;
        garage.bootstrap().await?;
        garage.s3_endpoint = garage.nodes[0].s3_endpoint.clone();
        garage.k2v_endpoint = garage.nodes[0].k2v_endpoint.clone();
        garage.admin_endpoint = garage.nodes[0].admin_endpoint.clone();
        announce(&format!(
            "garage cluster of {} node(s) ready in {:.2} s (s3 {}, k2v {}, bucket {})",
            garage.nodes.len(),
            started.elapsed().as_secs_f64(),
            garage.s3_endpoint,
            garage.k2v_endpoint,
            garage.bucket
        ));
        Ok(garage)
    }

    /// Starts every node and waits for all of them concurrently.
    async fn launch_all(&mut self, settings: &ClusterSettings) -> Result<()> {
        let (bin, http, token) = (&self.bin, &self.http, self.admin_token.as_str());
        let launches = self
            .nodes
            .iter_mut()
            .map(|node| launch_node(node, bin, http, token, settings));
        for result in futures::future::join_all(launches).await {
            result?;
        }
        Ok(())
    }

    /// Connects the nodes, applies the layout, waits for health, creates the key and bucket.
    async fn bootstrap(&mut self) -> Result<()> {
        // Every node dials every other one itself: Garage counts a peer as up only once its own
        // outgoing connection succeeded, and gossip alone takes a second or more to get there.
        if self.nodes.len() > 1 {
            let connects = (0..self.nodes.len()).map(|index| self.connect_to_others(index));
            for result in futures::future::join_all(connects).await {
                result?;
            }
        }

        let roles: Vec<Value> = self
            .nodes
            .iter()
            .map(|node| {
                json!({
                    "id": node.node_id,
                    "zone": node.zone,
                    "capacity": NODE_CAPACITY,
                    "tags": [],
                })
            })
            .collect();
        let staged = self
            .admin_post(0, "/v2/UpdateClusterLayout", &json!({ "roles": roles }))
            .await?;
        let version = staged
            .get("version")
            .and_then(Value::as_u64)
            .with_context(|| format!("UpdateClusterLayout answered without a version: {staged}"))?;
        self.admin_post(
            0,
            "/v2/ApplyClusterLayout",
            &json!({ "version": version + 1 }),
        )
        .await?;

        // Every node must have the layout and see all storage nodes before keys and buckets are
        // written with quorum, and before a test's first S3 call.
        self.wait_healthy(CLUSTER_READY_TIMEOUT).await?;

        // Independent of each other: create both at once, each admin call costs ~40 ms.
        let key_request = json!({ "name": KEY_NAME });
        let bucket_request = json!({ "globalAlias": DEFAULT_BUCKET });
        let (key, bucket) = tokio::try_join!(
            self.admin_post(0, "/v2/CreateKey", &key_request),
            self.admin_post(0, "/v2/CreateBucket", &bucket_request),
        )?;
        self.access_key_id = json_str(&key, "accessKeyId")?;
        self.secret_access_key = json_str(&key, "secretAccessKey")?;
        self.allow_test_key(0, &json_str(&bucket, "id")?)
            .await
            .with_context(|| format!("cannot allow the test key on bucket {DEFAULT_BUCKET:?}"))
    }

    /// Makes node `index` dial every other running node (ConnectClusterNodes).
    async fn connect_to_others(&self, index: usize) -> Result<()> {
        let peers: Vec<String> = self
            .nodes
            .iter()
            .filter(|other| other.index != index && other.is_running())
            .map(peer_address)
            .collect();
        if peers.is_empty() {
            return Ok(());
        }
        let results = self
            .admin_post(index, "/v2/ConnectClusterNodes", &json!(peers))
            .await?;
        check_connect_results(&results, &peers)
            .with_context(|| format!("garage node {index} cannot reach its peers"))
    }

    async fn allow_test_key(&self, node: usize, bucket_id: &str) -> Result<()> {
        self.admin_post(
            node,
            "/v2/AllowBucketKey",
            &json!({
                "bucketId": bucket_id,
                "accessKeyId": self.access_key_id,
                "permissions": { "read": true, "write": true, "owner": true },
            }),
        )
        .await?;
        Ok(())
    }

    /// Creates another bucket that the harness key may read, write and own.
    pub async fn create_bucket(&self, name: &str) -> Result<()> {
        let node = self.live_node()?;
        let bucket = self
            .admin_post(node, "/v2/CreateBucket", &json!({ "globalAlias": name }))
            .await
            .with_context(|| format!("cannot create bucket {name:?}"))?;
        self.allow_test_key(node, &json_str(&bucket, "id")?)
            .await
            .with_context(|| format!("cannot allow the test key on bucket {name:?}"))
    }

    /// Tern's storage config for this cluster (node 0's endpoints, the harness key and bucket).
    pub fn storage_config(&self) -> tern_server::storage::GarageConfig {
        let mut cfg = tern_server::storage::GarageConfig::new(
            &self.s3_endpoint,
            &self.k2v_endpoint,
            &self.bucket,
            &self.access_key_id,
            &self.secret_access_key,
        );
        cfg.region = self.region.clone();
        cfg
    }

    /// All nodes, running or stopped.
    pub fn nodes(&self) -> &[GarageNode] {
        &self.nodes
    }

    pub fn node(&self, index: usize) -> Result<&GarageNode> {
        self.nodes.get(index).with_context(|| {
            format!(
                "no garage node {index} (the cluster has {})",
                self.nodes.len()
            )
        })
    }

    /// The temp dir holding every node's config, data and log.
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_ref().map(tempfile::TempDir::path)
    }

    /// Kills node `index` with SIGKILL, like a crash. Stopping a stopped node is a no-op.
    pub fn stop_node(&mut self, index: usize) -> Result<()> {
        self.node(index)?;
        self.nodes[index].kill()
    }

    /// Restarts node `index` with its old config and data, reconnects it with the running nodes
    /// and returns once every running node sees every other one.
    ///
    /// The explicit connects matter: Garage only marks a peer up after its *own* outgoing
    /// connection succeeds (an incoming one is not enough), and after a failed attempt it waits
    /// 30 s before retrying, so on its own a restarted node is back only after 30-60 s.
    pub async fn start_node(&mut self, index: usize) -> Result<()> {
        self.node(index)?;
        let node = &mut self.nodes[index];
        node.spawn(&self.bin)?;
        let info = node.wait_ready(&self.http, &self.admin_token).await?;
        ensure!(
            info.node_id == node.node_id,
            "garage node {index} came back with id {} instead of {}",
            info.node_id,
            node.node_id
        );
        announce_node(node, &info);

        // Both directions: the restarted node dials the others, and they dial it (they would
        // otherwise wait out their 30 s retry delay).
        let others: Vec<usize> = self
            .nodes
            .iter()
            .filter(|other| other.index != index && other.is_running())
            .map(|other| other.index)
            .collect();
        let connects = std::iter::once(index)
            .chain(others.iter().copied())
            .map(|node| self.connect_to_others(node));
        for result in futures::future::join_all(connects).await {
            result?;
        }
        let running = others.len() + 1;
        for node in std::iter::once(index).chain(others) {
            self.wait_node_health(
                node,
                CLUSTER_READY_TIMEOUT,
                "connected to all running nodes",
                |h| h.storage_nodes_up == running,
            )
            .await?;
        }
        Ok(())
    }

    /// Kills every node. Called by `Drop`; call it earlier to test what happens without Garage.
    pub fn stop_all(&mut self) {
        for node in &mut self.nodes {
            // Best effort: keep stopping the others whatever one of them does.
            if let Err(e) = node.kill() {
                tracing::warn!("{e:#}");
            }
        }
    }

    /// Cluster health as seen by the first running node.
    pub async fn health(&self) -> Result<ClusterHealth> {
        self.node_health(self.live_node()?).await
    }

    /// Cluster health as seen by node `index`.
    pub async fn node_health(&self, index: usize) -> Result<ClusterHealth> {
        let body = self.admin_get(index, "/v2/GetClusterHealth").await?;
        serde_json::from_value(body.clone())
            .with_context(|| format!("unexpected GetClusterHealth answer: {body}"))
    }

    /// Polls the first running node until `want` holds for its health view.
    pub async fn wait_for_health(
        &self,
        timeout: Duration,
        want: impl Fn(&ClusterHealth) -> bool,
    ) -> Result<ClusterHealth> {
        self.wait_node_health(self.live_node()?, timeout, "the expected state", want)
            .await
    }

    /// Waits until every running node reports the cluster healthy: it has a layout and is
    /// connected to every storage node in it.
    ///
    /// Polls the unauthenticated `/health` endpoint (~1 ms) rather than GetClusterHealth: every
    /// authenticated admin call costs ~40 ms because Garage checks the token with Argon2.
    pub async fn wait_healthy(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        for node in self.nodes.iter().filter(|n| n.is_running()) {
            let url = format!("{}/health", node.admin_endpoint);
            loop {
                let last = match self.http.get(&url).send().await {
                    Ok(response) => {
                        let status = response.status();
                        let body = response.text().await.unwrap_or_default();
                        // 200 also covers "degraded"; only this text means every node is up.
                        if status.is_success() && body.contains("fully operational") {
                            break;
                        }
                        format!("{status}: {}", body.trim())
                    }
                    Err(e) => format!("{e:#}"),
                };
                if Instant::now() >= deadline {
                    bail!(
                        "garage node {} did not become healthy within {timeout:?}; last /health: \
                         {last}; last lines of its log:\n{}",
                        node.index,
                        node.log_tail(20)
                    );
                }
                tokio::time::sleep(POLL_INTERVAL).await;
            }
        }
        Ok(())
    }

    /// Makes every running node notice that node `index` is gone, and waits until they do.
    ///
    /// Garage notices a crashed peer only when its second write to the dead connection fails:
    /// at the next ping (up to 15 s later) or RPCs. Until then, requests routed to the dead node
    /// can stall. This sends two cheap RPCs to the dead node from each running node.
    pub async fn wait_node_down(&self, index: usize, timeout: Duration) -> Result<()> {
        let dead = self.node(index)?;
        ensure!(!dead.is_running(), "garage node {index} is still running");
        let poke = format!("/v2/GetNodeInfo?node={}", dead.node_id);
        let deadline = Instant::now() + timeout;
        for node in self.nodes.iter().filter(|n| n.is_running()) {
            loop {
                let status = self.admin_get(node.index, "/v2/GetClusterStatus").await?;
                let up = status["nodes"]
                    .as_array()
                    .and_then(|nodes| nodes.iter().find(|n| n["id"] == dead.node_id.as_str()))
                    .and_then(|n| n["isUp"].as_bool())
                    .unwrap_or(false);
                if !up {
                    break;
                }
                if Instant::now() >= deadline {
                    bail!(
                        "garage node {} still sees node {index} up after {timeout:?}",
                        node.index
                    );
                }
                // The RPC may hang until the connection is declared dead: don't wait for it.
                let _ = tokio::time::timeout(POKE_TIMEOUT, self.admin_get(node.index, &poke)).await;
            }
        }
        Ok(())
    }

    async fn wait_node_health(
        &self,
        index: usize,
        timeout: Duration,
        what: &str,
        want: impl Fn(&ClusterHealth) -> bool,
    ) -> Result<ClusterHealth> {
        let deadline = Instant::now() + timeout;
        loop {
            let last = self.node_health(index).await;
            match &last {
                Ok(health) if want(health) => return Ok(health.clone()),
                _ if Instant::now() >= deadline => {
                    let seen = match last {
                        Ok(health) => format!("{health:?}"),
                        Err(e) => format!("{e:#}"),
                    };
                    bail!(
                        "garage node {index} did not become {what} within {timeout:?}; last \
                         health: {seen}; last lines of its log:\n{}",
                        self.nodes[index].log_tail(20)
                    );
                }
                _ => tokio::time::sleep(POLL_INTERVAL).await,
            }
        }
    }

    /// `GET` on node `index`'s admin API (path like `/v2/GetClusterStatus`), parsed as JSON.
    pub async fn admin_get(&self, index: usize, path: &str) -> Result<Value> {
        self.admin_call(index, reqwest::Method::GET, path, None)
            .await
    }

    /// `POST` of a JSON body to node `index`'s admin API, parsed as JSON.
    pub async fn admin_post(&self, index: usize, path: &str, body: &Value) -> Result<Value> {
        self.admin_call(index, reqwest::Method::POST, path, Some(body))
            .await
    }

    async fn admin_call(
        &self,
        index: usize,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value> {
        let node = self.node(index)?;
        let url = format!("{}{path}", node.admin_endpoint);
        let mut request = self
            .http
            .request(method.clone(), &url)
            .bearer_auth(&self.admin_token);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("{method} {url} (garage node {index}) failed"))?;
        let status = response.status();
        let text = response
            .text()
            .await
            .with_context(|| format!("{method} {url}: cannot read the answer"))?;
        if !status.is_success() {
            bail!("{method} {url} answered {status}: {}", text.trim());
        }
        if text.trim().is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&text)
            .with_context(|| format!("{method} {url} answered non-JSON: {}", text.trim()))
    }

    fn live_node(&self) -> Result<usize> {
        self.nodes
            .iter()
            .position(GarageNode::is_running)
            .context("no garage node is running")
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        self.stop_all();
        if std::env::var_os("TERN_KEEP_GARAGE").is_some_and(|v| !v.is_empty())
            && let Some(dir) = self.dir.take()
        {
            announce(&format!("keeping the garage dir {}", dir.keep().display()));
        }
    }
}

/// Starts one node and waits for its admin API. Retries with new ports when they were taken
/// between picking them and Garage binding them (parallel tests pick ports too).
async fn launch_node(
    node: &mut GarageNode,
    bin: &Path,
    http: &reqwest::Client,
    token: &str,
    settings: &ClusterSettings,
) -> Result<()> {
    node.spawn(bin)?;
    let mut attempt = 1;
    let info = loop {
        match node.wait_ready(http, token).await {
            Ok(info) => break info,
            Err(e) if attempt < PORT_ATTEMPTS && node.log_suggests_port_conflict() => {
                tracing::warn!("garage node {} lost a port, retrying: {e:#}", node.index);
                node.kill()?;
                node.ports = Ports::allocate()?;
                node.write_config(settings)?;
                node.spawn(bin)?;
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    };
    node.node_id = info.node_id.clone();
    announce_node(node, &info);
    Ok(())
}

/// The line that proves in CI logs that a real Garage ran.
fn announce_node(node: &GarageNode, info: &NodeInfo) {
    announce(&format!(
        "garage started: pid {}, version {}, node {} ({}, id {}), db {}, admin {}",
        node.pid()
            .map_or_else(|| "?".to_owned(), |pid| pid.to_string()),
        info.garage_version,
        node.index,
        node.zone,
        info.node_id.get(..16).unwrap_or(&info.node_id),
        info.db_engine,
        node.admin_endpoint
    ));
}

/// `<id>@<addr>`, the form ConnectClusterNodes and `garage node connect` take.
fn peer_address(node: &GarageNode) -> String {
    format!("{}@{}", node.node_id, node.rpc_addr)
}

/// ConnectClusterNodes answers 200 with a per-peer `{success, error}` list.
fn check_connect_results(results: &Value, peers: &[String]) -> Result<()> {
    let results = results
        .as_array()
        .with_context(|| format!("ConnectClusterNodes answered {results}"))?;
    for (peer, result) in peers.iter().zip(results) {
        if result.get("success").and_then(Value::as_bool) != Some(true) {
            bail!("cannot connect garage nodes to {peer}: {result}");
        }
    }
    Ok(())
}

/// GetNodeInfo is a multi-node call: `{"success": {"<id>": {...}}, "error": {...}}`.
fn parse_self_node_info(body: &Value) -> Result<NodeInfo> {
    let success = body
        .get("success")
        .and_then(Value::as_object)
        .context("no `success` map")?;
    let (_, info) = success
        .iter()
        .next()
        .ok_or_else(|| anyhow!("empty `success` map; errors: {}", body["error"]))?;
    serde_json::from_value(info.clone()).context("unexpected node info")
}

fn json_str(value: &Value, field: &str) -> Result<String> {
    value
        .get(field)
        .and_then(Value::as_str)
        .map(str::to_owned)
        .with_context(|| format!("no string field `{field}` in {value}"))
}

/// Four distinct free ports on 127.0.0.1. All listeners stay open until every port is picked so
/// that the kernel cannot hand out the same port twice.
fn free_ports() -> Result<[u16; 4]> {
    let listeners = [(); 4].map(|()| TcpListener::bind("127.0.0.1:0"));
    let mut ports = [0; 4];
    for (port, listener) in ports.iter_mut().zip(listeners) {
        *port = listener
            .and_then(|l| l.local_addr())
            .context("cannot pick a free port on 127.0.0.1")?
            .port();
    }
    Ok(ports)
}

fn random_hex(bytes: usize) -> Result<String> {
    let mut buf = vec![0u8; bytes];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .context("cannot read /dev/urandom")?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// A path as a TOML basic string. JSON string escapes are a subset of TOML's.
fn toml_string(path: &Path) -> Result<String> {
    let text = path
        .to_str()
        .with_context(|| format!("non-UTF-8 path {}", path.display()))?;
    Ok(serde_json::to_string(text)?)
}

/// Spawns `command` so that it dies with this process.
///
/// `PR_SET_PDEATHSIG` fires when the *thread* that forked the child exits, not the process. Test
/// threads come and go (and a Garage shared between tests outlives the test that started it), so
/// every spawn happens on one helper thread that lives as long as the process.
fn spawn_tied_to_process(mut command: Command) -> io::Result<Child> {
    type Request = (Command, mpsc::Sender<io::Result<Child>>);
    static SPAWNER: OnceLock<io::Result<mpsc::Sender<Request>>> = OnceLock::new();

    let parent = libc::pid_t::try_from(std::process::id()).map_err(io::Error::other)?;
    // SAFETY: the closure runs between fork and exec and only makes async-signal-safe calls
    // (prctl, getppid) without allocating.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died before prctl took effect; then nobody would kill us.
            if libc::getppid() != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }

    let spawner = SPAWNER.get_or_init(|| {
        let (sender, receiver) = mpsc::channel::<Request>();
        std::thread::Builder::new()
            .name("tern-garage-spawner".to_owned())
            .spawn(move || {
                for (mut command, reply) in receiver {
                    // The requester may have given up; nothing to do then.
                    let _ = reply.send(command.spawn());
                }
            })
            .map(|_| sender)
    });
    let spawner = spawner
        .as_ref()
        .map_err(|e| io::Error::new(e.kind(), format!("cannot start the spawner thread: {e}")))?;
    let (reply, result) = mpsc::channel();
    spawner
        .send((command, reply))
        .map_err(|_| io::Error::other("the spawner thread is gone"))?;
    result
        .recv()
        .map_err(|_| io::Error::other("the spawner thread dropped the request"))?
}
