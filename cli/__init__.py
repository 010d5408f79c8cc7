"""The ``secagg`` command line: one sub-module per sub-command."""
