"""The package version (layer 0): one place, read by the package face and by provenance records."""

__version__ = "0.1.0"
