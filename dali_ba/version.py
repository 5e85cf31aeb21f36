"""dali-ba's version: what checkpoints record and the doctor reports (a module of its own, so that
reading it imports nothing else of the package)."""

__version__ = "0.2.0"
