"""Preorder: a pre-sale order service that never oversells, loses or leaks stock."""

__version__ = "0.1.0"
