"""Scans in, de-identified volumes and maps out.

DICOM profile (``deid.dicom``), keyed pseudonyms and the site key store (``deid.keys``), volume
assembly and fresh NIfTI writing (``deid.volumes``), the PHI scanner (``deid.scan``), the audit log
(``deid.audit``) and phantom PACS exports (``deid.phantom_dicom``). No torch here.
"""
