"""Generated gRPC/protobuf code for the secagg.v1 wire contract (do not edit by hand)."""
