"""Background loops every app process runs: the payment-timeout sweeper and the hold reconciler."""
