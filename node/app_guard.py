"""``flwr-clientapp`` as a site runs it: only the installed Med-LSDM ClientApp may load.

Flower's SuperNode starts ``flwr-clientapp`` (found on ``PATH``) for every message; that process
unpacks the app bundle (FAB) the coordinator sent, puts its folder first on ``sys.path`` and
imports the ClientApp it names, so a bundle that carries code would run that code at the site.
``lsdm-node join`` puts a ``flwr-clientapp`` of ours first on the SuperNode's ``PATH``; it runs
Flower's own ``flwr-clientapp`` with one change: the loader refuses a bundle that holds anything
but ``pyproject.toml`` or names another ClientApp than ``node.client_app:app``, and imports the
installed module without touching ``sys.path``.
"""

from __future__ import annotations

import importlib
from pathlib import Path

ALLOWED_CLIENTAPP = "node.client_app:app"
ALLOWED_FILES = {"pyproject.toml"}


class ForbiddenApp(Exception):
    """The coordinator sent an app that is not the installed Med-LSDM ClientApp."""


def check_app_folder(folder: Path) -> None:
    import tomllib

    files = {str(p.relative_to(folder)) for p in Path(folder).rglob("*") if p.is_file()}
    extra = sorted(files - ALLOWED_FILES)
    if extra:
        raise ForbiddenApp(f"the app carries files besides pyproject.toml: {extra[:5]}")
    project = tomllib.loads((Path(folder) / "pyproject.toml").read_text())
    components = project.get("tool", {}).get("flwr", {}).get("app", {}).get("components", {})
    if components.get("clientapp") != ALLOWED_CLIENTAPP:
        raise ForbiddenApp(
            f"the app names ClientApp {components.get('clientapp')!r}, "
            f"not the installed {ALLOWED_CLIENTAPP!r}"
        )


def guarded_load_client_app_fn(default_app_ref, app_path, multi_app):
    from flwr.clientapp.client_app import LoadClientAppError
    from flwr.common.config import get_project_dir

    def _load(fab_id: str, fab_version: str, fab_hash: str):
        folder = get_project_dir(fab_id, fab_version, fab_hash)
        try:
            check_app_folder(folder)
        except ForbiddenApp as e:
            raise LoadClientAppError(f"refused by the site: {e}") from None
        module, attribute = ALLOWED_CLIENTAPP.split(":")
        return getattr(importlib.import_module(module), attribute)

    return _load


def main() -> None:
    from flwr.supernode.cli import flwr_clientapp
    from flwr.supernode.runtime import run_clientapp

    run_clientapp.get_load_client_app_fn = guarded_load_client_app_fn
    flwr_clientapp()


if __name__ == "__main__":
    main()
