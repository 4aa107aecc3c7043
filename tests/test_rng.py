"""Tests for :class:`kmdask.rng.DotNetRandom` against .NET's published outputs and its spec."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kmdask.mccaffrey.dotnet_random import DotNetRandom
from kmdask.rng import keyed_rng

# First ten `new Random(seed).Next()` values for seeds 0..19, as asserted by .NET's own
# test-suite (dotnet/corefx, System.Runtime.Extensions/tests/System/Random.cs).
DOTNET_NEXT = [
    [1559595546, 1755192844, 1649316166, 1198642031, 442452829, 1200195957, 1945678308, 949569752, 2099272109, 587775847],  # noqa: E501
    [534011718, 237820880, 1002897798, 1657007234, 1412011072, 929393559, 760389092, 2026928803, 217468053, 1379662799],  # noqa: E501
    [1655911537, 867932563, 356479430, 2115372437, 234085668, 658591161, 1722583523, 956804207, 483147644, 24066104],  # noqa: E501
    [630327709, 1498044246, 1857544709, 426253993, 1203643911, 387788763, 537294307, 2034163258, 748827235, 815953056],  # noqa: E501
    [1752227528, 2128155929, 1211126341, 884619196, 25718507, 116986365, 1499488738, 964038662, 1014506826, 1607840008],  # noqa: E501
    [726643700, 610783965, 564707973, 1342984399, 995276750, 1993667614, 314199522, 2041397713, 1280186417, 252243313],  # noqa: E501
    [1848543519, 1240895648, 2065773252, 1801349602, 1964834993, 1722865216, 1276393953, 971273117, 1545866008, 1044130265],  # noqa: E501
    [822959691, 1871007331, 1419354884, 112231158, 786909589, 1452062818, 91104737, 2048632168, 1811545599, 1836017217],  # noqa: E501
    [1944859510, 353635367, 772936516, 570596361, 1756467832, 1181260420, 1053299168, 978507572, 2077225190, 480420522],  # noqa: E501
    [919275682, 983747050, 126518148, 1028961564, 578542428, 910458022, 2015493599, 2055866623, 195421134, 1272307474],  # noqa: E501
    [2041175501, 1613858733, 1627583427, 1487326767, 1548100671, 639655624, 830204383, 985742027, 461100725, 2064194426],  # noqa: E501
    [1015591673, 96486769, 981165059, 1945691970, 370175267, 368853226, 1792398814, 2063101078, 726780316, 708597731],  # noqa: E501
    [2137491492, 726598452, 334746691, 256573526, 1339733510, 98050828, 607109598, 992976482, 992459907, 1500484683],  # noqa: E501
    [1111907664, 1356710135, 1835811970, 714938729, 161808106, 1974732077, 1569304029, 2070335533, 1258139498, 144887988],  # noqa: E501
    [86323836, 1986821818, 1189393602, 1173303932, 1131366349, 1703929679, 384014813, 1000210937, 1523819089, 936774940],  # noqa: E501
    [1208223655, 469449854, 542975234, 1631669135, 2100924592, 1433127281, 1346209244, 2077569988, 1789498680, 1728661892],  # noqa: E501
    [182639827, 1099561537, 2044040513, 2090034338, 922999188, 1162324883, 160920028, 1007445392, 2055178271, 373065197],  # noqa: E501
    [1304539646, 1729673220, 1397622145, 400915894, 1892557431, 891522485, 1123114459, 2084804443, 173374215, 1164952149],  # noqa: E501
    [278955818, 212301256, 751203777, 859281097, 714632027, 620720087, 2085308890, 1014679847, 439053806, 1956839101],  # noqa: E501
    [1400855637, 842412939, 104785409, 1317646300, 1684190270, 349917689, 900019674, 2092038898, 704733397, 601242406],  # noqa: E501
]

# `new Random(seed).NextBytes(byte[10])`, from the same .NET test-suite (seeds 0, 1, 19).
DOTNET_BYTES = {
    0: bytes([0x1A, 0xC, 0x46, 0x6F, 0x5D, 0x75, 0xE4, 0xD8, 0xAD, 0x67]),
    1: bytes([0x46, 0xD0, 0x86, 0x82, 0x40, 0x97, 0xE4, 0xA3, 0x95, 0xCF]),
    19: bytes([0x55, 0x8B, 0x1, 0xDC, 0x3E, 0xF9, 0xDA, 0xF2, 0xD5, 0x26]),
}

# Seeds whose seeding overflows int32 (MSEED - |seed| is far below zero): third-party ports
# that were checked against .NET publish these; they only match with C# int32 wrapping.
WRAP_SEEDS = {
    2147483647: [1559595546, 1755192844, 1649316172, 1198642031, 442452829, 1200195955],
    -2147483648: [1559595546, 1755192844, 1649316172, 1198642031, 442452829, 1200195955],
    305419896: [1833211375, 1043988864, 268295676, 471379373, 1912720188, 1697597342],
}


@pytest.mark.parametrize("seed", range(len(DOTNET_NEXT)))
def test_next_matches_dotnet_suite(seed: int) -> None:
    r = DotNetRandom(seed)
    assert [r.next() for _ in range(10)] == DOTNET_NEXT[seed]


@pytest.mark.parametrize("seed", sorted(DOTNET_BYTES))
def test_next_bytes_matches_dotnet_suite(seed: int) -> None:
    assert DotNetRandom(seed).next_bytes(10) == DOTNET_BYTES[seed]


@pytest.mark.parametrize("seed", sorted(WRAP_SEEDS))
def test_int32_wrapping_seeds(seed: int) -> None:
    r = DotNetRandom(seed)
    assert [r.next() for _ in range(6)] == WRAP_SEEDS[seed]


def test_negative_seed_uses_absolute_value() -> None:
    a, b = DotNetRandom(-12345), DotNetRandom(12345)
    assert [a.next() for _ in range(60)] == [b.next() for _ in range(60)]


def test_next_double_is_sample_over_mbig() -> None:
    # Hand-derived from the spec: NextDouble() = InternalSample() * (1.0 / (2**31 - 1)).
    r = DotNetRandom(0)
    got = [r.next_double() for _ in range(5)]
    assert got == [v * (1.0 / 2147483647) for v in DOTNET_NEXT[0][:5]]
    # The widely quoted first value of `new Random(0).NextDouble()`.
    assert got[0] == 0.7262432699679598


def test_next_range_is_truncated_scaled_sample() -> None:
    # Next(min, max) = (int)(Sample() * (max - min)) + min, for each of the first draws.
    r = DotNetRandom(0)
    got = [r.next(0, 100) for _ in range(4)] + [r.next(-50, 50)] + [r.next(60000)]
    s = [v * (1.0 / 2147483647) for v in DOTNET_NEXT[0][:6]]
    assert got == [int(s[0] * 100), int(s[1] * 100), int(s[2] * 100), int(s[3] * 100),
                   int(s[4] * 100) - 50, int(s[5] * 60000)]
    assert got[:4] == [72, 81, 76, 55]


def test_degenerate_ranges_and_errors() -> None:
    r = DotNetRandom(3)
    assert r.next(0) == 0 and r.next(5, 5) == 5 and r.next(1) == 0 and r.next(1, 2) == 1
    with pytest.raises(ValueError, match="maxValue"):
        r.next(-1)
    with pytest.raises(ValueError, match="minValue 2 > maxValue 1"):
        r.next(2, 1)
    with pytest.raises(ValueError, match="32-bit"):
        DotNetRandom(2**31)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(-(2**31), 2**31 - 1),
    lo=st.integers(-(2**31), 2**31 - 1),
    width=st.integers(1, 2**32 - 1),
)
def test_next_range_property(seed: int, lo: int, width: int) -> None:
    hi = min(lo + width, 2**31 - 1)
    if hi <= lo:
        return
    a, b = DotNetRandom(seed), DotNetRandom(seed)
    xs = [a.next(lo, hi) for _ in range(20)]
    assert all(lo <= x < hi for x in xs)
    assert xs == [b.next(lo, hi) for _ in range(20)]  # deterministic


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(-(2**31), 2**31 - 1))
def test_samples_in_unit_interval(seed: int) -> None:
    r = DotNetRandom(seed)
    for _ in range(200):
        v = r.next()
        assert 0 <= v < 2**31 - 1
        d = r.next_double()
        assert 0.0 <= d < 1.0


def test_keyed_rng_still_deterministic() -> None:
    a = keyed_rng(7, 1, 2).integers(0, 1 << 30, 5)
    b = keyed_rng(7, 1, 2).integers(0, 1 << 30, 5)
    assert (a == b).all()
