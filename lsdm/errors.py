"""The one base of errors that are the user's to fix.

Every CLI (``lsdm``, ``lsdm-node``, ``lsdm-server``) catches :class:`InputError`, prints its
message as one line on stderr and exits with status 2; everything else is a bug and keeps its
traceback. Its subclasses live beside the code that raises them (``lsdm.bundle.BundleError``,
``policies.load.PolicyError``, ``deid.volumes.VolumeError``, ``deid.keys.KeyStoreError``,
``node.errors.UserError``).

This module imports nothing, so ``policies`` and ``deid`` may import it without pulling in torch
(an exception to the import table, see docs/architecture.md).
"""


class InputError(Exception):
    """Bad input (a file, a folder, an option, a configuration); the message says what and where."""
