"""IPP encoding (sitesrv.provider.ipp): round trips, known bytes and malformed input."""

from __future__ import annotations

import contextlib
import datetime
import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from sitesrv.provider import ipp
from sitesrv.provider.ipp import (
    Attribute,
    Collection,
    Group,
    IPPEncodeError,
    IPPParseError,
    LangString,
    Message,
    Range,
    Resolution,
    Value,
    attribute,
)

# -- strategies -------------------------------------------------------------------------

names = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=30
)
texts = st.text(max_size=60)
int32 = st.integers(min_value=-(2**31), max_value=2**31 - 1)
int8 = st.integers(min_value=-128, max_value=127)


@st.composite
def datetimes(draw: st.DrawFn) -> datetime.datetime:
    """Datetimes an IPP dateTime can carry: deciseconds and whole-minute UTC offsets."""
    base = draw(
        st.datetimes(
            min_value=datetime.datetime(1, 1, 1), max_value=datetime.datetime(9999, 12, 31)
        )
    )
    minutes = draw(st.integers(min_value=-14 * 60, max_value=14 * 60))
    tz = datetime.timezone(datetime.timedelta(minutes=minutes))
    return base.replace(microsecond=(base.microsecond // 100_000) * 100_000, tzinfo=tz)


def simple_values() -> st.SearchStrategy[Value]:
    """Values of every non-collection tag."""
    return st.one_of(
        st.builds(Value, st.just(ipp.TAG_INTEGER), int32),
        st.builds(Value, st.just(ipp.TAG_ENUM), int32),
        st.builds(Value, st.just(ipp.TAG_BOOLEAN), st.booleans()),
        st.builds(Value, st.sampled_from(sorted(ipp.STRING_TAGS)), texts),
        st.builds(
            Value,
            st.sampled_from([ipp.TAG_TEXT_LANG, ipp.TAG_NAME_LANG]),
            st.builds(LangString, st.text(max_size=10), texts),
        ),
        st.builds(Value, st.just(ipp.TAG_OCTET_STRING), st.binary(max_size=40)),
        st.builds(Value, st.just(ipp.TAG_DATETIME), datetimes()),
        st.builds(Value, st.just(ipp.TAG_RESOLUTION), st.builds(Resolution, int32, int32, int8)),
        st.builds(Value, st.just(ipp.TAG_RANGE), st.builds(Range, int32, int32)),
        st.builds(
            Value,
            st.sampled_from([ipp.TAG_UNSUPPORTED, ipp.TAG_UNKNOWN, ipp.TAG_NO_VALUE]),
            st.none(),
        ),
        # A tag this module does not interpret keeps its bytes.
        st.builds(Value, st.just(0x38), st.binary(max_size=20)),
    )


def values(depth: int = 2) -> st.SearchStrategy[Value]:
    """Simple values and (nested) collections."""
    if depth == 0:
        return simple_values()
    members = st.lists(
        st.builds(
            Attribute, names, st.lists(values(depth - 1), min_size=1, max_size=3).map(tuple)
        ),
        max_size=4,
    ).map(tuple)
    return st.one_of(
        simple_values(),
        st.builds(Value, st.just(ipp.TAG_BEGIN_COLLECTION), st.builds(Collection, members)),
    )


attributes = st.builds(Attribute, names, st.lists(values(), min_size=1, max_size=4).map(tuple))
groups = st.builds(
    Group,
    st.sampled_from(sorted(ipp.GROUP_TAGS)),
    st.lists(attributes, max_size=5).map(tuple),
)
messages = st.builds(
    Message,
    version=st.tuples(st.integers(0, 255), st.integers(0, 255)),
    code=st.integers(0, 0xFFFF),
    request_id=int32,
    groups=st.lists(groups, max_size=4).map(tuple),
    data=st.binary(max_size=100),
)


class RoundTripTests(SynchronousTestCase):
    """Whatever can be encoded decodes to the same message."""

    @settings(max_examples=300, deadline=None)
    @given(messages)
    def test_roundTrip(self, message: Message) -> None:
        """decode(encode(m)) == m, data included."""
        self.assertEqual(ipp.decode(ipp.encode(message)), message)

    @settings(max_examples=200, deadline=None)
    @given(messages)
    def test_parseFindsTheData(self, message: Message) -> None:
        """parse() stops right after the end-of-attributes tag."""
        encoded = ipp.encode(message)
        parsed, offset = ipp.parse(encoded)
        self.assertEqual(encoded[offset:], message.data)
        self.assertEqual(parsed.groups, message.groups)

    @settings(max_examples=200, deadline=None)
    @given(messages, st.data())
    def test_truncatedAttributesAreParseErrors(
        self, message: Message, data: st.DataObject
    ) -> None:
        """Cutting the message anywhere before the end of its attributes is an IPPParseError."""
        encoded = ipp.encode(attrs_only(message))
        cut = data.draw(st.integers(0, len(encoded) - 1))
        with self.assertRaises(IPPParseError):
            ipp.parse(encoded[:cut])

    @settings(max_examples=500, deadline=None)
    @given(st.binary(max_size=300))
    def test_arbitraryBytesNeverRaiseOtherwise(self, data: bytes) -> None:
        """Random bytes either decode or raise IPPParseError: nothing else escapes."""
        with contextlib.suppress(IPPParseError):
            ipp.decode(data)

    @settings(max_examples=300, deadline=None)
    @given(messages, st.data())
    def test_corruptedBytesNeverRaiseOtherwise(
        self, message: Message, data: st.DataObject
    ) -> None:
        """A valid message with one byte changed decodes or raises IPPParseError."""
        encoded = bytearray(ipp.encode(message))
        index = data.draw(st.integers(0, len(encoded) - 1))
        encoded[index] = data.draw(st.integers(0, 255))
        with contextlib.suppress(IPPParseError):
            ipp.decode(bytes(encoded))


def attrs_only(message: Message) -> Message:
    """The message without its data."""
    return Message(message.version, message.code, message.request_id, message.groups)


class KnownBytesTests(SynchronousTestCase):
    """The encoding matches RFC 8010's examples byte for byte."""

    def test_getPrinterAttributesRequest(self) -> None:
        """A minimal request, as in RFC 8010 section 4."""
        message = Message(
            (2, 0),
            ipp.OP_GET_PRINTER_ATTRIBUTES,
            1,
            (
                ipp.operation_attributes(
                    attribute("printer-uri", ipp.TAG_URI, "ipp://h/ipp/print/q")
                ),
            ),
        )
        expected = (
            b"\x02\x00\x00\x0b\x00\x00\x00\x01"
            b"\x01"
            b"\x47\x00\x12attributes-charset\x00\x05utf-8"
            b"\x48\x00\x1battributes-natural-language\x00\x02en"
            b"\x45\x00\x0bprinter-uri\x00\x13ipp://h/ipp/print/q"
            b"\x03"
        )
        self.assertEqual(ipp.encode(message), expected)
        self.assertEqual(ipp.decode(expected), message)

    def test_oneSetOf(self) -> None:
        """Additional values have an empty name (RFC 8010 section 3.1.5)."""
        group = Group(ipp.TAG_PRINTER, (attribute("sides-supported", ipp.TAG_KEYWORD, "a", "bb"),))
        encoded = ipp.encode(Message((1, 1), 0, 7, (group,)))
        self.assertIn(b"\x44\x00\x0fsides-supported\x00\x01a\x44\x00\x00\x00\x02bb", encoded)

    def test_collection(self) -> None:
        """begCollection / memberAttrName / value / endCollection (RFC 8010 section 3.1.6)."""
        size = Collection(
            (
                attribute("x-dimension", ipp.TAG_INTEGER, 21000),
                attribute("y-dimension", ipp.TAG_INTEGER, 29700),
            )
        )
        col = Collection((Attribute("media-size", (Value(ipp.TAG_BEGIN_COLLECTION, size),)),))
        group = Group(ipp.TAG_JOB, (attribute("media-col", ipp.TAG_BEGIN_COLLECTION, col),))
        encoded = ipp.encode(Message((2, 0), 2, 1, (group,)))
        self.assertIn(
            b"\x34\x00\x09media-col\x00\x00"
            b"\x4a\x00\x00\x00\x0amedia-size"
            b"\x34\x00\x00\x00\x00"
            b"\x4a\x00\x00\x00\x0bx-dimension\x21\x00\x00\x00\x04\x00\x00\x52\x08"
            b"\x4a\x00\x00\x00\x0by-dimension\x21\x00\x00\x00\x04\x00\x00\x74\x04"
            b"\x37\x00\x00\x00\x00"
            b"\x37\x00\x00\x00\x00",
            encoded,
        )
        decoded = ipp.decode(encoded)
        media_col = decoded.get(ipp.TAG_JOB, "media-col")
        assert media_col is not None and isinstance(media_col.value, Collection)
        inner = media_col.value.get("media-size")
        assert inner is not None and isinstance(inner.value, Collection)
        x = inner.value.get("x-dimension")
        assert x is not None
        self.assertEqual(x.value, 21000)

    def test_dateTime(self) -> None:
        """dateTime is RFC 2579 DateAndTime: 11 bytes with the UTC offset."""
        when = datetime.datetime(
            2024, 5, 6, 7, 8, 9, 300_000, tzinfo=datetime.timezone(datetime.timedelta(hours=-5))
        )
        raw = ipp._value_bytes(ipp.TAG_DATETIME, when, "x")
        self.assertEqual(raw, struct.pack(">HBBBBBBcBB", 2024, 5, 6, 7, 8, 9, 3, b"-", 5, 0))

    def test_textWithLanguage(self) -> None:
        """Language and text, each with a two-byte length."""
        raw = ipp._value_bytes(ipp.TAG_TEXT_LANG, LangString("fr", "été"), "x")
        self.assertEqual(raw, b"\x00\x02fr\x00\x05" + "été".encode())


def request_bytes(
    *attrs_bytes: bytes, header: bytes = b"\x02\x00\x00\x02\x00\x00\x00\x01"
) -> bytes:
    """A request header, an operation group with the given raw attributes, the end tag."""
    return header + b"\x01" + b"".join(attrs_bytes) + b"\x03"


class MalformedTests(SynchronousTestCase):
    """Malformed input raises IPPParseError with a clear message."""

    def assertProblem(self, data: bytes, text: str) -> None:
        """Decoding fails with a message containing ``text``."""
        with self.assertRaises(IPPParseError) as caught:
            ipp.decode(data)
        self.assertIn(text, str(caught.exception))

    def test_empty(self) -> None:
        """No bytes at all."""
        self.assertProblem(b"", "truncated")

    def test_noEndTag(self) -> None:
        """The attributes never end."""
        self.assertProblem(b"\x02\x00\x00\x02\x00\x00\x00\x01\x01", "no end-of-attributes")

    def test_valueLengthPastTheEnd(self) -> None:
        """A value length larger than what is left."""
        self.assertProblem(
            b"\x02\x00\x00\x02\x00\x00\x00\x01\x01\x47\x00\x01a\x7f\xff", "truncated"
        )

    def test_negativeLength(self) -> None:
        """Lengths are SIGNED-SHORT; a negative one is refused."""
        self.assertProblem(request_bytes(b"\x47\xff\xff"), "negative name length")

    def test_wrongIntegerSize(self) -> None:
        """An integer is four bytes."""
        self.assertProblem(request_bytes(b"\x21\x00\x01a\x00\x02\x00\x01"), "has 4 bytes, not 2")

    def test_badBoolean(self) -> None:
        """Booleans are 0 or 1."""
        self.assertProblem(request_bytes(b"\x22\x00\x01a\x00\x01\x02"), "neither 0 nor 1")

    def test_badUTF8(self) -> None:
        """Strings are UTF-8."""
        self.assertProblem(request_bytes(b"\x42\x00\x01a\x00\x01\xff"), "not UTF-8")

    def test_attributeBeforeGroup(self) -> None:
        """Attributes belong to a group."""
        self.assertProblem(
            b"\x02\x00\x00\x02\x00\x00\x00\x01\x47\x00\x01a\x00\x00\x03", "before the first group"
        )

    def test_additionalValueFirst(self) -> None:
        """A nameless value needs an attribute before it."""
        self.assertProblem(request_bytes(b"\x47\x00\x00\x00\x01x"), "without an attribute")

    def test_unterminatedCollection(self) -> None:
        """A collection must end."""
        self.assertProblem(
            request_bytes(b"\x34\x00\x01c\x00\x00\x4a\x00\x00\x00\x01m\x21\x00\x00\x00\x04abcd"),
            "collection",
        )

    def test_memberNameOutsideCollection(self) -> None:
        """memberAttrName only appears inside a collection."""
        self.assertProblem(request_bytes(b"\x4a\x00\x00\x00\x01m"), "outside a collection")

    def test_collectionNestingBounded(self) -> None:
        """Deeply nested collections are refused, not recursed into."""
        opening = b"\x34\x00\x01c\x00\x00" + b"\x4a\x00\x00\x00\x01m\x34\x00\x00\x00\x00" * 100
        self.assertProblem(request_bytes(opening), "nested deeper")

    def test_badDateTime(self) -> None:
        """A dateTime with month 13."""
        raw = struct.pack(">HBBBBBBcBB", 2024, 13, 1, 0, 0, 0, 0, b"+", 0, 0)
        self.assertProblem(request_bytes(b"\x31\x00\x01d\x00\x0b" + raw), "malformed dateTime")

    def test_reservedTag(self) -> None:
        """Tag 0x00 is reserved."""
        self.assertProblem(request_bytes(b"\x00"), "reserved tag")

    def test_encodeRefusesTooLong(self) -> None:
        """A value longer than a SIGNED-SHORT cannot be encoded."""
        message = Message(
            (2, 0), 0, 1, (Group(ipp.TAG_JOB, (attribute("x", ipp.TAG_TEXT, "a" * 40000),)),)
        )
        with self.assertRaises(IPPEncodeError):
            ipp.encode(message)

    def test_encodeRefusesWrongType(self) -> None:
        """A str where an integer belongs."""
        message = Message(
            (2, 0), 0, 1, (Group(ipp.TAG_JOB, (attribute("x", ipp.TAG_INTEGER, "1"),)),)
        )
        with self.assertRaises(IPPEncodeError):
            ipp.encode(message)


class ResponseTests(SynchronousTestCase):
    """Building responses."""

    def test_responseEchoesRequest(self) -> None:
        """Same version and request id, charset and language first, then the status message."""
        request = Message((1, 1), ipp.OP_PRINT_JOB, 42)
        answer = ipp.response(request, ipp.STATUS_BAD_REQUEST, "nope")
        self.assertEqual((answer.version, answer.request_id), ((1, 1), 42))
        op = answer.group(ipp.TAG_OPERATION)
        assert op is not None
        self.assertEqual(
            [a.name for a in op.attributes],
            ["attributes-charset", "attributes-natural-language", "status-message"],
        )
        self.assertEqual(ipp.status_name(answer.code), "client-error-bad-request")
