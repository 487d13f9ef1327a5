"""The job config as it arrives from a coordinator: every known key is checked, and a
bad one is a ConfigError naming its field (fuzzed with a fixed seed, bounded runs)."""

import math
import random

import pytest

from conftest import TINY_CONFIG
from nimble_worker.config import ConfigError, JobConfig

HOSTILE = [None, True, -1, 2**64, 1e308, math.inf, math.nan, "", "x" * 10_000, [], [1, 2], {}, {"a": 1},
           "../../etc/passwd", 0, 1, 0.5, "adam", b"\x00"]


def paths(d, prefix=""):
    for k, v in d.items():
        yield prefix + k
        if isinstance(v, dict) and k != "task_args":
            yield from paths(v, f"{prefix}{k}.")


def with_value(d, path, value):
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in d.items()}
    head, *rest = path.split(".")
    if rest:
        out[head] = with_value(out[head] if isinstance(out.get(head), dict) else {}, ".".join(rest), value)
    else:
        out[head] = value
    return out


def test_the_tiny_config_loads():
    cfg = JobConfig.from_dict(TINY_CONFIG)
    assert cfg.optimizer.name == "adam" and cfg.steps == 10


@pytest.mark.parametrize("path,value,field", [
    ("optimizer.lr", math.inf, "optimizer.lr"),
    ("seed", 2**64, "seed"),
    ("steps", "10", "steps"),
    ("optimizer", "adam", "optimizer"),
    ("optimizer.betas", [0.9], "optimizer.betas"),
    ("compression.error_feedback", 1, "compression.error_feedback"),
    ("name", "x" * 5000, "name"),
])
def test_a_bad_value_names_its_field(path, value, field):
    with pytest.raises(ConfigError) as err:
        JobConfig.from_dict(with_value(TINY_CONFIG, path, value))
    assert err.value.field == field and err.value.message.startswith(f"{field}: expected")


def test_fuzzed_configs_load_or_name_their_field():
    rng = random.Random(20261201)
    keys = list(paths(TINY_CONFIG)) + ["compression.rank", "compression.ratio", "strategy.name", "optimizer.betas"]
    refused = 0
    for _ in range(500):
        cfg = TINY_CONFIG
        for _ in range(rng.randint(1, 3)):
            cfg = with_value(cfg, rng.choice(keys), rng.choice(HOSTILE))
        try:
            got = JobConfig.from_dict(cfg)
        except ConfigError as e:
            refused += 1
            assert e.field and e.message
            continue
        for value in (got.steps, got.batch_size, got.seed, got.optimizer.lr, *got.optimizer.betas):
            assert isinstance(value, (int, float)) and math.isfinite(value)
    assert 0 < refused < 500
    with pytest.raises(ConfigError, match="mapping"):
        JobConfig.from_dict(["not", "a", "mapping"])
