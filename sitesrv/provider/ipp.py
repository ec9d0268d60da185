"""IPP messages (RFC 8010): decoding and encoding requests and responses.

A message is a version, an operation id (requests) or status code (responses), a request
id, attribute groups and the data that follows them (a Print-Job's document). Every
attribute value keeps its own value tag, so a 1setOf whose values mix tags (keyword and
name, say) round-trips exactly; values of tags this module does not know stay bytes.

Decoding is strict and bounded: lengths are checked against what is left, collections
nest at most `MAX_COLLECTION_DEPTH` deep, and anything malformed or truncated raises
`IPPParseError` (never another exception), which the IPP server answers with
``client-error-bad-request``.
"""

from __future__ import annotations

import datetime
import struct
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, TypeAlias

import attrs

# -- tags and codes ---------------------------------------------------------------------

# Delimiter tags: begin an attribute group (or end the attributes).
TAG_OPERATION = 0x01
TAG_JOB = 0x02
TAG_END = 0x03
TAG_PRINTER = 0x04
TAG_UNSUPPORTED_GROUP = 0x05
TAG_SUBSCRIPTION = 0x06
TAG_EVENT_NOTIFICATION = 0x07
TAG_RESOURCE = 0x08
TAG_DOCUMENT = 0x09
TAG_SYSTEM = 0x0A

# Out-of-band values (no value bytes).
TAG_UNSUPPORTED = 0x10
TAG_UNKNOWN = 0x12
TAG_NO_VALUE = 0x13
TAG_NOT_SETTABLE = 0x15
TAG_DELETE_ATTRIBUTE = 0x16
TAG_ADMIN_DEFINE = 0x17

# Integer-like values.
TAG_INTEGER = 0x21
TAG_BOOLEAN = 0x22
TAG_ENUM = 0x23

# Octet-string-like values.
TAG_OCTET_STRING = 0x30
TAG_DATETIME = 0x31
TAG_RESOLUTION = 0x32
TAG_RANGE = 0x33
TAG_BEGIN_COLLECTION = 0x34
TAG_TEXT_LANG = 0x35
TAG_NAME_LANG = 0x36
TAG_END_COLLECTION = 0x37

# Character-string values.
TAG_TEXT = 0x41
TAG_NAME = 0x42
TAG_KEYWORD = 0x44
TAG_URI = 0x45
TAG_URI_SCHEME = 0x46
TAG_CHARSET = 0x47
TAG_LANGUAGE = 0x48
TAG_MIME_TYPE = 0x49
TAG_MEMBER_NAME = 0x4A

#: Tags whose value is a (UTF-8) string.
STRING_TAGS = frozenset(
    {
        TAG_TEXT,
        TAG_NAME,
        TAG_KEYWORD,
        TAG_URI,
        TAG_URI_SCHEME,
        TAG_CHARSET,
        TAG_LANGUAGE,
        TAG_MIME_TYPE,
    }
)
#: Tags whose values this module turns into something other than bytes.
INTERPRETED_TAGS = STRING_TAGS | {
    TAG_INTEGER,
    TAG_BOOLEAN,
    TAG_ENUM,
    TAG_DATETIME,
    TAG_RESOLUTION,
    TAG_RANGE,
    TAG_BEGIN_COLLECTION,
    TAG_TEXT_LANG,
    TAG_NAME_LANG,
    TAG_END_COLLECTION,
    TAG_MEMBER_NAME,
}
#: Tags that carry no value (RFC 8010 section 3.8, "out-of-band").
OUT_OF_BAND_TAGS = frozenset(range(0x10, 0x20))
#: Tags that begin an attribute group.
GROUP_TAGS = frozenset(range(0x01, 0x10)) - {TAG_END}

# Operations (RFC 8011 section 5.4.15).
OP_PRINT_JOB = 0x0002
OP_PRINT_URI = 0x0003
OP_VALIDATE_JOB = 0x0004
OP_CREATE_JOB = 0x0005
OP_SEND_DOCUMENT = 0x0006
OP_CANCEL_JOB = 0x0008
OP_GET_JOB_ATTRIBUTES = 0x0009
OP_GET_JOBS = 0x000A
OP_GET_PRINTER_ATTRIBUTES = 0x000B

OPERATION_NAMES = {
    OP_PRINT_JOB: "Print-Job",
    OP_PRINT_URI: "Print-URI",
    OP_VALIDATE_JOB: "Validate-Job",
    OP_CREATE_JOB: "Create-Job",
    OP_SEND_DOCUMENT: "Send-Document",
    OP_CANCEL_JOB: "Cancel-Job",
    OP_GET_JOB_ATTRIBUTES: "Get-Job-Attributes",
    OP_GET_JOBS: "Get-Jobs",
    OP_GET_PRINTER_ATTRIBUTES: "Get-Printer-Attributes",
}

# Status codes (RFC 8011 section 5.4.15 / appendix B).
STATUS_OK = 0x0000
STATUS_OK_IGNORED_OR_SUBSTITUTED = 0x0001
STATUS_BAD_REQUEST = 0x0400
STATUS_FORBIDDEN = 0x0401
STATUS_NOT_AUTHENTICATED = 0x0402
STATUS_NOT_AUTHORIZED = 0x0403
STATUS_NOT_POSSIBLE = 0x0404
STATUS_TIMEOUT = 0x0405
STATUS_NOT_FOUND = 0x0406
STATUS_GONE = 0x0407
STATUS_REQUEST_ENTITY_TOO_LARGE = 0x0409
STATUS_DOCUMENT_FORMAT_NOT_SUPPORTED = 0x040A
STATUS_ATTRIBUTES_OR_VALUES_NOT_SUPPORTED = 0x040B
STATUS_CHARSET_NOT_SUPPORTED = 0x040D
STATUS_COMPRESSION_NOT_SUPPORTED = 0x040F
STATUS_INTERNAL_ERROR = 0x0500
STATUS_OPERATION_NOT_SUPPORTED = 0x0501
STATUS_SERVICE_UNAVAILABLE = 0x0502
STATUS_VERSION_NOT_SUPPORTED = 0x0503
STATUS_NOT_ACCEPTING_JOBS = 0x0506
STATUS_BUSY = 0x0507
STATUS_JOB_CANCELED = 0x0508

STATUS_NAMES = {
    STATUS_OK: "successful-ok",
    STATUS_OK_IGNORED_OR_SUBSTITUTED: "successful-ok-ignored-or-substituted-attributes",
    STATUS_BAD_REQUEST: "client-error-bad-request",
    STATUS_FORBIDDEN: "client-error-forbidden",
    STATUS_NOT_AUTHENTICATED: "client-error-not-authenticated",
    STATUS_NOT_AUTHORIZED: "client-error-not-authorized",
    STATUS_NOT_POSSIBLE: "client-error-not-possible",
    STATUS_TIMEOUT: "client-error-timeout",
    STATUS_NOT_FOUND: "client-error-not-found",
    STATUS_GONE: "client-error-gone",
    STATUS_REQUEST_ENTITY_TOO_LARGE: "client-error-request-entity-too-large",
    STATUS_DOCUMENT_FORMAT_NOT_SUPPORTED: "client-error-document-format-not-supported",
    STATUS_ATTRIBUTES_OR_VALUES_NOT_SUPPORTED: "client-error-attributes-or-values-not-supported",
    STATUS_CHARSET_NOT_SUPPORTED: "client-error-charset-not-supported",
    STATUS_COMPRESSION_NOT_SUPPORTED: "client-error-compression-not-supported",
    STATUS_INTERNAL_ERROR: "server-error-internal-error",
    STATUS_OPERATION_NOT_SUPPORTED: "server-error-operation-not-supported",
    STATUS_SERVICE_UNAVAILABLE: "server-error-service-unavailable",
    STATUS_VERSION_NOT_SUPPORTED: "server-error-version-not-supported",
    STATUS_NOT_ACCEPTING_JOBS: "server-error-not-accepting-jobs",
    STATUS_BUSY: "server-error-busy",
    STATUS_JOB_CANCELED: "server-error-job-canceled",
}

#: Collections nested deeper than this are refused (a bound on the decoder's recursion).
MAX_COLLECTION_DEPTH = 16

#: The largest name or value length the encoding can carry (a SIGNED-SHORT).
MAX_LENGTH = 0x7FFF

_HEADER = struct.Struct(">BBHi")
_SHORT = struct.Struct(">h")
_INT = struct.Struct(">i")
_DATETIME = struct.Struct(">HBBBBBBcBB")
_RESOLUTION = struct.Struct(">iib")
_RANGE = struct.Struct(">ii")


class IPPParseError(Exception):
    """The bytes are not a well-formed IPP message; ``str()`` says what and where."""

    def __init__(self, problem: str, offset: int | None = None) -> None:
        self.problem = problem
        self.offset = offset
        super().__init__(problem if offset is None else f"{problem} (at byte {offset})")


class IPPEncodeError(ValueError):
    """A message cannot be encoded (a value too long or out of range for its tag)."""


# -- values -----------------------------------------------------------------------------


@attrs.frozen
class Resolution:
    """A ``resolution`` value: cross-feed and feed resolution and their units."""

    #: Units: dots per inch.
    DPI = 3
    #: Units: dots per centimetre.
    DPCM = 4

    cross_feed: int
    feed: int
    units: int = DPI


@attrs.frozen
class Range:
    """A ``rangeOfInteger`` value (both bounds included)."""

    lower: int
    upper: int


@attrs.frozen
class LangString:
    """A ``textWithLanguage`` or ``nameWithLanguage`` value."""

    language: str
    text: str


@attrs.frozen
class Collection:
    """A ``collection`` value: its member attributes, in order."""

    members: tuple[Attribute, ...] = ()

    def get(self, name: str) -> Attribute | None:
        """The member called ``name``, or None."""
        for member in self.members:
            if member.name == name:
                return member
        return None


#: What a value may be in Python, by tag: int (integer, enum), bool, str (string tags),
#: bytes (octetString, unknown tags), datetime (dateTime), Resolution, Range, LangString,
#: Collection, or None (out-of-band tags).
Python: TypeAlias = (
    int
    | bool
    | str
    | bytes
    | datetime.datetime
    | Resolution
    | Range
    | LangString
    | Collection
    | None
)


@attrs.frozen
class Value:
    """One value of an attribute, with its value tag."""

    tag: int
    value: Python


@attrs.frozen
class Attribute:
    """A named attribute and its one or more values (a 1setOf has several)."""

    name: str
    values: tuple[Value, ...]

    @property
    def tag(self) -> int:
        """The first value's tag."""
        return self.values[0].tag

    @property
    def value(self) -> Python:
        """The first value."""
        return self.values[0].value

    @property
    def python(self) -> list[Python]:
        """All the values, without their tags."""
        return [v.value for v in self.values]


def attribute(name: str, tag: int, *values: Python) -> Attribute:
    """An attribute whose values all have ``tag`` (out-of-band tags take no values)."""
    if not values:
        if tag not in OUT_OF_BAND_TAGS:
            raise ValueError(f"attribute {name!r} needs at least one value")
        values = (None,)
    return Attribute(name, tuple(Value(tag, v) for v in values))


@attrs.frozen
class Group:
    """An attribute group: its delimiter tag and its attributes, in order."""

    tag: int
    attributes: tuple[Attribute, ...] = ()

    def get(self, name: str) -> Attribute | None:
        """The attribute called ``name``, or None."""
        for attr in self.attributes:
            if attr.name == name:
                return attr
        return None


@attrs.frozen
class Message:
    """An IPP request or response.

    ``code`` is the operation id of a request or the status code of a response; ``data``
    is what follows the attributes (a document).
    """

    version: tuple[int, int]
    code: int
    request_id: int
    groups: tuple[Group, ...] = ()
    data: bytes = b""

    def group(self, tag: int) -> Group | None:
        """The first group with this delimiter tag, or None."""
        for group in self.groups:
            if group.tag == tag:
                return group
        return None

    def groups_of(self, tag: int) -> list[Group]:
        """Every group with this delimiter tag (Get-Jobs answers have one per job)."""
        return [g for g in self.groups if g.tag == tag]

    def get(self, tag: int, name: str) -> Attribute | None:
        """Attribute ``name`` of the first group tagged ``tag``, or None."""
        group = self.group(tag)
        return None if group is None else group.get(name)

    def operation(self, name: str) -> Attribute | None:
        """An operation attribute, or None."""
        return self.get(TAG_OPERATION, name)


# -- decoding ---------------------------------------------------------------------------


class _Reader:
    """Bounded reading from a bytes buffer; every shortfall is an `IPPParseError`."""

    def __init__(self, data: bytes | memoryview) -> None:
        self.data = memoryview(data)
        self.offset = 0

    def take(self, count: int, what: str) -> bytes:
        end = self.offset + count
        if count < 0 or end > len(self.data):
            raise IPPParseError(
                f"truncated: {what} needs {count} bytes, {len(self.data) - self.offset} left",
                self.offset,
            )
        chunk = bytes(self.data[self.offset : end])
        self.offset = end
        return chunk

    def byte(self, what: str) -> int:
        return self.take(1, what)[0]

    def short(self, what: str) -> int:
        value: int = _SHORT.unpack(self.take(2, what))[0]
        if value < 0:
            raise IPPParseError(f"negative {what} ({value})", self.offset - 2)
        return value

    def peek(self) -> int | None:
        return self.data[self.offset] if self.offset < len(self.data) else None


def _text(raw: bytes, what: str, offset: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise IPPParseError(f"{what} is not UTF-8", offset) from None


def _decode_value(tag: int, raw: bytes, name: str, offset: int) -> Python:
    """The Python value of ``raw`` (the value bytes) for ``tag``."""
    size = len(raw)

    def need(expected: int, kind: str) -> None:
        if size != expected:
            raise IPPParseError(f"{name}: a {kind} value has {expected} bytes, not {size}", offset)

    if tag in OUT_OF_BAND_TAGS:
        # RFC 8010 says these have no value; a value sent anyway is ignored, like CUPS.
        return None
    if tag in (TAG_INTEGER, TAG_ENUM):
        need(4, "integer" if tag == TAG_INTEGER else "enum")
        value: int = _INT.unpack(raw)[0]
        return value
    if tag == TAG_BOOLEAN:
        need(1, "boolean")
        if raw[0] > 1:
            raise IPPParseError(f"{name}: boolean value {raw[0]} is neither 0 nor 1", offset)
        return raw[0] == 1
    if tag in STRING_TAGS:
        return _text(raw, f"the value of {name}", offset)
    if tag == TAG_DATETIME:
        need(11, "dateTime")
        year, month, day, hour, minute, second, deci, sign, tz_h, tz_m = _DATETIME.unpack(raw)
        if sign not in (b"+", b"-") or tz_h > 14 or tz_m > 59 or deci > 9:
            raise IPPParseError(f"{name}: malformed dateTime", offset)
        offset_minutes = (tz_h * 60 + tz_m) * (1 if sign == b"+" else -1)
        try:
            return datetime.datetime(
                year,
                month,
                day,
                hour,
                minute,
                second,
                deci * 100_000,
                tzinfo=datetime.timezone(datetime.timedelta(minutes=offset_minutes)),
            )
        except ValueError as e:
            raise IPPParseError(f"{name}: malformed dateTime ({e})", offset) from None
    if tag == TAG_RESOLUTION:
        need(9, "resolution")
        cross_feed, feed, units = _RESOLUTION.unpack(raw)
        return Resolution(cross_feed, feed, units)
    if tag == TAG_RANGE:
        need(8, "rangeOfInteger")
        lower, upper = _RANGE.unpack(raw)
        return Range(lower, upper)
    if tag in (TAG_TEXT_LANG, TAG_NAME_LANG):
        inner = _Reader(raw)
        language = _text(inner.take(inner.short("language length"), "language"), name, offset)
        text = _text(inner.take(inner.short("text length"), "text"), name, offset)
        if inner.offset != size:
            raise IPPParseError(f"{name}: extra bytes after a text/name with language", offset)
        return LangString(language, text)
    # octetString and tags this module does not interpret stay bytes.
    return raw


def _read_raw(reader: _Reader) -> tuple[int, int, str, bytes]:
    """One encoded attribute value: (its offset, tag, name, value bytes)."""
    start = reader.offset
    # An extension tag (0x7f) keeps its real tag in the value's first bytes: stays opaque.
    tag = reader.byte("value tag")
    name = _text(reader.take(reader.short("name length"), "name"), "attribute name", start)
    raw = reader.take(reader.short("value length"), "value")
    return start, tag, name, raw


def _read_collection(reader: _Reader, outer: str, depth: int) -> Collection:
    """Members up to (and including) the endCollection; begCollection already read."""
    if depth > MAX_COLLECTION_DEPTH:
        raise IPPParseError(
            f"{outer}: collections nested deeper than {MAX_COLLECTION_DEPTH}", reader.offset
        )
    members: list[Attribute] = []
    member: str | None = None
    values: list[Value] = []

    def finish() -> None:
        if member is not None:
            if not values:
                raise IPPParseError(f"{outer}: member {member!r} has no value", reader.offset)
            members.append(Attribute(member, tuple(values)))

    while True:
        next_tag = reader.peek()
        if next_tag is None:
            raise IPPParseError(f"truncated: {outer}: collection has no end", reader.offset)
        if next_tag < 0x10:
            raise IPPParseError(
                f"{outer}: collection not ended before delimiter tag 0x{next_tag:02x}",
                reader.offset,
            )
        start, tag, name, raw = _read_raw(reader)
        if name:
            raise IPPParseError(f"{outer}: named attribute {name!r} inside a collection", start)
        if tag == TAG_END_COLLECTION:
            finish()
            return Collection(tuple(members))
        if tag == TAG_MEMBER_NAME:
            finish()
            member = _text(raw, "member name", start)
            if not member:
                raise IPPParseError(f"{outer}: empty member name", start)
            values = []
            continue
        if member is None:
            raise IPPParseError(f"{outer}: value before a member name in a collection", start)
        if tag == TAG_BEGIN_COLLECTION:
            values.append(Value(tag, _read_collection(reader, f"{outer}.{member}", depth + 1)))
        else:
            values.append(Value(tag, _decode_value(tag, raw, f"{outer}.{member}", start)))


def parse(data: bytes | memoryview) -> tuple[Message, int]:
    """Decode the header and attribute groups; return the message (without data) and the
    offset at which the data (document) starts. Raise `IPPParseError` if malformed."""
    reader = _Reader(data)
    major, minor, code, request_id = _HEADER.unpack(reader.take(_HEADER.size, "header"))
    groups: list[Group] = []
    group_tag: int | None = None
    attributes: list[Attribute] = []
    current: tuple[str, list[Value]] | None = None

    def finish_attribute() -> None:
        nonlocal current
        if current is not None:
            attributes.append(Attribute(current[0], tuple(current[1])))
            current = None

    def finish_group() -> None:
        finish_attribute()
        if group_tag is not None:
            groups.append(Group(group_tag, tuple(attributes)))

    while True:
        if reader.peek() is None:
            raise IPPParseError("truncated: no end-of-attributes tag", reader.offset)
        tag = reader.peek()
        assert tag is not None
        if tag == TAG_END:
            reader.offset += 1
            finish_group()
            break
        if tag in GROUP_TAGS:
            reader.offset += 1
            finish_group()
            group_tag, attributes = tag, []
            continue
        if tag == 0x00:
            raise IPPParseError("reserved tag 0x00", reader.offset)
        start, tag, name, raw = _read_raw(reader)
        if group_tag is None:
            raise IPPParseError("attribute before the first group tag", start)
        if tag in (TAG_END_COLLECTION, TAG_MEMBER_NAME):
            raise IPPParseError(f"tag 0x{tag:02x} outside a collection", start)
        if name:
            finish_attribute()
            current = (name, [])
        elif current is None:
            raise IPPParseError("additional value without an attribute", start)
        label = current[0]
        if tag == TAG_BEGIN_COLLECTION:
            current[1].append(Value(tag, _read_collection(reader, label, 1)))
        else:
            current[1].append(Value(tag, _decode_value(tag, raw, label, start)))
    message = Message(
        version=(major, minor), code=code, request_id=request_id, groups=tuple(groups)
    )
    return message, reader.offset


def decode(data: bytes) -> Message:
    """Decode a whole message, the bytes after the attributes becoming ``data``."""
    message, offset = parse(data)
    return attrs.evolve(message, data=bytes(data[offset:]))


# -- encoding ---------------------------------------------------------------------------


def _short(length: int, what: str) -> bytes:
    if length > MAX_LENGTH:
        raise IPPEncodeError(f"{what} is {length} bytes, more than IPP's {MAX_LENGTH}")
    return _SHORT.pack(length)


def _encoded(tag: int, name: str, raw: bytes) -> bytes:
    name_bytes = name.encode("utf-8")
    return (
        bytes([tag])
        + _short(len(name_bytes), f"name {name!r}")
        + name_bytes
        + _short(len(raw), f"the value of {name or 'a member'}")
        + raw
    )


def _int32(value: int, what: str) -> bytes:
    try:
        return _INT.pack(value)
    except struct.error:
        raise IPPEncodeError(f"{what}: {value} does not fit a signed 32-bit integer") from None


def _value_bytes(tag: int, value: Python, what: str) -> bytes:
    """The value bytes of a non-collection value."""
    if tag in OUT_OF_BAND_TAGS:
        return b""
    if tag in (TAG_INTEGER, TAG_ENUM) and isinstance(value, int) and not isinstance(value, bool):
        return _int32(value, what)
    if tag == TAG_BOOLEAN and isinstance(value, bool):
        return b"\x01" if value else b"\x00"
    if tag in STRING_TAGS and isinstance(value, str):
        return value.encode("utf-8")
    if tag == TAG_DATETIME and isinstance(value, datetime.datetime):
        offset = value.utcoffset()
        if offset is None:
            raise IPPEncodeError(f"{what}: a dateTime needs a time zone")
        minutes = int(offset.total_seconds()) // 60
        sign = b"+" if minutes >= 0 else b"-"
        tz_h, tz_m = divmod(abs(minutes), 60)
        if not 0 <= value.year <= 0xFFFF or tz_h > 14:
            raise IPPEncodeError(f"{what}: {value} cannot be an IPP dateTime")
        return _DATETIME.pack(
            value.year,
            value.month,
            value.day,
            value.hour,
            value.minute,
            value.second,
            value.microsecond // 100_000,
            sign,
            tz_h,
            tz_m,
        )
    if tag == TAG_RESOLUTION and isinstance(value, Resolution):
        try:
            return _RESOLUTION.pack(value.cross_feed, value.feed, value.units)
        except struct.error:
            raise IPPEncodeError(f"{what}: resolution {value} out of range") from None
    if tag == TAG_RANGE and isinstance(value, Range):
        return _int32(value.lower, what) + _int32(value.upper, what)
    if tag in (TAG_TEXT_LANG, TAG_NAME_LANG) and isinstance(value, LangString):
        language = value.language.encode("utf-8")
        text = value.text.encode("utf-8")
        return (
            _short(len(language), f"{what}: language")
            + language
            + _short(len(text), f"{what}: text")
            + text
        )
    if tag not in INTERPRETED_TAGS and isinstance(value, bytes):
        # octetString and any tag this module does not interpret.
        return value
    raise IPPEncodeError(f"{what}: {type(value).__name__} value for tag 0x{tag:02x}")


def _encode_values(
    name: str, values: Sequence[Value], depth: int, *, in_collection: bool = False
) -> Iterator[bytes]:
    """The encoding of one attribute (or collection member) with all its values.

    A member's name went before in a memberAttrName, so all its values are nameless.
    """
    if not values:
        raise IPPEncodeError(f"attribute {name!r} has no value")
    for index, value in enumerate(values):
        label = name if index == 0 and not in_collection else ""
        if value.tag == TAG_BEGIN_COLLECTION:
            if not isinstance(value.value, Collection):
                raise IPPEncodeError(f"{name}: begCollection needs a Collection value")
            if depth >= MAX_COLLECTION_DEPTH:
                raise IPPEncodeError(f"{name}: collections nested too deep")
            yield _encoded(TAG_BEGIN_COLLECTION, label, b"")
            for member in value.value.members:
                if not member.name:
                    raise IPPEncodeError(f"{name}: a collection member has no name")
                yield _encoded(TAG_MEMBER_NAME, "", member.name.encode("utf-8"))
                yield from _encode_values(
                    member.name, member.values, depth + 1, in_collection=True
                )
            yield _encoded(TAG_END_COLLECTION, "", b"")
        elif value.tag < 0x10 or value.tag in (TAG_END_COLLECTION, TAG_MEMBER_NAME):
            raise IPPEncodeError(f"{name}: 0x{value.tag:02x} is not a value tag")
        else:
            yield _encoded(value.tag, label, _value_bytes(value.tag, value.value, name))


def encode(message: Message) -> bytes:
    """The bytes of ``message``, its data included. Raise `IPPEncodeError` if impossible."""
    major, minor = message.version
    if not (0 <= major <= 255 and 0 <= minor <= 255 and 0 <= message.code <= 0xFFFF):
        raise IPPEncodeError(f"bad version {message.version} or code {message.code}")
    try:
        parts = [_HEADER.pack(major, minor, message.code, message.request_id)]
    except struct.error:
        raise IPPEncodeError(f"request id {message.request_id} is not a 32-bit integer") from None
    for group in message.groups:
        if group.tag not in GROUP_TAGS:
            raise IPPEncodeError(f"0x{group.tag:02x} is not a group tag")
        parts.append(bytes([group.tag]))
        for attr in group.attributes:
            if not attr.name:
                raise IPPEncodeError("an attribute has no name")
            parts.extend(_encode_values(attr.name, attr.values, 0))
    parts.append(bytes([TAG_END]))
    parts.append(message.data)
    return b"".join(parts)


# -- building messages -----------------------------------------------------------------


def operation_attributes(*more: Attribute, charset: str = "utf-8", language: str = "en") -> Group:
    """An operation group starting with attributes-charset and -natural-language."""
    return Group(
        TAG_OPERATION,
        (
            attribute("attributes-charset", TAG_CHARSET, charset),
            attribute("attributes-natural-language", TAG_LANGUAGE, language),
            *more,
        ),
    )


def response(
    request: Message,
    status: int,
    message: str | None = None,
    groups: Iterable[Group] = (),
    extra_operation: Iterable[Attribute] = (),
) -> Message:
    """A response to ``request`` with ``status``, a ``status-message`` and more groups."""
    operation = [*extra_operation]
    if message:
        operation.insert(0, attribute("status-message", TAG_TEXT, message[:255]))
    version = request.version if request.version[0] in (1, 2) else (2, 0)
    return Message(
        version=version,
        code=status,
        request_id=request.request_id,
        groups=(operation_attributes(*operation), *groups),
    )


def status_name(status: int) -> str:
    """The keyword of a status code (hex for unknown ones)."""
    return STATUS_NAMES.get(status, f"0x{status:04x}")


def describe(message: Message) -> dict[str, Any]:
    """A JSON-friendly summary (for logs and tests)."""
    return {
        "version": f"{message.version[0]}.{message.version[1]}",
        "code": message.code,
        "request_id": message.request_id,
        "groups": [
            {
                "tag": g.tag,
                "attributes": {a.name: [repr(v) for v in a.python] for a in g.attributes},
            }
            for g in message.groups
        ],
        "data": len(message.data),
    }
