"""fusion: multimodal (image + text) sentiment analysis with cached frozen-encoder embeddings and small fusion heads.

    import fusion
    cache = fusion.extract(dataset="mvsa-single", root="data/MVSA_Single", out="caches/mvsa-single.h5")
    run = fusion.fit(cache, head="self_attn")
    fusion.load_run(run.path).predict(["meme.jpg"], ["not bad at all"])

The API lives in fusion/app/api.py and is imported on first use, so `import fusion` costs nothing (no torch).
"""

import types

import fusion.extract as _stage_one
from fusion.version import __version__

API = ("open_cache", "fit", "grid", "sweep", "load_run", "report", "reproduce")
TYPES = {"Cache": "handles", "Run": "handles", "GridResult": "handles", "Predictor": "predictor"}
__all__ = ["__version__", "extract", *API, *TYPES]


class _CallableStage(types.ModuleType):
    """`fusion.extract` names both stage 1 (the package fusion/extract/) and the API call that runs it; the call is
    fusion/app/api.py `extract`, with the same keywords."""

    def __call__(self, **options):
        from fusion.app import api

        return api.extract(**options)


_stage_one.__class__ = _CallableStage


def __getattr__(name: str):
    if name in API:
        from fusion.app import api

        return getattr(api, name)
    if name in TYPES:
        import importlib

        return getattr(importlib.import_module(f"fusion.app.{TYPES[name]}"), name)
    raise AttributeError(f"module 'fusion' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
