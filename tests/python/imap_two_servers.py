#!/usr/bin/env python3
"""Two Tern server processes over one store: a session IDLE-ing on server A sees an APPEND, a
STORE and an EXPUNGE made through server B, each within a time limit."""

import argparse
import imaplib
import re
import socket
import sys
import time


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)


def wait_for(m, pattern, what, limit=15):
    started = time.monotonic()
    m.sock.settimeout(limit)
    while True:
        try:
            line = m.readline()
        except socket.timeout:
            check(False, f"{what}: not seen within {limit} s")
        check(line != b"", f"{what}: connection closed")
        if re.match(pattern, line):
            return time.monotonic() - started


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--port-a", type=int, required=True)
    p.add_argument("--port-b", type=int, required=True)
    p.add_argument("--user", required=True)
    p.add_argument("--password", required=True)
    a_args = p.parse_args()

    a = imaplib.IMAP4("127.0.0.1", a_args.port_a)
    a.login(a_args.user, a_args.password)
    b = imaplib.IMAP4("127.0.0.1", a_args.port_b)
    b.login(a_args.user, a_args.password)
    typ, data = a.select("INBOX")
    check(typ == "OK" and data[0] == b"0", f"empty INBOX on A: {data}")
    tag = a._new_tag().decode()
    a.send(f"{tag} IDLE\r\n".encode())
    check(a.readline().startswith(b"+"), "IDLE continuation")

    started = time.monotonic()
    typ, _ = b.append("INBOX", None, None, b"Subject: via B\r\n\r\nhello from the other server\r\n")
    check(typ == "OK", "APPEND through B")
    appended = wait_for(a, rb"\* 1 EXISTS", "EXISTS on A after APPEND on B")
    typ, _ = b.select("INBOX")
    typ, _ = b.store("1", "+FLAGS", "(\\Flagged)")
    check(typ == "OK", "STORE through B")
    stored = wait_for(a, rb"\* 1 FETCH \(.*\\Flagged", "FETCH FLAGS on A after STORE on B")
    b.store("1", "+FLAGS.SILENT", "(\\Deleted)")
    typ, _ = b.expunge()
    check(typ == "OK", "EXPUNGE through B")
    expunged = wait_for(a, rb"\* 1 EXPUNGE", "EXPUNGE on A after EXPUNGE on B")
    a.send(b"DONE\r\n")
    check(a.readline().startswith(tag.encode() + b" OK"), "IDLE ends with OK")
    a.logout()
    b.logout()
    print(
        f"seen on A: append {appended * 1000:.0f} ms, store {stored * 1000:.0f} ms, "
        f"expunge {expunged * 1000:.0f} ms (total {(time.monotonic() - started) * 1000:.0f} ms)"
    )


if __name__ == "__main__":
    main()
