"""A bit-exact port of .NET Framework's legacy seeded ``System.Random``: the one generator of the
original demo, shared by all of its trials."""

from __future__ import annotations

_INT32_MIN = -(2**31)
_INT32_MAX = 2**31 - 1
_MBIG = _INT32_MAX  # Knuth's modulus as .NET uses it
_MSEED = 161803398
_INV_MBIG = 1.0 / _MBIG  # the constant .NET multiplies by in Sample()


def _i32(v: int) -> int:
    """Wrap a Python int to a C# ``int`` (two's complement, 32 bits), as unchecked C# does."""
    return ((v + 2**31) & 0xFFFFFFFF) - 2**31


class DotNetRandom:
    """Bit-exact port of .NET Framework's legacy seeded ``System.Random(seed)``.

    Knuth's subtractive generator as .NET implements it: a 56-slot table (slot 0 unused),
    indices ``inext = 0`` and ``inextp = 21``, four mixing passes when seeding, and every
    intermediate wrapped to a 32-bit signed integer exactly as unchecked C# arithmetic does
    (it matters for seeds near ``Int32.MaxValue`` / ``Int32.MinValue``). .NET Core and .NET 5+
    use the same algorithm for a seeded ``Random``.

    Parameters
    ----------
    seed : int
        A C# ``int``; negative seeds use their absolute value and ``Int32.MinValue`` maps to
        ``Int32.MaxValue``, as in .NET.

    Examples
    --------
    >>> DotNetRandom(0).next()
    1559595546
    """

    __slots__ = ("_inext", "_inextp", "_seed_array")

    def __init__(self, seed: int) -> None:
        seed = int(seed)
        if not _INT32_MIN <= seed <= _INT32_MAX:
            raise ValueError(f"DotNetRandom seed must be a 32-bit signed int, got {seed}")
        subtraction = _INT32_MAX if seed == _INT32_MIN else abs(seed)
        sa = [0] * 56
        mj = _i32(_MSEED - subtraction)
        sa[55] = mj
        mk = 1
        for i in range(1, 55):
            ii = (21 * i) % 55
            sa[ii] = mk
            mk = _i32(mj - mk)
            if mk < 0:
                mk = _i32(mk + _MBIG)
            mj = sa[ii]
        for _ in range(4):
            for i in range(1, 56):
                v = _i32(sa[i] - sa[1 + (i + 30) % 55])
                if v < 0:
                    v = _i32(v + _MBIG)
                sa[i] = v
        self._seed_array = sa
        self._inext = 0
        self._inextp = 21

    def _internal_sample(self) -> int:
        """The raw draw in ``[0, Int32.MaxValue)``; advances the state by one step."""
        inext = self._inext + 1
        if inext >= 56:
            inext = 1
        inextp = self._inextp + 1
        if inextp >= 56:
            inextp = 1
        sa = self._seed_array
        ret = _i32(sa[inext] - sa[inextp])
        if ret == _MBIG:
            ret -= 1
        if ret < 0:
            ret = _i32(ret + _MBIG)
        sa[inext] = ret
        self._inext = inext
        self._inextp = inextp
        return ret

    def sample(self) -> float:
        """``Sample()``: a double in ``[0, 1)``, ``InternalSample() * (1.0 / MBIG)``."""
        return self._internal_sample() * _INV_MBIG

    def _sample_large_range(self) -> float:
        """.NET's ``GetSampleForLargeRange``, for ``maxValue - minValue > Int32.MaxValue``."""
        result = self._internal_sample()
        if self._internal_sample() % 2 == 0:  # the second draw only picks the sign
            result = -result
        d = float(result) + (_INT32_MAX - 1)
        return d / (2 * _INT32_MAX - 1)

    def next(self, min_value: int | None = None, max_value: int | None = None) -> int:
        """``Next()``, ``Next(maxValue)`` or ``Next(minValue, maxValue)``, as in .NET.

        Parameters
        ----------
        min_value, max_value : int, optional
            With no argument: a draw in ``[0, Int32.MaxValue)``. With one argument it is
            ``maxValue`` (a draw in ``[0, maxValue)``). With two: ``[minValue, maxValue)``.

        Returns
        -------
        int
        """
        if min_value is None:
            return self._internal_sample()
        if max_value is None:
            max_value = int(min_value)
            if max_value < 0:
                raise ValueError(f"Next(maxValue): maxValue must be >= 0, got {max_value}")
            return int(self.sample() * max_value)  # C# (int) truncates; the product is >= 0
        lo, hi = int(min_value), int(max_value)
        if lo > hi:
            raise ValueError(f"Next(minValue, maxValue): minValue {lo} > maxValue {hi}")
        rng = hi - lo  # C# computes it in long
        if rng <= _INT32_MAX:
            return int(self.sample() * rng) + lo
        return int(self._sample_large_range() * rng) + lo

    def next_double(self) -> float:
        """``NextDouble()``: the same as :meth:`sample`."""
        return self.sample()

    def next_bytes(self, n: int) -> bytes:
        """``NextBytes`` into a fresh buffer of ``n`` bytes: each is ``InternalSample() % 256``."""
        return bytes(self._internal_sample() % 256 for _ in range(int(n)))
