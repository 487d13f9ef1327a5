import json

from conftest import TINY_CONFIG
from nimble_worker import bench


def test_bench_quick_on_the_tiny_task(tiny_task, capsys):
    code = bench.main(["--task", tiny_task, "--config", json.dumps(TINY_CONFIG),
                       "--device", "cpu", "--quick"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "matmul fp32" in captured.err
    out = json.loads(captured.out)  # exactly one JSON object on stdout
    assert set(out) == {"devices", "device", "matmul_gflops", "memory_gbps", "h2d_gbps", "task"}
    assert out["device"] == "cpu" and out["devices"][0]["kind"] in ("cpu", "cuda", "mps")
    assert set(out["matmul_gflops"]) == {"fp32", "bf16", "fp16"}
    assert out["matmul_gflops"]["fp32"] > 0
    assert all(v is None or v > 0 for v in out["matmul_gflops"].values())
    assert out["memory_gbps"] > 0 and out["h2d_gbps"] is None
    task = out["task"]
    assert set(task) == {"samples_per_s", "max_micro_batch", "best_micro_batch"}
    rates = task["samples_per_s"]
    assert {"1", "4", "16", "64"} <= set(rates) and all(v > 0 for v in rates.values())
    assert 1 <= task["best_micro_batch"] <= task["max_micro_batch"] <= bench.CPU_MAX_MICRO_BATCH
    assert str(task["best_micro_batch"]) in rates and str(task["max_micro_batch"]) in rates


def test_bench_without_a_task(capsys):
    assert bench.main(["--device", "cpu", "--quick"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert "task" not in out and out["matmul_gflops"]["fp32"] > 0
