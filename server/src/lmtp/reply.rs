//! Replies: a code, an enhanced status code (RFC 3463, advertised as ENHANCEDSTATUSCODES) and a
//! text, written by smtp-proto's `Response`; the multi-line LHLO reply is ours (smtp-proto's
//! EHLO writer has a text of its own).

use smtp_proto::Response;

/// One single-line reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub status: [u8; 3],
    pub text: String,
}

impl Reply {
    pub fn new(code: u16, status: [u8; 3], text: impl Into<String>) -> Reply {
        Reply {
            code,
            status,
            text: text.into(),
        }
    }

    pub fn write(&self, out: &mut Vec<u8>) {
        let [a, b, c] = self.status;
        // Writing into a Vec cannot fail.
        let _ = Response::new(self.code, a, b, c, clean(&self.text)).write(&mut *out);
    }
}

/// A reply text never breaks the line (an address or a client name may be quoted in it).
pub fn clean(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// The greeting (no enhanced code: the client has not seen ENHANCEDSTATUSCODES yet).
pub fn greeting(out: &mut Vec<u8>, hostname: &str) {
    out.extend_from_slice(format!("220 {} Tern LMTP ready\r\n", clean(hostname)).as_bytes());
}

/// The LHLO reply: our name, then one extension per line.
pub fn lhlo(out: &mut Vec<u8>, hostname: &str, max_size: u64) {
    let lines = [
        clean(hostname),
        "PIPELINING".into(),
        "ENHANCEDSTATUSCODES".into(),
        "8BITMIME".into(),
        format!("SIZE {max_size}"),
        "CHUNKING".into(),
    ];
    for (i, line) in lines.iter().enumerate() {
        let sep = if i + 1 == lines.len() { ' ' } else { '-' };
        out.extend_from_slice(format!("250{sep}{line}\r\n").as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        let mut out = Vec::new();
        Reply::new(550, [5, 1, 1], "<a@b>: no\r\nsuch user").write(&mut out);
        lhlo(&mut out, "mx", 10);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "550 5.1.1 <a@b>: no  such user\r\n250-mx\r\n250-PIPELINING\r\n\
             250-ENHANCEDSTATUSCODES\r\n250-8BITMIME\r\n250-SIZE 10\r\n250 CHUNKING\r\n"
        );
    }
}
