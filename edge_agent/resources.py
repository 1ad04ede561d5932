"""Files that ship inside the edge-fl package: the backbone model, the broker configs, the deploy templates.

They live once, at the top of the repository (models/, broker_config/, deploy/); the wheel carries them as
the packages edge_agent.bundled.models, .broker_config and .deploy (pyproject.toml maps the directories
into the package). An installed edge-fl finds them with importlib.resources inside site-packages; a
checkout (an editable install, or the repository on sys.path) uses the repository's directories.

Every function returns the path it looked at, whether or not a file is there: the caller reports a
missing file with that path (for a default model that cannot be found at import time that is what a
user must see).
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

__all__ = ["MODELS", "BROKER_CONFIG", "DEPLOY", "BACKBONE_MODEL_NAME",
           "backbone_model", "broker_config", "deploy_file", "bundled_file"]

MODELS = "edge_agent.bundled.models"
BROKER_CONFIG = "edge_agent.bundled.broker_config"
DEPLOY = "edge_agent.bundled.deploy"
BACKBONE_MODEL_NAME = "backbone_int8.tflite"
_PACKAGE_DIR = Path(__file__).resolve().parent


def bundled_file(package: str, name: str) -> Path:
    """The path of `name` (may contain "/") inside one of the bundled packages above.

    A pip-installed wheel is unpacked on disk, so the file has a real path that can be handed to the
    TFLite interpreter or to Mosquitto; a package that is not on the filesystem is an installation
    error, said as one.
    """
    try:
        root = resources.files(package)
    except ModuleNotFoundError:
        # A checkout: `pip install -e .` cannot map a package nested in a real one (edge_agent.bundled
        # inside edge_agent), and a script may put the repository on sys.path by hand. The repository's
        # own directory is then the one source. Anywhere else, name where the wheel puts the file.
        repository = _PACKAGE_DIR.parent
        if (repository / "pyproject.toml").is_file():
            return repository / package.rsplit(".", 1)[1] / name
        return _PACKAGE_DIR.joinpath(*package.split(".")[1:], *name.split("/"))
    target = root
    for part in name.split("/"):  # one level at a time: a namespace package's joinpath takes one name
        target = target.joinpath(part)
    if not isinstance(target, os.PathLike):
        raise FileNotFoundError(f"{package}/{name} is not on the filesystem ({target!r}): install edge-fl "
                                "from its wheel or a checkout, not from a zip archive")
    return Path(os.fspath(target))


def backbone_model() -> Path:
    """The int8 backbone .tflite the wheel ships; its sidecar .json sits beside it."""
    return bundled_file(MODELS, BACKBONE_MODEL_NAME)


def broker_config(name: str) -> Path:
    """A Mosquitto config or ACL example from broker_config/, e.g. "mosquitto-dev.conf"."""
    return bundled_file(BROKER_CONFIG, name)


def deploy_file(name: str) -> Path:
    """A deploy template from deploy/, e.g. "edge-fl-agent.service" or "termux/run"."""
    return bundled_file(DEPLOY, name)
