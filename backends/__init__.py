"""Demo aiohttp backends for the lb-testbed balancer (``python -m backends --help``)."""

from backends.app import BACKEND_HEADER, make_app

__all__ = ["BACKEND_HEADER", "make_app"]
