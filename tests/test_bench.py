"""The benchmark harness (bench/): verdict logic, and a tiny real run of the data-scale benchmark."""

import json
import math

import pytest

from bench.common import Target, check, interleaved_timings, ratio, summarize


def test_target_flags_a_miss_and_says_by_how_much():
    drop = check("c.drop", "accuracy drop", 3.7, "<=", 1.0, unit="pts")
    assert not drop["passed"] and drop["by"] == "missed by 2.70 pts"
    slow = check("c.speed", "speed-up", 8.0, ">=", 10)
    assert not slow["passed"] and "20.0% short" in slow["by"]
    over = check("o.overhead", "overhead", 1.38, "<=", 1.15)
    assert not over["passed"] and "20.0% over" in over["by"]
    assert check("c.size", "shrink", 58.5, ">=", 50)["passed"]
    assert check("o.exact", "at the limit", 1.15, "<=", 1.15)["passed"]
    assert not check("nan", "not measured", math.nan, ">=", 1)["passed"]
    with pytest.raises(ValueError):
        Target("bad", "bad op", 1.0, 1.0, "==")


def test_timing_summaries_and_ratios():
    s = summarize([3.0, 1.0, 2.0])
    assert (s["median"], s["min"], s["max"], s["n"]) == (2.0, 1.0, 3.0, 3)
    r = ratio({"median": 4.0, "min": 3.0, "max": 6.0}, {"median": 2.0, "min": 1.0, "max": 3.0})
    assert r == {"median": 2.0, "min": 1.0, "max": 6.0}
    calls = {"fast": lambda: sum(range(10)), "slow": lambda: sum(range(200_000))}
    t = interleaved_timings(calls, repeats=7, warmup=1, rounds=3)
    assert t["fast"]["n"] == t["slow"]["n"] == 7
    assert t["slow"]["median"] > t["fast"]["median"]


def test_data_scale_writes_results_with_targets(tmp_path):
    from bench.__main__ import main

    out = tmp_path / "results"
    assert main(["--only", "data_scale", "--data-sizes", "2000,8000", "--out", str(out)]) == 0
    [json_path] = out.glob("*.json")
    [md_path] = out.glob("*.md")
    results = json.loads(json_path.read_text())
    assert results["machine"]["cpu_count"] >= 1 and results["machine"]["torch_threads"] >= 1
    sizes = results["benchmarks"]["data_scale"]["sizes"]
    assert [s["rows"] for s in sizes] == [2000, 8000]
    for s in sizes:
        total = s["seconds"]["total"]
        assert 0 < total["min"] <= total["median"] <= total["max"]
        assert s["peak_rss_bytes"] >= s["baseline_rss_bytes"] > 0
        assert s["table_bytes"] > s["rows"] * 64 * 8  # 64 float64 columns plus labels
    # more rows take longer, but far less than quadratically
    assert sizes[1]["seconds"]["total"]["median"] > sizes[0]["seconds"]["total"]["median"]
    ids = {t["id"]: t for t in results["targets"]}
    assert set(ids) == {"data.growth_exponent", "data.time_1m", "data.peak_memory"}
    assert 0 < ids["data.growth_exponent"]["measured"] < 2
    assert "extrapolated" in ids["data.time_1m"]["note"]
    text = md_path.read_text()
    assert "## Targets:" in text and "5. Data stages at scale" in text and "8,000" in text


def test_unknown_benchmark_is_refused(capsys):
    from bench.__main__ import main

    with pytest.raises(SystemExit):
        main(["--only", "nonsense"])
    assert "unknown benchmark" in capsys.readouterr().err


def test_merge_carries_unmeasured_families_from_the_newest_earlier_file_with_their_date(tmp_path):
    from bench.report import merge_previous

    def target(i):
        return check(f"t{i}", f"target {i}", float(i), ">=", 1)

    host = "box"
    for date, quality_value in (("2026-11-01", 1), ("2026-11-20", 2)):  # the newer file must win
        (tmp_path / f"{date}-{host}.json").write_text(
            json.dumps(
                {
                    "date": date,
                    "command": f"python -m bench  # {date}",
                    "machine": {"host": host},
                    "benchmarks": {
                        "quality": {"targets": [target(quality_value)]},
                        "compression": {
                            "settings": [
                                {"setting": "kept", "targets": [target(10)]},
                                {"setting": "redone", "targets": [target(11)]},
                            ],
                            "targets": [target(10), target(11)],
                        },
                    },
                    "errors": {},
                    "targets": [],
                    "scale_notes": [],
                }
            )
        )
    (tmp_path / "2026-11-21-other.json").write_text("{}")  # another host's file is never read
    today = {
        "date": "2026-11-24",
        "command": "python -m bench --only compression --merge",
        "machine": {"host": host},
        "benchmarks": {"compression": {"settings": [{"setting": "redone", "targets": [target(12)]}]}},
        "errors": {},
        "targets": [],
        "scale_notes": [],
    }
    merge_previous(today, tmp_path)
    quality = today["benchmarks"]["quality"]
    assert quality["measured_on"] == "2026-11-20" and quality["command"] == "python -m bench  # 2026-11-20"
    settings = {s["setting"]: s for s in today["benchmarks"]["compression"]["settings"]}
    assert settings["redone"]["targets"][0]["measured"] == 12 and "measured_on" not in settings["redone"]
    assert settings["kept"]["measured_on"] == "2026-11-20"
    assert sorted(t["measured"] for t in today["targets"]) == [2, 10, 12]


def test_the_gpu_script_runs_its_settings_end_to_end_on_the_cpu():
    """No GPU in CI: the same code paths (settings, fit, the report) on the CPU with tiny sizes."""
    from bench import gpu

    result = gpu.run(epochs=1, pairs=1, device="cpu", batch_size=64, models=("cnn",), max_rows=256)
    assert [r["setting"] for r in result["rows"]] == ["fp32", "bf16 autocast", "bf16 + channels_last"]
    assert all(r["samples_per_s"]["median"] > 0 for r in result["rows"])
    table = gpu.markdown(result)
    assert "| cnn | fp32 |" in table and "1.00×" in table and result["card"] == "cpu (smoke run)"
    assert gpu.main([]) == 0  # no CUDA here: says so, writes nothing
