"""The site's secret key store: keyed pseudonyms, keyed UIDs, keyed date shifts, the re-link table.

Every common de-identification tool hashes UIDs and IDs without a secret, so anyone who holds an
original UID can confirm which output it became. Here every replacement is an HMAC-SHA256 under a
per-site secret: consistent across runs at one site, unlinkable by anyone without the secret.

The store is a folder (``~/.lsdm-node`` by default), mode 0700, holding:

``site.key``      32 random bytes, base64, mode 0600; created once, never printed
``links.enc``     one Fernet token per line; each decrypts to a JSON list of
                  ``{"pseudonym", "kind", "original"}`` records, so only the site can re-link
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import stat
import string
from collections.abc import Iterable
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from lsdm.errors import InputError

KEY_FILE = "site.key"
LINKS_FILE = "links.enc"
DEFAULT_KEYS_DIR = Path("~/.lsdm-node")
KEYS_ENV = "LSDM_NODE_KEYS"
# Letters only (16 of them: 75 bits), so a pseudonym can never look like a date, a DICOM UID or a
# record number to a human or to the PHI scanner. (Base32 was used before; its digits 2-7 made a
# run like "746356" possible, which the scanner rightly flags as an ID.)
PSEUDONYM_CHARS = 16
PSEUDONYM_ALPHABET = string.ascii_lowercase


class KeyStoreError(InputError):
    """The key store is missing, unreadable or unsafe."""


def default_keys_dir() -> Path:
    return Path(os.environ.get(KEYS_ENV, str(DEFAULT_KEYS_DIR))).expanduser()


class SiteKeys:
    """A loaded site secret. Construct with :meth:`create`, :meth:`load` or :meth:`open`."""

    def __init__(self, root: Path, secret: bytes):
        if len(secret) < 32:
            raise KeyStoreError(f"site secret is too short: {root / KEY_FILE}")
        self.root = root
        self.__secret = secret

    def __repr__(self) -> str:  # never show the secret, even in a traceback
        return f"SiteKeys({str(self.root)!r}, fingerprint={self.fingerprint!r})"

    # -- creation and loading -------------------------------------------------------------------
    @classmethod
    def create(cls, root: Path) -> SiteKeys:
        root = Path(root).expanduser()
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(root, 0o700)
        path = root / KEY_FILE
        secret = secrets.token_bytes(32)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise KeyStoreError(f"a site secret already exists: {path}") from None
        with os.fdopen(fd, "w") as f:
            f.write(base64.b64encode(secret).decode() + "\n")
        return cls(root, secret)

    @classmethod
    def load(cls, root: Path) -> SiteKeys:
        root = Path(root).expanduser()
        path = root / KEY_FILE
        try:
            st = path.stat()
        except FileNotFoundError:
            raise KeyStoreError(f"no site secret (run `lsdm-node init`): {path}") from None
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise KeyStoreError(f"site secret is readable by others (chmod 600 it): {path}")
        try:
            secret = base64.b64decode(path.read_text().strip(), validate=True)
        except (ValueError, OSError):
            raise KeyStoreError(f"site secret is unreadable or corrupt: {path}") from None
        return cls(root, secret)

    @classmethod
    def open(cls, root: Path) -> tuple[SiteKeys, bool]:
        """Load the store, creating it on first use; the flag says whether it was created."""
        if (Path(root).expanduser() / KEY_FILE).exists():
            return cls.load(root), False
        return cls.create(root), True

    # -- keyed derivations ---------------------------------------------------------------------
    def _mac(self, purpose: str, value: str) -> bytes:
        # Domain separation: the same original never yields related outputs for two purposes.
        return hmac.new(self.__secret, f"{purpose}\x00{value}".encode(), hashlib.sha256).digest()

    @property
    def fingerprint(self) -> str:
        """A short public name for this secret (which key made an output), not the secret."""
        return self._mac("fingerprint", "").hex()[:12]

    def uid(self, original: str) -> str:
        """A new UID under the 2.25 arc (UUID-derived UIDs), 128 bits of keyed HMAC."""
        return "2.25." + str(int.from_bytes(self._mac("uid", original.strip())[:16], "big"))

    def pseudonym(self, kind: str, original: str) -> str:
        """``<kind>-<16 lower-case letters>``, e.g. ``s-kqhvxlmztrabcdew`` for a series."""
        value = int.from_bytes(self._mac(f"pseudonym:{kind}", original.strip()), "big")
        letters = []
        for _ in range(PSEUDONYM_CHARS):
            value, index = divmod(value, len(PSEUDONYM_ALPHABET))
            letters.append(PSEUDONYM_ALPHABET[index])
        return f"{kind}-{''.join(letters)}"

    def date_offset_days(self, patient: str, max_days: int) -> int:
        """A keyed per-patient shift in 1..max_days days (applied backwards in time)."""
        return 1 + int.from_bytes(self._mac("date-shift", patient.strip())[:8], "big") % max_days

    def _fernet(self) -> Fernet:
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"lsdm-node links").derive(
            self.__secret
        )
        return Fernet(base64.urlsafe_b64encode(key))

    # -- re-link table ---------------------------------------------------------------------------
    def append_links(self, records: Iterable[dict]) -> int:
        """Append pseudonym -> original records, encrypted; returns how many were written."""
        batch = list(records)
        if not batch:
            return 0
        token = self._fernet().encrypt(json.dumps(batch, sort_keys=True).encode())
        path = self.root / LINKS_FILE
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "ab") as f:
            f.write(token + b"\n")
        return len(batch)

    def read_links(self) -> list[dict]:
        path = self.root / LINKS_FILE
        if not path.exists():
            return []
        fernet = self._fernet()
        out: list[dict] = []
        for n, line in enumerate(path.read_bytes().splitlines(), 1):
            if not line.strip():
                continue
            try:
                out.extend(json.loads(fernet.decrypt(line.strip())))
            except InvalidToken:
                raise KeyStoreError(
                    f"link table line {n} does not decrypt with this site's key: {path}"
                ) from None
        return out


def ensure_outside(keys_dir: Path, published: Path) -> None:
    """Refuse a key store inside a folder that will be published (or the other way round)."""
    k = Path(keys_dir).expanduser().resolve()
    p = Path(published).expanduser().resolve()
    if k == p or p in k.parents or k in p.parents:
        raise KeyStoreError(f"the key store must not lie inside the output or hold it: {k}")
