"""secagg.simulation."""
