#!/usr/bin/env python3
"""Reads and changes a Tern mailbox with Python's imaplib, for tests/tests/imap_clients.rs.

Usage: imap_tool.py --port PORT --user USER --password PASS COMMAND

  dump MAILBOX[@FIRST]...
        prints JSON {mailbox: {"uidvalidity": n, "messages": [{"uid", "flags", "hex"}]}}:
        every message's UID and flags, and for UIDs >= FIRST (default 1) the whole message
        (BODY.PEEK[], hex-encoded, downloaded over 4 connections), checked against its
        RFC822.SIZE
  change
        reads JSON from stdin: {"mailbox": NAME, "add_flags": [[uid, flag]],
        "remove_flags": [[uid, flag]], "expunge": [uid], "append": [{"flags": [flag],
        "message": TEXT}]}; appended TEXT has LF line ends, sent with CRLF

Exits non-zero with a message on the first failure.
"""

import argparse
import concurrent.futures
import imaplib
import json
import re
import sys


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def ok(result, what):
    typ, data = result
    check(typ == "OK", f"{what}: {typ} {data!r}")
    return data


def connect(args):
    m = imaplib.IMAP4(args.host, args.port, timeout=60)
    ok(m.login(args.user, args.password), "LOGIN")
    return m


UID = re.compile(rb"UID (\d+)")
FLAGS = re.compile(rb"FLAGS \(([^)]*)\)")
SIZE = re.compile(rb"RFC822\.SIZE (\d+)")
DOWNLOADERS = 4


def quote(name):
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def number(pattern, text, what):
    found = pattern.search(text)
    check(found is not None, f"no {what} in {text!r}")
    return int(found.group(1))


def download(args, mailbox, uids):
    """{uid: hex} of whole messages, over a connection of its own."""
    m = connect(args)
    ok(m.select(quote(mailbox), readonly=True), f"EXAMINE {mailbox}")
    wanted = ",".join(str(uid) for uid in uids)
    data = ok(m.uid("FETCH", wanted, "(UID RFC822.SIZE BODY.PEEK[])"), "UID FETCH BODY")
    out = {}
    for item in data:
        if not isinstance(item, tuple):
            continue
        meta, body = item
        uid = number(UID, meta, "UID")
        size = number(SIZE, meta, "RFC822.SIZE")
        check(size == len(body), f"UID {uid}: RFC822.SIZE {size}, {len(body)} bytes fetched")
        out[uid] = body.hex()
    m.logout()
    check(sorted(out) == sorted(uids), f"{mailbox}: asked for {len(uids)}, got {len(out)}")
    return out


def read_mailbox(args, m, mailbox, first):
    count = int(ok(m.select(quote(mailbox), readonly=True), f"EXAMINE {mailbox}")[0])
    uidvalidity = int(m.untagged_responses.get("UIDVALIDITY", [b"0"])[0])
    messages = {}
    if count > 0:
        for line in ok(m.uid("FETCH", "1:*", "(UID FLAGS)"), "UID FETCH FLAGS"):
            flags = FLAGS.search(line)
            check(flags is not None, f"no FLAGS in {line!r}")
            uid = number(UID, line, "UID")
            messages[uid] = {"uid": uid, "flags": sorted(flags.group(1).decode().split())}
        check(len(messages) == count, f"{mailbox}: {count} EXISTS, {len(messages)} FETCHed")
    m.close()
    # Bodies over a few connections at once: each message costs the server a couple of
    # storage round trips, which a single FETCH makes one after the other.
    wanted = sorted(uid for uid in messages if uid >= first)
    chunks = [wanted[k::DOWNLOADERS] for k in range(DOWNLOADERS) if wanted[k::DOWNLOADERS]]
    with concurrent.futures.ThreadPoolExecutor(DOWNLOADERS) as pool:
        for bodies in pool.map(lambda chunk: download(args, mailbox, chunk), chunks):
            for uid, body in bodies.items():
                messages[uid]["hex"] = body
    return {"uidvalidity": uidvalidity, "messages": list(messages.values())}


def command_dump(args):
    m = connect(args)
    out = {}
    for spec in args.mailboxes:
        mailbox, _, first = spec.partition("@")
        out[mailbox] = read_mailbox(args, m, mailbox, int(first or "1"))
    m.logout()
    json.dump(out, sys.stdout)


def command_change(args):
    spec = json.load(sys.stdin)
    mailbox = spec["mailbox"]
    m = connect(args)
    ok(m.select(quote(mailbox)), f"SELECT {mailbox}")
    for uid, flag in spec.get("add_flags", []):
        ok(m.uid("STORE", str(uid), "+FLAGS.SILENT", f"({flag})"), "UID STORE +FLAGS")
    for uid, flag in spec.get("remove_flags", []):
        ok(m.uid("STORE", str(uid), "-FLAGS.SILENT", f"({flag})"), "UID STORE -FLAGS")
    gone = ",".join(str(uid) for uid in spec.get("expunge", []))
    if gone:
        ok(m.uid("STORE", gone, "+FLAGS.SILENT", "(\\Deleted)"), "UID STORE \\Deleted")
        ok(m.uid("EXPUNGE", gone), "UID EXPUNGE")
    for item in spec.get("append", []):
        text = item["message"].replace("\n", "\r\n").encode()
        flags = "(" + " ".join(item.get("flags", [])) + ")"
        ok(m.append(quote(mailbox), flags, None, text), "APPEND")
    m.close()
    m.logout()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--user", required=True)
    parser.add_argument("--password", required=True)
    sub = parser.add_subparsers(dest="command", required=True)
    dump = sub.add_parser("dump")
    dump.add_argument("mailboxes", nargs="+")
    sub.add_parser("change")
    args = parser.parse_args()
    try:
        {"dump": command_dump, "change": command_change}[args.command](args)
    except (AssertionError, imaplib.IMAP4.error, OSError) as e:
        print(f"FAILED: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
