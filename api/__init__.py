"""The HTTP face of paramstore: FastAPI app, wire formats, error mapping, the
client SDK and the CLI. Knows nothing of Raft internals."""
