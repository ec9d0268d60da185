"""Tests for sitesrv.costing: the price of a print job."""

from __future__ import annotations

from hypothesis import assume, given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from sitesrv.costing import Prices, job_cost

price_values = st.integers(min_value=0, max_value=10_000)
discounts = st.integers(min_value=0, max_value=100)
prices = st.builds(Prices, mono=price_values, colour=price_values, duplex_discount=discounts)
page_counts = st.integers(min_value=0, max_value=10_000)
copy_counts = st.integers(min_value=1, max_value=1_000)


class WorkedExampleTests(SynchronousTestCase):
    """Costs worked out by hand."""

    def test_mono(self) -> None:
        """10 pages mono at 0.10 cost 1.00."""
        self.assertEqual(job_cost(Prices(mono=10, colour=50), pages=10), 100)

    def test_colour_copies(self) -> None:
        """2 copies of 5 colour pages at 0.50 cost 5.00."""
        self.assertEqual(job_cost(Prices(mono=10, colour=50), 5, copies=2, colour=True), 500)

    def test_duplex_rounds_half_up(self) -> None:
        """3 duplex pages at 0.15 with 10% off: 0.405 rounds up to 0.41."""
        self.assertEqual(
            job_cost(Prices(mono=15, colour=50, duplex_discount=10), 3, duplex=True), 41
        )

    def test_duplex_rounds_down(self) -> None:
        """7 duplex pages at 0.03 with 15% off: 0.1785 rounds to 0.18; 0.21 simplex."""
        p = Prices(mono=3, colour=9, duplex_discount=15)
        self.assertEqual(job_cost(p, 7, duplex=True), 18)
        self.assertEqual(job_cost(p, 7), 21)
        # 6 pages: 18 * 0.85 = 15.3, rounds down to 15.
        self.assertEqual(job_cost(p, 6, duplex=True), 15)

    def test_duplex_discount_once_per_job(self) -> None:
        """The discount is rounded on the job's total, not per page or per copy."""
        # Per page, 1 * 0.5 would round to 1 each time (3 in all); on the total, 1.5 -> 2.
        p = Prices(mono=1, colour=1, duplex_discount=50)
        self.assertEqual(job_cost(p, 3, duplex=True), 2)
        self.assertEqual(job_cost(p, 1, copies=3, duplex=True), 2)

    def test_full_discount(self) -> None:
        """A 100% duplex discount makes duplex jobs free."""
        self.assertEqual(job_cost(Prices(10, 20, duplex_discount=100), 9, duplex=True), 0)

    def test_no_discount_on_simplex(self) -> None:
        """The duplex discount does not touch simplex jobs."""
        self.assertEqual(job_cost(Prices(10, 20, duplex_discount=50), 9), 90)


class InvalidInputTests(SynchronousTestCase):
    """Nonsense is refused with a message, never priced."""

    def test_negative_pages(self) -> None:
        """A negative page count is refused."""
        with self.assertRaises(ValueError) as e:
            job_cost(Prices(10, 20), -1)
        self.assertIn("negative number of pages", str(e.exception))

    def test_copies(self) -> None:
        """Fewer than one copy is refused."""
        for copies in [0, -2]:
            with self.assertRaises(ValueError) as e:
                job_cost(Prices(10, 20), 1, copies=copies)
            self.assertIn("at least one copy", str(e.exception))

    def test_negative_prices(self) -> None:
        """Negative prices would credit the user, so they are refused."""
        with self.assertRaises(ValueError) as e:
            Prices(mono=-1, colour=0)
        self.assertIn("mono price must not be negative", str(e.exception))
        with self.assertRaises(ValueError) as e:
            Prices(mono=0, colour=-1)
        self.assertIn("colour price must not be negative", str(e.exception))

    def test_discount_range(self) -> None:
        """A duplex discount outside 0..100 percent is refused."""
        for discount in [-1, 101]:
            with self.assertRaises(ValueError) as e:
                Prices(mono=1, colour=1, duplex_discount=discount)
            self.assertIn("between 0 and 100", str(e.exception))

    def test_job_cost_checks_prices(self) -> None:
        """job_cost refuses bad prices even if they got past the constructor."""
        p = Prices(mono=1, colour=1)
        object.__setattr__(p, "mono", -5)
        with self.assertRaises(ValueError):
            job_cost(p, 1)
        p = Prices(mono=1, colour=1)
        object.__setattr__(p, "duplex_discount", 150)
        with self.assertRaises(ValueError):
            job_cost(p, 1, duplex=True)


class PropertyTests(SynchronousTestCase):
    """Invariants that hold for every job."""

    @given(prices, page_counts, copy_counts, st.booleans(), st.booleans())
    def test_never_negative(
        self, p: Prices, pages: int, copies: int, colour: bool, duplex: bool
    ) -> None:
        """No job pays the user."""
        self.assertGreaterEqual(job_cost(p, pages, copies, colour, duplex), 0)

    @given(prices, copy_counts, st.booleans(), st.booleans())
    def test_zero_pages(self, p: Prices, copies: int, colour: bool, duplex: bool) -> None:
        """A job with no pages costs nothing."""
        self.assertEqual(job_cost(p, 0, copies, colour, duplex), 0)

    @given(prices, page_counts, page_counts, copy_counts, st.booleans(), st.booleans())
    def test_monotonic_in_pages(
        self, p: Prices, a: int, b: int, copies: int, colour: bool, duplex: bool
    ) -> None:
        """More pages never cost less."""
        fewer, more = sorted((a, b))
        self.assertLessEqual(
            job_cost(p, fewer, copies, colour, duplex), job_cost(p, more, copies, colour, duplex)
        )

    @given(prices, page_counts, copy_counts, copy_counts, st.booleans(), st.booleans())
    def test_monotonic_in_copies(
        self, p: Prices, pages: int, a: int, b: int, colour: bool, duplex: bool
    ) -> None:
        """More copies never cost less."""
        fewer, more = sorted((a, b))
        self.assertLessEqual(
            job_cost(p, pages, fewer, colour, duplex), job_cost(p, pages, more, colour, duplex)
        )

    @given(prices, page_counts, copy_counts, st.booleans())
    def test_duplex_not_dearer(self, p: Prices, pages: int, copies: int, colour: bool) -> None:
        """Duplex never costs more than simplex."""
        self.assertLessEqual(
            job_cost(p, pages, copies, colour, duplex=True),
            job_cost(p, pages, copies, colour, duplex=False),
        )

    @given(price_values, price_values, page_counts, copy_counts, st.booleans())
    def test_duplex_without_discount(
        self, mono: int, colour_price: int, pages: int, copies: int, colour: bool
    ) -> None:
        """With no discount, duplex costs exactly what simplex does."""
        p = Prices(mono=mono, colour=colour_price, duplex_discount=0)
        self.assertEqual(
            job_cost(p, pages, copies, colour, duplex=True),
            job_cost(p, pages, copies, colour, duplex=False),
        )

    @given(prices, page_counts, copy_counts, st.booleans())
    def test_colour_not_cheaper(self, p: Prices, pages: int, copies: int, duplex: bool) -> None:
        """When colour pages cost at least as much as mono, colour jobs do too."""
        assume(p.colour >= p.mono)
        self.assertGreaterEqual(
            job_cost(p, pages, copies, colour=True, duplex=duplex),
            job_cost(p, pages, copies, colour=False, duplex=duplex),
        )

    @given(prices, page_counts, copy_counts, st.booleans(), st.booleans())
    def test_linear_in_copies(
        self, p: Prices, pages: int, copies: int, colour: bool, duplex: bool
    ) -> None:
        """Without a discount in play, n copies cost n times one copy."""
        assume(not duplex or p.duplex_discount == 0)
        self.assertEqual(
            job_cost(p, pages, copies, colour, duplex),
            copies * job_cost(p, pages, 1, colour, duplex),
        )

    @given(prices, page_counts, copy_counts, st.booleans())
    def test_discount_bounds(self, p: Prices, pages: int, copies: int, colour: bool) -> None:
        """Duplex cost is the simplex cost less the discount, off by at most half a unit."""
        simplex = job_cost(p, pages, copies, colour)
        duplex = job_cost(p, pages, copies, colour, duplex=True)
        exact_times_100 = simplex * (100 - p.duplex_discount)
        self.assertLessEqual(abs(duplex * 100 - exact_times_100), 50)
