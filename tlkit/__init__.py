"""tlkit: transfer learning for small image datasets -> tracked, comparable classifiers."""

__version__ = "0.2.0"
