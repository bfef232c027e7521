"""Read one multipart file field into memory, bounded, without touching the disk.

Starlette's ``UploadFile`` spools any part larger than 1 MB to a temporary file. Uploads here
are patient images that must never be written to disk, so the request body is streamed through
``python_multipart``'s parser directly and only the wanted field's bytes are kept, in memory.
The size limit is enforced while reading: a body that declares or reaches more than the limit
is refused with 413 before the rest is read.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from medlens.errors import UploadError

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

__all__ = ["UploadError", "read_file_field", "MULTIPART_OVERHEAD"]

MULTIPART_OVERHEAD = 64 * 1024
"""Room for boundaries, part headers and small extra fields on top of the file limit."""


def _mb(n: int) -> str:
    return f"{n / 2**20:g} MB"


def _too_large(limit: int) -> UploadError:
    return UploadError(
        413,
        f"the upload is larger than the limit of {_mb(limit)}; send a smaller "
        "image (downscale or re-encode it), or start the server with a "
        "larger --max-upload-mb",
    )


class _FieldCollector:
    """``python_multipart`` callbacks that keep the bytes of one field only."""

    def __init__(self, field: str, limit: int):
        self.field, self.limit = field, limit
        self.names: list[str] = []  # every field name seen, for the error message
        self.data: bytearray | None = None  # the wanted field's bytes, once it starts
        self.count = 0  # how many parts carried the wanted field
        self._header, self._value, self._disposition = b"", b"", b""
        self._keep = False

    def callbacks(self) -> MultipartCallbacks:
        return {
            "on_part_begin": self._begin,
            "on_header_field": self._hfield,
            "on_header_value": self._hvalue,
            "on_header_end": self._hend,
            "on_headers_finished": self._headers_done,
            "on_part_data": self._pdata,
        }

    def _begin(self):
        self._disposition, self._keep = b"", False

    def _hfield(self, data, start, end):
        self._header += data[start:end]

    def _hvalue(self, data, start, end):
        self._value += data[start:end]

    def _hend(self):
        if self._header.lower() == b"content-disposition":
            self._disposition = self._value
        self._header, self._value = b"", b""

    def _headers_done(self):
        _, options = parse_options_header(self._disposition)
        name = options.get(b"name", b"").decode("utf-8", "replace")
        self.names.append(name)
        if name == self.field:
            self.count += 1
            self._keep = self.count == 1
            if self._keep:
                self.data = bytearray()

    def _pdata(self, data, start, end):
        if self._keep:
            self.data += data[start:end]
            if len(self.data) > self.limit:
                raise _too_large(self.limit)


async def read_file_field(request: Request, field: str, limit: int) -> bytes:
    """The bytes of multipart form field ``field`` of ``request``, read in memory.

    Raises:
        UploadError: 415 not multipart; 400 malformed body or several ``field`` parts;
            413 over ``limit`` bytes; 422 no ``field`` in the form.
    """
    how = (
        f"send the image as multipart/form-data field `{field}`, e.g. `curl -F {field}=@image.png`"
    )
    ctype = request.headers.get("content-type", "")
    kind, params = parse_options_header(ctype)
    if kind != b"multipart/form-data":
        raise UploadError(
            415,
            f"expected a multipart/form-data body, got "
            f"{ctype.split(';')[0] or 'no content type'}; {how}",
        )
    boundary = params.get(b"boundary")
    if not boundary:
        raise UploadError(400, f"the multipart body has no boundary in its Content-Type; {how}")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit + MULTIPART_OVERHEAD:
        raise _too_large(limit)
    collector = _FieldCollector(field, limit)
    received = 0
    try:
        # Inside the try: the parser's constructor refuses a boundary over 70 (RFC 2046) /
        # 256 characters with FormParserError, as the parsing itself refuses a malformed body.
        parser = MultipartParser(boundary, collector.callbacks())
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit + MULTIPART_OVERHEAD:  # many small fields, or a lying header
                raise _too_large(limit)
            parser.write(chunk)
        parser.finalize()
    except FormParserError as e:
        raise UploadError(400, f"the multipart body is malformed ({e}); {how}") from None
    if collector.count > 1:
        raise UploadError(
            400, f"the form has {collector.count} `{field}` fields; send one image per request"
        )
    if collector.data is None:
        seen = ", ".join(f"`{n}`" for n in collector.names) or "none"
        raise UploadError(422, f"the form has no field `{field}` (fields received: {seen}); {how}")
    return bytes(collector.data)
