"""`mcibi`: `params` (its settings, light to import) and `method` (the networks and steps)."""
