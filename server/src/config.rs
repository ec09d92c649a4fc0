//! `tern.yaml`: the configuration of `tern serve`, one documented type per section
//! (`docs/config.md` describes every field). Read with [`Config::from_yaml`], which says where a
//! syntax or type error is; [`Config::problems`] then finds what is well-formed but unusable.
//! The operator (#6) writes this file from the same types.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::imap::ImapConfig;
use crate::lmtp::LmtpConfig;
use crate::net::ProxyPolicy;
use crate::net::TlsFiles;
use crate::net::throttle::ThrottleConfig;
use crate::storage::StorageConfig;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{}{message}", location.map(|(l, c)| format!("line {l} column {c}: ")).unwrap_or_default())]
    Syntax {
        location: Option<(usize, usize)>,
        message: String,
    },
    #[error("{} problem(s):\n{}", .0.len(), .0.iter().map(|p| format!("  {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<Problem>),
}

/// Something well-formed but unusable, and where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// e.g. `imap.listen[1].tls`
    pub path: String,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// The whole file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where mail lives: `backend: garage` (production) or `backend: local`.
    pub storage: StorageConfig,
    /// The user directory.
    pub users: UsersConfig,
    /// Certificate for IMAP STARTTLS and implicit TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
    #[serde(default)]
    pub imap: ImapSection,
    #[serde(default)]
    pub lmtp: LmtpSection,
}

/// The LMTP service (deliveries from Postfix). Every field has a default.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LmtpSection {
    /// Serve LMTP at all.
    pub enabled: bool,
    /// Loopback by default: the Postfix next to the server delivers here.
    pub listen: SocketAddr,
    /// Name in the greeting and in `Received:` lines.
    pub hostname: String,
    /// Largest message taken (SIZE); larger: 552 5.3.4.
    pub max_message_bytes: u64,
    pub max_recipients: usize,
    pub max_line_bytes: usize,
    pub command_timeout_secs: u64,
    pub data_timeout_secs: u64,
    /// A delivery not acknowledged by the store in this time is answered 451 (Postfix retries;
    /// the retry finds the stored copy).
    pub delivery_timeout_secs: u64,
    /// A retry of the same bytes for the same user within this window is not stored twice.
    pub dedup_window_secs: u64,
    /// Bad commands tolerated before the connection is closed.
    pub max_errors: u32,
    pub max_connections: usize,
    pub write_timeout_secs: u64,
}

impl Default for LmtpSection {
    fn default() -> Self {
        let d = LmtpConfig::default();
        LmtpSection {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 2424)),
            hostname: d.hostname,
            max_message_bytes: d.max_message_size,
            max_recipients: d.max_recipients,
            max_line_bytes: d.max_line,
            command_timeout_secs: d.command_timeout.as_secs(),
            data_timeout_secs: d.data_timeout.as_secs(),
            delivery_timeout_secs: d.delivery_timeout.as_secs(),
            dedup_window_secs: d.dedup_window.as_secs(),
            max_errors: d.max_errors,
            max_connections: d.max_connections,
            write_timeout_secs: d.write_timeout.as_secs(),
        }
    }
}

impl LmtpSection {
    pub fn runtime(&self) -> LmtpConfig {
        LmtpConfig {
            hostname: self.hostname.clone(),
            max_message_size: self.max_message_bytes,
            max_recipients: self.max_recipients,
            max_line: self.max_line_bytes,
            command_timeout: Duration::from_secs(self.command_timeout_secs),
            data_timeout: Duration::from_secs(self.data_timeout_secs),
            delivery_timeout: Duration::from_secs(self.delivery_timeout_secs),
            dedup_window: Duration::from_secs(self.dedup_window_secs),
            max_errors: self.max_errors,
            max_connections: self.max_connections,
            write_timeout: Duration::from_secs(self.write_timeout_secs),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsersConfig {
    /// The YAML user directory (`tern user ...` manages it).
    pub file: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    #[serde(flatten)]
    pub files: TlsFiles,
    /// How often the files are checked for a renewed certificate, in seconds.
    #[serde(default = "default_reload_secs")]
    pub reload_secs: u64,
}

fn default_reload_secs() -> u64 {
    60
}

/// How a listener's connections start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ListenTls {
    /// Plaintext, with STARTTLS when `tls` is configured.
    Starttls,
    /// TLS from the first byte (993).
    Implicit,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    pub addr: SocketAddr,
    pub tls: ListenTls,
}

/// The IMAP service. Every field has a default.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ImapSection {
    /// Listeners; default `0.0.0.0:1143` (STARTTLS) and, with `tls`, `0.0.0.0:1993` (implicit).
    pub listen: Vec<Listener>,
    /// Accept passwords on connections without TLS. Only for tests behind a trusted network.
    pub allow_plaintext: bool,
    /// Longest command line, in bytes (literals not counted).
    pub max_line_bytes: usize,
    /// Largest message APPEND takes, in bytes (advertised as APPENDLIMIT).
    pub max_message_bytes: u32,
    pub login_timeout_secs: u64,
    /// Time to finish sending a command once started.
    pub command_timeout_secs: u64,
    /// A logged-in connection silent this long is closed (RFC 9051: at least 30 minutes).
    pub idle_timeout_secs: u64,
    /// Interval of `* OK still here` during IDLE.
    pub keepalive_secs: u64,
    /// Time the client has to take a chunk of output.
    pub write_timeout_secs: u64,
    pub max_connections_per_address: u32,
    pub max_connections_per_user: u32,
    /// Failed-login delays and limits.
    pub auth_throttle: ThrottleConfig,
    /// Load balancers that send a PROXY v2 header.
    pub proxy_protocol: ProxyPolicy,
}

impl Default for ImapSection {
    fn default() -> Self {
        let d = ImapConfig::default();
        ImapSection {
            listen: Vec::new(),
            allow_plaintext: d.allow_plaintext,
            max_line_bytes: d.max_line,
            max_message_bytes: d.max_literal,
            login_timeout_secs: d.login_timeout.as_secs(),
            command_timeout_secs: d.command_timeout.as_secs(),
            idle_timeout_secs: d.idle_timeout.as_secs(),
            keepalive_secs: d.keepalive.as_secs(),
            write_timeout_secs: d.write_timeout.as_secs(),
            max_connections_per_address: d.max_connections_per_address,
            max_connections_per_user: d.max_connections_per_user,
            auth_throttle: d.throttle,
            proxy_protocol: d.proxy,
        }
    }
}

impl ImapSection {
    /// The listeners, defaults filled in.
    pub fn listeners(&self, tls: bool) -> Vec<Listener> {
        if !self.listen.is_empty() {
            return self.listen.clone();
        }
        let mut l = vec![Listener {
            addr: SocketAddr::from(([0, 0, 0, 0], 1143)),
            tls: ListenTls::Starttls,
        }];
        if tls {
            l.push(Listener {
                addr: SocketAddr::from(([0, 0, 0, 0], 1993)),
                tls: ListenTls::Implicit,
            });
        }
        l
    }

    pub fn runtime(&self) -> ImapConfig {
        ImapConfig {
            allow_plaintext: self.allow_plaintext,
            max_line: self.max_line_bytes,
            max_literal: self.max_message_bytes,
            login_timeout: Duration::from_secs(self.login_timeout_secs),
            command_timeout: Duration::from_secs(self.command_timeout_secs),
            idle_timeout: Duration::from_secs(self.idle_timeout_secs),
            keepalive: Duration::from_secs(self.keepalive_secs),
            write_timeout: Duration::from_secs(self.write_timeout_secs),
            max_connections_per_address: self.max_connections_per_address,
            max_connections_per_user: self.max_connections_per_user,
            throttle: self.auth_throttle,
            proxy: self.proxy_protocol.clone(),
            ..ImapConfig::default()
        }
    }
}

impl Config {
    pub fn from_yaml(text: &str) -> Result<Config, ConfigError> {
        serde_yaml::from_str(text).map_err(|e| ConfigError::Syntax {
            location: e.location().map(|l| (l.line(), l.column())),
            message: e.to_string(),
        })
    }

    pub fn to_yaml(&self) -> Result<String, ConfigError> {
        serde_yaml::to_string(self).map_err(|e| ConfigError::Syntax {
            location: None,
            message: e.to_string(),
        })
    }

    pub async fn read(path: &std::path::Path) -> Result<Config, ConfigError> {
        let text = tokio::fs::read_to_string(path)
            .await
            .map_err(|error| ConfigError::Read {
                path: path.to_path_buf(),
                error,
            })?;
        Config::from_yaml(&text)
    }

    /// What is well-formed but cannot work, each with its place in the file. Checks only the
    /// file itself; `tern check-config` also opens the certificate.
    pub fn problems(&self) -> Vec<Problem> {
        let mut p = Vec::new();
        let mut add = |path: &str, message: &str| {
            p.push(Problem {
                path: path.to_string(),
                message: message.to_string(),
            })
        };
        let imap = &self.imap;
        if self.tls.is_none() && !imap.allow_plaintext {
            add(
                "tls",
                "no certificate and imap.allow_plaintext is false: nobody could log in",
            );
        }
        for (i, l) in imap.listen.iter().enumerate() {
            if l.tls == ListenTls::Implicit && self.tls.is_none() {
                add(
                    &format!("imap.listen[{i}].tls"),
                    "implicit TLS needs the `tls` section (cert and key)",
                );
            }
            if l.addr.port() != 0 && imap.listen[..i].iter().any(|o| o.addr == l.addr) {
                add(
                    &format!("imap.listen[{i}].addr"),
                    &format!("{} is listed twice", l.addr),
                );
            }
        }
        if imap.idle_timeout_secs < 30 * 60 {
            add(
                "imap.idle_timeout_secs",
                "RFC 9051 requires at least 1800 (30 minutes)",
            );
        }
        if imap.keepalive_secs == 0 || imap.keepalive_secs >= imap.idle_timeout_secs {
            add(
                "imap.keepalive_secs",
                "must be above 0 and below idle_timeout_secs",
            );
        }
        for (name, v) in [
            ("login_timeout_secs", imap.login_timeout_secs),
            ("command_timeout_secs", imap.command_timeout_secs),
            ("write_timeout_secs", imap.write_timeout_secs),
        ] {
            if v == 0 {
                add(&format!("imap.{name}"), "must be above 0");
            }
        }
        if imap.max_line_bytes < 1024 {
            add(
                "imap.max_line_bytes",
                "must be at least 1024 (RFC 7162 asks clients to keep lines under 8192)",
            );
        }
        if imap.max_message_bytes == 0 {
            add("imap.max_message_bytes", "must be above 0");
        }
        if imap.max_connections_per_address == 0 || imap.max_connections_per_user == 0 {
            add("imap.max_connections_per_*", "must be above 0");
        }
        let t = &imap.auth_throttle;
        if t.max_failures_per_address == 0 || t.max_failures_per_user == 0 {
            add(
                "imap.auth_throttle",
                "max_failures_per_* must be above 0 (0 would refuse every login)",
            );
        }
        let lmtp = &self.lmtp;
        if lmtp.enabled {
            if lmtp.listen.port() != 0 && imap.listen.iter().any(|l| l.addr == lmtp.listen) {
                add("lmtp.listen", "is also an IMAP listener");
            }
            for (name, v) in [
                ("max_message_bytes", lmtp.max_message_bytes),
                ("max_recipients", lmtp.max_recipients as u64),
                ("command_timeout_secs", lmtp.command_timeout_secs),
                ("data_timeout_secs", lmtp.data_timeout_secs),
                ("delivery_timeout_secs", lmtp.delivery_timeout_secs),
                ("max_connections", lmtp.max_connections as u64),
                ("write_timeout_secs", lmtp.write_timeout_secs),
            ] {
                if v == 0 {
                    add(&format!("lmtp.{name}"), "must be above 0");
                }
            }
            if lmtp.max_line_bytes < 1000 {
                add(
                    "lmtp.max_line_bytes",
                    "must be at least 1000 (RFC 5321's line limit)",
                );
            }
            if lmtp.hostname.is_empty() || lmtp.hostname.contains(char::is_whitespace) {
                add("lmtp.hostname", "must be a host name");
            }
        }
        if let Some(tls) = &self.tls
            && tls.reload_secs == 0
        {
            add("tls.reload_secs", "must be above 0");
        }
        if let StorageConfig::Garage(g) = &self.storage {
            for (name, url) in [
                ("s3_endpoint", &g.s3_endpoint),
                ("k2v_endpoint", &g.k2v_endpoint),
            ] {
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    add(
                        &format!("storage.{name}"),
                        "must be an http:// or https:// URL",
                    );
                }
            }
            if g.bucket.is_empty() {
                add("storage.bucket", "must not be empty");
            }
        }
        p
    }

    /// Parses and checks: the file is usable as far as can be told without opening anything.
    pub fn parse_and_check(text: &str) -> Result<Config, ConfigError> {
        let config = Config::from_yaml(text)?;
        let problems = config.problems();
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../../docs/tern.example.yaml");

    #[test]
    fn the_annotated_example_parses_and_is_valid() {
        let c = Config::parse_and_check(EXAMPLE).unwrap();
        assert!(matches!(c.storage, StorageConfig::Garage(_)));
        let listeners = c.imap.listeners(c.tls.is_some());
        assert!(listeners.iter().any(|l| l.tls == ListenTls::Implicit));
        // What is written back reads back the same (the operator writes the file this way).
        let again = Config::from_yaml(&c.to_yaml().unwrap()).unwrap();
        assert_eq!(again, c);
    }

    #[test]
    fn a_minimal_file_gets_the_defaults() {
        let c = Config::parse_and_check(
            "storage: {backend: local, path: /var/lib/tern}\nusers: {file: /etc/tern/users.yaml}\nimap: {allow_plaintext: true}\n",
        )
        .unwrap();
        let rt = c.imap.runtime();
        let d = ImapConfig::default();
        assert_eq!(rt.idle_timeout, d.idle_timeout);
        assert_eq!(rt.max_literal, d.max_literal);
        assert_eq!(
            c.imap.listeners(false),
            vec![Listener {
                addr: "0.0.0.0:1143".parse().unwrap(),
                tls: ListenTls::Starttls
            }]
        );
    }

    #[test]
    fn errors_say_where() {
        let e = Config::from_yaml(
            "storage: {backend: local, path: /x}\nusers: {file: /u}\nimap:\n  idle_timeout: 5\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("line 4") && e.contains("unknown field `idle_timeout`"),
            "{e}"
        );
        let e = Config::from_yaml("storage: {backend: floppy}\nusers: {file: /u}\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 1") && e.contains("floppy"), "{e}");

        let e = Config::parse_and_check(
            "storage: {backend: local, path: /x}\nusers: {file: /u}\nimap:\n  idle_timeout_secs: 60\n  listen:\n    - {addr: '0.0.0.0:993', tls: implicit}\n",
        )
        .unwrap_err()
        .to_string();
        for needle in [
            "tls: no certificate",
            "imap.listen[0].tls: implicit TLS needs",
            "imap.idle_timeout_secs: RFC 9051",
        ] {
            assert!(e.contains(needle), "{needle:?} missing from:\n{e}");
        }
    }
}
