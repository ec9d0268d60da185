"""Tools for testing and benchmarking sitesrv (not used by the servers themselves)."""
