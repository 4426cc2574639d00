"""Events out: the order log as a transactional outbox, relayed to NATS JetStream and to signed webhooks."""
