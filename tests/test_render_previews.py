"""examples/render_previews.py: one small preview per example (its inputs, then its outputs, in one row)."""

import numpy as np
import render_previews
from PIL import Image


def test_tile_puts_images_in_one_row_with_gaps_and_never_exceeds_the_width():
    red, blue = Image.new("RGB", (128, 128), "red"), Image.new("RGB", (128, 64), "blue")
    row = render_previews.tile([red, blue], width=512)
    assert row.size == (128 + render_previews.GAP + 128, 128)
    assert row.getpixel((10, 10)) == (255, 0, 0) and row.getpixel((128 + render_previews.GAP + 10, 64)) == (0, 0, 255)
    assert row.getpixel((128 + render_previews.GAP + 10, 10)) == (255, 255, 255)  # the shorter image is centred
    wide = render_previews.tile([red] * 6, width=512)
    assert wide.width == 512 and wide.height == round(128 * 512 / (6 * 128 + 5 * render_previews.GAP))


def test_preview_of_an_example_that_loads_an_image_shows_the_input_then_the_outputs(host, tmp_path):
    written = render_previews.render(host, [render_previews.EXAMPLES / "invert_reconstruct.json"], tmp_path)
    assert written == [tmp_path / "invert_reconstruct.png"]
    preview = Image.open(written[0]).convert("RGB")
    assert preview.size == (3 * 128 + 2 * render_previews.GAP, 128)  # the input and two reconstructions
    source = Image.open(render_previews.EXAMPLES / "inputs" /
                        "red_circle_blue_square_green_triangle_on_yellow_stripes.png").convert("RGB")
    assert np.array_equal(np.asarray(preview.crop((0, 0, 128, 128))), np.asarray(source))
