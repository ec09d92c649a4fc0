//! What every listener shares, below the protocols: the connection stream (plain or TLS),
//! TLS certificates reloaded from files, the PROXY protocol v2 header, connection limits and the
//! throttle on failed logins. IMAP uses all of it; LMTP and the SASL service use what they need.

pub mod limits;
pub mod proxy;
pub mod stream;
pub mod throttle;
pub mod tls;

pub use limits::{ConnectionLimits, LimitExceeded};
pub use proxy::ProxyPolicy;
pub use stream::Stream;
pub use throttle::AuthThrottle;
pub use tls::{TlsError, TlsFiles, TlsProvider};
