import numpy as np
import pytest

from tests.conftest import requires_shared
from tests.slides import read_sizes, read_train_csv
from utils.rle import RLEStripEncoder, decode_window, parse_rle, rle_decode, rle_encode, runs_intersection, runs_to_rle


def test_literal_column_major_one_based():
    # Column by column: col 0 = (1, 1), col 1 = (0, 1) -> flat 1 1 0 1.
    mask = np.array([[1, 0], [1, 1]], dtype=np.uint8)
    assert rle_encode(mask) == "1 2 4 1"
    assert (rle_decode("1 2 4 1", (2, 2)) == mask).all()
    # A run continuing from one column into the next.
    mask = np.array([[0, 1], [1, 0]], dtype=np.uint8)  # flat 0 1 1 0
    assert rle_encode(mask) == "2 2"


def test_empty_masks():
    assert rle_encode(np.zeros((3, 4), np.uint8)) == ""
    for empty in ("", "   ", None, float("nan")):
        assert rle_decode(empty, (3, 4)).sum() == 0
    assert rle_encode(np.ones((3, 4), np.uint8)) == "1 12"


def test_random_round_trips_strips_and_windows():
    rng = np.random.default_rng(0)
    for _ in range(200):
        h, w = (int(v) for v in rng.integers(1, 25, 2))
        mask = (rng.random((h, w)) < rng.random()).astype(np.uint8)
        text = rle_encode(mask)
        assert text == rle_encode(np.asfortranarray(mask * 255))  # any layout, non-zero = 1
        runs = parse_rle(text, (h, w))
        assert (rle_decode(runs, (h, w)) == mask).all()
        assert runs_to_rle(runs) == text
        encoder, col = RLEStripEncoder(h), 0
        while col < w:
            width = int(rng.integers(0, 5))
            encoder.add(mask[:, col:col + width])
            col += width
        assert encoder.encode() == text
        padded = np.zeros((h + 60, w + 60), np.uint8)
        padded[20:20 + h, 20:20 + w] = mask
        for _ in range(4):
            step = int(rng.integers(1, 4))
            r0, c0 = int(rng.integers(-5, h + 2)), int(rng.integers(-5, w + 2))
            r1, c1 = r0 + int(rng.integers(0, h + 5)), c0 + int(rng.integers(0, w + 5))
            expected = padded[20 + r0:20 + r1:step, 20 + c0:20 + c1:step]
            got = decode_window(runs, (h, w), (r0, r1), (c0, c1), step)
            assert got.shape == expected.shape and (got == expected).all()


def test_window_decode_does_not_allocate_the_whole_mask():
    import tracemalloc

    shape = (100_000, 100_000)  # 10 G pixels
    runs = parse_rle("1 5 500000005 10", shape)
    tracemalloc.start()
    window = decode_window(runs, shape, (0, 256), (0, 256))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert window[:5, 0].all() and window.sum() == 5
    assert peak < 5_000_000
    assert decode_window(runs, shape, (0, 20), (5000, 5001))[4:14, 0].all()


@pytest.mark.slow
@requires_shared
@pytest.mark.parametrize("slide_id", ["2f6ecfcdf", "8242609fa"])
def test_real_slides_round_trip_exactly(slide_id):
    text, shape = read_train_csv()[slide_id], read_sizes()[slide_id]
    runs = parse_rle(text, shape, slide_id)
    assert len(runs) == {"2f6ecfcdf": 41688, "8242609fa": 161083}[slide_id]
    mask = rle_decode(runs, shape)
    assert mask.shape == shape
    assert rle_encode(mask) == text
    del mask
    # The streamed way inference uses: column strips decoded from the runs, then joined.
    encoder = RLEStripEncoder(shape[0])
    for col in range(0, shape[1], 3000):
        encoder.add(decode_window(runs, shape, (0, shape[0]), (col, min(col + 3000, shape[1]))))
    assert encoder.encode() == text


@pytest.mark.parametrize(
    "text, needle",
    [
        ("1 2 3", "odd number of values"),
        ("1 2.5", "is not an integer"),
        ("a 2", "is not an integer"),
        ("1e3 2", "is not an integer"),
        ("1 0", "zero length"),
        ("1 -3", "negative length"),
        ("-1 3", "negative start"),
        ("0 3", "start 0"),
        ("11 3", "runs past the end"),
        ("1 5 3 2", "overlaps or comes before"),
        ("7 2 1 2", "overlaps or comes before"),
        ("1 99999999999999999999", "value too large"),
    ],
)
def test_bad_rle_raises_value_error_naming_the_id(text, needle):
    with pytest.raises(ValueError) as info:
        parse_rle(text, (3, 4), name="slide_x")
    assert "slide_x" in str(info.value) and needle in str(info.value)


def test_bad_shapes_and_types():
    with pytest.raises(ValueError, match="must be positive"):
        parse_rle("1 1", (0, 4), "s")
    with pytest.raises(ValueError, match="too large"):
        parse_rle("1 1", (10**9, 10**9), "s")
    with pytest.raises(ValueError, match="expected a string"):
        parse_rle(12, (3, 4), "s")


from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=300, deadline=None)
@given(
    text=st.one_of(
        st.text(max_size=60),
        st.lists(st.integers(-5, 10**20), max_size=12).map(lambda v: " ".join(map(str, v))),
    ),
    height=st.integers(1, 50),
    width=st.integers(1, 50),
)
def test_fuzz_parse_only_raises_value_error(text, height, width):
    try:
        runs = parse_rle(text, (height, width), "fuzz")
    except ValueError as exc:
        assert "fuzz" in str(exc)
        return
    mask = rle_decode(runs, (height, width))
    assert rle_decode(rle_encode(mask), (height, width)).tolist() == mask.tolist()


def test_fast_and_tolerant_parsing_agree():
    """The memory-lean path (Kaggle format: digits and single spaces) and the tolerant path
    (any whitespace) give the same runs; the intersection is symmetric and exact."""
    rng = np.random.default_rng(5)
    for _ in range(50):
        mask = (rng.random((37, 23)) < rng.random()).astype(np.uint8)
        text = rle_encode(mask)
        messy = "  " + text.replace(" ", " \t\n ") + "\n"
        assert np.array_equal(parse_rle(text, mask.shape), parse_rle(messy, mask.shape))
        other = (rng.random((37, 23)) < 0.4).astype(np.uint8)
        a, b = parse_rle(text, mask.shape), parse_rle(rle_encode(other), mask.shape)
        assert runs_intersection(a, b) == runs_intersection(b, a) == int((mask & other).sum())
