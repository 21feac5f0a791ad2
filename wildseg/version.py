"""wildseg's version, from the installed package's metadata."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("wildseg")
except PackageNotFoundError:
    __version__ = "0.0.0+unknown"
