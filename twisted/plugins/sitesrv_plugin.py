"""twistd plugin: ``twistd -n sitesrv --config FILE`` or ``twistd -n sitesrv --demo``."""

from twisted.application.service import ServiceMaker

serviceMaker = ServiceMaker(
    "sitesrv", "sitesrv.tap", "Site server for print management (primary or site)", "sitesrv"
)
