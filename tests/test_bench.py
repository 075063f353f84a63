"""The benchmark code path in a tiny configuration: structure of its JSON and markdown, not timings."""

import json

from benchmarks import suite as bench

TINY = bench.Settings(d=2, n=4, batch_size=8, depths=(1,), parameterizations=("full",), steps=2, repeats=1,
                      scaling_ns=(4, 8), scaling_tokens=32, scaling_steps=1, scaling_repeats=1,
                      gemm_size=64)


def test_suite_writes_json_and_markdown_and_keeps_the_log(tmp_path):
    sweep_json = tmp_path / "sweep.json"
    sweep_json.write_text(json.dumps({"members": 16, "steps": 2, "d": 2, "n": 4, "batch_size": 8,
                                      "vmapped_seconds_median": 1.0, "sequential_seconds_median": 3.0,
                                      "speedup": 3.0, "vmapped_compile_seconds": 0.5,
                                      "sequential_compile_seconds": 0.4}))
    res = bench.run_suite(TINY, str(sweep_json), log=lambda _: None)
    js, md = tmp_path / "b.json", tmp_path / "B.md"
    md.write_text(f"old\n{bench.LOG_BEGIN}\n- kept entry\n{bench.LOG_END}\n")
    bench.write(res, str(js), str(md))

    data = json.loads(js.read_text())
    assert {"settings", "machine", "throughput", "scaling", "sweep_vmap", "wall_s"} <= set(data)
    assert data["machine"]["cpu_count"] >= 1 and data["machine"]["jax"]
    assert [(r["depth"], r["parameterization"]) for r in data["throughput"]] == [(1, "full")]
    for r in data["throughput"]:
        assert r["step"]["steps_per_s"] > 0 and r["floor"]["step_s"] > 0 and r["step_over_floor"] > 0
        assert r["step_over_floor_fastest"] == min(r["step"]["all_s"]) / min(r["floor"]["all_s"])
        assert r["step"]["compile_s"] > 0 and r["step"]["memory"]["peak_rss_mb"] > 0
        assert "temp_size_in_bytes" in r["step"]["memory"]["xla"]
        assert r["model_mflop"] > 0 and r["model_gflops"] > 0 and r["goal_gflops"] > 0  # the step adds work
    assert [r["n"] for r in data["scaling"]] == [4, 8]
    assert "ratio_to_previous" in data["scaling"][1]["assoc"] and "meets_goal" in data["scaling"][1]
    assert data["sweep_vmap"]["result"]["speedup"] == 3.0

    text = md.read_text()
    for heading in ("## Machine", "## Throughput", "## Scaling in n", "## Scaling in members", "## Memory",
                    "## Optimisation log"):
        assert heading in text
    assert "- kept entry" in text and "old" not in text.split("## Machine")[0]
    assert text.count("| 1 | full |") == 2 and "3.00x" in text  # the throughput and the roofline rows
    assert "What step/floor <= 1.3 asks of the model" in text and data["dense_gflops"] > 0


def test_missing_sweep_json_leaves_a_row_saying_where_it_comes_from(tmp_path):
    out = bench.sweep_vmap(str(tmp_path / "absent.json"))
    assert out["result"] is None and "benchmarks.sweep_vmap" in out["note"]


def test_naive_batch_is_capped_by_score_memory():
    s = bench.Settings(scaling_tokens=4096 * 21, naive_score_bytes=2**27)
    assert bench.scaling_batch(s, 20, "assoc") == 4096
    assert bench.scaling_batch(s, 4096, "naive") * 4 * 4097 * 4096 <= 2**27
    assert bench.scaling_batch(s, 4096, "naive") >= 1
