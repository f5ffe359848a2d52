"""SHA-512 crypt (``$6$``), the password hash every shadow-utils and libcrypt accepts.

Written from Ulrich Drepper's specification (https://www.akkadia.org/drepper/SHA-crypt.txt)
on top of hashlib, because the alternatives are worse here: Python's ``crypt`` module is
deprecated in 3.11 and gone in 3.13, ctypes into libcrypt depends on the host's library, and
passlib is unmaintained. The tests check the output against the host's libcrypt (``crypt``
while it exists, ``openssl passwd -6``) and the specification's own vectors.

SHA-512 crypt rather than yescrypt (``$y$``): cloud-init hands the hash to ``chpasswd -e`` /
``usermod -p`` in the guest, and every Linux guest's libcrypt verifies ``$6$``; older ones
(glibc's own crypt, before libxcrypt) know nothing newer.
"""

from __future__ import annotations

import hashlib
import secrets

ALPHABET = "./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
DEFAULT_ROUNDS = 5000  # the specification's default: no "rounds=" field in the output
MIN_ROUNDS, MAX_ROUNDS = 1000, 999_999_999
SALT_LENGTH = 16  # the most the specification uses; longer salts are cut to 16

# Whoever can read the guest's seed drive or cloud-init's cache (root only) can try to crack
# the hash, so we spend ten times the default rounds: about 60 ms in pure Python on the
# development VM, once per task start.
ROUNDS = 50_000


def _digest(*parts: bytes) -> bytes:
    return hashlib.sha512(b"".join(parts)).digest()


def _stretch(block: bytes, length: int) -> bytes:
    """``block`` repeated and cut to ``length`` bytes (the spec's P and S sequences)."""
    return (block * (length // len(block) + 1))[:length]


def _initial_digest(password: bytes, salt: bytes) -> bytes:
    """Steps 1-12 of the specification: digest A."""
    alternate = _digest(password, salt, password)
    parts = [password, salt, _stretch(alternate, len(password))]
    # One of B or the password per bit of the password's length, lowest bit first.
    length = len(password)
    while length:
        parts.append(alternate if length & 1 else password)
        length >>= 1
    return _digest(*parts)


def _rounds(password: bytes, salt: bytes, rounds: int) -> bytes:
    result = _initial_digest(password, salt)
    p_seq = _stretch(_digest(password * len(password)), len(password))
    s_seq = _stretch(_digest(salt * (16 + result[0])), len(salt))
    for i in range(rounds):
        h = hashlib.sha512()
        h.update(p_seq if i & 1 else result)
        if i % 3:
            h.update(s_seq)
        if i % 7:
            h.update(p_seq)
        h.update(result if i & 1 else p_seq)
        result = h.digest()
    return result


def _byte_order() -> list[tuple[int, ...]]:
    """The specification's permutation of the 64 digest bytes into 4-character groups.

    Group k takes bytes k, k+21 and k+42, rotated by k mod 3; the last byte goes alone.
    """
    groups: list[tuple[int, ...]] = []
    for k in range(21):
        trio = (k, k + 21, k + 42)
        shift = k % 3
        groups.append(trio[shift:] + trio[:shift])
    groups.append((63,))
    return groups


_ORDER = _byte_order()


def _encode(digest: bytes) -> str:
    out = []
    for group in _ORDER:
        value = 0
        for index in group:
            value = (value << 8) | digest[index]
        # 24 bits make 4 characters, the final single byte 2; least significant bits first.
        for _ in range(4 if len(group) == 3 else 2):
            out.append(ALPHABET[value & 0x3F])
            value >>= 6
    return "".join(out)


def new_salt() -> str:
    return "".join(secrets.choice(ALPHABET) for _ in range(SALT_LENGTH))


def sha512_crypt(password: str, salt: str | None = None, rounds: int = ROUNDS) -> str:
    """The ``$6$`` hash of ``password`` (UTF-8, as PAM sees it), with a fresh salt by default."""
    if not MIN_ROUNDS <= rounds <= MAX_ROUNDS:
        raise ValueError(f"rounds must be between {MIN_ROUNDS} and {MAX_ROUNDS}")
    salt = (new_salt() if salt is None else salt)[:SALT_LENGTH]
    if not salt or any(c not in ALPHABET for c in salt):
        raise ValueError("a salt is 1 to 16 characters of [./0-9A-Za-z]")
    digest = _rounds(password.encode(), salt.encode(), rounds)
    prefix = "$6$" if rounds == DEFAULT_ROUNDS else f"$6$rounds={rounds}$"
    return f"{prefix}{salt}${_encode(digest)}"
