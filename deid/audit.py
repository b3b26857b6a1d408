"""The audit log: JSON lines saying what was done to which pseudonym, and nothing identifying.

Records carry pseudonyms, counts, shapes and reasons; never a name, an ID, an original UID, a date
or an input path (export folder names are full of identity). Run times are not recorded either: the
log is published with the cohort, and a processing date can be matched to a scan date.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from policies.load import policy_to_yaml
from policies.site import SitePolicy

AUDIT_NAME = "audit.jsonl"


class AuditLog:
    def __init__(self, path: Path, *, command: str, policy: SitePolicy, key_fingerprint: str):
        self.path = Path(path)
        self._records: list[dict] = []
        self.add(
            "run",
            command=command,
            policy=policy.name,
            policy_sha256=hashlib.sha256(policy_to_yaml(policy).encode()).hexdigest(),
            deidentification=[m for _, m in policy.method_codes()],
            key_fingerprint=key_fingerprint,
        )

    def add(self, event: str, **fields: object) -> None:
        self._records.append({"seq": len(self._records), "event": event, **fields})

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("w") as f:
            for record in self._records:
                f.write(json.dumps(record, sort_keys=True) + "\n")

    @property
    def records(self) -> list[dict]:
        return list(self._records)
