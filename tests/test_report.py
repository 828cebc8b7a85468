"""Caption placement in ``boxed_images``: labels never pile up, even over near-duplicate boxes."""

import itertools

import numpy as np
import pytest

from effdl.report import BoxedImage, boxed_images, caption_extent, caption_tops

CHAR, LINE = caption_extent(13, 100)


def rectangles(boxes, captions):
    tops = caption_tops(boxes, captions, CHAR, LINE)
    return [(x0, x0 + CHAR * len(c), top, top + LINE) for (x0, *_), c, top in zip(boxes, captions, tops, strict=True)]


def overlap(a, b):
    return a[0] < b[1] and b[0] < a[1] and a[2] < b[3] and b[2] < a[3]


def test_near_duplicate_boxes_get_stacked_captions_that_do_not_overlap():
    boxes = [(100 + i, 150 + 2 * i, 300, 330) for i in range(6)]  # six guesses at one square
    captions = [f"square 0.{90 - i}" for i in range(6)]
    placed = rectangles(boxes, captions)
    assert not any(overlap(a, b) for a, b in itertools.combinations(placed, 2))
    assert placed[0][2] == boxes[0][1] - LINE  # the best one keeps its place above the box


def test_a_caption_sits_above_its_box_or_inside_it_at_the_top_edge():
    boxes, captions = [(10, 200, 80, 260), (300, 3, 400, 90)], ["circle", "triangle"]
    assert caption_tops(boxes, captions, CHAR, LINE) == [200 - LINE, 3]


def test_captions_side_by_side_keep_the_same_line():
    boxes = [(0, 100, 50, 150), (400, 100, 450, 150)]
    assert caption_tops(boxes, ["a", "b"], CHAR, LINE) == [100 - LINE, 100 - LINE]


def test_boxed_images_draws_a_png_of_the_panels(tmp_path):
    pixels = np.zeros((256, 256, 3), dtype=np.uint8)
    panel = BoxedImage("six guesses", pixels, [(40 + i, 60 + i, 200, 200) for i in range(6)],
                       [f"square {i}" for i in range(6)], ["tab:blue"] * 6, [np.ones((256, 256), bool)] * 6)
    path = boxed_images(tmp_path / "overlay.png", [panel, panel], title="stacked captions")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(("n_panels", "n_series"), [(2, 8), (2, 3), (1, 8)])
def test_line_panels_put_one_legend_beside_several_panels_or_many_series(tmp_path, monkeypatch, n_panels, n_series):
    import effdl.report as report

    saved = []
    save = report._save
    monkeypatch.setattr(report, "_save", lambda fig, path, tight=True: saved.append(fig) or save(fig, path, tight))
    series = {f"run {i}": ([1, 2, 3], [i, i + 1, i + 2]) for i in range(n_series)}
    path = report.line_panels(tmp_path / "curves.png", {f"panel {i}": series for i in range(n_panels)}, title="t",
                              xlabel="x", ylabel="y")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (fig,) = saved
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == list(series)
    box = legend.get_window_extent()
    for ax in fig.axes:
        assert ax.get_legend() is None and not box.overlaps(ax.get_window_extent())
        assert all(float(tick).is_integer() for tick in ax.get_xticks())  # whole epochs get whole ticks


def test_line_panels_give_a_series_the_colour_of_its_place_in_order(tmp_path, monkeypatch):
    """Two plots of one benchmark, one without the second run: the third keeps its colour in both."""
    import effdl.report as report

    saved = []
    save = report._save
    monkeypatch.setattr(report, "_save", lambda fig, path, tight=True: saved.append(fig) or save(fig, path, tight))
    order = ["a", "b", "c"]
    colours = []
    for names in (["a", "b", "c"], ["a", "c", "extra"]):
        series = {name: ([1, 2], [1, 2]) for name in names}
        report.line_panels(tmp_path / "curves.png", {"panel": series}, title="t", xlabel="x", ylabel="y", order=order)
        colours.append({line.get_label(): line.get_color() for line in saved[-1].axes[0].get_lines()})
    assert colours[0]["c"] == colours[1]["c"] == "C2" and colours[1]["extra"] == "C3"
