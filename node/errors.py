"""Errors that are the user's to fix: the CLI prints them as one line and exits with status 2."""

from __future__ import annotations

from deid.scan import Finding
from lsdm.errors import InputError


class UserError(InputError):
    """A bad path, a bad option or bad input at a site; the message names what and where."""


class ScanFailed(Exception):
    """The last gate found identifying data in a run's output: nothing was published."""

    def __init__(self, findings: list[Finding]):
        self.findings = findings
        super().__init__(f"the PHI scanner found {len(findings)} problem(s) in the output")
