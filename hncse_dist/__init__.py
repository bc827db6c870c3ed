"""hncse-dist: distributed HNCSE / SimCSE training of sentence encoders."""

__version__ = "0.1.0"
