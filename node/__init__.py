"""The site: the ``lsdm-node`` CLI and the orchestration of what a hospital runs."""
