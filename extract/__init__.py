"""Stage 1: the dataset readers (datasets/), the frozen encoders and the extraction loop that writes a cache.

`fusion.extract` is also the API's extract function: calling this package, `fusion.extract(dataset=..., root=...)`,
runs fusion/app/api.py `extract` (the root package, fusion/__init__.py, makes the package callable; nothing in this
package imports the application).
"""
