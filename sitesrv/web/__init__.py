"""The web port: health, metrics, status page, release station, device API."""
