"""The evidence benchmarks: answer extraction, constructions, intervals, bucketing, tiny real runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from evaluation import decode_fidelity as D
from evaluation import divergence as DV
from evaluation import evidence_cli
from evaluation import task_data as TD
from evaluation import tasks as T
from evaluation.significance import mcnemar_exact, paired_bootstrap, wilson
from infokv_local.bench.kl_ratios import all_kl_ratios, kl_ratios, markdown_ratios
from infokv_local.llamacpp.model import Model

# ---- answer extraction ---------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("She makes 9 * 2 = $18 every day.\nThe answer is 18.", "18"),
    ("so 3 bolts.\n\nThe answer is \\(\\boxed{3}\\).", "3"),
    ("Thus the total is \\(\\boxed{3}\\) bolts, 4 more later", "3"),
    ("The answer is: $1,234.50.", "1234.5"),
    ("Janet sells 16 - 3 - 4 = 9 eggs.\n#### 18", "18"),
    ("the answer is 7, not 8. Actually the answer is 12.", "12"),
    ("She has 5 apples and eats 2, leaving 3", "3"),
    ("The temperature drops to -4 degrees; the answer is -4.", "-4"),
    ("The answer is 18.0", "18"),
    ("no digits here at all", None),
])
def test_extract_answer(text: str, expected: str | None) -> None:
    assert T.extract_answer(text) == expected


def test_numeric_match_and_gold() -> None:
    assert TD.gold_answer("He pays 2 + 3 = <<2+3=5>>5\n#### 1,200") == "1200"
    assert T.numeric_match("1200", "1200") and T.numeric_match("18", "18.00")
    assert not T.numeric_match("18", "19") and not T.numeric_match(None, "3")
    assert T.retrieval_correct("The number is 5600228.", ["5600228"])
    assert not T.retrieval_correct("The number is 56002289.", ["5600228"])
    assert T.retrieval_correct("ABCDE, FGHIJ and KLMNO", ["KLMNO", "ABCDE", "FGHIJ"])
    assert not T.retrieval_correct("ABCDE and FGHIJ", ["KLMNO", "ABCDE", "FGHIJ"])


def test_split_sentences_keeps_decimals() -> None:
    q = "A pen costs $2.50 each. Tom buys 3 pens. How much does he pay?"
    assert TD.split_sentences(q) == ["A pen costs $2.50 each.", "Tom buys 3 pens.", "How much does he pay?"]


# ---- constructions -------------------------------------------------------------------------------


def _count(model: Model):
    return lambda text: len(model.tokenize(text, add_special=False, parse_special=False))


@pytest.mark.parametrize("target", [512, 2048])
def test_long_prefill_construction(model: Model, target: int) -> None:
    q = TD.load_questions(limit=3)[2]["question"]
    sents = TD.split_sentences(q)
    assert len(sents) >= 3
    lp = TD.long_prefill_context(q, target, _count(model), seed=5)
    # every background sentence is present, in order, and the inquiry is the last sentence
    at = -1
    for s in sents[:-1]:
        i = lp.context.find(s, at + 1)
        assert i > at, f"sentence missing or out of order: {s!r}"
        at = i
    assert lp.inquiry == sents[-1]
    # the stated length: at most the target, short of it by less than one filler sentence (<= 3%)
    n = _count(model)(lp.context + "\n\n" + lp.inquiry)
    assert n == lp.n_tokens
    assert target * 0.97 <= n <= target
    # the sentences are spread through the filler, not all in one place
    assert lp.context.find(sents[-2]) - lp.context.find(sents[0]) > len(lp.context) // 20
    # the same seed gives the same text, another seed another filler
    assert TD.long_prefill_context(q, target, _count(model), seed=5).context == lp.context
    assert TD.long_prefill_context(q, target, _count(model), seed=6).context != lp.context


def test_long_prefill_block_layout(model: Model) -> None:
    q = TD.load_questions(limit=3)[2]["question"]
    sents = TD.split_sentences(q)
    lp = TD.long_prefill_context(q, 1024, _count(model), seed=5, layout="block")
    # the background is one run of the question's own sentences, in order, somewhere in the filler
    block = " ".join(sents[:-1])
    assert block in lp.context and lp.inquiry == sents[-1]
    assert 1024 * 0.97 <= _count(model)(lp.context + "\n\n" + lp.inquiry) == lp.n_tokens <= 1024
    assert len(lp.context) > 4 * len(block)
    # the same filler as the spread layout of that seed, only the facts placed differently
    spread = TD.long_prefill_context(q, 1024, _count(model), seed=5)
    assert spread.context != lp.context and block not in spread.context

    def filler_only(text: str) -> str:
        for sentence in sents[:-1]:
            gap = sentence + " " if sentence + " " in text else " " + sentence
            text = text.replace(gap, "", 1)
        return text

    assert filler_only(spread.context) == filler_only(lp.context)
    with pytest.raises(ValueError, match="unknown layout"):
        TD.long_prefill_context(q, 1024, _count(model), seed=5, layout="scattered")


def test_retrieval_constructions(model: Model) -> None:
    count = _count(model)
    niah = TD.niah_item(1024, count, seed=3)
    assert f"is: {niah['answers'][0]}." in niah["prompt"] and 0.95 * 1024 <= count(niah["prompt"]) <= 1024
    vt = TD.variable_tracking_item(1024, count, seed=3)
    names = vt["answers"]
    assert len(set(names)) == 5 and 0.95 * 1024 <= count(vt["prompt"]) <= 1024
    positions = [vt["prompt"].find(f"VAR {v} =") for v in names]
    assert all(p >= 0 for p in positions) and positions == sorted(positions)


# ---- intervals and bucketing ---------------------------------------------------------------------


def test_retrieval_items_follow_the_ids_and_kinds(model: Model) -> None:
    """--offset chooses other needles (the question id is the construction's seed), --kinds which items."""
    items = T.build_items("retrieval", model, [{"id": "3"}, {"id": "4"}], [512], 0, kinds=["niah"])
    assert [it.item_id for it in items] == ["niah-3@512", "niah-4@512"]
    assert items[0].prompt == TD.niah_item(512, _count(model), 3)["prompt"] != items[1].prompt
    both = T.build_items("retrieval", model, [{"id": "0"}], [512], 0)
    assert [it.kind for it in both] == ["niah", "variable_tracking"]
    with pytest.raises(ValueError, match="unknown retrieval kind"):
        T.build_items("retrieval", model, [{"id": "0"}], [512], 0, kinds=["needles"])


def test_wilson_known_values() -> None:
    lo, hi = wilson(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    lo, hi = wilson(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = wilson(81, 100)
    assert lo == pytest.approx(0.7222, abs=1e-4) and hi == pytest.approx(0.8749, abs=1e-4)
    assert wilson(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError, match="need 0 <= k <= n"):
        wilson(11, 10)


def test_paired_intervals_known_values() -> None:
    assert mcnemar_exact([1] * 6, [0] * 6) == (6, 0, pytest.approx(0.03125))
    assert mcnemar_exact([1, 1, 1, 1, 1, 0, 1], [0, 0, 0, 0, 0, 1, 1]) == (5, 1, pytest.approx(0.21875))
    assert mcnemar_exact([1, 0], [1, 0]) == (0, 0, 1.0)
    assert paired_bootstrap([1] * 8, [0] * 8) == (1.0, 1.0, 1.0)
    assert paired_bootstrap([1, 0, 1], [1, 0, 1]) == (0.0, 0.0, 0.0)
    a = [1, 1, 1, 0, 1, 0, 1, 1, 0, 1]
    b = [1, 0, 1, 0, 0, 0, 1, 0, 0, 1]
    mean, lo, hi = paired_bootstrap(a, b, n_boot=20000, seed=1)
    assert mean == pytest.approx(0.3)
    # the differences are 3 ones and 7 zeros: the bootstrap mean is Binomial(10, 0.3) / 10
    assert lo == pytest.approx(0.0) and hi == pytest.approx(0.6)


def test_bucket_by_distance_fixed_inputs() -> None:
    dist = [-3, 0, 5, 127, 128, 300, 511, 512, 2047, 2048, 9000]
    kl = [9.0, 1.0, 2.0, 3.0, 10.0, 20.0, 30.0, 100.0, 200.0, 1000.0, 3000.0]
    out = D.bucket_by_distance(dist, kl)
    assert D.bucket_labels() == ["0-128", "128-512", "512-2K", "2K+"]
    assert out == {"0-128": {"mean": 2.0, "n": 3}, "128-512": {"mean": 20.0, "n": 3},
                   "512-2K": {"mean": 150.0, "n": 2}, "2K+": {"mean": 2000.0, "n": 2}}
    assert D.bucket_by_distance([0, 1], [1.0, 3.0]) == {"0-128": {"mean": 2.0, "n": 2}}


def test_summarize_pairs_the_same_items() -> None:
    recs = []
    for i, (x, y, f) in enumerate([(1, 0, 1), (1, 1, 1), (0, 0, 1), (1, 0, 0)]):
        base = {"task": "t", "model": "m", "length": None, "item_id": str(i)}
        recs += [dict(base, policy="infokv", budget_spec="128", correct=bool(x)),
                 dict(base, policy="h2o", budget_spec="128", correct=bool(y)),
                 dict(base, policy="full", budget_spec="full", correct=bool(f))]
    recs.append({"task": "t", "model": "m", "length": None, "item_id": "9", "policy": "h2o", "budget_spec": "128",
                 "correct": True})  # not answered by infokv: left out of the pairing
    rows = {(r["policy"], r["budget"]): r for r in T.summarize(recs)}
    inf = rows[("infokv", "128")]
    assert (inf["n"], inf["correct"]) == (4, 3) and inf["ci95"] == pytest.approx(list(wilson(3, 4)))
    assert inf["paired"]["h2o"]["n"] == 4 and inf["paired"]["h2o"]["diff"] == pytest.approx(0.5)
    assert (inf["paired"]["h2o"]["wins"], inf["paired"]["h2o"]["losses"]) == (2, 0)
    assert inf["paired"]["full"]["diff"] == 0.0
    assert rows[("h2o", "128")]["n"] == 5


def test_summary_pairs_each_reference_policy_with_every_other(tmp_path: Path, capsys) -> None:
    log = tmp_path / "dp.jsonl"
    outcomes = {"full": (1, 1, 1, 0), "infokv": (1, 0, 0, 0), "rkv": (1, 1, 0, 1), "h2o": (0, 0, 0, 0)}
    recs = [{"task": "decode-pressure", "model": "m", "length": None, "item_id": str(i), "policy": p,
             "budget_spec": "full" if p == "full" else "128", "correct": bool(x[i])}
            for p, x in outcomes.items() for i in range(4)]
    log.write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert evidence_cli.main(["summary", str(log), "--reference", "rkv,infokv"]) == 0
    out = capsys.readouterr().out
    assert "| rkv − policy (bootstrap 95%) |" in out and "| infokv − policy (bootstrap 95%) |" in out
    rows = {r["policy"]: r for r in json.loads(log.with_suffix(".json").read_text())["results"]}
    assert set(rows["rkv"]["paired"]) == {"full", "infokv", "h2o"}
    assert set(rows["infokv"]["paired"]) == {"full", "rkv", "h2o"} and "paired" not in rows["h2o"]
    assert rows["rkv"]["paired"]["full"]["diff"] == pytest.approx(0.0)
    assert (rows["rkv"]["paired"]["infokv"]["wins"], rows["rkv"]["paired"]["infokv"]["losses"]) == (2, 0)
    assert rows["infokv"]["paired"]["full"]["diff"] == pytest.approx(-0.5)


def test_summary_of_one_budget_on_the_items_all_policies_answered(tmp_path: Path, capsys) -> None:
    """A log holding some policies on 4 questions and others on 2, at two budgets: ``--budget`` keeps one budget
    and the full cache, ``--common`` the questions every row answered."""
    def rec(i: int, policy: str, spec: str, ok: bool) -> dict:
        return {"task": "decode-pressure", "model": "m", "length": None, "item_id": f"gsm8k-{i}", "policy": policy,
                "budget_spec": spec, "correct": ok}

    recs = [rec(i, "full", "full", True) for i in range(4)] + [rec(i, "infokv", "128", i < 3) for i in range(4)]
    recs += [rec(i, "tova", "128", i == 1) for i in range(2)] + [rec(i, "infokv", "256", True) for i in range(3)]
    assert [r["item_id"] for r in T.select_records(recs, ["128"], common=True)] == ["gsm8k-0", "gsm8k-1"] * 3
    assert len(T.select_records(recs, ["128"])) == 10 and len(T.select_records(recs, None, common=True)) == 8
    log = tmp_path / "dp.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = tmp_path / "b128.json"
    assert evidence_cli.main(["summary", str(log), "--budget", "128", "--common", "--out", str(out)]) == 0
    rows = {(r["policy"], r["budget"]): r for r in json.loads(out.read_text())["results"]}
    assert set(rows) == {("full", "full"), ("infokv", "128"), ("tova", "128")}
    assert {r["n"] for r in rows.values()} == {2} and rows[("infokv", "128")]["paired"]["tova"]["wins"] == 1
    with pytest.raises(SystemExit, match="no records at budget 512 .its budgets: 128, 256, full"):
        evidence_cli.main(["summary", str(log), "--budget", "512", "--out", str(out)])
    # leaving out the policy run on fewer questions: the others' rows keep all four
    assert len(T.select_records(recs, ["128"], common=True, policies=["infokv"])) == 8
    assert evidence_cli.main(["summary", str(log), "--budget", "128", "--policies", "infokv", "--common",
                              "--out", str(out)]) == 0
    rows = {(r["policy"], r["budget"]): r for r in json.loads(out.read_text())["results"]}
    assert set(rows) == {("full", "full"), ("infokv", "128")} and {r["n"] for r in rows.values()} == {4}
    with pytest.raises(SystemExit, match="no records of h2o .its policies: full, infokv, tova"):
        evidence_cli.main(["summary", str(log), "--policies", "h2o", "--out", str(out)])
    capsys.readouterr()


def test_accuracy_plots_take_all_correct_whose_interval_rounds_below_one(tmp_path: Path) -> None:
    from evaluation import plots
    from evaluation.significance import wilson

    lo, hi = wilson(10, 10)
    assert hi < 1.0  # 0.9999999...: an error bar from 1.0 to it is negative
    results = [{"task": "retrieval", "model": "m", "length": 4096, "policy": p, "budget": b, "n": 10, "correct": 10,
                "accuracy": 1.0, "ci95": [lo, hi]} for p, b in (("full", "full"), ("infokv", "r0.25"))]
    assert plots.plot_task_accuracy(results, tmp_path / "t.png").stat().st_size > 1000
    rows = [{"task": "retrieval", "model": "m", "length": 4096, "policy": "infokv", "budget": "r0.25", "n": 10,
             "correct_a": 10, "correct_b": 0, "ci95_a": [lo, hi], "ci95_b": list(wilson(0, 10)), "mcnemar_p": 0.002}]
    assert plots.plot_paired_accuracy(rows, tmp_path / "p.png").stat().st_size > 1000


def test_compare_pairs_two_logs_of_the_same_items(tmp_path: Path, capsys) -> None:
    def rec(i: int, policy: str, spec: str, ok: bool | None, **kw) -> dict:
        return {"task": "retrieval", "model": "m", "length": 4096, "item_id": f"niah-{i}", "policy": policy,
                "budget_spec": spec, "correct": ok, **kw}

    on = [rec(i, "infokv", "r0.25", True) for i in range(8)] + [rec(8, "infokv", "r0.25", True)]  # 8: not in b
    on += [rec(0, "snapkv", "r0.25", True)]  # snapkv: only in a, not compared
    off = [rec(i, "infokv", "r0.25", i == 3) for i in range(8)] + [rec(9, "infokv", "r0.25", None, skipped=True)]
    rows = T.compare_logs(on, off)
    assert len(rows) == 1
    r = rows[0]
    assert (r["policy"], r["n"], r["correct_a"], r["correct_b"], r["wins"], r["losses"]) == ("infokv", 8, 8, 1, 7, 0)
    assert r["mcnemar_p"] == pytest.approx(2 / 2**7) and r["diff"] == pytest.approx(7 / 8)
    assert r["ci95_b"] == pytest.approx(list(wilson(1, 8))) and r["ci95"][0] > 0

    a, b = tmp_path / "on.jsonl", tmp_path / "off.jsonl"
    a.write_text("".join(json.dumps(x) + "\n" for x in on))
    b.write_text("".join(json.dumps(x) + "\n" for x in off))
    png = tmp_path / "c.png"
    assert evidence_cli.main(["compare", str(a), str(b), "--json", str(tmp_path / "c.json"), "--plot", str(png),
                              "--label-a", "probed", "--label-b", "chunked"]) == 0
    out = capsys.readouterr().out
    assert "| retrieval | 4096 | r0.25 | infokv | 8 | 8 [0.68, 1.00] | 1 [0.02, 0.47] | +0.88" in out
    assert json.loads((tmp_path / "c.json").read_text())["results"][0]["wins"] == 7
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
    assert evidence_cli.main(["compare", str(a), str(tmp_path / "missing.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("reference, other, kind, numbers", [
    ("So 80 + 150 = 230.", "So 8 + 15 = 23.", DV.NUMBER_COPIED, ("80", "8")),  # 80 is in the question
    ("So 80 + 150 = 230.", "So 80 + 15 = 23.", DV.NUMBER_NEW, ("150", "15")),
    ("Total: 49.50 + 67", "Total: 49 + 67", DV.NUMBER_COPIED, ("49.50", "49")),
    ("Earns 700 + 450", "Earns 750 + 450", DV.NUMBER_COPIED, ("700", "750")),
    ("We know 80. Then", "We know 80, then", DV.OTHER, None),  # the same number, then other text
    ("Step 3: add", "Step three: add", DV.NUMBER_NEW, ("3", None)),
    ("a b c", "a b d", DV.OTHER, None),
    ("same", "same", DV.SAME, None),
])
def test_divergence_classifies_where_two_replies_part(reference: str, other: str, kind: str, numbers) -> None:
    got = DV.classify(reference, other, context="He pays 80 dollars, then 49.50 and 700 more.")
    assert got["kind"] == kind
    if numbers is not None:
        assert (got["reference_number"], got["other_number"]) == numbers
    if kind != DV.SAME:  # the snippets mark where the texts part
        before, after = got["reference"].split("⟨")
        assert reference[:got["at"]].endswith(before) and after.startswith(reference[got["at"]:][:5])
        assert got["other"].split("⟨")[1].startswith(other[got["at"]:][:5])


def test_the_question_numbers_a_reply_never_writes() -> None:
    question = "Tom buys 1,200 apples at 3 dollars and sells 45 of them for 7 dollars."
    reference = "1200 apples x 3 = 3600. He sells 45 at 7: 315."
    assert DV.question_numbers_dropped(question, reference, "1200 apples x 8 = 9600. He sells 45 at 7.") == ["3"]
    assert DV.question_numbers_dropped(question, reference, "1,200 x 3, then 45 x 7") == []
    assert DV.question_numbers_dropped(question, "no numbers", "none") == []  # only what the reference used
    rows = [{"outcome": "lost", "kind": DV.OTHER, "question_numbers_dropped": ["3"]},
            {"outcome": "lost", "kind": DV.OTHER, "question_numbers_dropped": []}]
    assert DV.counts(rows) == {"lost": {DV.OTHER: 2, DV.QUESTION_NUMBER_DROPPED: 1}, "won": {}}


def test_diverge_command_counts_the_question_numbers_lost(tmp_path: Path, capsys) -> None:
    """GSM8K test question 0 (16 eggs a day, $2 each): a lost reply that never writes the 16 the full cache used."""
    log = [{"task": "decode-pressure", "model": "m", "length": None, "item_id": "gsm8k-0", "policy": p,
            "budget_spec": spec, "correct": ok, "text": text}
           for p, spec, ok, text in [("full", "full", True, "16 - 3 - 4 = 9 eggs, 9 x 2 = 18"),
                                     ("infokv", "128", False, "6 - 3 - 4 = -1 eggs, so 2")]]
    path = tmp_path / "log.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in log))
    assert evidence_cli.main(["diverge", str(path), "--policy", "infokv", "--json", str(tmp_path / "d.json")]) == 0
    assert "in 1 of them a number of the question that full's reply used is never written" in capsys.readouterr().out
    assert json.loads((tmp_path / "d.json").read_text())["items"][0]["question_numbers_dropped"] == ["16"]


def test_diverge_command_reads_lost_and_won_answers(tmp_path: Path, capsys) -> None:
    def rec(i: int, policy: str, ok: bool, text: str, spec: str = "256") -> dict:
        return {"task": "decode-pressure", "model": "m", "length": None, "item_id": f"q-{i}", "policy": policy,
                "budget_spec": "full" if policy == "full" else spec, "correct": ok, "text": text}

    log = [rec(0, "full", True, "a is 80 so 80 + 1 = 81"), rec(0, "infokv", False, "a is 80 so 8 + 1 = 9"),
           rec(1, "full", False, "b is 7 then x"), rec(1, "infokv", True, "b is 7 then y"),
           rec(2, "full", True, "same"), rec(2, "infokv", True, "same"),
           rec(3, "full", True, "c"), rec(3, "infokv", False, "d", spec="128")]
    rows = DV.divergences(log, "infokv", budget="256")
    assert [(r["item_id"], r["outcome"], r["kind"]) for r in rows] == [("q-0", "lost", DV.NUMBER_COPIED),
                                                                       ("q-1", "won", DV.OTHER)]
    assert DV.counts(rows) == {"lost": {DV.NUMBER_COPIED: 1}, "won": {DV.OTHER: 1}}
    assert len(DV.divergences(log, "infokv")) == 3  # every budget
    path = tmp_path / "log.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in log))
    assert evidence_cli.main(["diverge", str(path), "--policy", "infokv", "--budget", "256",
                              "--json", str(tmp_path / "d.json")]) == 0
    out = capsys.readouterr().out
    assert "lost against full: 1 (1 number copied, written differently)" in out and "| q-1 | 256 | won |" in out
    assert json.loads((tmp_path / "d.json").read_text())["counts"]["won"] == {DV.OTHER: 1}
    assert evidence_cli.main(["diverge", str(tmp_path / "none.jsonl"), "--policy", "infokv"]) == 2


# ---- tiny real runs on SmolLM2 -------------------------------------------------------------------


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_tasks_command_tiny_real_run(tmp_path: Path, model_path: Path) -> None:
    out = tmp_path / "dp.json"
    argv = ["tasks", "--task", "decode-pressure", "--model", str(model_path), "--limit", "1", "--max-tokens", "24",
            "--budget", "48", "--buffer", "16", "--policies", "full,infokv,streaming", "--out", str(out),
            "--no-progress"]
    assert evidence_cli.main(argv) == 0
    data = json.loads(out.read_text())
    recs = _lines(out.with_suffix(".jsonl"))
    assert len(recs) == 3 and len(data["items"]) == 3
    by = {r["policy"]: r for r in recs}
    assert all("cpu" in r for r in recs)  # which CPU made each record (greedy texts can differ by CPU)
    assert by["full"]["evicted_tokens"] == 0 and by["full"]["budget"] is None
    for p in ("infokv", "streaming"):
        assert by[p]["budget"] == 48 and by[p]["evicted_tokens"] > 0 and by[p]["max_used_cells"] <= 48 + 16
        assert by[p]["prompt_tokens"] == by["full"]["prompt_tokens"] > 48
    assert {(r["policy"], r["budget"]) for r in data["results"]} == {("full", "full"), ("infokv", "48"),
                                                                     ("streaming", "48")}
    assert all(set(r) >= {"task", "model", "policy", "budget", "n", "correct", "accuracy", "ci95"}
               for r in data["results"])
    # resumable: a rerun generates nothing new; a torn last line is dropped and redone
    assert evidence_cli.main(argv) == 0
    assert len(_lines(out.with_suffix(".jsonl"))) == 3
    text = out.with_suffix(".jsonl").read_text().splitlines()
    out.with_suffix(".jsonl").write_text("\n".join(text[:2]) + "\n" + text[2][:20])
    assert evidence_cli.main(argv) == 0
    again = _lines(out.with_suffix(".jsonl"))
    assert len(again) == 3 and {r["policy"] for r in again} == {"full", "infokv", "streaming"}


def test_every_generation_of_a_run_uses_one_flash_attention_setting(tmp_path: Path, model_path: Path,
                                                                    capsys) -> None:
    """The full cache and every policy on one kernel (engines of different size classes would otherwise take
    different verdicts), recorded, kept on a rerun; a policy needing every query row (H2O) makes it off."""
    out = tmp_path / "fa.json"
    argv = ["tasks", "--task", "decode-pressure", "--model", str(model_path), "--limit", "1", "--max-tokens", "16",
            "--budget", "48", "--buffer", "16", "--policies", "full,snapkv", "--out", str(out), "--no-progress",
            "--parallel", "1", "--flash-attn", "on"]
    assert evidence_cli.main(argv) == 0
    assert {r["flash_attn"] for r in _lines(out.with_suffix(".jsonl"))} == {"on"}
    assert evidence_cli.main([*argv[:-1], "off"]) == 2
    assert "generated with flash attention on, asked for off now" in capsys.readouterr().err
    assert evidence_cli.main([*argv[:-2], "--policies", "full,snapkv,tova"]) == 0  # auto: as the log says
    assert {r["flash_attn"] for r in _lines(out.with_suffix(".jsonl"))} == {"on"}
    assert evidence_cli.main([*argv[:-2], "--policies", "full,h2o"]) == 2  # the log's setting rules H2O out
    assert "generated with flash attention on, which policy 'h2o' cannot use" in capsys.readouterr().err
    h2o = [*argv[:-2], "--policies", "full,h2o", "--out", str(tmp_path / "h2o.json")]
    assert evidence_cli.main([*h2o, "--flash-attn", "on"]) == 2
    assert "policy 'h2o' needs flash attention off" in capsys.readouterr().err
    assert evidence_cli.main(h2o) == 0
    assert {r["flash_attn"] for r in _lines(tmp_path / "h2o.jsonl")} == {"off"}


def test_tasks_long_prefill_and_retrieval_tiny(tmp_path: Path, model_path: Path) -> None:
    for task in ("long-prefill", "long-prefill-block", "retrieval"):
        out = tmp_path / f"{task}.json"
        assert evidence_cli.main(["tasks", "--task", task, "--model", str(model_path), "--limit", "1", "--lengths",
                                  "384", "--max-tokens", "8", "--ratio", "0.25", "--buffer", "32", "--policies",
                                  "full,snapkv", "--out", str(out), "--no-progress"]) == 0
        recs = _lines(out.with_suffix(".jsonl"))
        assert len(recs) == (4 if task == "retrieval" else 2)
        if task == "long-prefill-block":
            assert {r["item_id"] for r in recs} == {"gsm8k-0@384-block"}
        for r in recs:
            assert r["length"] == 384 and r["prompt_tokens"] >= 0.95 * 384
            if r["policy"] == "snapkv":
                assert r["budget"] == int(0.25 * r["prompt_tokens"]) and r["evicted_tokens"] > 0


def test_tasks_with_the_prompt_probe(tmp_path: Path, model_path: Path, capsys) -> None:
    out = tmp_path / "probe.json"
    argv = ["tasks", "--task", "retrieval", "--model", str(model_path), "--limit", "1", "--lengths", "512",
            "--max-tokens", "4", "--ratio", "0.25", "--buffer", "32", "--policies", "full,snapkv", "--out", str(out),
            "--no-progress"]
    assert evidence_cli.main([*argv, "--prompt-probe"]) == 0
    recs = _lines(out.with_suffix(".jsonl"))
    assert len(recs) == 4 and all(r["prompt_probe"] is True for r in recs)
    assert json.loads(out.read_text())["prompt_probe"] is True
    # a rerun without the probe is refused rather than mixed into the same log
    assert evidence_cli.main(argv) == 2
    assert "snapkv was measured with other settings (prompt_probe True there, False now)" in capsys.readouterr().err
    # so is another buffer (records say it; records made before they did were made with the defaults)
    assert all(r["buffer"] == 32 and r["n_recent"] == 32 for r in recs)
    assert evidence_cli.main([*[x if x != "32" else "48" for x in argv], "--prompt-probe"]) == 2
    assert "(buffer 32 there, 48 now)" in capsys.readouterr().err
    assert len(_lines(out.with_suffix(".jsonl"))) == 4
    old = tmp_path / "old.jsonl"  # a record without the settings: the defaults of the time
    old.write_text(json.dumps({k: v for k, v in recs[-1].items() if k not in ("buffer", "n_sink", "n_recent")}) + "\n")
    assert T.read_done(old, {"prompt_probe": True, "buffer": 64, "n_sink": 4, "n_recent": 32})
    with pytest.raises(ValueError, match="buffer 64 there, 32 now"):
        T.read_done(old, {"prompt_probe": True, "buffer": 32, "n_sink": 4, "n_recent": 32})


def test_fidelity_decode_tiny_real_run(tmp_path: Path, model_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "fd.json"
    argv = ["fidelity-decode", "--model", str(model_path), "--limit", "1", "--max-tokens", "48", "--budget", "60,4000",
            "--buffer", "16", "--policies", "infokv,streaming,full", "--traces", str(tmp_path / "tr.jsonl"),
            "--out", str(out), "--by-distance", "--no-progress"]
    assert evidence_cli.main(argv) == 0
    (trace,) = _lines(tmp_path / "tr.jsonl")
    assert len(trace["trace_ids"]) > 16 and len(trace["prompt_ids"]) > 60 + 16
    rows = {(r["policy"], r["budget"]): r for r in json.loads(out.read_text())["results"]}
    assert set(rows) == {("infokv", "60"), ("streaming", "60"), ("infokv", "4000"), ("streaming", "4000")}
    for p in ("infokv", "streaming"):
        r = rows[(p, "60")]
        # the prompt alone overflows 60 + 16: compressed from the prefill on, every trace token counted
        assert r["n_tokens"] == len(trace["trace_ids"]) and r["mean_kl"] > 0
        assert 0 <= r["top1_agreement"] <= 1 and math.isfinite(r["delta_nll"])
        assert sum(b["n"] for b in r["by_distance"].values()) == r["n_tokens"]
        big = rows[(p, "4000")]
        assert big["n_never_compressed"] == 1 and big["n_tokens"] == 0
    assert (tmp_path / "fd-by-distance.png").stat().st_size > 1000
    recs = _lines(out.with_suffix(".jsonl"))
    assert {r["flash_attn"] for r in recs} == {json.loads(out.read_text())["flash_attn"][0]}
    assert all(r["together"] for r in recs)  # the default --parallel 8: replays decoded together
    capsys.readouterr()
    assert evidence_cli.main([*argv, "--parallel", "1"]) == 2  # one by one would mix kernel paths in one log
    assert "(together True there, False now)" in capsys.readouterr().err


def test_replay_counts_from_the_first_compression(model: Model) -> None:
    """The first compression starts the count (the token decoded after it), distances grow by one per token."""
    toks = model.tokenize(TD.cot_prompt("Tom has 3 apples and buys 4 more. How many apples does he have?"))
    trace = {"id": "x", "prompt_ids": toks, "trace_ids": model.tokenize(" He has 7 apples. " * 12, add_special=False)}
    n_all = len(toks) + len(trace["trace_ids"])
    b = n_all - 40  # compresses once the sequence passes b + buffer
    res = D.replay_trace(model, trace, [("h2o", str(b))], buffer=16)[("h2o", str(b))]
    assert res["first_evict"] == b + 16
    d = res["distance"]
    assert d[0] == 0 and d == list(range(len(d)))
    assert len(res["kl"]) == n_all - 1 - res["first_evict"]


def test_replays_run_together_predict_as_they_do_one_by_one(model: Model) -> None:
    """Configs replayed as sequences of one context (more configs than sequences, so sequences are reused, and
    the policies that read the cached keys on streams other than 0) give the one-by-one replay's figures."""
    toks = model.tokenize(TD.cot_prompt("Tom has 3 apples and buys 4 more. How many apples does he have?"))
    trace = {"id": "x", "prompt_ids": toks,
             "trace_ids": model.tokenize(" He has 7 apples, then 5 after giving two away. " * 8, add_special=False)}
    configs = [("infokv", "r0.25"), ("h2o", "r0.25"), ("keydiff", "r0.25"), ("rkv", "r0.125"),
               ("infokv-rkv", "r0.125"), ("streaming", "r0.125"), ("snapkv", "9999")]
    alone = D.replay_trace(model, trace, configs, buffer=16, n_threads=2, flash_attn=False)
    together = D.replay_trace(model, trace, configs, buffer=16, n_threads=2, flash_attn=False, parallel=3)
    assert alone[("snapkv", "9999")]["first_evict"] is None and not together[("snapkv", "9999")]["kl"]
    for key in configs[:-1]:
        a, b = alone[key], together[key]
        assert a["first_evict"] is not None and a["first_evict"] == b["first_evict"], key
        assert a["distance"] == b["distance"] and len(a["kl"]) > 20, key
        # llama.cpp is not batch-invariant in general; on this CPU the figures came out bit-equal
        np.testing.assert_allclose(b["kl"], a["kl"], rtol=1e-3, atol=1e-5, err_msg=str(key))
        np.testing.assert_allclose(b["nll_comp"], a["nll_comp"], rtol=1e-3, atol=1e-5, err_msg=str(key))
        assert np.mean(np.equal(a["agree"], b["agree"])) >= 0.95, key


def test_a_forked_prompt_replays_as_its_own_reading(model: Model) -> None:
    """Configs whose policies read a prompt alike, at one budget, share one reading (the others fork it): one by
    one and together, their figures equal those of replays that each read the prompt."""
    toks = model.tokenize(TD.cot_prompt("Tom has 3 apples and buys 4 more. How many apples does he have?"))
    trace = {"id": "x", "prompt_ids": toks,
             "trace_ids": model.tokenize(" He has 7 apples, then 5 after giving two away. " * 8, add_special=False)}
    configs = [(p, "r0.25") for p in ("snapkv", "rkv", "tova", "infokv", "infokv-rkv", "streaming", "keydiff", "h2o")]
    kw = dict(buffer=32, n_threads=2, flash_attn=False)
    for parallel in (1, 3):
        forked = D.replay_trace(model, trace, configs, parallel=parallel, **kw)
        read = D.replay_trace(model, trace, configs, parallel=parallel, fork=False, **kw)
        assert sum(o["prompt_forked"] for o in forked.values()) == 4  # 8 configs, 4 reading groups
        assert not any(o["prompt_forked"] for o in read.values())
        for key in configs:
            a, b = forked[key], read[key]
            assert a["first_evict"] is not None and a["first_evict"] == b["first_evict"], key
            assert a["distance"] == b["distance"], key
            if parallel == 1:  # each replay decoded alone: deterministic
                assert a["kl"] == b["kl"] and a["nll_comp"] == b["nll_comp"], key
            else:  # together: bit-equal on this CPU, but llama.cpp is not batch-invariant in general
                np.testing.assert_allclose(a["kl"], b["kl"], rtol=1e-3, atol=1e-5, err_msg=str(key))


def test_python_m_evaluation_has_every_research_command() -> None:
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    for sub in ("tasks", "fidelity-decode", "needle-retention", "summary", "compare", "diverge"):
        res = subprocess.run([sys.executable, "-m", "evaluation", sub, "--help"], cwd=root, capture_output=True,
                             text=True, timeout=120)
        assert res.returncode == 0 and "usage: python -m evaluation " + sub in res.stdout, res.stderr


def test_kl_ratios_fixed_inputs() -> None:
    def rec(item: str, policy: str, kl: list[float]) -> dict:
        return {"model": "m", "budget_spec": "r0.25", "item_id": item, "policy": policy, "kl": kl}

    recs = [rec("a", "infokv", [1.0, 1.0]), rec("a", "h2o", [2.0, 2.0]), rec("a", "snapkv", [1.0, 3.0]),
            rec("b", "infokv", [3.0]), rec("b", "h2o", [6.0]), rec("b", "snapkv", [4.0]),
            rec("c", "h2o", [9.0])]  # trace c has no infokv record: not paired
    (r,) = kl_ratios(recs)
    assert r["n_items"] == 2 and r["best_baseline"] == "snapkv" and "tova" not in r
    assert r["h2o"]["ratio"] == pytest.approx(0.5) and r["h2o"]["ci95"] == pytest.approx([0.5, 0.5])
    assert r["snapkv"]["ratio"] == pytest.approx(5 / 8) and r["best"] == r["snapkv"]
    lo, hi = r["snapkv"]["ci95"]
    assert lo == pytest.approx(0.5) and hi == pytest.approx(0.75)  # per-trace ratios 2/4 and 3/4
    assert r["snapkv"]["wins"] == 2 and r["h2o"]["wins"] == 2

    # a variant is compared with the baselines and with plain infokv; ties are not wins
    recs += [rec("a", "infokv:mix=rank", [4.0]), rec("b", "infokv:mix=rank", [1.0])]
    rows = all_kl_ratios(recs)
    assert [(x["policy"], x["against"]) for x in rows] == [
        ("infokv", "baselines"), ("infokv:mix=rank", "baselines"), ("infokv:mix=rank", "infokv")]
    v = rows[2]["infokv"]
    assert v["ratio"] == pytest.approx(5 / 5) and v["wins"] == 1  # 4 vs 2 on a (lost), 1 vs 3 on b (won)
    md = markdown_ratios(rows).splitlines()
    assert md[0] == "| budget | policy | items | ÷ best (which) | ÷ h2o | ÷ snapkv |"  # the baselines present
    assert md[2] == ("| r0.25 | infokv | 2 | 0.625 [0.500, 0.750], 2 of 2 (snapkv) | 0.500 [0.500, 0.500], 2 of 2 "
                     "| 0.625 [0.500, 0.750], 2 of 2 |")
    assert md[-1].startswith("| r0.25 | infokv:mix=rank | 2 | 1.000 [")

    # StreamingLLM and the key policies are baselines too: the best one here is streaming
    recs += [rec("a", "streaming", [1.0]), rec("b", "streaming", [2.0]), rec("a", "keydiff", [5.0]),
             rec("b", "keydiff", [5.0])]
    (r,) = kl_ratios(recs)
    assert r["best_baseline"] == "streaming" and r["best"]["ratio"] == pytest.approx(5 / 3)
    assert r["keydiff"]["ratio"] == pytest.approx(0.5) and r["best"]["wins"] == 0
    header = markdown_ratios(all_kl_ratios(recs)).splitlines()[0]
    assert header.endswith("| ÷ h2o | ÷ snapkv | ÷ streaming | ÷ keydiff |")


def test_jsonl_inputs_are_strict_and_logs_resume_after_a_torn_line(tmp_path):
    from infokv_local.bench.jsonl import read_inputs, read_log

    good = tmp_path / "in.jsonl"
    good.write_text('{"text": "a"}\n\n{"text": "b", "id": "x"}\n')
    assert [i for i, _ in read_inputs(good, lambda d: "text" in d, "text")] == [1, 3]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        read_inputs(bad, lambda d: True, "x")
    bad.write_text('{"text": "a"}\n[1]\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected an object with text"):
        read_inputs(bad, lambda d: True, "an object with text")
    log = tmp_path / "runs.jsonl"
    assert read_log(log) == []
    log.write_text('{"k": 1}\n{"k": 2}\n{"k": 3, "cut by a ki')
    assert read_log(log) == [{"k": 1}, {"k": 2}]
    with log.open("a") as f:  # the next record starts on a line of its own
        f.write('{"k": 4}\n')
    assert read_log(log) == [{"k": 1}, {"k": 2}, {"k": 4}]


def test_needle_retention_on_the_real_model(model) -> None:
    from evaluation import needle_retention as NR

    res = NR.run_needle_retention(model, 512, 0.25, [0, 1], ["streaming", "snapkv"], progress=False)
    assert [(r["policy"], r["mode"], r["n"]) for r in res["results"]] == [
        (p, m, 2) for p in ("streaming", "snapkv") for m in ("chunked", "probe", "once")]
    by = {(it["seed"], it["policy"], it["mode"]): it["sentence_kept"] for it in res["items"]}
    assert all(by[(s, "streaming", "probe")] == by[(s, "streaming", "chunked")] for s in (0, 1))  # nothing to probe
    for it in res["items"]:
        assert 0 <= it["value_kept"] <= it["value_tokens"] == 7  # SmolLM2 writes digits one token each
        assert it["value_tokens"] <= it["sentence_tokens"] and 0 <= it["sentence_kept"] <= it["sentence_tokens"]
        assert it["budget"] == int(0.25 * it["n_tokens"])
    item = TD.niah_item(512, lambda t: len(model.tokenize(t, add_special=False, parse_special=False)), 0)
    tokens = model.tokenize(item["prompt"])
    sentence, value = NR.needle_span(model, item["prompt"], item["answers"][0])
    assert b"".join(model.token_bytes(tokens[i]) for i in value).decode().strip() == item["answers"][0]
    assert b"special magic number" in b"".join(model.token_bytes(tokens[i]) for i in sentence)
    b = int(0.25 * len(tokens))
    # StreamingLLM keeps the sinks and a recent run; read once, every policy ends at the budget + the new token
    kept = sorted(NR.kept_after_reading(model, tokens, "streaming", b, "chunked", 64, 1))
    assert kept[:4] == [0, 1, 2, 3] and kept[4:] == list(range(kept[4], len(tokens) + 1))
    assert len(NR.kept_after_reading(model, tokens, "snapkv", b, "once", 64, 1)) == b + 1
    assert len(NR.kept_after_reading(model, tokens, "snapkv", b, "probe", 64, 1)) <= b + 64
    with pytest.raises(ValueError, match="unknown mode"):
        NR.kept_after_reading(model, tokens, "snapkv", b, "twice", 64, 1)


def test_needle_retention_command_reads_the_seeds_from_offset(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    main = evidence_cli.main
    out = tmp_path / "n.json"
    assert main(["needle-retention", "--quick", "--offset", "5", "--items", "2", "--policies", "streaming",
                 "--modes", "chunked", "--threads", "1", "--no-progress", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["seeds"] == [5, 6] and [it["seed"] for it in res["items"]] == [5, 6]
    assert "streaming" in capsys.readouterr().out
    # every read is logged beside the JSON; a rerun takes finished reads from the log and measures the rest
    log = out.with_suffix(".jsonl")
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(r["seed"], r["policy"], r["mode"]) for r in records] == [(5, "streaming", "chunked"),
                                                                        (6, "streaming", "chunked")]
    records[0]["sentence_kept"] = 0  # a marker: only a read taken from the log can have it
    log.write_text(json.dumps(records[0]) + "\n")
    assert main(["needle-retention", "--quick", "--offset", "5", "--items", "2", "--policies", "streaming",
                 "--modes", "chunked", "--threads", "1", "--no-progress", "--json", str(out)]) == 0
    again = json.loads(out.read_text())["items"]
    assert again[0]["sentence_kept"] == 0 and again[1] == res["items"][1]
    assert len(log.read_text().splitlines()) == 2
    # the log is refused with other settings rather than mixed
    assert main(["needle-retention", "--quick", "--ratio", "0.5", "--offset", "5", "--items", "2",
                 "--policies", "streaming", "--modes", "chunked", "--threads", "1", "--no-progress",
                 "--json", str(out)]) == 2
    assert "other settings" in capsys.readouterr().err


# ---- multi-step: several questions in one reply ------------------------------------------------------

def test_multi_step_answers_are_read_per_question() -> None:
    text = ("Problem 1 ... so 12 apples.\nAnswer 1: 12\n\nAnswer 2: $1,250.00\nAnswer 3 = \\boxed{7}\n"
            "I made a mistake above. Answer 3: 8\nAnswer 9: 4")
    assert T.extract_numbered_answers(text, 4) == ["12", "1250", "8", None]  # the last line of each; 9 is out
    item = T.TaskItem("g", "multi-step", None, "", ["12", "1250", "7", "3"], 10, "gsm8k-multi")
    assert T.sub_correct(item, text) == [True, True, False, False]
    assert T.score_item(item, text) == (False, "12,1250,8,")


def test_multi_step_groups_consecutive_questions() -> None:
    qs = [{"id": str(i), "question": f"Q{i}?", "answer": str(i)} for i in range(100, 113)]
    groups = TD.group_questions(qs, 6)
    assert [g["id"] for g in groups] == ["100+6", "106+6"]  # the last, incomplete group is left out
    assert groups[1]["answers"] == [str(i) for i in range(106, 112)]
    msg = groups[0]["question"]
    assert msg.index("Problem 1: Q100?") < msg.index("Problem 6: Q105?") and "Answer k: N" in msg
    with pytest.raises(ValueError, match="at least one"):
        TD.group_questions(qs, 0)


def test_multi_step_summary_counts_questions_and_pairs_groups() -> None:
    def rec(item: str, policy: str, sub: list[bool]) -> dict:
        return {"task": "multi-step", "model": "m", "length": None, "item_id": item, "policy": policy,
                "budget_spec": "full" if policy == "full" else "256", "sub_correct": sub, "correct": all(sub)}

    recs = [rec("a", "full", [True, True, True]), rec("b", "full", [True, True, False]),
            rec("a", "infokv", [True, True, False]), rec("b", "infokv", [True, False, False]),
            rec("a", "snapkv", [True, False, False]), rec("b", "snapkv", [True, False, False])]
    rows = {r["policy"]: r for r in T.summarize_questions(recs)}
    assert rows["full"]["questions"] == 6 and rows["full"]["correct"] == 5
    assert rows["infokv"]["by_position"] == [1.0, 0.5, 0.0] and rows["infokv"]["groups"] == 2
    vs = rows["infokv"]["paired"]
    assert vs["snapkv"]["diff"] == pytest.approx(1 / 6) and (vs["snapkv"]["more"], vs["snapkv"]["fewer"]) == (1, 0)
    assert vs["full"]["diff"] == pytest.approx(-1 / 3) and vs["full"]["fewer"] == 2
    assert "by position" in T.format_question_table(list(rows.values()))


def test_multi_step_tiny_real_run(tmp_path: Path, model_path: Path) -> None:
    out = tmp_path / "ms.json"
    argv = ["tasks", "--task", "multi-step", "--group", "2", "--model", str(model_path), "--limit", "4",
            "--max-tokens", "40", "--budget", "48", "--buffer", "16", "--policies", "full,infokv", "--out", str(out),
            "--no-progress", "--parallel", "1"]
    assert evidence_cli.main(argv) == 0
    recs = _lines(out.with_suffix(".jsonl"))
    assert {r["item_id"] for r in recs} == {"gsm8k-0+2", "gsm8k-2+2"} and len(recs) == 4
    assert all(len(r["sub_correct"]) == 2 and r["kind"] == "gsm8k-multi" for r in recs)
    assert all(r["evicted_tokens"] > 0 for r in recs if r["policy"] == "infokv")
    data = json.loads(out.read_text())
    assert data["group"] == 2 and {r["policy"] for r in data["by_question"]} == {"full", "infokv"}
    assert all(r["questions"] == 4 for r in data["by_question"])


def test_fidelity_decode_over_multi_step_traces(tmp_path: Path, model, model_path: Path) -> None:
    out = tmp_path / "fdg.json"
    argv = ["fidelity-decode", "--model", str(model_path), "--group", "2", "--limit", "2", "--max-tokens", "32",
            "--budget", "60", "--buffer", "16", "--policies", "infokv", "--traces", str(tmp_path / "tr.jsonl"),
            "--out", str(out), "--no-progress"]
    assert evidence_cli.main(argv) == 0
    (trace,) = _lines(tmp_path / "tr.jsonl")
    prompt = b"".join(model.token_bytes(t) for t in trace["prompt_ids"]).decode("utf-8", "replace")
    assert trace["id"] == "0+2" and "Problem 2:" in prompt
    data = json.loads(out.read_text())
    assert data["group"] == 2 and data["n_questions"] == 2 and data["results"][0]["n_tokens"] > 0


def test_summary_of_a_multi_step_log_counts_its_questions(tmp_path: Path, capsys) -> None:
    log = tmp_path / "ms.jsonl"
    recs = [{"task": "multi-step", "model": "m", "length": None, "item_id": f"g{i}", "kind": "gsm8k-multi",
             "policy": p, "budget_spec": "full" if p == "full" else "232", "correct": False,
             "sub_correct": [True, i % 2 == 0 or p == "full", False]} for i in range(4) for p in ("full", "infokv")]
    log.write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert evidence_cli.main(["summary", str(log)]) == 0
    assert "by position" in capsys.readouterr().out
    data = json.loads(log.with_suffix(".json").read_text())
    rows = {r["policy"]: r for r in data["by_question"]}
    assert rows["full"]["by_position"] == [1.0, 1.0, 0.0] and rows["infokv"]["by_position"] == [1.0, 0.5, 0.0]
