"""``lsdm-node deid-dicom``: de-identified DICOM copies of a PACS export."""

from __future__ import annotations

import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from deid.audit import AUDIT_NAME, AuditLog
from deid.dicom import Deidentifier, Quarantined
from deid.files import NotDicom, Skipped, iter_files, read_dicom
from deid.keys import SiteKeys, ensure_outside
from deid.scan import KnownValues, scan_path
from lsdm.atomic import staged_directory
from node.errors import ScanFailed, UserError
from policies.site import SitePolicy


@dataclass
class DeidTreeReport:
    written: int = 0
    series: Counter = field(default_factory=Counter)  # series pseudonym -> files
    quarantined: list[Skipped] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)


def check_paths(src: Path, out: Path, keys_dir: Path) -> None:
    if not src.exists():
        raise UserError(f"input not found: {src}")
    s, o = src.resolve(), out.resolve()
    if o == s or s in o.parents or o in s.parents:
        raise UserError(f"output must lie outside the input: {out}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"output already exists and is not empty: {out}")
    ensure_outside(keys_dir, out)


def deidentify_tree(
    src: Path,
    out: Path,
    policy: SitePolicy,
    keys: SiteKeys,
    *,
    quarantine: Path | None = None,
    on_file: Callable[[int], None] | None = None,
) -> DeidTreeReport:
    """De-identify every DICOM file under ``src`` into ``out``; all or nothing.

    Output files are named ``<patient>/<study>/<series>/<instance>.dcm`` by keyed pseudonyms. The
    PHI scanner runs over the staged output with every identifying value read from the input; any
    finding aborts the run with ``out`` untouched.
    """
    deid = Deidentifier(policy, keys)
    report = DeidTreeReport()
    known = KnownValues()
    links: dict[str, dict] = {}
    files = list(iter_files(src))
    with staged_directory(out) as stage:
        audit = AuditLog(
            stage / AUDIT_NAME,
            command="deid-dicom",
            policy=policy,
            key_fingerprint=keys.fingerprint,
        )
        for n, path in enumerate(files, 1):
            try:
                ds = read_dicom(path)
                known.add(ds)
                outcome = deid.apply(ds)
            except NotDicom as e:
                report.skipped.append(Skipped(path, e.reason))
                audit.add("skipped", reason=e.reason)
            except Quarantined as e:
                report.quarantined.append(Skipped(path, e.reason))
                audit.add("quarantined", reason=e.reason)
                if quarantine is not None:  # site-private: keep the original for a human to look at
                    target = quarantine / f"{len(report.quarantined):05d}.dcm"
                    quarantine.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(path, target)
            else:
                rel = Path(
                    outcome.patient, outcome.study, outcome.series, outcome.instance + ".dcm"
                )
                target = stage / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                if target.exists():  # the same SOP instance twice (e.g. in two encodings)
                    report.skipped.append(Skipped(path, "duplicate of an instance already written"))
                    audit.add("skipped", reason="duplicate SOP instance", instance=outcome.instance)
                    if on_file is not None:
                        on_file(n)
                    continue
                try:
                    ds.save_as(target, enforce_file_format=True)
                except Exception as e:  # an object pydicom can read but not write back
                    target.unlink(missing_ok=True)
                    report.skipped.append(Skipped(path, f"cannot be written ({type(e).__name__})"))
                    audit.add("skipped", reason=f"cannot be written ({type(e).__name__})")
                else:
                    report.written += 1
                    report.series[outcome.series] += 1
                    audit.add("deidentified", patient=outcome.patient, series=outcome.series,
                              instance=outcome.instance, actions=outcome.actions)  # fmt: skip
                    for link in outcome.links:
                        links[link["pseudonym"]] = link
            if on_file is not None:
                on_file(n)
        audit.write()
        findings = scan_path(stage, policy=policy, known_values=known.values)
        if findings:
            raise ScanFailed(findings)
        keys.append_links(links.values())
    return report
