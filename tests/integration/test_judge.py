"""Pairwise LLM-as-judge evaluation (`sketchtune_jax.eval.judge`, `sketchtune eval judge`).

The judge is `judge_stub.StubJudge` on 127.0.0.1: scripted verdicts, failures, slow and
malformed replies; no network. Library tests answer with plain functions (generation is
injected); command-line tests use tiny random models; the real model's test is slow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from judge_stub import StubJudge, serve
from model_utils import DATA, assert_cli_refuses, save_tiny_model_with_tokenizer, word_text

from sketchtune_jax.eval.judge import (
    JudgeClient,
    JudgeError,
    JudgeStore,
    JudgeUnavailable,
    Question,
    judge_messages,
    pair_outcome,
    parse_verdict,
    read_questions,
    run_judge,
    summarize,
    wilson_interval,
)

IDENTITY = {"judge": {"model": "stub-judge"}}


# ----------------------------------------------------------------------------- verdicts and counts


def test_the_last_bracketed_verdict_counts():
    assert parse_verdict("A is wrong, so [[B]]") == "B"
    assert parse_verdict("format: [[A]] or [[B]]... final verdict: [[C]]") == "tie"
    assert parse_verdict("Assistant A is better.") == "unparsed"
    assert parse_verdict("[A]") == "unparsed"
    assert parse_verdict(None) == "unparsed"


def test_a_verdict_that_flips_with_the_order_is_a_tie():
    # "ab" shows model A first, "ba" shows model B first: "B" in the second order is model A.
    assert pair_outcome("A", "B") == ("win", False)
    assert pair_outcome("B", "A") == ("loss", False)
    assert pair_outcome("tie", "tie") == ("tie", False)
    assert pair_outcome("A", "A") == ("tie", True)
    assert pair_outcome("A", "tie") == ("tie", True)
    assert pair_outcome("A", "unparsed") == ("unparsed", False)


def test_wilson_interval_matches_known_values():
    low, high = wilson_interval(8, 10, 0.95)
    assert low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)
    assert wilson_interval(0, 20)[0] == 0.0 and wilson_interval(20, 20)[1] == 1.0
    assert wilson_interval(0, 0) == (0.0, 1.0)
    # A higher confidence widens the interval.
    assert wilson_interval(8, 10, 0.99)[0] < low
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(3, 2)


def test_summary_counts_and_rates():
    s = summarize(["win"] * 6 + ["loss"] * 2 + ["tie"] * 2 + ["unparsed"], inconsistent=1)
    assert (s["pairs"], s["wins"], s["losses"], s["ties"], s["unparsed"]) == (11, 6, 2, 2, 1)
    assert s["win_rate"] == 0.6 and s["inconsistent_ties"] == 1
    assert (s["win_rate_low"], s["win_rate_high"]) == pytest.approx(wilson_interval(6, 10))
    assert summarize(["unparsed"])["win_rate"] is None


# ----------------------------------------------------------------------------- questions


def test_questions_from_records_lists_and_lines(tmp_path):
    records = [{"instruction": "Name a colour.", "input": ""}, {"instruction": "Translate.", "input": "chat"}]
    (tmp_path / "q.json").write_text(json.dumps(records))
    (tmp_path / "q.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    (tmp_path / "list.json").write_text(json.dumps(["Name a colour.", "Translate.\n\nchat"]))
    (tmp_path / "q.txt").write_text("Name a colour.\n\nWhy is the sky blue?\n")
    from_json = read_questions(tmp_path / "q.json")
    assert [q.text for q in from_json] == ["Name a colour.", "Translate.\n\nchat"]
    assert "### Input:\nchat" in from_json[1].alpaca and "### Input" not in from_json[0].alpaca
    assert read_questions(tmp_path / "q.jsonl") == from_json
    # The same text has the same id whatever file it comes from.
    assert [q.id for q in read_questions(tmp_path / "list.json")] == [q.id for q in from_json]
    assert [q.text for q in read_questions(tmp_path / "q.txt")] == ["Name a colour.", "Why is the sky blue?"]
    assert len(read_questions(tmp_path / "q.json", limit=1)) == 1


def test_repeated_questions_are_judged_once(tmp_path):
    (tmp_path / "q.json").write_text(json.dumps(["a?", "b?", "a?", "c?"]))
    assert [q.text for q in read_questions(tmp_path / "q.json")] == ["a?", "b?", "c?"]


def test_bad_question_files_are_named(tmp_path):
    (tmp_path / "bad.json").write_text(json.dumps([{"instruction": "fine"}, {"question": "no instruction"}]))
    with pytest.raises(ValueError, match="record 1 is not a question.*'question'"):
        read_questions(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError, match="prompts file not found"):
        read_questions(tmp_path / "missing.json")
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(ValueError, match="no questions"):
        read_questions(tmp_path / "empty.json")


# ----------------------------------------------------------------------------- the client


def _client(url: str, **kw) -> JudgeClient:
    return JudgeClient(url, "stub-judge", **{"timeout_s": 5.0, "backoff_s": 0.01, "max_retries": 3, **kw})


MESSAGES = judge_messages("Why?", "Because it is long.", "No.")


def test_client_gets_the_verdict_and_sends_the_pairwise_prompt():
    judge = StubJudge()
    with serve(judge) as url, _client(url) as client:
        client.check()
        reply = client.ask(MESSAGES)
    assert parse_verdict(reply.text) == "A" and reply.usage["total_tokens"] == 110
    assert judge.requests == [("Why?", "Because it is long.", "No.")]
    assert MESSAGES[0]["role"] == "system" and '"[[C]]" for a tie' in MESSAGES[0]["content"]


@pytest.mark.parametrize("status", [500, 503, 429])
def test_client_retries_throttling_and_server_errors(status):
    judge = StubJudge(fail=2, fail_status=status)
    with serve(judge) as url, _client(url) as client:
        assert parse_verdict(client.ask(MESSAGES).text) == "A"
    assert judge.chat_calls == 3


def test_client_retries_a_reply_slower_than_its_timeout():
    judge = StubJudge(slow=1, slow_s=1.5)
    with serve(judge) as url, _client(url, timeout_s=0.5) as client:
        assert parse_verdict(client.ask(MESSAGES).text) == "A"
    assert judge.chat_calls == 2


def test_client_gives_up_after_its_retries():
    judge = StubJudge(fail=100)
    with serve(judge) as url, _client(url, max_retries=2) as client:
        with pytest.raises(JudgeUnavailable, match="failed after 3 tries; last: HTTP 500"):
            client.ask(MESSAGES)
    assert judge.chat_calls == 3


def test_client_does_not_retry_a_refused_key_or_a_rejected_request():
    judge = StubJudge(api_key="right")
    with serve(judge) as url:
        with _client(url, api_key="wrong") as client:
            with pytest.raises(JudgeError, match="refused the API key .*HTTP 401.*OPENAI_API_KEY"):
                client.check()
            with pytest.raises(JudgeError, match="refused the API key"):
                client.ask(MESSAGES)
        with JudgeClient(url, "no-such-model", api_key="right", backoff_s=0.01) as client:
            with pytest.raises(JudgeError, match="rejected the request .*HTTP 404.*no-such-model"):
                client.ask(MESSAGES)
    assert judge.chat_calls == 0


def test_client_names_an_unreachable_endpoint():
    with serve(StubJudge()) as url:
        pass  # the server is closed now: nothing listens on its port
    with _client(url) as client, pytest.raises(JudgeError, match="cannot reach the judge at http://127.0.0.1"):
        client.check()
    with pytest.raises(JudgeError, match="http:// or https://"):
        JudgeClient("localhost:8000/v1", "m")


def test_a_malformed_reply_keeps_its_body():
    judge = StubJudge(garbage=1)
    with serve(judge) as url, _client(url) as client:
        reply = client.ask(MESSAGES)
    assert reply.text is None and "upstream proxy error" in reply.body


# ----------------------------------------------------------------------------- the loop


QUESTIONS = [Question(id=f"q{i}", text=f"question {i}", alpaca=f"### {i}") for i in range(6)]


def _answer_a(i: int) -> str:
    return "a long answer, longer than short" if i % 2 == 0 else "x"


def _answerers(calls: list[str] | None = None) -> dict:
    """Model A answers at length on even questions; model B always says "short"."""

    def a(questions):
        if calls is not None:
            calls.append("a")
        return [_answer_a(int(q.id[1:])) for q in questions]

    def b(questions):
        if calls is not None:
            calls.append("b")
        return ["short" for _ in questions]

    return {"a": a, "b": b}


def test_run_asks_both_orders_and_counts(tmp_path):
    judge = StubJudge(policy="longer")
    with serve(judge) as url, _client(url) as client:
        summary = run_judge(QUESTIONS, _answerers(), client, JudgeStore(tmp_path, IDENTITY), batch_size=4)
    assert (summary["wins"], summary["losses"], summary["ties"], summary["unparsed"]) == (3, 3, 0, 0)
    assert summary["win_rate"] == 0.5 and summary["requests"] == summary["asked_this_run"] == 12
    # Each pair was shown once with each answer first.
    shown = [(f"question {i}", first, second) for i in range(6) for first, second in [(_answer_a(i), "short")]]
    assert sorted(judge.requests) == sorted(shown + [(q, second, first) for q, first, second in shown])
    pairs = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert [p["outcome"] for p in pairs] == ["win", "loss"] * 3
    assert pairs[0]["answer_b"] == "short" and "[[A]]" in pairs[0]["judgment_ab"]
    assert json.loads((tmp_path / "summary.json").read_text())["wins"] == 3


def test_a_position_biased_judge_gives_only_ties(tmp_path):
    with serve(StubJudge(policy="first")) as url, _client(url) as client:
        summary = run_judge(QUESTIONS, _answerers(), client, JudgeStore(tmp_path, IDENTITY))
    assert (summary["wins"], summary["losses"], summary["ties"], summary["inconsistent_ties"]) == (0, 0, 6, 6)


def test_verdicts_without_the_format_are_recorded_as_unparsed(tmp_path):
    judge = StubJudge(policy="none", garbage=1)
    with serve(judge) as url, _client(url) as client:
        summary = run_judge(QUESTIONS[:2], _answerers(), client, JudgeStore(tmp_path, IDENTITY))
    assert summary["unparsed"] == 2 and summary["win_rate"] is None
    verdicts = [json.loads(line) for line in (tmp_path / "verdicts.jsonl").read_text().splitlines()]
    assert {v["verdict"] for v in verdicts} == {"unparsed"} and len(verdicts) == 4
    # What was paid for is kept: the judge's words, or the body it sent instead.
    assert sum("upstream proxy error" in v.get("body", "") for v in verdicts) == 1
    assert sum("Both answers have merits" in (v["judgment"] or "") for v in verdicts) == 3
    # Unparsed verdicts are answers too: running again does not ask again.
    with serve(judge) as url, _client(url) as client:
        assert run_judge(QUESTIONS[:2], _answerers(), client, JudgeStore(tmp_path, IDENTITY))["asked_this_run"] == 0


def test_a_second_run_reuses_answers_and_verdicts(tmp_path):
    judge, calls = StubJudge(), []
    with serve(judge) as url, _client(url) as client:
        run_judge(QUESTIONS[:4], _answerers(calls), client, JudgeStore(tmp_path, IDENTITY))
        assert judge.chat_calls == 8 and calls == ["a", "b"]
        again = run_judge(QUESTIONS[:4], _answerers(calls), client, JudgeStore(tmp_path, IDENTITY))
        assert again["asked_this_run"] == 0 and judge.chat_calls == 8 and calls == ["a", "b"]
        # More questions: only the new ones are answered and asked.
        more = run_judge(QUESTIONS, _answerers(calls), client, JudgeStore(tmp_path, IDENTITY))
    assert more["asked_this_run"] == 4 and more["pairs"] == 6 and judge.chat_calls == 12
    assert calls == ["a", "b", "a", "b"]


def test_a_failing_judge_stops_the_run_and_the_rerun_asks_only_the_rest(tmp_path):
    # The first requests succeed, then every try fails: the run ends with one error, its
    # verdicts saved; with the judge healthy again the rerun asks only what is missing.
    judge = StubJudge()
    with serve(judge) as url, _client(url, max_retries=1) as client:
        judge.fail_status, judge.fail = 500, 0
        original_ask = client.ask
        answered = []

        def ask_then_break(messages):
            if len(answered) >= 5:
                judge.fail = 10**6  # every later request fails
            reply = original_ask(messages)
            answered.append(reply)
            return reply

        client.ask = ask_then_break
        with pytest.raises(JudgeUnavailable, match="run the same command again to go on"):
            run_judge(QUESTIONS, _answerers(), client, JudgeStore(tmp_path, IDENTITY), concurrency=1)
    saved = (tmp_path / "verdicts.jsonl").read_text().splitlines()
    assert len(saved) == 5
    healthy = StubJudge()
    with serve(healthy) as url, _client(url) as client:
        summary = run_judge(QUESTIONS, _answerers(), client, JudgeStore(tmp_path, IDENTITY))
    assert summary["asked_this_run"] == healthy.chat_calls == 7 and summary["pairs"] == 6


def test_the_store_refuses_another_run_or_a_foreign_directory(tmp_path):
    JudgeStore(tmp_path / "run", IDENTITY)
    with pytest.raises(FileExistsError, match="other settings \\(judge"):
        JudgeStore(tmp_path / "run", {"judge": {"model": "gpt-4o"}})
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="holds no judge run"):
        JudgeStore(tmp_path / "other", IDENTITY)


def test_a_line_cut_short_by_a_kill_is_ignored_and_not_glued_to_the_next(tmp_path):
    store = JudgeStore(tmp_path, IDENTITY)
    store.add_verdict({"id": "q0", "order": "ab", "key": "k", "verdict": "A"})
    with open(tmp_path / "verdicts.jsonl", "a") as f:
        f.write('{"id": "q1", "order": "a')
    store.add_verdict({"id": "q2", "order": "ba", "key": "k", "verdict": "B"})
    assert set(store.verdicts()) == {("q0", "ab", "k"), ("q2", "ba", "k")}


# ----------------------------------------------------------------------------- the command line


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """Two tiny HF models (different random weights, the same tokenizer) and a question file."""
    root = tmp_path_factory.mktemp("judge")
    texts = [word_text(40, s) for s in range(20)]
    save_tiny_model_with_tokenizer(root / "a", texts)
    save_tiny_model_with_tokenizer(root / "b", texts, seed=1)
    prompts = root / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"instruction": word_text(6, s), "input": ""}) for s in range(6)))
    return root


def _argv(models: Path, url: str, out: Path, *extra: str) -> list[str]:
    return [
        "eval",
        "judge",
        "--model-a",
        str(models / "a"),
        "--model-b",
        str(models / "b"),
        "--prompts",
        str(models / "prompts.jsonl"),
        "--endpoint",
        url,
        "--judge-model",
        "stub-judge",
        "--max-new-tokens",
        "6",
        "--backoff",
        "0.01",
        "--out",
        str(out),
        *extra,
    ]


def test_command_judges_two_models_and_resumes(tiny_models, tmp_path, capsys):
    from sketchtune_jax.cli import main

    judge = StubJudge(fail=2, fail_status=503)
    with serve(judge) as url:
        assert main(_argv(tiny_models, url, tmp_path / "out", "--json", str(tmp_path / "s.json"))) == 0
        printed = capsys.readouterr().out
        assert "A win rate" in printed and "interval (Wilson)" in printed and "judge requests" in printed
        summary = json.loads((tmp_path / "s.json").read_text())
        assert summary["pairs"] == 6 and summary["requests"] == 12 and len(judge.requests) == 12
        assert summary["wins"] + summary["losses"] + summary["ties"] + summary["unparsed"] == 6
        assert summary["model_a"] == str(tiny_models / "a")
        for name in ("answers_a.jsonl", "answers_b.jsonl", "verdicts.jsonl", "pairs.jsonl", "run.json"):
            assert (tmp_path / "out" / name).is_file(), name
        # The models' answers reached the judge as they are saved.
        answers = [json.loads(line) for line in (tmp_path / "out" / "answers_a.jsonl").read_text().splitlines()]
        assert {a["answer"] for a in answers} <= {first for _, first, _ in judge.requests} | {
            second for _, _, second in judge.requests
        }
        # Everything is saved: a second run asks nothing and loads no model.
        assert main(_argv(tiny_models, url, tmp_path / "out")) == 0
    assert len(judge.requests) == 12
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["asked_this_run"] == 0


def test_command_errors_are_one_line_and_come_before_any_work(tiny_models, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    argv = _argv(tiny_models, "http://127.0.0.1:9/v1", tmp_path / "o")
    no_endpoint = argv[: argv.index("--endpoint")] + argv[argv.index("--endpoint") + 2 :]
    assert_cli_refuses(no_endpoint, capsys, "no judge endpoint: pass --endpoint URL or set OPENAI_BASE_URL")
    assert_cli_refuses(argv, capsys, "cannot reach the judge at http://127.0.0.1:9/v1")
    same = argv.copy()
    same[same.index("--model-b") + 1] = str(tiny_models / "a")
    assert_cli_refuses(same, capsys, "model A and model B are the same model")
    (tmp_path / "c.safetensors").write_bytes(b"")
    codebooks = argv + ["--codebooks-a", str(tmp_path / "c.safetensors")]
    assert_cli_refuses(codebooks, capsys, "--codebooks-a applies to a sketched model")
    assert_cli_refuses(argv + ["--limit", "0"], capsys, "--limit must be > 0")
    missing = argv.copy()
    missing[missing.index("--prompts") + 1] = str(tmp_path / "nope.json")
    assert_cli_refuses(missing, capsys, "prompts file not found")
    with serve(StubJudge(api_key="right")) as url:
        keyed = _argv(tiny_models, url, tmp_path / "o2")
        assert_cli_refuses(keyed, capsys, "refused the API key (HTTP 401")
        monkeypatch.setenv("OPENAI_API_KEY", "wrong")
        assert_cli_refuses(keyed, capsys, "pass --api-key or set OPENAI_API_KEY")
    # Nothing was generated for any of them.
    assert not list(tmp_path.glob("o*/answers_*.jsonl"))


def test_a_judge_failing_while_running_is_one_line_and_exit_status_1(tiny_models, tmp_path, capsys):
    from sketchtune_jax.cli import main

    with serve(StubJudge(fail=10**6)) as url:
        assert main(_argv(tiny_models, url, tmp_path / "out", "--max-retries", "1", "--limit", "2")) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "failed after 2 tries; last: HTTP 500" in err and "run the same command again to go on" in err
    # The answers it generated are kept for the rerun.
    assert len((tmp_path / "out" / "answers_b.jsonl").read_text().splitlines()) == 2


def test_endpoint_and_key_come_from_the_environment(tiny_models, tmp_path, monkeypatch):
    from sketchtune_jax.cli import main

    judge = StubJudge(api_key="secret")
    with serve(judge) as url:
        monkeypatch.setenv("OPENAI_BASE_URL", url)
        monkeypatch.setenv("OPENAI_API_KEY", "secret")
        argv = _argv(tiny_models, "unused", tmp_path / "out", "--limit", "2")
        argv = argv[: argv.index("--endpoint")] + argv[argv.index("--endpoint") + 2 :]
        assert main(argv) == 0
    assert len(judge.requests) == 4
    assert "secret" not in (tmp_path / "out" / "run.json").read_text()


def test_a_killed_run_resumes_without_asking_answered_pairs_again(tiny_models, tmp_path):
    judge = StubJudge(delay_s=0.4)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    with serve(judge) as url:
        cmd = [sys.executable, "-m", "sketchtune_jax.cli", *_argv(tiny_models, url, out, "--concurrency", "2")]
        log = open(tmp_path / "stderr.txt", "w")
        # stderr to a file: a pipe nobody reads would fill with progress bars and block the run.
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log)
        try:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and proc.poll() is None:
                verdicts = out / "verdicts.jsonl"
                if verdicts.is_file() and len(verdicts.read_text().splitlines()) >= 4:
                    break
                time.sleep(0.05)
            assert proc.poll() is None, (tmp_path / "stderr.txt").read_text()[-2000:]
        finally:
            proc.kill()
            proc.wait(timeout=60)
            log.close()
        time.sleep(0.5)  # requests sent just before the kill reach the stub's log
        saved = [json.loads(line) for line in (out / "verdicts.jsonl").read_text().splitlines() if line.endswith("}")]
        assert 4 <= len(saved) < 12
        asked_before = list(judge.requests)
        from sketchtune_jax.cli import main

        assert main(_argv(tiny_models, url, out)) == 0
    asked_again = judge.requests[len(asked_before) :]
    answered = {(r["id"], r["order"]) for r in saved}
    assert len(asked_again) == 12 - len(answered)
    questions = {q.text: q.id for q in read_questions(tiny_models / "prompts.jsonl")}
    answers = {
        side: {
            json.loads(line)["id"]: json.loads(line)["answer"]
            for line in (out / f"answers_{side}.jsonl").read_text().splitlines()
        }
        for side in ("a", "b")
    }
    for question, first, second in asked_again:
        qid = questions[question]
        could_be = {
            o
            for o, pair in (("ab", ("a", "b")), ("ba", ("b", "a")))
            if [first, second] == [answers[s][qid] for s in pair]
        }
        assert could_be - {o for i, o in answered if i == qid}, (qid, could_be)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pairs"] == 6 and summary["asked_this_run"] == len(asked_again)


# ----------------------------------------------------------------------------- the real model


@pytest.mark.slow
def test_a_fine_tuned_smollm2_sketch_against_its_base(smollm2, tmp_path):
    """SmolLM2-135M sketched, its codebooks tuned a few steps, judged against the untuned sketch."""
    from sketchtune_jax.cli import main

    sketch, run = tmp_path / "sketch", tmp_path / "run"
    wiki = DATA / "wikitext-2" / "test.txt"
    common = ["--calib", str(wiki), "--nsamples", "2", "--seq-len", "64", "--kmeans-iters", "5"]
    assert main(["sketch", "smollm2-135m", "--bits", "4", "--groups-per-row", "4", *common, "--out", str(sketch)]) == 0
    train = DATA / "math" / "math_data.train.json"
    # Two steps, layers scanned (one layer compiled, not 30): the codebooks move, quickly.
    tune = ["--max-steps", "2", "--batch-size", "2", "--seq-len", "128", "--lr", "1e-3", "--warmup-steps", "1"]
    tune += ["--scan-layers"]
    assert main(["finetune", str(sketch), "--data", str(train), "--out", str(run), *tune, "--pad-multiple", "128"]) == 0
    prompts = DATA / "math" / "gsm8k.test.json"
    judge = StubJudge()
    with serve(judge) as url:
        argv = ["eval", "judge", "--model-a", str(sketch), "--codebooks-a", str(run / "codebooks.safetensors")]
        argv += ["--model-b", str(sketch), "--prompts", str(prompts), "--limit", "3", "--max-new-tokens", "8"]
        argv += ["--endpoint", url, "--judge-model", "stub-judge", "--out", str(tmp_path / "judged")]
        assert main(argv) == 0
    summary = json.loads((tmp_path / "judged" / "summary.json").read_text())
    assert summary["pairs"] == 3 and len(judge.requests) == 6
    assert summary["wins"] + summary["losses"] + summary["ties"] == 3
    assert sorted({q for q, _, _ in judge.requests}) == sorted(q.text for q in read_questions(prompts, limit=3))
