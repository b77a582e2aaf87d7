"""AES-256-GCM for backups and archived WAL, streamed in chunks (the STREAM construction).

A file is a 36-byte header followed by chunks. Each chunk is at most ``chunk_size`` bytes
of plaintext sealed with AES-256-GCM (16-byte tag)::

    header = b"CRMBAK1\\n" | key id (8 bytes) | chunk size (4 bytes, big-endian) | salt (16 bytes)
    file key = HKDF-SHA256(master key, salt, "crm-appliance backup file v1")    # one key per file
    nonce(i) = i as 11 bytes big-endian | final flag (0x00, or 0x01 on the last chunk)
    AAD(i)   = header | final flag

The per-file key (from a random salt) means nonces never repeat across files; the counter
in the nonce means chunks cannot be reordered or dropped; the final flag means the file
cannot be cut at a chunk boundary or extended without the last tag failing; the header in
the AAD means it cannot be edited. Memory stays at one chunk whatever the file size.

The key file holds text (``secrets.token_urlsafe(32)``, written by the installer, mode
0600). The AES key and the fingerprint are both derived from it with HKDF, under different
labels, so the fingerprint that manifests record reveals nothing about the key.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterator

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from appliance.config import read_secret
from appliance.errors import BackupError, BackupIntegrityError, ConfigError

MAGIC = b"CRMBAK1\n"
HEADER = struct.Struct(">8s8sI16s")
CHUNK_SIZE = 1 << 20
TAG_SIZE = 16
MIN_KEY_CHARS = 32
CIPHER = "AES-256-GCM, STREAM construction, HKDF-SHA256 per-file keys"


def _hkdf(material: bytes, info: bytes, salt: bytes | None = None) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(material)


@dataclass(frozen=True)
class BackupKey:
    """The master key, derived from the key file, and its public fingerprint."""

    path: Path
    fingerprint: str  # 64 hex digits: SHA-256 of a value derived under its own label
    _master: bytes = field(repr=False)

    @property
    def key_id(self) -> bytes:
        """The fingerprint's first 8 bytes, stored in every file header."""
        return bytes.fromhex(self.fingerprint)[:8]

    @property
    def short(self) -> str:
        return self.fingerprint[:16]

    def sign(self, data: bytes) -> str:
        """HMAC-SHA256 under a key of its own, for manifests (so an edit is detected)."""
        mac_key = _hkdf(self._master, b"crm-appliance manifest mac v1")
        return hmac.new(mac_key, data, hashlib.sha256).hexdigest()

    def file_cipher(self, salt: bytes) -> AESGCM:
        return AESGCM(_hkdf(self._master, b"crm-appliance backup file v1", salt=salt))


def key_from_text(text: str, path: Path) -> BackupKey:
    material = text.strip().encode("utf-8")
    if len(material) < MIN_KEY_CHARS:
        raise BackupError(f"{path}: the backup key is too short: expected at least {MIN_KEY_CHARS} characters, "
                          f"found {len(material)}; the installer generates one, or: "
                          f"python3 -c 'import secrets; print(secrets.token_urlsafe(32))'")
    master = _hkdf(material, b"crm-appliance backup master key v1")
    fingerprint = hashlib.sha256(_hkdf(material, b"crm-appliance backup key fingerprint v1")).hexdigest()
    return BackupKey(path=Path(path), fingerprint=fingerprint, _master=master)


def load_key(path: str | os.PathLike, label: str = "[backup] key_file") -> BackupKey:
    """Read the key file with the secrets' rule: it must exist, be non-empty and mode 0600."""
    path = Path(path)
    try:
        text = read_secret(path, label)
    except ConfigError as exc:  # the same message, as a backup problem
        raise BackupError(str(exc)) from None
    return key_from_text(text, path)


def _nonce(index: int, final: bool) -> bytes:
    return index.to_bytes(11, "big") + (b"\x01" if final else b"\x00")


class EncryptingWriter:
    """A write-only file object that encrypts into ``raw``, counting the plaintext and hashing
    what it stores (the checksum ``sha256sum`` can check without the key).

    The plaintext is not hashed: the chunks' tags already prove, under the key, that the file
    decrypts to exactly what was written, and hashing it too cost a third of a backup's CPU.

    ``close()`` seals the final chunk; until then the file is incomplete and would fail
    authentication. It does not close ``raw``.
    """

    def __init__(self, raw: BinaryIO, key: BackupKey, chunk_size: int = CHUNK_SIZE):
        if not 1 <= chunk_size <= 1 << 26:
            raise ValueError(f"chunk size {chunk_size} out of range")
        salt = os.urandom(16)
        self._header = HEADER.pack(MAGIC, key.key_id, chunk_size, salt)
        self._aead = key.file_cipher(salt)
        self._raw = raw
        self._chunk_size = chunk_size
        self._buf = bytearray()
        self._index = 0
        self._closed = False
        self._error: BaseException | None = None
        self.stored_sha256 = hashlib.sha256()
        self.stored_size = 0
        self.plain_size = 0
        self._emit(self._header)

    def _emit(self, data: bytes) -> None:
        self._raw.write(data)
        self.stored_sha256.update(data)
        self.stored_size += len(data)

    def _seal(self, plain, final: bool) -> None:
        flag = b"\x01" if final else b"\x00"
        self._emit(self._aead.encrypt(_nonce(self._index, final), plain, self._header + flag))
        self._index += 1

    def write(self, data) -> int:
        if self._error is not None:
            raise self._error  # a failed write (disk full, say) fails every later one the same way
        if self._closed:
            raise ValueError("write to a closed EncryptingWriter")
        view = memoryview(data).cast("B")
        n = len(view)
        self.plain_size += n
        size, buf, pos = self._chunk_size, self._buf, 0
        # A full chunk is held back until more data shows it is not the last one; whole chunks
        # further on in ``data`` are sealed straight from it, without a copy.
        try:
            if buf and n:
                if len(buf) < size:
                    pos = min(size - len(buf), n)
                    buf += view[:pos]
                if len(buf) == size and pos < n:
                    self._seal(buf, final=False)
                    buf.clear()
            while n - pos > size:
                self._seal(view[pos:pos + size], final=False)
                pos += size
        except BaseException as exc:
            self._error = exc
            raise
        buf += view[pos:]
        return n

    def close(self) -> None:
        if self._error is not None:
            raise self._error
        if not self._closed:
            try:
                self._seal(self._buf, final=True)
            except BaseException as exc:
                self._error = exc
                raise
            self._buf.clear()
            self._closed = True

    def writable(self) -> bool:  # tarfile and shutil ask
        return True

    def tell(self) -> int:  # tarfile's "w" mode asks: the plaintext written so far
        return self.plain_size

    def flush(self) -> None:
        self._raw.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self.close()


def _read_exact(raw: BinaryIO, n: int) -> bytes:
    parts, left = [], n
    while left:
        part = raw.read(left)
        if not part:
            break
        parts.append(part)
        left -= len(part)
    return b"".join(parts)


def decrypt_chunks(raw: BinaryIO, key: BackupKey, name: str) -> Iterator[bytes]:
    """Yield the plaintext of ``raw`` chunk by chunk; any alteration raises BackupIntegrityError.

    Nothing is yielded that has not been authenticated, but a caller that stops early has
    not checked the rest: read to the end.
    """
    header = _read_exact(raw, HEADER.size)
    if len(header) < HEADER.size or not header.startswith(MAGIC):
        raise BackupIntegrityError(f"{name}: not an encrypted appliance backup file (bad or short header); "
                                   f"it was damaged or replaced: do not restore from it")
    _, key_id, chunk_size, salt = HEADER.unpack(header)
    if key_id != key.key_id:
        raise BackupIntegrityError(
            f"{name}: encrypted with the key whose fingerprint starts {key_id.hex()}, but {key.path} holds "
            f"the key {key.short}: use the key file that was in place when this was written")
    if not 1 <= chunk_size <= 1 << 26:
        raise BackupIntegrityError(f"{name}: bad chunk size {chunk_size} in the header: the file was altered")
    aead = key.file_cipher(salt)
    sealed = chunk_size + TAG_SIZE
    index = 0
    current = _read_exact(raw, sealed)
    while True:
        following = _read_exact(raw, sealed) if len(current) == sealed else b""
        final = not following
        flag = b"\x01" if final else b"\x00"
        try:
            plain = aead.decrypt(_nonce(index, final), current, header + flag)
        except InvalidTag:
            where = "the last chunk" if final else f"chunk {index}"
            raise BackupIntegrityError(
                f"{name}: {where} (at byte {HEADER.size + index * sealed}) fails authentication: the file was "
                f"altered, truncated or extended after it was written: do not restore from it") from None
        yield plain
        if final:
            return
        current, index = following, index + 1


class DecryptingReader(io.RawIOBase):
    """A read-only file object over ``decrypt_chunks`` (for tarfile and shutil)."""

    def __init__(self, raw: BinaryIO, key: BackupKey, name: str):
        self._chunks = decrypt_chunks(raw, key, name)
        self._pending = b""
        self._pos = 0
        self._done = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self._pos >= len(self._pending) and not self._done:
            try:
                self._pending, self._pos = next(self._chunks), 0
            except StopIteration:
                self._done = True
        n = min(len(buffer), len(self._pending) - self._pos)
        buffer[:n] = memoryview(self._pending)[self._pos:self._pos + n]
        self._pos += n
        return n


class HashingReader(io.RawIOBase):
    """Pass reads through, counting bytes and hashing them (the stored file's checksum)."""

    def __init__(self, raw: BinaryIO):
        self._raw = raw
        self.sha256 = hashlib.sha256()
        self.size = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self._raw.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        self.sha256.update(data)
        self.size += n
        return n

    def read(self, n: int = -1) -> bytes:
        data = self._raw.read(n)
        self.sha256.update(data)
        self.size += len(data)
        return data

