"""The benchmarks stay runnable as the library moves: each module of fusion.benchmarks imports and answers --help
(gpu_check without importing torch, so its preflight can say torch is missing), and the ending they share prints
the machine and the command, then one JSON object as the last line. The benchmarks themselves take minutes to an
hour; benchmarks/gpu_check.sh has its own tests in tests/test_gpu_ready.py."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

# Run in a child process: importing fusion.benchmarks sets HF_HUB_OFFLINE and TOKENIZERS_PARALLELISM in its process.
EVERY_HELP_THEN_AN_ENDING = textwrap.dedent("""
    import contextlib, importlib, io, pkgutil, sys
    import fusion.benchmarks.gpu_check

    # gpu_check's preflight reports a missing torch or numpy: importing it must not need them.
    assert not {"torch", "numpy", "transformers"} & set(sys.modules), "gpu_check imports heavy packages"
    for module in pkgutil.iter_modules(fusion.benchmarks.__path__):
        benchmark = importlib.import_module(f"fusion.benchmarks.{module.name}")
        if hasattr(benchmark, "main"):
            with contextlib.redirect_stdout(io.StringIO()) as shown, contextlib.suppress(SystemExit):
                benchmark.main(["--help"])
            assert "usage:" in shown.getvalue(), module.name
            print("helped", module.name)

    from fusion.benchmarks.common import finish

    finish({"figure": 1.5, "threads": 2}, other_cores=0.25)
""")


def test_every_benchmark_imports_answers_help_and_ends_with_the_machine_then_one_json_line(tmp_path):
    script = tmp_path / "every_benchmark.py"
    script.write_text(EVERY_HELP_THEN_AN_ENDING)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    helped = {line.split()[1] for line in lines if line.startswith("helped ")}
    assert {"extract_speed", "fit_speed", "gpu_check", "grid_choices", "grid_speed", "serve_load", "serve_speed",
            "token_speed", "token_stream"} <= helped
    assert json.loads(lines[-1]) == {"figure": 1.5, "threads": 2}
    assert "CPU bf16 units:" in lines[-3] and "0.25 cores" in lines[-3]
    assert lines[-2].startswith("run: 20") and lines[-2].endswith(f"command: {sys.executable} {script}")


def test_serve_load_counts_every_answer_and_reads_the_servers_peak_memory(tiny_models, tmp_path, capsys):
    """The load benchmark end to end at a tiny scale (tiny encoders, a few requests, a 1500 x 1500 flat PNG):
    every request is counted once, as answered or not, and the server's memory is read."""
    from fusion.benchmarks.serve_load import main

    summary = main(["--workdir", str(tmp_path), "--text-model", str(tiny_models[0]), "--image-model",
                    str(tiny_models[1]), "--size", "12", "--clients", "1,16", "--requests", "2", "--big", "3",
                    "--big-side", "1500"])
    cases = summary["cases"]
    assert set(cases) == {"1", "16", "big_png"}
    for name, case in cases.items():
        counted = case["answered_200"] + case["answered_503"] + case["non_503_5xx"] + case["other_4xx"] + \
            case["unanswered"]
        assert counted == case["requests"] == {"1": 2, "16": 32, "big_png": 3}[name]
        assert case["answered_200"] == case["requests"] and case["peak_rss_mb"] > 100, case  # torch alone is more
    assert summary["non_503_5xx_total"] == 0 and summary["unanswered_total"] == 0
    assert summary["batching_gain_16_over_1"] > 0 and cases["big_png"]["side"] == 1500
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == summary
