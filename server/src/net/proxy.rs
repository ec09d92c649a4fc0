//! PROXY protocol v2 (HAProxy's binary header) from load balancers we trust: the client's real
//! address then goes into logs, limits and the login throttle. A connection from a trusted
//! address must start with the header (as Dovecot's `haproxy_trusted_networks`); anyone else
//! is taken at face value and never parsed for one.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ipnet::IpNet;
use ppp::v2::{Addresses, Command, Header};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt};

const SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// Longest address + TLV block taken (HAProxy sends a few dozen bytes).
const MAX_BODY: usize = 2048;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no PROXY v2 header from a trusted proxy")]
    Missing,
    #[error("PROXY v2 header too long ({0} bytes)")]
    TooLong(usize),
    #[error("malformed PROXY v2 header: {0}")]
    Malformed(String),
    #[error("PROXY v2 header not received in time")]
    Timeout,
    #[error("reading the PROXY v2 header: {0}")]
    Io(#[from] std::io::Error),
}

/// Which peers may (and must) send a PROXY v2 header.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyPolicy {
    /// Networks of the load balancers, e.g. `10.0.0.0/8`; empty: PROXY protocol off.
    #[serde(default)]
    pub trusted: Vec<IpNet>,
}

impl ProxyPolicy {
    pub fn trusts(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        self.trusted.iter().any(|net| net.contains(&ip))
    }

    /// The address to account the connection to: the header's source for a trusted peer, else
    /// the peer itself.
    pub async fn client_address<S: AsyncRead + Unpin>(
        &self,
        stream: &mut S,
        peer: SocketAddr,
        timeout: Duration,
    ) -> Result<SocketAddr, ProxyError> {
        if !self.trusts(peer.ip()) {
            return Ok(peer);
        }
        match tokio::time::timeout(timeout, read_header(stream)).await {
            Err(_) => Err(ProxyError::Timeout),
            Ok(Ok(source)) => Ok(source.unwrap_or(peer)),
            Ok(Err(e)) => Err(e),
        }
    }
}

/// Reads exactly one v2 header. `None`: a LOCAL command (the proxy's own health check) or an
/// address family without an IP.
pub async fn read_header<S: AsyncRead + Unpin>(
    stream: &mut S,
) -> Result<Option<SocketAddr>, ProxyError> {
    let mut fixed = [0u8; 16];
    let mut got = 0;
    // Byte by byte against the signature, so that a client speaking IMAP straight away is
    // refused at once instead of waiting for 16 bytes that may never come.
    while got < fixed.len() {
        let n = stream.read(&mut fixed[got..]).await?;
        if n == 0 {
            return Err(ProxyError::Missing);
        }
        got += n;
        let k = got.min(SIGNATURE.len());
        if fixed[..k] != SIGNATURE[..k] {
            return Err(ProxyError::Missing);
        }
    }
    let len = u16::from_be_bytes([fixed[14], fixed[15]]) as usize;
    if len > MAX_BODY {
        return Err(ProxyError::TooLong(len));
    }
    let mut whole = Vec::with_capacity(16 + len);
    whole.extend_from_slice(&fixed);
    whole.resize(16 + len, 0);
    stream.read_exact(&mut whole[16..]).await?;
    let header =
        Header::try_from(whole.as_slice()).map_err(|e| ProxyError::Malformed(e.to_string()))?;
    if header.command == Command::Local {
        return Ok(None);
    }
    Ok(match header.addresses {
        Addresses::IPv4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        Addresses::IPv6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        Addresses::Unspecified | Addresses::Unix(_) => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ppp::v2::{AddressFamily, Builder, Protocol, Version};

    fn header(source: &str, dest: &str) -> Vec<u8> {
        let source: SocketAddr = source.parse().unwrap();
        let dest: SocketAddr = dest.parse().unwrap();
        Builder::with_addresses(
            Version::Two | Command::Proxy,
            Protocol::Stream,
            (source, dest),
        )
        .build()
        .unwrap()
    }

    #[tokio::test]
    async fn a_trusted_peer_names_the_client_and_the_rest_of_the_stream_is_untouched() {
        let policy = ProxyPolicy {
            trusted: vec!["10.0.0.0/8".parse().unwrap()],
        };
        let mut bytes = header("203.0.113.7:51000", "10.1.2.3:1143");
        bytes.extend_from_slice(b"a1 CAPABILITY\r\n");
        let mut reader = bytes.as_slice();
        let peer: SocketAddr = "10.9.9.9:4000".parse().unwrap();
        let client = policy
            .client_address(&mut reader, peer, Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(client, "203.0.113.7:51000".parse().unwrap());
        assert_eq!(reader, b"a1 CAPABILITY\r\n");

        let mut v6 = header("[2001:db8::1]:443", "[2001:db8::2]:1143");
        let mut reader = v6.as_mut_slice() as &[u8];
        let client = policy
            .client_address(&mut reader, peer, Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(client, "[2001:db8::1]:443".parse().unwrap());
    }

    #[tokio::test]
    async fn an_untrusted_peer_is_not_parsed_and_a_trusted_one_must_send_a_header() {
        let policy = ProxyPolicy {
            trusted: vec!["10.0.0.0/8".parse().unwrap()],
        };
        let bytes = header("203.0.113.7:51000", "10.1.2.3:1143");
        let mut reader = bytes.as_slice();
        let outsider: SocketAddr = "192.0.2.1:4000".parse().unwrap();
        let client = policy
            .client_address(&mut reader, outsider, Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(client, outsider, "an outsider cannot spoof its address");
        assert_eq!(reader.len(), bytes.len(), "nothing consumed");

        let mut plain: &[u8] = b"a1 LOGIN alice secret\r\n";
        let err = policy
            .client_address(
                &mut plain,
                "10.0.0.5:1".parse().unwrap(),
                Duration::from_secs(1),
            )
            .await
            .unwrap_err();
        assert!(matches!(err, ProxyError::Missing), "{err}");

        // Mapped IPv4 peers count as their IPv4 address.
        assert!(policy.trusts("::ffff:10.0.0.1".parse().unwrap()));
        assert!(!ProxyPolicy::default().trusts("10.0.0.1".parse().unwrap()));
    }

    #[tokio::test]
    async fn a_local_command_keeps_the_peer_and_garbage_is_refused() {
        let policy = ProxyPolicy {
            trusted: vec!["127.0.0.0/8".parse().unwrap()],
        };
        let local = Builder::new(
            Version::Two | Command::Local,
            AddressFamily::Unspecified | Protocol::Unspecified,
        )
        .build()
        .unwrap();
        let peer: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let mut reader = local.as_slice();
        assert_eq!(
            policy
                .client_address(&mut reader, peer, Duration::from_secs(1))
                .await
                .unwrap(),
            peer
        );
        let mut long = SIGNATURE.to_vec();
        long.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        let mut reader = long.as_slice();
        let err = policy
            .client_address(&mut reader, peer, Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(matches!(err, ProxyError::TooLong(65535)), "{err}");
    }
}
