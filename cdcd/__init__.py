"""cdcd: copy a Redis to another Redis, then keep it in sync, exactly and resumably."""

__version__ = "0.1.0"
