"""Errors a user can act on: the CLI prints their message as one line and exits 1 (traceback only with
FUSION_DEBUG=1)."""


class FusionError(Exception):
    """Base of every known failure; its message names the file/row and what is wrong."""


class LabelFileError(FusionError):
    """A dataset's label file cannot be parsed: the run stops (message names the file and line)."""


class DatasetError(FusionError):
    """The dataset folder is not where or what it should be."""


class ModelLoadError(FusionError):
    """An encoder's weights, tokenizer or processor cannot be loaded (offline, wrong path)."""


class CacheError(FusionError):
    """A cache file is missing, damaged, incomplete, of an unknown version, or for other settings."""


class CacheLockedError(CacheError):
    """Another process is writing the same cache."""


class RunError(FusionError):
    """A run directory (config.json, metrics.json, head.safetensors) is missing, damaged or altered."""


def install_extra(extra: str) -> str:
    """How to install one of the optional extras (pyproject.toml): from the checkout, since "fusion" on PyPI is
    another project."""
    return f".venv/bin/pip install -e '.[{extra}]' (from the checkout)"
