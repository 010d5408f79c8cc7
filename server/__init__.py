"""secagg.server."""
