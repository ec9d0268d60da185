"""Normalising the raw strings that card readers send into the card numbers users have.

A reader's configuration names a regex (its first group, or the whole match if it has no
group, is the card number) and a chain of named conversion steps such as
``"hex2dec,strip-leading-zeros"``. Configuration errors raise `CardFormatError` when the
normaliser is built; a swipe that cannot be converted raises `CardNumberError`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType

import attrs

#: Longer raw input is refused: no card carries more, and it bounds the regex's work.
MAX_INPUT_LENGTH = 256

# Steps such as ascii-to-hex double the length; a chain of them must not grow a number
# without bound (or past Python's int-to-decimal digit limit).
_MAX_WORKING_LENGTH = 1024

#: The whole raw string except surrounding whitespace.
DEFAULT_REGEX = r"^\s*(\S.*?)\s*$"

#: One conversion: takes the number so far, returns the converted number.
Step = Callable[[str], str]

#: Builds a step from the arguments written after its name (``substring:-8`` -> ``("-8",)``).
StepFactory = Callable[[tuple[str, ...]], Step]


class CardFormatError(ValueError):
    """A card-number configuration is wrong: unknown step, bad argument, or bad regex."""


class CardNumberError(ValueError):
    """A raw card string cannot be turned into a card number with this configuration."""


# Explicit ASCII classes: int() and \d would also accept non-ASCII digits and underscores.
_HEX = re.compile(r"[0-9A-Fa-f]+")
_DECIMAL = re.compile(r"[0-9]+")
_INTEGER = re.compile(r"-?[0-9]+")


def _shown(value: str) -> str:
    return repr(value if len(value) <= 40 else value[:37] + "...")


def _hex2dec(value: str) -> str:
    if not _HEX.fullmatch(value):
        raise CardNumberError(f"hex2dec: {_shown(value)} is not a hexadecimal number")
    return str(int(value, 16))


def _dec2hex(value: str) -> str:
    if not _DECIMAL.fullmatch(value):
        raise CardNumberError(f"dec2hex: {_shown(value)} is not a decimal number")
    return format(int(value), "X")


def _ascii_to_hex(value: str) -> str:
    if not value.isascii():
        raise CardNumberError(f"ascii-to-hex: {_shown(value)} has non-ASCII characters")
    return value.encode("ascii").hex().upper()


def _reverse_bytes(value: str) -> str:
    if value and not _HEX.fullmatch(value):
        raise CardNumberError(f"reverse-bytes: {_shown(value)} is not a hexadecimal number")
    if len(value) % 2:
        # An odd-length hex number has an implied leading zero nibble.
        value = "0" + value
    return "".join(value[i : i + 2] for i in range(len(value) - 2, -1, -2))


def _strip_leading_zeros(value: str) -> str:
    stripped = value.lstrip("0")
    # A number that is all zeros is zero, not nothing.
    return stripped if stripped or not value else "0"


def _upper(value: str) -> str:
    return value.upper()


def _lower(value: str) -> str:
    return value.lower()


def _integer(name: str, argument: str, what: str, minimum: int | None = None) -> int:
    if not _INTEGER.fullmatch(argument):
        raise CardFormatError(f"{name}: {what} must be a whole number, not {argument!r}")
    number = int(argument)
    if minimum is not None and number < minimum:
        raise CardFormatError(f"{name}: {what} must be {minimum} or more, not {number}")
    if abs(number) > _MAX_WORKING_LENGTH:
        raise CardFormatError(f"{name}: {what} must be at most {_MAX_WORKING_LENGTH}")
    return number


def _arguments(name: str, arguments: tuple[str, ...], least: int, most: int) -> None:
    if not least <= len(arguments) <= most:
        if most == 0:
            raise CardFormatError(f"{name} takes no arguments, not {':'.join(arguments)!r}")
        usage = _USAGE[name]
        raise CardFormatError(f"{name}: wrong number of arguments, expected {usage!r}")


def _no_arguments(name: str, step: Step) -> StepFactory:
    def make(arguments: tuple[str, ...]) -> Step:
        _arguments(name, arguments, 0, 0)
        return step

    return make


def _make_substring(arguments: tuple[str, ...]) -> Step:
    _arguments("substring", arguments, 1, 2)
    start = _integer("substring", arguments[0], "START")
    if len(arguments) == 1:
        return lambda value: value[start:]
    length = _integer("substring", arguments[1], "LEN", minimum=0)
    # Slice twice: value[start:start + length] would be empty for start=-2, length=2.
    return lambda value: value[start:][:length]


def _make_pad(arguments: tuple[str, ...]) -> Step:
    _arguments("pad", arguments, 1, 1)
    width = _integer("pad", arguments[0], "N", minimum=0)
    return lambda value: value.rjust(width, "0")


_USAGE: Mapping[str, str] = {
    "ascii-to-hex": "ascii-to-hex",
    "dec2hex": "dec2hex",
    "hex2dec": "hex2dec",
    "lower": "lower",
    "pad": "pad:N",
    "reverse-bytes": "reverse-bytes",
    "strip-leading-zeros": "strip-leading-zeros",
    "substring": "substring:START[:LEN]",
    "upper": "upper",
}

#: The conversion steps by name; each builds its step from the step's arguments.
CONVERTERS: Mapping[str, StepFactory] = MappingProxyType(
    {
        "hex2dec": _no_arguments("hex2dec", _hex2dec),
        "dec2hex": _no_arguments("dec2hex", _dec2hex),
        "ascii-to-hex": _no_arguments("ascii-to-hex", _ascii_to_hex),
        "reverse-bytes": _no_arguments("reverse-bytes", _reverse_bytes),
        "strip-leading-zeros": _no_arguments("strip-leading-zeros", _strip_leading_zeros),
        "substring": _make_substring,
        "pad": _make_pad,
        "upper": _no_arguments("upper", _upper),
        "lower": _no_arguments("lower", _lower),
    }
)


def _build_step(text: str) -> Step:
    name, *arguments = text.strip().split(":")
    factory = CONVERTERS.get(name.strip())
    if factory is None:
        known = ", ".join(_USAGE[known] for known in sorted(CONVERTERS))
        raise CardFormatError(
            f"unknown card number conversion {name.strip()!r}; known conversions: {known}"
        )
    return factory(tuple(argument.strip() for argument in arguments))


@attrs.frozen
class CardNormaliser:
    """A regex that finds the card number in a reader's raw string, and the steps applied.

    Everything is checked when it is built, so a bad configuration fails at start-up.
    """

    regex: str = DEFAULT_REGEX
    steps: tuple[str, ...] = ()
    _pattern: re.Pattern[str] = attrs.field(init=False, repr=False, eq=False)
    _functions: tuple[Step, ...] = attrs.field(init=False, repr=False, eq=False)

    def __attrs_post_init__(self) -> None:
        try:
            pattern = re.compile(self.regex)
        except re.error as e:
            raise CardFormatError(f"the card number regex {self.regex!r} is invalid: {e}") from e
        # Frozen, but these are caches derived from the fields, set once here.
        object.__setattr__(self, "_pattern", pattern)
        object.__setattr__(self, "_functions", tuple(_build_step(step) for step in self.steps))

    @classmethod
    def parse(cls, regex: str | None, convert: str | Sequence[str] | None) -> CardNormaliser:
        """Build from configuration: ``convert`` is ``"hex2dec,pad:10"`` (or ``;``) or a list.

        A missing or empty regex means `DEFAULT_REGEX`; raises `CardFormatError`.
        """
        if convert is None:
            steps: list[str] = []
        elif isinstance(convert, str):
            steps = re.split(r"[,;]", convert)
        else:
            steps = list(convert)
        # Blank entries come from trailing separators and empty config fields; skip them.
        return cls(
            regex=regex or DEFAULT_REGEX,
            steps=tuple(step.strip() for step in steps if step.strip()),
        )

    def normalise(self, raw: str) -> str:
        """Return the card number in ``raw``; raises `CardNumberError` if there is none."""
        if len(raw) > MAX_INPUT_LENGTH:
            raise CardNumberError(
                f"card data is too long ({len(raw)} characters, the limit is {MAX_INPUT_LENGTH})"
            )
        match = self._pattern.search(raw)
        if match is None:
            raise CardNumberError(
                f"card data {_shown(raw)} does not match the card number regex {self.regex!r}"
            )
        number = match.group(1) if self._pattern.groups else match.group(0)
        if number is None:
            raise CardNumberError(
                f"card data {_shown(raw)} matched, but the regex's first group did not"
            )
        for step in self._functions:
            number = step(number)
            if len(number) > _MAX_WORKING_LENGTH:
                raise CardNumberError(f"card number from {_shown(raw)} grew too long")
        if not number:
            raise CardNumberError(f"card data {_shown(raw)} has no card number in it")
        return number
