"""tlkit: transfer learning for small image datasets -> tracked, comparable classifiers."""

__version__ = "0.4.0"
