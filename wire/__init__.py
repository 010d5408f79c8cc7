"""Shared by server and client transports: protobuf <-> core dataclasses, chunking, statuses."""
