"""Generated gRPC and protobuf stubs (``make proto``); do not edit by hand."""
