"""The product's entry points: the ``splitserve`` CLI and the local cluster it serves.

The one package that imports both the router and the deployment side (`cluster`); everything
else is layered below it (see docs/architecture.md).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("splitserve")
except PackageNotFoundError:  # a source tree without `pip install -e .`
    __version__ = "0+unknown"
