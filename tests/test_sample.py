"""The generated sample: deterministic, pyramidal, realistic enough for every step."""
import cv2
import numpy as np

from data.sample import SAMPLE, SampleSpec, draw_slide, generate_sample, write_pyramid
from data.tiling import pixel_limit, tissue_columns
from data.readers import open_slide
from data.sources import read_labels_csv
from utils.rle import rle_decode


def test_same_seed_same_pixels_and_masks():
    spec = SampleSpec("t", "train", 1024, 1280, 3)
    image, mask = draw_slide(spec)
    again, mask_again = draw_slide(spec)
    assert np.array_equal(image, again) and np.array_equal(mask, mask_again)
    other, _ = draw_slide(SampleSpec("t", "train", 1024, 1280, 4))
    assert not np.array_equal(image, other)


def test_slides_look_like_tissue_with_glomeruli(tmp_path):
    spec = SampleSpec("t", "train", 2048, 2560, 5)
    image, mask = draw_slide(spec)
    assert image.dtype == np.uint8 and image.shape == (2048, 2560, 3)
    n_glomeruli = cv2.connectedComponents(mask)[0] - 1
    assert 2 <= n_glomeruli <= 10 and 0.003 < mask.mean() < 0.05
    # the saturation filter finds background (border) and tissue (centre): real work to do
    small = cv2.resize(image, (640, 512), interpolation=cv2.INTER_AREA)
    keep = tissue_columns(small[:64], 64, 40, pixel_limit(200, 64))  # the top band is mostly background
    assert not keep.all()
    centre = tissue_columns(small[224:288], 64, 40, pixel_limit(200, 64))
    assert centre[3:7].all()
    # glomeruli are darker and more purple than the tissue around them
    ring = cv2.dilate(mask, np.ones((41, 41), np.uint8)) - mask
    assert image[mask > 0].mean() < image[ring > 0].mean()
    path = str(tmp_path / "t.tiff")
    write_pyramid(path, image)
    with open_slide(path) as slide:
        assert slide.shape == (2048, 2560)
        assert [lv.downsample for lv in slide.levels] == [1.0, 4.0, 16.0]
        region = slide.read(0, 0, 2048, 2560)
    assert np.abs(region.astype(int) - image).mean() < 3  # JPEG q90


def test_generate_sample_writes_exact_rle(tmp_path):
    specs = (SampleSpec("a", "train", 768, 1024, 1), SampleSpec("b", "test", 640, 896, 2))
    csvs = generate_sample(str(tmp_path), specs)
    for spec in specs:
        labels = read_labels_csv(csvs[spec.split])
        assert np.array_equal(rle_decode(labels[spec.slide_id], (spec.height, spec.width)), draw_slide(spec)[1])
    assert {s.split for s in SAMPLE} == {"train", "test"} and len(SAMPLE) == 5
