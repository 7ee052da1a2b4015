"""Evaluation metrics, the doctest sandbox and the comparison table, without models."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import pytest

from kubeforge.evaluate.compare import comparison_rows, write_plots, write_table
from kubeforge.evaluate.generation import corpus_bleu, exact_match, parse_rate, rouge_l, text_metrics
from kubeforge.evaluate.sources import find_model_folder
from kubeforge.formats.functions import function_header, parses
from kubeforge.sandbox import DoctestCase, isolation, run_doctests

pytestmark = pytest.mark.unit


def function(body: str, example: str = ">>> add(1, 2)\n    3", name: str = "add", args: str = "a, b") -> str:
    return f'def {name}({args}):\n    """Add.\n\n    {example}\n    """\n{body}'


# ---------------------------------------------------------------------------------------------
# text metrics


def test_exact_match_ignores_surrounding_whitespace_only() -> None:
    assert exact_match(["  return a + b\n", "return a-b", "x"], ["return a + b", "return a - b", "x"]) == pytest.approx(
        2 / 3
    )
    assert exact_match([], []) is None


def test_bleu_is_sacrebleus_corpus_score_on_its_0_to_100_scale() -> None:
    assert corpus_bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)
    # 1-gram 5/6, 2-gram 3/5, 3-gram 1/4, 4-gram 0/3 with sacrebleu's default exponential smoothing.
    assert corpus_bleu(["the cat is on the mat"], ["the cat sat on the mat"]) == pytest.approx(37.9918, abs=1e-3)
    assert corpus_bleu(["xyzzy plugh"], ["the cat sat on the mat"]) == pytest.approx(0.0, abs=1e-6)


def test_rouge_l_is_the_mean_lcs_f1() -> None:
    # LCS 3 of 3 predicted and 6 reference tokens: P=1, R=0.5, F1=2/3; the second pair is identical.
    score = rouge_l(["the cat sat", "a b c"], ["the cat sat on the mat", "a b c"])
    assert score == pytest.approx((2 / 3 + 1.0) / 2)
    assert rouge_l(["nothing shared"], ["the cat"]) == 0.0


def test_text_metrics_reject_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        text_metrics(["a", "b"], ["a"])


def test_parse_rate_counts_sources_that_parse() -> None:
    good = "def f(x):\n    return x + 1\n"
    truncated = "def f(x):\n    return (x +\n"
    assert parses(good) and not parses(truncated) and not parses("x = 1\x00")
    header = 'def f(x):\n    """Add one."""\n'
    bodies = ["    return x + 1\n", "    return (x +\n", "    \n", "", "    # x plus one\n    # done\n", "    pass\n"]
    # The header alone parses: a blank or comment-only generation must not count as valid Python.
    assert parses(header) and parses(header + bodies[4])
    assert parse_rate([header] * 6, bodies) == pytest.approx(2 / 6)
    assert parse_rate([], []) is None


def test_function_header_of_instruction_and_preference_records() -> None:
    header = 'def f():\n    """Doc."""\n'
    assert function_header({"instruction": "Write it.", "input": header, "output": "    return 1\n"}) == header
    assert function_header({"prompt": f"Write the body of this Python function.\n\n{header}"}) == header


# ---------------------------------------------------------------------------------------------
# doctest sandbox


def test_doctests_pass_fail_and_no_tests() -> None:
    outcomes = run_doctests(
        [
            DoctestCase(function("    return a + b\n"), "add"),
            DoctestCase(function("    return a - b\n"), "add"),
            DoctestCase("def add(a, b):\n    return a + b\n", "add"),
            DoctestCase("def add(a, b:\n", "add"),
        ],
        timeout_s=5,
    )
    assert [o.status for o in outcomes] == ["passed", "failed", "no_tests", "error"]
    assert outcomes[0].passed and outcomes[0].attempted == 1
    assert outcomes[1].failed == 1 and not outcomes[1].passed
    assert "SyntaxError" in outcomes[3].detail


def test_an_infinite_loop_times_out_without_taking_down_the_other_cases() -> None:
    looping = DoctestCase(function("    while True:\n        pass\n"), "add")
    swallowing = DoctestCase(
        function("    while True:\n        try:\n            while True:\n                pass\n"
                 "        except BaseException:\n            pass\n"),
        "add",
    )
    good = DoctestCase(function("    return a + b\n"), "add")
    started = time.monotonic()
    outcomes = run_doctests([good, looping, good, swallowing, good], timeout_s=1.0)
    assert [o.status for o in outcomes] == ["passed", "timeout", "passed", "timeout", "passed"]
    assert time.monotonic() - started < 15


def test_a_case_that_blocks_the_alarm_is_killed_by_the_parent_and_the_rest_rerun() -> None:
    blocking = DoctestCase(
        function("    import signal\n    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})\n"
                 "    while True:\n        pass\n"),
        "add",
    )
    crashing = DoctestCase(function("    import os\n    os._exit(3)\n"), "add")
    good = DoctestCase(function("    return a + b\n"), "add")
    outcomes = run_doctests([blocking, good, crashing, good], timeout_s=1.0)
    assert [o.status for o in outcomes] == ["timeout", "passed", "crashed", "passed"]


def test_the_network_is_unreachable_from_a_doctest() -> None:
    connecting = DoctestCase(
        function(
            "    import socket\n    socket.create_connection(('1.1.1.1', 80), timeout=3).close()\n    return True\n",
            example=">>> connect()\n    True",
            name="connect",
            args="",
        ),
        "connect",
    )
    [outcome] = run_doctests([connecting], timeout_s=5)
    # Contained when a network namespace is available; else the connection must at least fail here.
    assert outcome.status == "failed", (outcome, isolation())


def test_functions_see_their_modules_globals_and_methods_replace_the_class_method() -> None:
    uses_global = DoctestCase(
        function("    return ascii_lowercase[:n]\n", example=">>> first(3)\n    'abc'", name="first", args="n"),
        "first",
        module="string",
    )
    # A method of a standard-library class: the doctest calls it through the class, so the generated
    # version must be the one that runs (here a wrong one, which must fail).
    wrong_method = DoctestCase(
        'def limit_denominator(self, max_denominator=1000000):\n    """Closest.\n\n'
        "    >>> Fraction('3.141592653589793').limit_denominator(10)\n    Fraction(22, 7)\n    \"\"\"\n"
        "    return self\n",
        "limit_denominator",
        module="fractions",
        qualname="Fraction.limit_denominator",
    )
    real_afterwards = DoctestCase(
        'def check():\n    """\n    >>> Fraction(\'3.141592653589793\').limit_denominator(10)\n'
        '    Fraction(22, 7)\n    """\n',
        "check",
        module="fractions",
    )
    outcomes = run_doctests([uses_global, wrong_method, real_afterwards], timeout_s=5)
    assert [o.status for o in outcomes] == ["passed", "failed", "passed"]


def test_doctests_run_in_a_scratch_directory_with_a_clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    case = DoctestCase(
        function(
            "    import os\n    return (os.getcwd() != start, 'HTTPS_PROXY' in os.environ)\n",
            example=">>> where(None)\n    (True, False)",
            name="where",
            args="start",
        ).replace("where(None)", f"where({str(Path.cwd())!r})"),
        "where",
    )
    [outcome] = run_doctests([case], timeout_s=5)
    assert outcome.passed, outcome


# ---------------------------------------------------------------------------------------------
# comparison


SCORES = {
    "candidate": {"perplexity": 10.0, "exact_match": 0.5, "bleu": 30.0, "rouge_l": 0.6, "parse_rate": None,
                  "doctest_pass_rate": None},
    "base": {"perplexity": 12.0, "exact_match": 0.25, "bleu": 20.0, "rouge_l": 0.5, "parse_rate": None,
             "doctest_pass_rate": None},
    "champion": {"perplexity": None, "exact_match": 0.5, "bleu": 35.0, "rouge_l": 0.7, "parse_rate": None,
                 "doctest_pass_rate": None},
}


def test_comparison_rows_hold_deltas_against_base_and_champion() -> None:
    rows = {row["model"]: row for row in comparison_rows(SCORES)}
    assert list(rows) == ["candidate", "base", "champion"]
    assert rows["candidate"]["perplexity_vs_base"] == pytest.approx(-2.0)
    assert rows["candidate"]["bleu_vs_champion"] == pytest.approx(-5.0)
    assert rows["candidate"]["perplexity_vs_champion"] is None  # the champion has no perplexity
    assert rows["base"]["perplexity_vs_base"] is None  # no delta against itself
    assert rows["champion"]["exact_match_vs_base"] == pytest.approx(0.25)


def test_table_and_plots_are_written(tmp_path: Path) -> None:
    rows = comparison_rows(SCORES)
    write_table(rows, tmp_path / "c.csv", tmp_path / "c.md")
    with (tmp_path / "c.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert [r["model"] for r in table] == ["candidate", "base", "champion"]
    assert table[0]["perplexity"] == "10" and table[0]["parse_rate"] == "" and table[2]["perplexity"] == ""
    assert "parse_rate_vs_base" not in table[0]  # a delta column nobody has a number for is left out
    assert table[0]["rouge_l_vs_champion"] == "-0.1"
    markdown = (tmp_path / "c.md").read_text()
    assert markdown.startswith("| model | perplexity |") and "| candidate | 10 |" in markdown
    plots = write_plots(SCORES, tmp_path / "plots")
    assert sorted(p.name for p in plots) == ["bleu.png", "generation.png", "perplexity.png"]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in plots)


def test_a_downloaded_model_folder_is_found_with_its_tokenizer(tmp_path: Path) -> None:
    model = tmp_path / "artifacts" / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    assert find_model_folder(tmp_path) is None  # no weights
    (model / "model.safetensors").write_bytes(b"")
    assert find_model_folder(tmp_path) is None  # no tokenizer
    tokenizer = tmp_path / "artifacts" / "components" / "tokenizer"
    tokenizer.mkdir(parents=True)
    (tokenizer / "tokenizer.json").write_text("{}")
    assert find_model_folder(tmp_path) == (model, tokenizer)
    (model / "tokenizer_config.json").write_text("{}")
    assert find_model_folder(tmp_path) == (model, model)


def writing(path: Path) -> DoctestCase:
    """A function that writes `path` and says whether it could."""
    return DoctestCase(
        function(
            f"    try:\n        open({str(path)!r}, 'w').write('pwned')\n    except OSError:\n        return False\n"
            "    return True\n",
            example=">>> write()\n    True",
            name="write",
            args="",
        ),
        "write",
    )


def test_generated_code_cannot_write_outside_its_scratch_folder(tmp_path: Path) -> None:
    """A checkpoint or the MLflow database on the work volume is out of its reach (Landlock)."""
    if not isolation().writes:
        pytest.skip("no Landlock on this kernel: the write sandbox cannot be tested here")
    target = tmp_path / "checkpoint.pt"
    [outcome] = run_doctests([writing(target)], timeout_s=5)
    assert outcome.status == "failed" and not target.exists(), outcome
    # Its own scratch folder (its working directory and TMPDIR) stays writable.
    scratch = DoctestCase(
        function("    import os, tempfile\n    open('here.txt', 'w').write('x')\n"
                 "    return tempfile.mkstemp()[0] > 0 and os.path.exists('here.txt')\n",
                 example=">>> scratch()\n    True", name="scratch", args=""),
        "scratch",
    )
    [outcome] = run_doctests([scratch], timeout_s=5)
    assert outcome.passed, outcome


def test_on_kubernetes_unconfined_doctests_are_refused_unless_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    from kubeforge.errors import StageError
    from kubeforge.evaluate.stage import _check_confinement
    from kubeforge.sandbox import Isolation
    from kubeforge.spec.evaluate import EvaluateSpec

    unconfined, complete = Isolation("namespace (unshare -rn)", None), Isolation("namespace", "landlock")
    lines: list[str] = []
    _check_confinement(EvaluateSpec(), unconfined, lines.append)  # a laptop: runs, and says how
    assert "writes: unconfined" in lines[0]
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    with pytest.raises(StageError, match=r"spec\.evaluate\.allow_unconfined_doctests: this pod cannot confine"):
        _check_confinement(EvaluateSpec(), unconfined, lines.append)
    _check_confinement(EvaluateSpec(), complete, lines.append)
    _check_confinement(EvaluateSpec(allow_unconfined_doctests=True), unconfined, lines.append)
