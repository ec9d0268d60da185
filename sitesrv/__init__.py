"""sitesrv: a site server for print management that keeps remote sites working offline."""

__version__ = "0.1.0"

#: Version of the replication wire protocol (see docs/protocols/replication.rst).
#: 2 compresses row batches with zlib; the primary still serves version 1 sites.
PROTOCOL_VERSION = 2
