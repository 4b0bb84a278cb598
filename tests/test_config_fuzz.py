"""Fuzzing the runner's config parsing (issue 8): ``--set key=value`` items, override values and the CLI.

Whatever goes in, the result is a config or a ValueError/KeyError with a message, never another exception;
valid values round-trip through ``--set`` and through config.json (the check a resumed run relies on)."""
from __future__ import annotations

import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from experiments.__main__ import main, parse_set
from experiments.presets import get_preset, list_presets
from experiments.sweep import expand
from experiments.storage import _jsonable
from experiments.curvature import MEASURES
from experiments.config import DEFAULTS, TYPES, resolve_config

COUNTS = {"inputs": 0, "rejected": 0}
KEYS = sorted(DEFAULTS)
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True),
                    st.text(max_size=12))
ANY = st.recursive(SCALARS, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=5), c, max_size=3),
                   max_leaves=8)
JSON = st.recursive(st.none() | st.booleans() | st.integers(-10**9, 10**9) | st.floats(allow_nan=False, allow_infinity=False)
                    | st.text(max_size=10),
                    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=5), c, max_size=3),
                    max_leaves=8)
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _clear(exc: BaseException) -> None:
    assert isinstance(exc, (ValueError, KeyError)) and str(exc).strip(), repr(exc)
    COUNTS["rejected"] += 1


@settings(max_examples=400, **SETTINGS)
@given(st.lists(st.text(max_size=30) | st.builds(lambda k, v: f"{k}={v}", st.sampled_from(KEYS), st.text(max_size=20)),
                max_size=5))
def test_parse_set_never_crashes(items):
    COUNTS["inputs"] += 1
    try:
        out = parse_set(items)
    except Exception as exc:  # noqa: BLE001 - the property: only clear error types
        _clear(exc)
        return
    assert all(isinstance(k, str) and k and k == k.strip() for k in out)


@settings(max_examples=300, **SETTINGS)
@given(st.sampled_from(KEYS), JSON)
def test_set_values_round_trip(key, value):
    COUNTS["inputs"] += 1
    assert parse_set([f"{key}={json.dumps(value)}"]) == {key: value}
    assert parse_set([f" {key} ={json.dumps(value)}"]) == {key: value}


@settings(max_examples=200, **SETTINGS)
@given(st.text(max_size=20))
def test_plain_strings_stay_strings(text):
    COUNTS["inputs"] += 1
    try:
        json.loads(text)
        return  # JSON text is parsed as JSON (covered above)
    except (ValueError, RecursionError):
        pass
    expect = {"true": True, "false": False, "none": None}.get(text.strip().lower(), text)
    assert parse_set([f"dataset={text}"]) == {"dataset": expect}


def test_pathological_set_items():
    bad = ["", "=", "=1", "  =x", "lr", "lr=" + "[" * 100_000, "lr=NaN", "lr=-Infinity", "lr=1e999",
           "batch_size=1.5", "batch_size=true", "batch_size=-3", "max_steps=\"10\"", "hidden=[8,-1]",
           "hidden=[8.5]", "dropout=1", "dropout=-0.1", "optimizer=adam", "lr=0", "data_kwargs=[1]",
           "eval_every_epochs=0", "checkpoint_every_evals=0", "verify=yes", "unknown_key=1", "lr\x00=1",
           "lambda_tol=-1", "threads=1e30", "init_seed=-1", "model=7"]
    preset = get_preset("finding1-quick")
    for item in bad:
        COUNTS["inputs"] += 1
        with pytest.raises((ValueError, KeyError)) as ei:
            expand(preset, parse_set([item]))
        _clear(ei.value)


@settings(max_examples=400, **SETTINGS)
@given(st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=8), ANY, max_size=4),
       st.sampled_from(list_presets()))
def test_override_fuzz_gives_a_config_or_a_clear_error(overrides, preset_name):
    COUNTS["inputs"] += 1
    try:
        runs = expand(get_preset(preset_name), overrides)
    except Exception as exc:  # noqa: BLE001
        _clear(exc)
        return
    for _, cfg in runs:  # accepted: well-typed, and config.json round-trips exactly (resume compares them)
        for k, (kind, lo, none_ok) in TYPES.items():
            v = cfg[k]
            if v is None:
                assert none_ok, k
            elif kind in ("int", "float"):
                assert not isinstance(v, bool) and math.isfinite(v) and (lo is None or v >= lo), (k, v)
                assert kind == "float" or isinstance(v, int), (k, v)
        assert resolve_config(cfg) == cfg
        assert json.loads(json.dumps(_jsonable(cfg))) == _jsonable(cfg)


def _valid_value(key):
    kind, lo, none_ok = TYPES[key]
    lo = 0 if lo is None else lo
    lo = 1e-6 if key in ("lr", "lambda_tol", "width") else lo  # strictly positive
    base = {"int": st.integers(int(lo), 10**6), "bool": st.booleans(), "str": st.text(min_size=1, max_size=8),
            "float": st.floats(min_value=float(lo), max_value=1e6 if key != "dropout" else 0.99),
            "ints": st.lists(st.integers(int(lo), 512), max_size=3),
            "dict": st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
            "measures": st.lists(st.sampled_from(sorted(MEASURES)), max_size=2)}[kind]
    return base | st.none() if none_ok else base


@settings(max_examples=300, **SETTINGS)
@given(st.data())
def test_valid_values_are_accepted_and_round_trip_through_set(data):
    keys = data.draw(st.lists(st.sampled_from(sorted(set(TYPES) - {"optimizer", "batch_size"})), max_size=4,
                              unique=True))
    over = {k: data.draw(_valid_value(k), label=k) for k in keys}
    COUNTS["inputs"] += 1
    cfg = resolve_config(over)
    via_cli = resolve_config(parse_set([f"{k}={json.dumps(v)}" for k, v in over.items()]))
    assert _jsonable(via_cli) == _jsonable(cfg)
    assert json.loads(json.dumps(_jsonable(cfg))) == _jsonable(cfg)


@settings(max_examples=60, **SETTINGS)
@given(st.lists(st.text(max_size=25), max_size=3))
def test_cli_run_returns_status_not_traceback(monkeypatch_items):
    """``python -m experiments run PRESET --set=...``: status 0 or 2 (with a message), never an exception.
    The sweep itself is replaced by the config expansion so that nothing trains."""
    import experiments.sweep as sweep

    COUNTS["inputs"] += 1
    real = sweep.run_sweep
    sweep.run_sweep = lambda preset, out, overrides, progress=True, seeds=None, jobs=1: expand(get_preset(preset),
                                                                                              overrides, seeds)
    try:
        rc = main(["run", "finding2-quick", "--no-progress"] + [f"--set={x}" for x in monkeypatch_items])
    finally:
        sweep.run_sweep = real
    assert rc in (0, 2)
    if rc == 2:
        COUNTS["rejected"] += 1


def test_fuzz_counts():
    print(f"\nconfig fuzz: {COUNTS['inputs']} inputs, {COUNTS['rejected']} rejected with a clear error, "
          "0 uncaught exceptions")
