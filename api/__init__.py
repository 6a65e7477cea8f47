"""The HTTP face of paramstore: FastAPI app, wire formats, error mapping and the
CLI. Knows nothing of Raft internals. (The client SDK is the `paramstore` package.)"""
