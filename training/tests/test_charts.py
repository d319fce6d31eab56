import re

from training.charts import loss_chart_svg


def test_loss_chart_draws_one_point_per_step_and_marks_dev_loss():
    svg = loss_chart_svg([[1, 2.0], [2, 1.5], [3, 1.0]], [[3, 1.2]], title="loss")
    assert svg.startswith("<svg") and svg.endswith("</svg>")
    train_line = re.search(r'stroke="#2563eb"[^>]*points="([^"]+)"', svg).group(1)
    assert len(train_line.split()) == 3
    assert svg.count("<circle") == 1


def test_falling_loss_goes_down_the_chart():
    svg = loss_chart_svg([[1, 3.0], [10, 0.5]])
    (x1, y1), (x2, y2) = [tuple(map(float, p.split(","))) for p in re.search(r'points="([^"]+)"', svg).group(1).split()]
    assert x2 > x1 and y2 > y1  # SVG y grows downwards


def test_no_points_gives_no_chart():
    assert loss_chart_svg([]) == ""
