#!/usr/bin/env python3
"""Drives a Tern IMAP server with Python's imaplib, as a real client would.

Usage: imap_client.py --port PORT --user USER --password PASS SCENARIO [--expect N]

Scenarios (each exits non-zero with a message on the first failed check):
  basic         login, create, append 50 messages, select, fetch, search, store, copy, move,
                expunge; leaves 50 messages in "Kept" for the restart check
  idle          an IDLE session is woken by an APPEND from a second connection
  two-sessions  two sessions on one mailbox see each other's EXISTS, FETCH FLAGS and EXPUNGE
  kept          after a restart: "Kept" still holds --expect messages with their flags
Run by tests/tests/imap_dev.rs.
"""

import argparse
import imaplib
import re
import socket
import sys
import time


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def ok(result, what):
    typ, data = result
    check(typ == "OK", f"{what}: {typ} {data!r}")
    return data


def connect(args):
    m = imaplib.IMAP4(args.host, args.port, timeout=30)
    ok(m.login(args.user, args.password), "LOGIN")
    return m


def message(i):
    return (
        f"From: Sender {i} <sender{i}@example.org>\r\n"
        "To: someone@localhost\r\n"
        f"Subject: message number {i}\r\n"
        f"Date: Tue, 3 Mar 2026 10:{i % 60:02d}:00 +0100\r\n"
        f"Message-ID: <m{i}@example.org>\r\n"
        "\r\n"
        f"Body of message {i}.\r\n"
    ).encode()


def uids_of(data):
    return [int(x) for x in data[0].split()] if data and data[0] else []


def scenario_basic(args):
    m = connect(args)
    # imaplib keeps the greeting's list; ask again now that we are logged in.
    caps = ok(m.capability(), "CAPABILITY")[0].decode().upper().split()
    for cap in ("IMAP4REV1", "IDLE", "UIDPLUS", "MOVE", "SPECIAL-USE"):
        check(cap in caps, f"capability {cap} missing from {caps}")

    typ, boxes = m.list()
    ok((typ, boxes), "LIST")
    names = [b.decode() for b in boxes]
    for special in ("\\Sent", "\\Trash", "\\Drafts", "\\Junk", "\\Archive"):
        check(any(special in n for n in names), f"{special} missing from LIST: {names}")

    ok(m.create("Kept"), "CREATE Kept")
    typ, data = m.create("Kept")
    check(typ == "NO", f"second CREATE must fail: {typ} {data}")

    date = imaplib.Time2Internaldate(time.mktime((2024, 5, 17, 12, 0, 0, 0, 0, -1)))
    for i in range(50):
        flags = r"(\Seen)" if i % 2 == 0 else "()"
        data = ok(m.append("Kept", flags, date, message(i)), f"APPEND {i}")
        check(b"APPENDUID" in data[0], f"APPENDUID missing: {data}")

    data = ok(m.select("Kept"), "SELECT Kept")
    check(data == [b"50"], f"EXISTS: {data}")

    data = ok(m.fetch("1:*", "(UID FLAGS RFC822.SIZE INTERNALDATE)"), "FETCH 1:*")
    check(len(data) == 50, f"50 FETCH responses expected, got {len(data)}")
    check(b"17-May-2024" in data[0], f"APPEND date kept: {data[0]}")

    data = ok(m.fetch("7", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)] BODY.PEEK[TEXT])"), "FETCH 7")
    check(data[0][1] == b"Subject: message number 6\r\n\r\n", f"header fields: {data}")
    check(data[1][1] == b"Body of message 6.\r\n", f"text: {data}")
    data = ok(m.fetch("8", "(ENVELOPE)"), "FETCH ENVELOPE")
    check(b'"message number 7"' in data[0] and b'"<m7@example.org>"' in data[0], f"{data}")

    check(uids_of(ok(m.search(None, "UNSEEN"), "SEARCH UNSEEN")) == list(range(2, 51, 2)),
          "UNSEEN are the odd messages")
    check(uids_of(ok(m.search(None, "SUBJECT", '"number 42"'), "SEARCH SUBJECT")) == [43],
          "SEARCH SUBJECT")
    check(uids_of(ok(m.search(None, "BODY", '"message 13."'), "SEARCH BODY")) == [14], "SEARCH BODY")
    check(uids_of(ok(m.uid("SEARCH", "UID", "1:4294967295"), "UID SEARCH")) == list(range(1, 51)),
          "UID SEARCH UID 1:4294967295")

    data = ok(m.store("1:3", "+FLAGS", r"(\Flagged)"), "STORE")
    check(len(data) == 3 and all(b"\\Flagged" in d for d in data), f"STORE answers: {data}")
    ok(m.store("2", "-FLAGS.SILENT", r"(\Flagged)"), "STORE -FLAGS.SILENT")
    check(uids_of(ok(m.search(None, "FLAGGED"), "SEARCH FLAGGED")) == [1, 3], "FLAGGED after STORE")

    # Copies go to Archive, then the copies move to Trash; Kept keeps its 50.
    data = ok(m.copy("1:10", "Archive"), "COPY")
    check(b"COPYUID" in data[-1], f"COPYUID: {data}")
    ok(m.select("Archive"), "SELECT Archive")
    typ, data = m.uid("MOVE", "1:5", "Trash")
    ok((typ, data), "UID MOVE")
    check(int(ok(m.select("Archive"), "reselect")[0]) == 5, "5 left in Archive")
    check(int(ok(m.select("Trash"), "SELECT Trash")[0]) == 5, "5 in Trash")

    ok(m.store("1:2", "+FLAGS.SILENT", r"(\Deleted)"), "STORE \\Deleted")
    data = ok(m.expunge(), "EXPUNGE")
    check(sorted(data) == [b"1", b"2"], f"EXPUNGE responses: {data}")
    check(int(ok(m.select("Trash"), "reselect Trash")[0]) == 3, "3 left in Trash")

    typ, data = m.select("Nope")
    check(typ == "NO", f"SELECT of a missing mailbox: {typ} {data}")
    # imaplib refuses to send FETCH outside the selected state: send it raw.
    m.send(b"raw1 FETCH 1 (FLAGS)\r\n")
    line = m.readline()
    check(line.startswith(b"raw1 BAD"), f"FETCH with nothing selected: {line}")
    m.logout()


def scenario_idle(args):
    a = connect(args)
    b = connect(args)
    ok(a.create("Idle"), "CREATE Idle")
    ok(a.select("Idle"), "SELECT Idle")
    tag = a._new_tag().decode()
    a.send(f"{tag} IDLE\r\n".encode())
    line = a.readline()
    check(line.startswith(b"+"), f"IDLE continuation: {line}")
    started = time.monotonic()
    ok(b.append("Idle", "()", None, message(999)), "APPEND from the second connection")
    a.sock.settimeout(10)
    woke = None
    while woke is None:
        try:
            line = a.readline()
        except socket.timeout:
            raise AssertionError("IDLE was not woken within 10 s")
        if re.match(rb"\* 1 EXISTS", line):
            woke = time.monotonic() - started
    a.send(b"DONE\r\n")
    line = a.readline()
    check(line.startswith(tag.encode() + b" OK"), f"IDLE ends with OK: {line}")
    print(f"idle woken after {woke * 1000:.0f} ms")
    a.logout()
    b.logout()


def untagged(m, name):
    return m.untagged_responses.pop(name, [])


def scenario_two_sessions(args):
    a = connect(args)
    b = connect(args)
    ok(a.create("Shared"), "CREATE Shared")
    for i in range(3):
        ok(a.append("Shared", "()", None, message(i)), "APPEND")
    ok(a.select("Shared"), "A SELECT")
    ok(b.select("Shared"), "B SELECT")

    ok(a.append("Shared", "()", None, message(3)), "A APPEND")
    ok(b.noop(), "B NOOP")
    check(untagged(b, "EXISTS")[-1:] == [b"4"], "B sees EXISTS 4")

    ok(a.store("2", "+FLAGS", r"(\Flagged)"), "A STORE")
    ok(b.noop(), "B NOOP")
    fetches = untagged(b, "FETCH")
    check(any(f.startswith(b"2 (FLAGS (\\Flagged)") for f in fetches), f"B sees FLAGS: {fetches}")

    ok(a.store("1", "+FLAGS.SILENT", r"(\Deleted)"), "A STORE \\Deleted")
    ok(a.expunge(), "A EXPUNGE")
    ok(b.noop(), "B NOOP")
    check(untagged(b, "EXPUNGE") == [b"1"], "B sees EXPUNGE 1")
    data = ok(b.fetch("1:*", "(UID)"), "B FETCH")
    check(len(data) == 3, f"B has 3 messages: {data}")
    a.logout()
    b.logout()


def scenario_kept(args):
    m = connect(args)
    data = ok(m.select("Kept", readonly=True), "EXAMINE Kept")
    check(int(data[0]) == args.expect, f"{args.expect} messages expected, got {data}")
    check(uids_of(ok(m.search(None, "FLAGGED"), "SEARCH FLAGGED")) == [1, 3],
          "flags survive the restart")
    data = ok(m.fetch("50", "(BODY.PEEK[TEXT])"), "FETCH 50")
    check(data[0][1] == b"Body of message 49.\r\n", f"body survives: {data}")
    m.logout()


LMTP_SUBJECT = "Delivered over LMTP"


def scenario_lmtp(args):
    """Postfix's part played by smtplib.LMTP: one delivery, one reply per recipient, then
    the message is in the user's INBOX over IMAP."""
    import smtplib

    lmtp = smtplib.LMTP("127.0.0.1", args.lmtp_port)
    code, _ = lmtp.docmd("LHLO", "test.local")
    check(code == 250, f"LHLO: {code}")
    refused = lmtp.sendmail(
        "sender@example.org",
        [f"{args.user}@localhost"],
        f"From: sender@example.org\r\nTo: {args.user}@localhost\r\n"
        f"Subject: {LMTP_SUBJECT}\r\n\r\nHello through LMTP.\r\n",
    )
    check(refused == {}, f"delivery refused: {refused}")
    try:
        lmtp.sendmail("sender@example.org", ["nobody@localhost"], "Subject: x\r\n\r\nx\r\n")
        check(False, "an unknown recipient must be refused")
    except smtplib.SMTPRecipientsRefused as e:
        code, _ = e.recipients["nobody@localhost"]
        check(code == 550, f"unknown user: {e.recipients}")
    lmtp.quit()
    scenario_lmtp_kept(args)


def scenario_lmtp_kept(args):
    m = connect(args)
    ok(m.select("INBOX", readonly=True), "EXAMINE INBOX")
    found = uids_of(ok(m.uid("SEARCH", None, "SUBJECT", f'"{LMTP_SUBJECT}"'), "SEARCH"))
    check(len(found) == 1, f"exactly one delivered copy expected, found UIDs {found}")
    m.logout()


SCENARIOS = {
    "lmtp": scenario_lmtp,
    "lmtp-kept": scenario_lmtp_kept,
    "basic": scenario_basic,
    "idle": scenario_idle,
    "two-sessions": scenario_two_sessions,
    "kept": scenario_kept,
}

if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--user", required=True)
    p.add_argument("--password", required=True)
    p.add_argument("--expect", type=int, default=0)
    p.add_argument("--lmtp-port", type=int, default=0)
    p.add_argument("scenario", choices=sorted(SCENARIOS))
    args = p.parse_args()
    started = time.monotonic()
    try:
        SCENARIOS[args.scenario](args)
    except (AssertionError, imaplib.IMAP4.error, OSError) as e:
        print(f"FAIL {args.scenario}: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"PASS {args.scenario} in {time.monotonic() - started:.2f} s")
