"""The preorder benchmark: `python -m bench` (see README.md)."""
