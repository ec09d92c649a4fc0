#!/usr/bin/env python3
"""SMTP in and IMAP out for the Postfix end-to-end test (tests/tests/postfix_lmtp.rs).

Usage:
  mail.py send --port SMTP_PORT --sender ADDR --rcpt ADDR [--rcpt ADDR]... --subject S --body B
        one SMTP transaction with smtplib (EHLO, MAIL, one RCPT per address, DATA); prints JSON
        {"rcpt": {addr: [code, text]}, "data": [code, text], "queue_id": id or null}
  fetch --port IMAP_PORT --user USER --password PASS
        prints JSON [{"uid": n, "message": text}] for every message of INBOX (EXAMINE, so
        nothing changes), the message as stored (BODY.PEEK[]), CRLF kept

Exits non-zero with a message when the server refuses something the script did not expect.
"""

import argparse
import imaplib
import json
import re
import smtplib
import sys

TIMEOUT = 20


def send(args):
    message = (
        f"From: <{args.sender}>\r\n"
        f"To: {', '.join(f'<{r}>' for r in args.rcpt)}\r\n"
        f"Subject: {args.subject}\r\n"
        "\r\n"
        f"{args.body}\r\n"
    ).encode()
    with smtplib.SMTP("127.0.0.1", args.port, local_hostname="client.test", timeout=TIMEOUT) as s:
        code, text = s.ehlo()
        if code != 250:
            sys.exit(f"EHLO refused: {code} {text!r}")
        code, text = s.mail(args.sender)
        if code != 250:
            sys.exit(f"MAIL refused: {code} {text!r}")
        rcpt = {}
        for r in args.rcpt:
            code, text = s.rcpt(r)
            rcpt[r] = [code, text.decode(errors="replace")]
        if any(code == 250 for code, _ in rcpt.values()):
            code, text = s.data(message)
            data = [code, text.decode(errors="replace")]
        else:
            s.rset()
            data = None
    queued = re.search(r"queued as ([0-9A-Za-z]+)", data[1]) if data else None
    print(json.dumps({"rcpt": rcpt, "data": data, "queue_id": queued and queued.group(1)}))


def fetch(args):
    m = imaplib.IMAP4("127.0.0.1", args.port, timeout=TIMEOUT)
    typ, data = m.login(args.user, args.password)
    if typ != "OK":
        sys.exit(f"LOGIN: {typ} {data!r}")
    typ, data = m.select("INBOX", readonly=True)
    if typ != "OK":
        sys.exit(f"EXAMINE INBOX: {typ} {data!r}")
    messages = []
    if int(data[0]) > 0:
        typ, data = m.uid("FETCH", "1:*", "(UID BODY.PEEK[])")
        if typ != "OK":
            sys.exit(f"UID FETCH: {typ} {data!r}")
        for item in data:
            if not isinstance(item, tuple):
                continue
            uid = re.search(rb"UID (\d+)", item[0])
            if not uid:
                sys.exit(f"FETCH response without UID: {item[0]!r}")
            messages.append(
                {"uid": int(uid.group(1)), "message": item[1].decode("utf-8", "replace")}
            )
    m.logout()
    print(json.dumps(messages))


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("send")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--sender", required=True)
    s.add_argument("--rcpt", action="append", required=True)
    s.add_argument("--subject", required=True)
    s.add_argument("--body", required=True)
    f = sub.add_parser("fetch")
    f.add_argument("--port", type=int, required=True)
    f.add_argument("--user", required=True)
    f.add_argument("--password", required=True)
    args = p.parse_args()
    {"send": send, "fetch": fetch}[args.command](args)


if __name__ == "__main__":
    main()
