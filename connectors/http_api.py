"""The ``http`` connector: MFDs whose embedded software calls the JSON device API.

Such a device needs nothing running for it alone: the device API under ``/api/v1/`` on
the web port (``sitesrv.web.deviceapi``) serves every ``http`` device, each
authenticating with its own API key. This plugin makes the name known to the connector
manager, so ``http`` devices are not reported as naming an unknown connector, and its
service logs where the device is served while the device record exists.
"""

from __future__ import annotations

from collections.abc import Mapping

from twisted.application.service import IService, Service
from twisted.logger import Logger
from twisted.plugin import IPlugin
from zope.interface import implementer

from sitesrv.core.devicecore import InvalidOptions
from sitesrv.interfaces import IConnectorFactory, IDeviceCore
from sitesrv.store.devices import Device

log = Logger()

#: The connector's name in device records.
NAME = "http"


class DeviceAPIDevice(Service):
    """An ``http`` device while its record exists: served by the web port's device API."""

    def __init__(self, device: Device) -> None:
        self.device = device

    def startService(self) -> None:
        """Say where the device is served."""
        super().startService()
        log.info(
            "device {device}: served by the JSON device API at /api/v1/ on the web port"
            " (printer {printer})",
            device=self.device.name,
            printer=self.device.printer,
        )


@implementer(IPlugin, IConnectorFactory)
class HTTPConnector:
    """The ``http`` connector plugin."""

    name = NAME
    description = "MFDs calling the JSON device API (/api/v1/ on the web port) with their key"
    options: Mapping[str, str] = {}

    def makeService(self, device: Device, core: IDeviceCore) -> IService:
        """The device's service; the device API itself runs on the web port."""
        if device.options:
            raise InvalidOptions(
                f"the http connector takes no options, not {', '.join(sorted(device.options))}"
            )
        return DeviceAPIDevice(device)


#: The plugin object ``getPlugins(IConnectorFactory, connectors)`` finds.
httpDevices = HTTPConnector()
