"""Administration tools: the ``sitesrv-admin`` command line."""
