"""Orders: creation against reserved stock, the status machine, the event log, idempotent retries."""
