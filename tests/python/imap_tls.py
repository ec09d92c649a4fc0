#!/usr/bin/env python3
"""Python's imaplib against Tern over TLS: STARTTLS on the plain port, implicit TLS on the
other, both checking the certificate and the host name against the test's CA file."""

import argparse
import imaplib
import ssl
import sys


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)


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

    try:
        imaplib.IMAP4_SSL("localhost", a.tls_port, ssl_context=ssl.create_default_context())
        check(False, "a client that does not trust the CA must refuse the server")
    except ssl.SSLError:
        print("untrusted CA refused: ok")


if __name__ == "__main__":
    main()
