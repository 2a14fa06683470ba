"""whatsappd: one supervised WhatsApp connection per company, driven over a Unix socket."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("whatsappd")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"

__all__ = ["__version__"]
