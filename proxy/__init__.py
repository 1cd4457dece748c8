"""upscale-v2-proxy: keeps clients of the deprecated Upscale V2 API working on top of V3."""

__version__ = "0.1.0"
