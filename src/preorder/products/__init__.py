"""Products: admin-managed catalogue entries with stock, price and presale window."""
