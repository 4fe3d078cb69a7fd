"""uvicorn's httptools protocol, except that a request whose method HTTP parsers do not know
gets 501 Not Implemented with a Redfish error (DSP0266 §7.2: an unsupported method is answered
405 or 501), not the parser's 400."""

from __future__ import annotations

import httptools
import msgspec
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .errors import RedfishError


class RedfishHttpProtocol(HttpToolsProtocol):
    def data_received(self, data: bytes) -> None:
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserInvalidMethodError:
            body = msgspec.json.encode(RedfishError(501, "OperationNotAllowed").body())
            self.transport.write(b"HTTP/1.1 501 Not Implemented\r\ncontent-type: application/json\r\n"
                                 b"odata-version: 4.0\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
                                 % len(body) + body)
            self.transport.close()
        except httptools.HttpParserError:
            self.send_400_response("Invalid HTTP request received.")
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
