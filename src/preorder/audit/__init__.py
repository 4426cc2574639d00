"""Audit log: who did what to which product or order, when and from where (admin actions, append-only)."""
