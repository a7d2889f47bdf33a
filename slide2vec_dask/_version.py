"""The package version, in a module of its own so any module can import it without the package's public surface."""

__version__ = "0.1.0"
