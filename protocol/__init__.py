"""secagg.protocol."""
