"""secagg.client."""
