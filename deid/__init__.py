"""Scans in, de-identified volumes and maps out.

DICOM profile (``deid.dicom``; the rules it shares with the scanner in ``deid.profile``, what
identifying text looks like and how known values are found again in ``deid.phi``, what it does to
single values in ``deid.values``), keyed pseudonyms and the site key store
(``deid.keys``), volume assembly (``deid.volumes``), the PHI scanner (``deid.scan``), the audit log
(``deid.audit``) and phantom PACS exports (``deid.phantom_dicom``). No torch here. Volumes are
written by the one NIfTI writer, ``lsdm.cohort.write_nifti``, whose docstring states the header
rule (fresh header, no text, no extensions).
"""
