"""Benchmark: this project's DICOM de-identification against dicognito and deid, same files.

For each tool: files per second (best of ``--repeats`` runs, reading and writing included; ours
also includes its PHI-scanner gate over its own output), and what the project's PHI scanner finds
in each tool's output under the strict policy, split into (a) original identifying values found
byte by byte (names, IDs, dates, instance UIDs, institution of the input) and (b) all findings
(also private tags, non-remapped UIDs, descriptors, burned-in annotation flags, missing markers).

The corpus: pydicom's test files, pydicom-data, deid-data and a phantom PACS export with fake
identity. The PyPI package ``deid`` is a top-level package named ``deid`` like ours, so it cannot
share our environment: it runs in its own venv (created on first use under
``~/.cache/med-lsdm-bench/deid-venv`` with ``pip install deid==0.4.13``) as a subprocess, timed
inside that process. dicognito runs in-process (``pip install -e '.[bench]'``).

    .venv/bin/python bench/bench_deid.py --out bench/results/deid.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from deid.files import NotDicom, iter_files, read_dicom  # noqa: E402
from deid.keys import SiteKeys  # noqa: E402
from deid.scan import KnownValues, scan_path  # noqa: E402
from policies.presets import STRICT  # noqa: E402

DEID_VENV = Path("~/.cache/med-lsdm-bench/deid-venv").expanduser()
PYDICOM_FILES = [
    "CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "rtstruct.dcm", "rtplan.dcm", "rtdose.dcm",
    "test-SR.dcm", "liver_1frame.dcm", "waveform_ecg.dcm", "examples_overlay.dcm", "priv_SQ.dcm",
    "reportsi.dcm", "SC_rgb.dcm", "MR_small_RLE.dcm",
]  # fmt: skip
PYDICOM_DATA_FILES = ["emri_small.dcm", "MR-SIEMENS-DICOM-WithOverlays.dcm", "liver.dcm",
                      "US1_UNCR.dcm", "eCT_Supplemental.dcm", "MR2_UNCR.dcm"]  # fmt: skip
DEID_DATA_FILES = ["humans/ctbrain1.dcm", "humans/ctbrain2.dcm", "animals/cat.dcm",
                   "ultrasounds/GREYSCALE_IMAGE.dcm", "ultrasounds/RGB_IMAGE.dcm"]  # fmt: skip

DEID_SCRIPT = r"""
import json, sys, time, warnings
warnings.simplefilter("ignore")
from deid.config import DeidRecipe
from deid.dicom import get_identifiers, replace_identifiers
files, out = json.loads(sys.argv[1]), sys.argv[2]
t0 = time.perf_counter()
ok = 0
for f in files:  # one call per file, so a file it cannot handle does not stop the others
    try:
        items = get_identifiers([f])
        replace_identifiers(dicom_files=[f], deid=DeidRecipe(), ids=items, save=True,
                            output_folder=out, remove_private=True, overwrite=True)
        ok += 1
    except Exception:
        pass
print(json.dumps({"seconds": time.perf_counter() - t0, "ok": ok}))
"""


def build_corpus(root: Path) -> list[Path]:
    import deid_data  # noqa: F401  (the deid-data package ships its files beside its module)
    from pydicom.data import get_testdata_file

    deid_data_dir = Path(sys.modules["deid_data"].__file__).parent / "data"
    root.mkdir(parents=True)
    for name in PYDICOM_FILES + PYDICOM_DATA_FILES:
        shutil.copyfile(get_testdata_file(name, download=False), root / name)
    for rel in DEID_DATA_FILES:
        shutil.copyfile(deid_data_dir / rel, root / rel.replace("/", "_"))
    from node.phantom_pacs import write_phantom_pacs

    write_phantom_pacs(root / "phantom", subjects=4, shape=(16, 64, 64), seed=7)
    shutil.rmtree(root / "phantom" / "maps")
    (root / "phantom" / "dicom" / "EXPORT_NOTES.txt").unlink()
    return [p for p in iter_files(root)]


def run_ours(files: list[Path], src: Path, out: Path) -> tuple[float, int]:
    from node.deid_tree import deidentify_tree

    keys = SiteKeys.create(out.parent / f"{out.name}-keys")
    t0 = time.perf_counter()
    report = deidentify_tree(src, out, STRICT, keys)
    return time.perf_counter() - t0, report.written


def run_ours_profile_only(files: list[Path], src: Path, out: Path) -> tuple[float, int]:
    """The same loop as dicognito's below: read, de-identify, write; no harvest, no gate."""
    from deid.dicom import Deidentifier, Quarantined

    keys = SiteKeys.create(out.parent / f"{out.name}-keys")
    deid = Deidentifier(STRICT, keys)
    out.mkdir(parents=True)
    ok = 0
    t0 = time.perf_counter()
    for n, f in enumerate(files):
        try:
            ds = deid.apply(read_dicom(f)).dataset
            ds.save_as(out / f"{n:05d}.dcm", enforce_file_format=True)
            ok += 1
        except (NotDicom, Quarantined):
            continue
    return time.perf_counter() - t0, ok


def run_dicognito(files: list[Path], src: Path, out: Path) -> tuple[float, int]:
    from dicognito.anonymizer import Anonymizer
    from pydicom import dcmread

    out.mkdir(parents=True)
    anonymizer = Anonymizer()
    ok = 0
    t0 = time.perf_counter()
    for n, f in enumerate(files):
        try:
            ds = dcmread(f)
            anonymizer.anonymize(ds)
            ds.save_as(out / f"{n:05d}.dcm")
            ok += 1
        except Exception:
            continue
    return time.perf_counter() - t0, ok


def run_deid(files: list[Path], src: Path, out: Path) -> tuple[float, int]:
    python = DEID_VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(DEID_VENV)], check=True)
        subprocess.run(
            [str(DEID_VENV / "bin" / "pip"), "install", "-q", "deid==0.4.13"], check=True
        )
    out.mkdir(parents=True)
    # deid names outputs by input file name: give it uniquely named copies
    staging = out.parent / f"{out.name}-in"
    staging.mkdir()
    inputs = []
    for n, f in enumerate(files):
        target = staging / f"{n:05d}_{f.name}"
        shutil.copyfile(f, target)
        inputs.append(str(target))
    result = subprocess.run(
        [str(python), "-c", DEID_SCRIPT, json.dumps(inputs), str(out)],
        capture_output=True, text=True, cwd=tempfile.gettempdir(), check=True,
    )  # fmt: skip
    shutil.rmtree(staging)
    stats = json.loads(result.stdout.strip().splitlines()[-1])
    return stats["seconds"], stats["ok"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "deid.md")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    import logging

    logging.getLogger("pydicom").setLevel(logging.ERROR)
    work = Path(tempfile.mkdtemp(prefix="bench-deid-"))
    try:
        src = work / "corpus"
        files = build_corpus(src)
        known = KnownValues()
        dicom_files = []
        for f in files:
            try:
                known.add(read_dicom(f, header_only=True))
                dicom_files.append(f)
            except NotDicom:
                pass
        rows = []
        tools = (
            ("med-lsdm strict, full run (harvest + de-identify + scanner gate)", run_ours),
            ("med-lsdm strict, de-identification only", run_ours_profile_only),
            ("dicognito 0.19.0", run_dicognito),
            ("deid 0.4.13", run_deid),
        )
        for name, runner in tools:
            best, written, out = None, 0, None
            for r in range(args.repeats):
                out = work / f"tool{len(rows)}-{r}"
                seconds, written = runner(dicom_files, src, out)
                best = seconds if best is None else min(best, seconds)
            findings = scan_path(out, policy=STRICT, known_values=known.values)
            original = [f for f in findings if f.kind == "known value"]
            files_hit = len({f.path for f in findings})
            rows.append((name, len(dicom_files), written, len(dicom_files) / best,
                         len(original), len(findings), files_hit))  # fmt: skip
            print(
                f"{name}: {len(dicom_files) / best:.1f} files/s, {written} written, "
                f"{len(original)} original values, {len(findings)} findings",
                flush=True,
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    cpu = platform.processor() or platform.machine()
    lines = [
        "# DICOM de-identification benchmark",
        "",
        f"Machine: 2-core CPU box ({cpu}, {os.cpu_count()} logical CPUs, Python "
        f"{platform.python_version()}), shared with other work; best of {args.repeats} runs.",
        f"Corpus: {len(dicom_files)} DICOM files (pydicom test files, pydicom-data, deid-data, and "
        "a 4-subject phantom PACS export with fake identity), "
        f"{len(known.values)} distinct identifying values harvested from them.",
        "",
        "| tool | DICOM files in | files written | files/s | original identifying values "
        "found, (file, value) pairs | all scanner findings (strict) "
        "| output files with a finding |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, n_in, written, fps, original, total, hit in rows:
        lines.append(f"| {name} | {n_in} | {written} | {fps:.1f} | {original} | {total} | {hit} |")
    lines += [
        "",
        "Notes: med-lsdm's time includes its PHI-scanner gate over its own output, and it writes",
        "fewer files because it quarantines objects with burned-in annotation (US, secondary",
        "capture, BurnedInAnnotation=YES) and head images that may show a face, which the other",
        "tools pass through. dicognito replaces names and IDs with realistic fakes, which the",
        "strict scanner counts as surviving values in places the profile empties; the byte-level",
        "column counts only values of the input itself. deid runs with its default recipe and",
        "remove_private=True, in its own environment (its package name clashes with ours).",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(args.out.read_text())


if __name__ == "__main__":
    main()
