"""The replicated state machine of paramstore: tensors, versions, optimizers,
snapshots and the Raft wiring. Knows nothing of HTTP."""
