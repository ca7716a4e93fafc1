"""Property-based checks of the slide reader: random and mutated bytes give a SlideError or a
correct read, never another exception, a hang or a huge allocation."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from data.readers import SlideError, open_slide
from tests.slides import has_shared, shared

SOURCES = ["openslide-python-small.svs", "kidney-48-5.tif", "CMU-1-Small-Region.svs"]


def _open_and_read(path):
    try:
        with open_slide(path) as slide:
            h, w = slide.shape
            if h * w > 50_000_000:  # a corrupted header may claim a huge image: read a corner
                h, w = min(h, 64), min(w, 64)
            region = slide.read_level(0, 0, 0, h, w)
            assert region.dtype == np.uint8 and region.shape == (h, w, 3)
            for y0, strip in slide.iter_strips(0):  # the tiler's path (direct tile decoding)
                assert strip.shape[1:] == (slide.shape[1], 3)
                if y0 > 2000:
                    break
    except SlideError as exc:
        assert path in str(exc)


@settings(max_examples=60, deadline=5000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(min_size=0, max_size=2048))
def test_random_bytes(tmp_path, data):
    path = str(tmp_path / "random.tif")
    with open(path, "wb") as fh:
        fh.write(data)
    _open_and_read(path)


@pytest.mark.skipif(not has_shared(), reason="needs ../shared/data")
@settings(max_examples=80, deadline=10000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(source=st.sampled_from(SOURCES),
       flips=st.lists(st.tuples(st.integers(0, 10**9), st.integers(1, 255)), min_size=1, max_size=8),
       header_only=st.booleans(), cut=st.one_of(st.none(), st.floats(0.0, 1.0)))
def test_mutated_real_slides(tmp_path, source, flips, header_only, cut):
    """Bit flips (mostly in the first 4 KiB, where the TIFF structure is) and truncations."""
    data = bytearray(open(shared("wsi", source), "rb").read())
    for position, value in flips:
        data[position % (min(len(data), 4096) if header_only else len(data))] ^= value
    if cut is not None:
        data = data[: int(len(data) * cut)]
    path = str(tmp_path / "mutated.svs")
    with open(path, "wb") as fh:
        fh.write(bytes(data))
    _open_and_read(path)
