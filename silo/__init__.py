"""The silo daemon: dials out to the coordinator, trains locally, uploads."""
