"""``sitesrv-provider``: the reference print provider.

An IPP printer for users' computers (``ippserver``), a spool on disk (``spool``), page
counting (``pages``), delivery to physical printers (``deliver``) and the provider side of
the print-provider protocol (``service``), configured from a TOML file (``config``).
Separate from ``sitesrv.providers``, the server's side of that protocol.
"""
