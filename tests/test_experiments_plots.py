"""The runner's figures of tracker fields: produced from the runs' metrics, absent when nothing was logged."""
from __future__ import annotations

import matplotlib.image
import pytest

from experiments import plots
from experiments.verdicts import Config, Evidence


def _evidence(fields: tuple[str, ...]) -> Evidence:
    """Two configurations of two seeds each, whose metrics log λ_max and ``fields`` (none at the first step, as the
    tracker's top_overlap has no previous update there)."""
    configs = []
    for lr in (0.05, 0.1):
        runs = {}
        for seed in (0, 1):
            metrics = [{"step": t, "lambda_max": 10.0 + t * lr + seed,
                        **{f: None if t == 0 else (t * (seed + 1) % 7) / 7 for f in fields}} for t in range(0, 50, 5)]
            runs[seed] = {"metrics": metrics}
        configs.append(Config(f"lr={lr}", {"lr": lr}, runs))
    return Evidence(configs)


def _label(cfg: dict) -> str:
    return f"η={cfg['lr']}"


@pytest.mark.parametrize("fields, panels", [(("gradient_fraction", "top_overlap"), 2), (("gradient_fraction",), 1)])
def test_geometry_plot_has_a_panel_per_logged_field(tmp_path, fields, panels):
    path = plots.geometry_plot(_evidence(fields), _label, "claim", tmp_path / "geometry_over_training.png")
    assert path == tmp_path / "geometry_over_training.png"
    height, width, _ = matplotlib.image.imread(path).shape
    single = plots.geometry_plot(_evidence(fields[:1]), _label, "claim", tmp_path / "one.png")
    assert (height > matplotlib.image.imread(single).shape[0]) == (panels == 2)


def test_geometry_plot_is_absent_without_geometry_fields(tmp_path):
    assert plots.geometry_plot(_evidence(()), _label, "claim", tmp_path / "g.png") is None
    assert not (tmp_path / "g.png").exists()
    assert plots.training_plot(_evidence(()), _label, "claim", tmp_path / "l.png") == tmp_path / "l.png"
