"""Where a passing ``hello-ray preflight`` keeps its JSON: ``_preflight/<run name>.json``, a helper
folder of the store (never finalized), read back by the run's report."""
from __future__ import annotations

PREFLIGHT_KEY = "_preflight"  # helper folder (never finalized) holding the last passing preflight per run name


def preflight_file(run_name: str) -> str:
    """The file of run ``run_name``'s last passing preflight inside ``PREFLIGHT_KEY``."""
    return f"{run_name}.json"
