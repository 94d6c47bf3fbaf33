"""The coordinator: round state machine, gRPC service, run folder."""
