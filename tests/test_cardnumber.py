"""Tests for sitesrv.cardnumber: turning card reader input into card numbers."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from sitesrv.cardnumber import (
    CONVERTERS,
    MAX_INPUT_LENGTH,
    CardFormatError,
    CardNormaliser,
    CardNumberError,
)

# A regex that passes the raw string through untouched, to test the steps alone.
EVERYTHING = r"^(.+)$"

hex_digits = "0123456789abcdefABCDEF"
even_hex = (
    st.text(alphabet=hex_digits, min_size=2, max_size=200)
    .map(lambda s: s[: len(s) // 2 * 2])
    .filter(bool)
)
digit_strings = st.text(alphabet="0123456789", min_size=1, max_size=100)
printable_ascii = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=100
)


def convert(steps: str, raw: str) -> str:
    """Run ``raw`` through the comma-separated steps with the pass-through regex."""
    return CardNormaliser.parse(EVERYTHING, steps).normalise(raw)


class ConverterExampleTests(SynchronousTestCase):
    """Each step on inputs worked out by hand."""

    def test_hex2dec(self) -> None:
        """Hex, either case, becomes decimal."""
        self.assertEqual(convert("hex2dec", "FF"), "255")
        self.assertEqual(convert("hex2dec", "00ff"), "255")

    def test_dec2hex(self) -> None:
        """Decimal becomes upper-case hex with no prefix."""
        self.assertEqual(convert("dec2hex", "255"), "FF")
        self.assertEqual(convert("dec2hex", "0"), "0")

    def test_ascii_to_hex(self) -> None:
        """Each character becomes its two upper-case hex digits."""
        self.assertEqual(convert("ascii-to-hex", "1:z"), "313A7A")

    def test_reverse_bytes(self) -> None:
        """Byte order is reversed; an odd length gets a leading zero first."""
        self.assertEqual(convert("reverse-bytes", "0A1B2C3D"), "3D2C1B0A")
        self.assertEqual(convert("reverse-bytes", "ABC"), "BC0A")

    def test_strip_leading_zeros(self) -> None:
        """Leading zeros go, but zero stays zero."""
        self.assertEqual(convert("strip-leading-zeros", "000123"), "123")
        self.assertEqual(convert("strip-leading-zeros", "000"), "0")
        self.assertEqual(convert("strip-leading-zeros", "1000"), "1000")

    def test_substring(self) -> None:
        """Python-style start, optional length."""
        self.assertEqual(convert("substring:-8", "1234567890"), "34567890")
        self.assertEqual(convert("substring:2", "1234567890"), "34567890")
        self.assertEqual(convert("substring:2:3", "1234567890"), "345")
        self.assertEqual(convert("substring:-2:2", "1234567890"), "90")
        self.assertEqual(convert("substring:-8", "123"), "123")

    def test_pad(self) -> None:
        """Zeros are added on the left up to the width, never truncating."""
        self.assertEqual(convert("pad:8", "123"), "00000123")
        self.assertEqual(convert("pad:2", "123"), "123")

    def test_case(self) -> None:
        """upper and lower change letter case."""
        self.assertEqual(convert("upper", "abCd"), "ABCD")
        self.assertEqual(convert("lower", "abCd"), "abcd")

    def test_chain_ascii_to_hex_hex2dec(self) -> None:
        """A reader sending the digits as text: "1234" -> 31323334 hex -> 825373492."""
        normaliser = CardNormaliser.parse(None, "ascii-to-hex,hex2dec")
        self.assertEqual(normaliser.normalise(" 1234\r\n"), "825373492")

    def test_chain_little_endian_reader(self) -> None:
        """A reader sending a UID in little-endian hex, the number printed on the card."""
        normaliser = CardNormaliser.parse(None, "reverse-bytes; hex2dec; pad:10")
        self.assertEqual(normaliser.normalise("0A1B2C3D"), "1026300682")
        self.assertEqual(normaliser.normalise("01000000"), "0000000001")

    def test_no_steps(self) -> None:
        """Without steps the default regex just trims whitespace."""
        normaliser = CardNormaliser.parse(None, None)
        self.assertEqual(normaliser.normalise("\t 0012 34 \r\n"), "0012 34")
        self.assertEqual(CardNormaliser.parse("", "").normalise(" 7 "), "7")


class RegexTests(SynchronousTestCase):
    """The regex that finds the number in the raw string."""

    def test_first_group(self) -> None:
        """The first group is the number, wherever the match is."""
        normaliser = CardNormaliser.parse(r";(\d+)=(\d+)\?", "strip-leading-zeros")
        self.assertEqual(normaliser.normalise("%B;0001234=9999?"), "1234")

    def test_whole_match(self) -> None:
        """A regex without groups gives its whole match."""
        self.assertEqual(
            CardNormaliser.parse(r"[0-9A-F]{8}", None).normalise("id=0A1B2C3D"), "0A1B2C3D"
        )

    def test_no_match(self) -> None:
        """Input the regex does not match is refused, naming the regex."""
        normaliser = CardNormaliser.parse(r"^(\d+)$", None)
        with self.assertRaises(CardNumberError) as e:
            normaliser.normalise("12a4")
        self.assertIn("'12a4'", str(e.exception))
        self.assertIn(repr(r"^(\d+)$"), str(e.exception))

    def test_blank(self) -> None:
        """A blank line has no card number."""
        for raw in ["", "   ", "\r\n"]:
            with self.assertRaises(CardNumberError):
                CardNormaliser.parse(None, None).normalise(raw)

    def test_unmatched_first_group(self) -> None:
        """A match whose first group took no part is refused."""
        with self.assertRaises(CardNumberError) as e:
            CardNormaliser.parse(r"(\d+)|x", None).normalise("x")
        self.assertIn("first group", str(e.exception))

    def test_empty_result(self) -> None:
        """A group that matched nothing, or steps that leave nothing, is refused."""
        with self.assertRaises(CardNumberError):
            CardNormaliser.parse(r"^(\d*)", None).normalise("abc")
        with self.assertRaises(CardNumberError):
            CardNormaliser.parse(None, "substring:5").normalise("123")

    def test_too_long(self) -> None:
        """Raw input over the limit is refused before the regex runs."""
        normaliser = CardNormaliser.parse(None, None)
        self.assertEqual(normaliser.normalise("1" * MAX_INPUT_LENGTH), "1" * MAX_INPUT_LENGTH)
        with self.assertRaises(CardNumberError) as e:
            normaliser.normalise("1" * (MAX_INPUT_LENGTH + 1))
        self.assertIn("too long", str(e.exception))

    def test_growth_limited(self) -> None:
        """A chain that keeps doubling the number is stopped with CardNumberError."""
        normaliser = CardNormaliser.parse(None, ["ascii-to-hex"] * 4)
        with self.assertRaises(CardNumberError):
            normaliser.normalise("1" * MAX_INPUT_LENGTH)

    def test_bad_regex(self) -> None:
        """A regex that does not compile is a configuration error."""
        with self.assertRaises(CardFormatError) as e:
            CardNormaliser.parse("(", None)
        self.assertIn("'('", str(e.exception))


class ConfigurationTests(SynchronousTestCase):
    """Step chains are checked when built."""

    def test_unknown_step(self) -> None:
        """An unknown name is refused with the list of known names."""
        with self.assertRaises(CardFormatError) as e:
            CardNormaliser.parse(None, "hex2dec,hex2oct")
        message = str(e.exception)
        self.assertIn("'hex2oct'", message)
        for name in CONVERTERS:
            self.assertIn(name, message)

    def test_unknown_step_direct(self) -> None:
        """Building the class directly checks the steps too."""
        with self.assertRaises(CardFormatError):
            CardNormaliser(steps=("nope",))

    def test_bad_arguments(self) -> None:
        """Missing, extra or malformed arguments are refused."""
        for steps in [
            "hex2dec:1",
            "upper:x",
            "substring",
            "substring:x",
            "substring:1:2:3",
            "substring:1:-2",
            "substring:1.5",
            "pad",
            "pad:-1",
            "pad:abc",
            "pad:99999999",
            "pad:1_0",
        ]:
            with self.assertRaises(CardFormatError, msg=steps):
                CardNormaliser.parse(None, steps)

    def test_separators(self) -> None:
        """Commas, semicolons, spaces around names and a list are all the same chain."""
        expected = CardNormaliser(steps=("hex2dec", "pad:10"))
        self.assertEqual(CardNormaliser.parse(None, "hex2dec,pad:10"), expected)
        self.assertEqual(CardNormaliser.parse(None, " hex2dec ; pad:10 ;"), expected)
        self.assertEqual(CardNormaliser.parse(None, ["hex2dec", "pad:10"]), expected)

    def test_converter_errors(self) -> None:
        """Input a step cannot convert is refused with CardNumberError."""
        for steps, raw in [
            ("hex2dec", "XYZ"),
            ("hex2dec", "1_0"),
            ("hex2dec", "0x10"),
            ("dec2hex", "12A"),
            ("dec2hex", "\N{ARABIC-INDIC DIGIT ONE}"),
            ("reverse-bytes", "GG"),
            ("ascii-to-hex", "caf\N{LATIN SMALL LETTER E WITH ACUTE}"),
        ]:
            with self.assertRaises(CardNumberError, msg=(steps, raw)) as e:
                convert(steps, raw)
            self.assertIn(steps, str(e.exception))


class PropertyTests(SynchronousTestCase):
    """Invariants of the steps for all inputs."""

    @given(st.integers(min_value=0, max_value=10**200))
    def test_dec2hex_hex2dec(self, number: int) -> None:
        """dec2hex gives upper-case hex, and hex2dec takes it back to the same decimal."""
        self.assertEqual(convert("dec2hex", str(number)), format(number, "X"))
        self.assertEqual(convert("dec2hex,hex2dec", str(number)), str(number))

    @given(even_hex)
    def test_reverse_bytes_twice(self, value: str) -> None:
        """Reversing bytes twice gives back the input; once reverses the bytes."""
        self.assertEqual(convert("reverse-bytes,reverse-bytes", value), value)
        once = convert("reverse-bytes", value)
        self.assertEqual(bytes.fromhex(once), bytes.fromhex(value)[::-1])

    @given(printable_ascii)
    def test_ascii_to_hex(self, value: str) -> None:
        """Output is twice as long as input and decodes back to it."""
        hexed = convert("ascii-to-hex", value)
        self.assertEqual(len(hexed), 2 * len(value))
        self.assertEqual(bytes.fromhex(hexed).decode("ascii"), value)
        self.assertEqual(hexed, hexed.upper())

    @given(digit_strings, st.integers(min_value=0, max_value=200))
    def test_pad(self, value: str, width: int) -> None:
        """pad:N reaches at least N, keeps the number, and strip-leading-zeros undoes it."""
        padded = convert(f"pad:{width}", value)
        self.assertGreaterEqual(len(padded), width)
        self.assertTrue(padded.endswith(value))
        self.assertEqual(
            convert(f"pad:{width},strip-leading-zeros", value),
            convert("strip-leading-zeros", value),
        )

    @given(digit_strings)
    def test_strip_leading_zeros(self, value: str) -> None:
        """The result is the canonical decimal form of the same number."""
        self.assertEqual(convert("strip-leading-zeros", value), str(int(value)))

    @given(printable_ascii)
    def test_substring_last_8(self, value: str) -> None:
        """substring:-8 keeps at most the last 8 characters."""
        result = convert("substring:-8", value)
        self.assertLessEqual(len(result), 8)
        self.assertEqual(result, value[-8:])

    @given(st.text(max_size=MAX_INPUT_LENGTH + 10))
    def test_any_input(self, raw: str) -> None:
        """Any raw string either gives a non-empty number or raises CardNumberError."""
        normaliser = CardNormaliser.parse(None, "ascii-to-hex,hex2dec,dec2hex,reverse-bytes")
        try:
            result = normaliser.normalise(raw)
        except CardNumberError:
            pass
        else:
            self.assertTrue(result)
