"""upscale-v2-proxy: keeps clients of the deprecated Upscale V2 API working on top of V3."""

from importlib import metadata

try:  # the installed distribution's version; the fallback for a bare checkout
    __version__ = metadata.version("upscale-v2-proxy")
except metadata.PackageNotFoundError:  # pragma: no cover
    __version__ = "0.1.0"
