#!/usr/bin/env python3
"""Python's imaplib against Tern over TLS: STARTTLS on the plain port, implicit TLS on the
other, both checking the certificate and the host name against the test's CA file."""

import argparse
import base64
import hashlib
import hmac
import imaplib
import os
import ssl
import sys


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)


class Scram:
    """A SCRAM-SHA-256 client (RFC 5802) for imaplib.authenticate, checking the server's
    signature at the end."""

    def __init__(self, user, password):
        self.user, self.password = user, password
        self.nonce = base64.b64encode(os.urandom(18)).decode()
        self.step = 0
        self.server_ok = False

    def __call__(self, challenge):
        self.step += 1
        if self.step == 1:
            self.bare = f"n={self.user},r={self.nonce}"
            return ("n,," + self.bare).encode()
        if self.step == 2:
            server_first = challenge.decode()
            attrs = dict(a.split("=", 1) for a in server_first.split(","))
            check(attrs["r"].startswith(self.nonce), "server nonce extends ours")
            salted = hashlib.pbkdf2_hmac(
                "sha256", self.password.encode(), base64.b64decode(attrs["s"]), int(attrs["i"])
            )
            client_key = hmac.digest(salted, b"Client Key", "sha256")
            stored_key = hashlib.sha256(client_key).digest()
            without_proof = f"c=biws,r={attrs['r']}"
            auth = f"{self.bare},{server_first},{without_proof}".encode()
            sig = hmac.digest(stored_key, auth, "sha256")
            proof = bytes(a ^ b for a, b in zip(client_key, sig))
            server_key = hmac.digest(salted, b"Server Key", "sha256")
            self.expected = "v=" + base64.b64encode(hmac.digest(server_key, auth, "sha256")).decode()
            return f"{without_proof},p={base64.b64encode(proof).decode()}".encode()
        check(challenge.decode() == self.expected, "server signature verifies")
        self.server_ok = True
        return b""


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--plain-port", type=int, required=True)
    p.add_argument("--tls-port", type=int, required=True)
    p.add_argument("--ca", required=True)
    p.add_argument("--user", required=True)
    p.add_argument("--password", required=True)
    a = p.parse_args()
    ctx = ssl.create_default_context(cafile=a.ca)  # verifies chain and host name

    m = imaplib.IMAP4("localhost", a.plain_port)
    check("STARTTLS" in m.capabilities, f"STARTTLS advertised: {m.capabilities}")
    check("LOGINDISABLED" in m.capabilities, "LOGINDISABLED before TLS")
    m.starttls(ssl_context=ctx)
    check("STARTTLS" not in m.capabilities, f"no STARTTLS after TLS: {m.capabilities}")
    check("AUTH=PLAIN" in m.capabilities, "AUTH=PLAIN after TLS")
    m.login(a.user, a.password)
    typ, _ = m.select("INBOX")
    check(typ == "OK", "SELECT INBOX over STARTTLS")
    m.append("INBOX", None, None, b"Subject: over tls\r\n\r\nhello\r\n")
    m.logout()
    print("starttls: ok")

    m = imaplib.IMAP4_SSL("localhost", a.tls_port, ssl_context=ctx)
    check("STARTTLS" not in m.capabilities, "no STARTTLS on implicit TLS")
    m.authenticate("PLAIN", lambda _: f"\0{a.user}\0{a.password}".encode())
    typ, data = m.select("INBOX")
    check(typ == "OK" and data[0] == b"1", f"the message appended over STARTTLS: {data}")
    m.logout()
    print("implicit tls: ok")

    # SCRAM-SHA-256 on the plain port: no password crosses the wire, and it unlocks the mail.
    m = imaplib.IMAP4("localhost", a.plain_port)
    check("AUTH=SCRAM-SHA-256" in m.capabilities, f"SCRAM advertised: {m.capabilities}")
    scram = Scram(a.user, a.password)
    m.authenticate("SCRAM-SHA-256", scram)
    check(scram.server_ok, "the server proved it knows the verifier")
    typ, data = m.select("INBOX")
    check(typ == "OK" and data[0] == b"1", f"mail readable after SCRAM: {data}")
    typ, data = m.fetch("1", "(BODY[HEADER.FIELDS (SUBJECT)])")
    check(b"over tls" in data[0][1], f"decrypted after SCRAM: {data}")
    m.logout()
    for user, password in [(a.user, "wrong"), ("nobody", a.password)]:
        m = imaplib.IMAP4("localhost", a.plain_port)
        try:
            m.authenticate("SCRAM-SHA-256", Scram(user, password))
            check(False, f"SCRAM as {user} with a wrong password must fail")
        except imaplib.IMAP4.error as e:
            check("AUTHENTICATIONFAILED" in str(e), f"failure reason: {e}")
        m.logout()
    print("scram-sha-256: ok")

    try:
        imaplib.IMAP4_SSL("localhost", a.tls_port, ssl_context=ssl.create_default_context())
        check(False, "a client that does not trust the CA must refuse the server")
    except ssl.SSLError:
        print("untrusted CA refused: ok")


if __name__ == "__main__":
    main()
