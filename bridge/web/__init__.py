"""aiohttp applications: the REST API (with health, metrics, events and launches) and OPP web."""
