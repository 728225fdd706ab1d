"""Keep every tool's state inside the project (never $HOME) before Prefect, MLflow or DVC is imported."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from tasks.core.layout import state_dir


def configure_environment(root: Path) -> None:
    """Set defaults (a value the user already exported wins) for the tools llmpipe drives."""
    state = state_dir(root)
    prefect_home = state / "prefect"
    defaults = {
        "LLMPIPE_ROOT": str(root),
        "PREFECT_HOME": str(prefect_home),
        "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{prefect_home / 'prefect.db'}",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # A fresh database takes ~13 s to migrate on a 2-core machine; the default timeout is too tight.
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        "DVC_SITE_CACHE_DIR": str(state / "dvc-site-cache"),
        "DVC_NO_ANALYTICS": "1",
        "MPLCONFIGDIR": str(state / "matplotlib"),
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # one bar per model file logged or loaded
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    # dvc.yaml's `cmd: llmpipe stage ...` must find this interpreter's llmpipe even if the venv
    # is not activated (e.g. `.venv/bin/llmpipe run`).
    scripts = str(Path(sys.executable).parent)
    if scripts not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = scripts + os.pathsep + os.environ.get("PATH", "")
    prefect_home.mkdir(parents=True, exist_ok=True)
