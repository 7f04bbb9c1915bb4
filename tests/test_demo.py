"""`python -m gqa_jax.demo` at a small size: it learns, grades itself right, reports decoding speed, saves and loads."""

from __future__ import annotations

import re

import numpy as np
import pytest

from gqa_jax.demo.__main__ import main
from gqa_jax.demo.task import Examples, decode

# The short runs share every shape (8 rows, 4 new tokens: 2 prompt rows + 6 problems, and the speed test's batch),
# so one process compiles the generation loops once for all of them.
SHORT = ["--size", "tiny", "--max-digits", "3", "--batch-size", "8", "--eval-examples", "6", "--decode-tokens", "4",
         "--prompt", "931"]
SAMPLE = r"^\s+(sort|reverse)\s+(\d+) -> (\S*)\s+(ok|wrong, expected (\d+))$"


@pytest.mark.slow  # ~20 s on one CPU core: 300 training steps
def test_demo_learns_and_reports(capsys):
    # 32 rows everywhere (30 problems + the prompt's 2), so the speed test reuses the compiled cached loop
    argv = ["--size", "tiny", "--steps", "300", "--max-digits", "3", "--batch-size", "32", "--eval-examples", "30",
            "--decode-tokens", "4", "--prompt", "931", "--seed", "1"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    out = captured.out

    losses = [float(x) for x in re.findall(r"loss (\d+\.\d+)", captured.err)]  # one line per tenth of the run
    assert len(losses) == 10 and losses[-1] < losses[0] / 2, losses

    samples = re.findall(SAMPLE, out, re.MULTILINE)
    assert [s[:2] for s in samples[:2]] == [("sort", "931"), ("reverse", "931")]
    assert len(samples) == 8
    for op, digits, answer, verdict, expected in samples:  # the demo grades against the true answer
        truth = "".join(sorted(digits)) if op == "sort" else digits[::-1]
        assert (verdict == "ok") == (answer == truth)
        assert verdict == "ok" or expected == truth

    accuracy = float(re.search(r"accuracy on 30 new problems: (\d+\.\d)% exact", out).group(1))
    assert accuracy >= 50.0, out  # chance is far below: the model learned the task

    speeds = re.findall(r"([\d,]+) tokens/s", out)
    assert len(speeds) == 2 and all(float(s.replace(",", "")) > 0 for s in speeds)
    assert re.search(r"the cache is \d+\.\dx faster", out)


@pytest.mark.parametrize("steps", [1, 100])
def test_short_runs_train_and_report(steps, capsys):
    # 100 steps used to crash: the warm-up took every step and left the cosine decay none.
    assert main([*SHORT, "--steps", str(steps), "--seed", "2"]) == 0
    assert re.search(r"accuracy on 6 new problems: \d+\.\d% exact", capsys.readouterr().out)


def test_help_lists_the_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    usage = capsys.readouterr().out
    for flag in ("--steps", "--size", "--implementation", "--batch-size", "--prompt", "--seed"):
        assert flag in usage


def test_bad_flags(capsys):
    assert main(["--prompt", "12a4"]) == 2
    assert "1 to max_digits=8 digits, got '12a4'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--steps", "0"])
    assert "--steps must be >= 1, got 0" in capsys.readouterr().err


def test_task_data_is_what_it_says():
    examples = Examples.random(np.random.default_rng(119), 50, 6)
    tokens, weights = examples.training_batch()
    prompts, prompt_lengths = examples.prompts()
    for i in range(50):
        k = examples.lengths[i]
        digits = "".join(map(str, examples.digits[i, :k]))
        op = "S" if examples.ops[i] == 0 else "R"
        answer = "".join(sorted(digits)) if op == "S" else digits[::-1]
        assert decode(tokens[i]) == f"{op}{digits}={answer}"
        assert decode(prompts[i, : prompt_lengths[i]]) == f"{op}{digits}="
        assert np.flatnonzero(weights[i]).tolist() == list(range(k + 1, 2 * k + 2))  # predictions of answer + end


def test_save_then_load_generates_the_same_without_training(tmp_path, capsys, monkeypatch):
    for name in ("FORCE_COLOR", "TTY_COMPATIBLE"):  # stdout and stderr are captured: not a terminal
        monkeypatch.delenv(name, raising=False)
    path = tmp_path / "demo.msgpack"
    assert main([*SHORT, "--steps", "20", "--seed", "3", "--save", str(path)]) == 0
    trained = capsys.readouterr()
    assert "\r" not in trained.err + trained.out and "\x1b" not in trained.err + trained.out
    progress = trained.err.splitlines()[-10:]  # plain lines, one per tenth: count, rate, elapsed, ETA, loss
    for i, line in enumerate(progress):
        assert re.fullmatch(rf"train +{2 * (i + 1)}/20 ([\d,.]+|\?) (steps/s|s/step) \d+:\d\d:\d\d ETA "
                            r"(\d+:\d\d:\d\d|-:--:--) loss \d+\.\d{4}", line), progress
    assert f"saved the trained model to {path}" in trained.out

    # No --size or --max-digits: they come from the file.
    assert main(["--load", str(path), "--batch-size", "8", "--eval-examples", "6", "--decode-tokens", "4",
                 "--prompt", "931", "--seed", "3"]) == 0
    loaded = capsys.readouterr()
    assert "train:" not in loaded.out and "loss" not in loaded.err
    assert f"loaded the trained model from {path} (size tiny, up to 3 digits)" in loaded.out
    results = lambda out: re.findall(SAMPLE, out, re.MULTILINE) + re.findall(r"^accuracy on .*$", out, re.MULTILINE)
    assert len(results(loaded.out)) == 2 + 6 + 1  # the prompt's 2 operations, 6 new problems, the accuracy
    assert results(loaded.out) == results(trained.out)


def test_load_refuses_what_it_cannot_use(tmp_path, capsys):
    assert main(["--load", str(tmp_path / "missing.msgpack")]) == 2
    assert "error: --load: [Errno 2] No such file or directory" in capsys.readouterr().err

    garbage = tmp_path / "garbage.msgpack"
    garbage.write_bytes(b"not a checkpoint")
    assert main(["--load", str(garbage)]) == 2
    assert f"error: --load: {str(garbage)!r} is not a gqa-jax demo model" in capsys.readouterr().err
