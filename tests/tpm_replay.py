"""Replaying IMA's measurement list onto PCR 10, to check a guest's TPM against it."""

from __future__ import annotations

import hashlib


def sha1_replay(ascii_log: str) -> str:
    """PCR 10's SHA-1 bank after extending each template hash of IMA's list (its ASCII form:
    PCR, SHA-1 template hash, template, ...) in order, from all zeros; a violation's all-zero
    hash is extended as all ones, as IMA does."""
    pcr = bytes(20)
    for line in ascii_log.splitlines():
        fields = line.split()
        if len(fields) < 2 or fields[0] != "10":
            continue
        digest = bytes.fromhex(fields[1])
        if digest == bytes(20):
            digest = b"\xff" * 20
        pcr = hashlib.sha1(pcr + digest).digest()
    return pcr.hex()
