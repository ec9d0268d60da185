"""Tests for sitesrv.money: amounts as integer minor units."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from sitesrv.money import (
    MAX_MINOR,
    AmountError,
    format_amount,
    from_float,
    parse_amount,
    to_float,
)

minors = st.integers(min_value=-MAX_MINOR, max_value=MAX_MINOR)
decimal_counts = st.integers(min_value=0, max_value=4)


class ParseAmountTests(SynchronousTestCase):
    """What people type into amount fields."""

    def test_examples(self) -> None:
        """Plain decimal amounts, with optional sign and fewer places, are accepted."""
        self.assertEqual(parse_amount("1.50"), 150)
        self.assertEqual(parse_amount("-1.5"), -150)
        self.assertEqual(parse_amount("+3"), 300)
        self.assertEqual(parse_amount("0.05"), 5)
        self.assertEqual(parse_amount("12"), 1200)
        self.assertEqual(parse_amount(".5"), 50)
        self.assertEqual(parse_amount("-0"), 0)

    def test_whitespace(self) -> None:
        """Surrounding whitespace, as pasted from elsewhere, is ignored."""
        self.assertEqual(parse_amount("  1.50\n"), 150)

    def test_trailing_zeros(self) -> None:
        """Zeros beyond the allowed places carry no value, so they are accepted."""
        self.assertEqual(parse_amount("1.500"), 150)
        self.assertEqual(parse_amount("7.0", decimals=0), 7)

    def test_other_decimals(self) -> None:
        """The number of decimals is a setting."""
        self.assertEqual(parse_amount("150", decimals=0), 150)
        self.assertEqual(parse_amount("1.5", decimals=1), 15)
        self.assertEqual(parse_amount("1.2345", decimals=4), 12345)

    def test_too_many_places(self) -> None:
        """Places that would be lost are refused with a message saying so."""
        with self.assertRaises(AmountError) as e:
            parse_amount("1.505")
        self.assertEqual(str(e.exception), "'1.505' has more than 2 decimal places")
        with self.assertRaises(AmountError) as e:
            parse_amount("1.25", decimals=1)
        self.assertEqual(str(e.exception), "'1.25' has more than 1 decimal place")
        with self.assertRaises(AmountError) as e:
            parse_amount("1.5", decimals=0)
        self.assertEqual(str(e.exception), "'1.5' must be a whole amount")

    def test_not_amounts(self) -> None:
        """Anything but plain decimal notation is refused as not an amount."""
        for text in [
            "abc",
            "1,234.50",
            "NaN",
            "nan",
            "inf",
            "-Infinity",
            "1e3",
            "1E-2",
            "1_000",
            "1.2.3",
            "--1",
            "+",
            ".",
            "1 000",
            "\N{ARABIC-INDIC DIGIT ONE}",
            "0x10",
        ]:
            with self.assertRaises(AmountError, msg=text) as e:
                parse_amount(text)
            self.assertEqual(str(e.exception), f"{text!r} is not an amount")

    def test_empty(self) -> None:
        """An empty or blank field is refused."""
        for text in ["", "   "]:
            with self.assertRaises(AmountError) as e:
                parse_amount(text)
            self.assertEqual(str(e.exception), "an amount is required")

    def test_magnitude(self) -> None:
        """Amounts beyond MAX_MINOR minor units are refused; the limit itself is fine."""
        self.assertEqual(parse_amount("10000000000000.00"), MAX_MINOR)
        self.assertEqual(parse_amount("-10000000000000"), -MAX_MINOR)
        for text in ["10000000000000.01", "-10000000000000.01", "9" * 5000]:
            with self.assertRaises(AmountError) as e:
                parse_amount(text)
            self.assertIn("too large", str(e.exception))
            self.assertIn("10000000000000.00", str(e.exception))

    def test_long_input_shortened(self) -> None:
        """A huge paste is cut short in the message."""
        with self.assertRaises(AmountError) as e:
            parse_amount("x" * 10_000)
        self.assertLess(len(str(e.exception)), 100)

    def test_bad_decimals(self) -> None:
        """Decimals outside 0..4 are a programming error, not a user error."""
        for decimals in [-1, 5]:
            with self.assertRaises(ValueError) as e:
                parse_amount("1", decimals=decimals)
            self.assertNotIsInstance(e.exception, AmountError)

    @given(minors, decimal_counts)
    def test_round_trip(self, minor: int, decimals: int) -> None:
        """Every amount in range survives formatting and parsing back."""
        self.assertEqual(parse_amount(format_amount(minor, decimals), decimals), minor)

    @given(st.text(max_size=30), decimal_counts)
    def test_any_text(self, text: str, decimals: int) -> None:
        """Any text either parses to an amount in range or raises AmountError."""
        try:
            minor = parse_amount(text, decimals)
        except AmountError as e:
            self.assertNotIn("\n", str(e))
        else:
            self.assertLessEqual(abs(minor), MAX_MINOR)


class FormatAmountTests(SynchronousTestCase):
    """How amounts are shown."""

    def test_examples(self) -> None:
        """Always the configured number of places, with a leading zero and minus sign."""
        self.assertEqual(format_amount(150), "1.50")
        self.assertEqual(format_amount(-5), "-0.05")
        self.assertEqual(format_amount(0), "0.00")
        self.assertEqual(format_amount(-150), "-1.50")
        self.assertEqual(format_amount(123456), "1234.56")
        self.assertEqual(format_amount(150, decimals=0), "150")
        self.assertEqual(format_amount(-150, decimals=0), "-150")
        self.assertEqual(format_amount(5, decimals=1), "0.5")
        self.assertEqual(format_amount(5, decimals=4), "0.0005")

    @given(minors, decimal_counts)
    def test_places(self, minor: int, decimals: int) -> None:
        """The text has exactly `decimals` places and no other characters than -0-9."""
        text = format_amount(minor, decimals)
        if decimals:
            self.assertEqual(len(text.partition(".")[2]), decimals)
        else:
            self.assertNotIn(".", text)
        self.assertEqual(text.startswith("-"), minor < 0)


class FloatTests(SynchronousTestCase):
    """Conversion at the edge, for APIs such as PaperCut's XML-RPC that use floats."""

    def test_from_float_examples(self) -> None:
        """Floats are read as their shortest text, then rounded half away from zero."""
        self.assertEqual(from_float(1.5), 150)
        self.assertEqual(from_float(0.1), 10)
        # Stored in binary as 1.00499999..., but written and meant as 1.005.
        self.assertEqual(from_float(1.005), 101)
        self.assertEqual(from_float(0.285), 29)
        self.assertEqual(from_float(0.125), 13)
        self.assertEqual(from_float(-0.125), -13)
        self.assertEqual(from_float(0.124), 12)
        self.assertEqual(from_float(2.5, decimals=0), 3)
        self.assertEqual(from_float(-2.5, decimals=0), -3)
        self.assertEqual(from_float(-0.0), 0)
        self.assertEqual(from_float(1e-10), 0)

    def test_from_float_refuses(self) -> None:
        """Not-a-number, infinities and absurd magnitudes are refused."""
        for value in [math.nan, math.inf, -math.inf]:
            with self.assertRaises(AmountError):
                from_float(value)
        for value in [1e300, -1e300, 1e13 + 0.01, 1e16]:
            with self.assertRaises(AmountError) as e:
                from_float(value)
            self.assertIn("too large", str(e.exception))
        self.assertEqual(from_float(1e13), MAX_MINOR)

    def test_to_float_examples(self) -> None:
        """Minor units become the nearest float."""
        self.assertEqual(to_float(150), 1.5)
        self.assertEqual(to_float(-5), -0.05)
        self.assertEqual(to_float(10), 0.1)
        self.assertEqual(to_float(150, decimals=0), 150.0)

    @given(st.integers(min_value=-(10**12), max_value=10**12), decimal_counts)
    def test_float_round_trip(self, minor: int, decimals: int) -> None:
        """Every amount within +-10**12 minor units survives a trip through a float."""
        self.assertEqual(from_float(to_float(minor, decimals), decimals), minor)
