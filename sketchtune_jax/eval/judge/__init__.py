"""Pairwise LLM-as-judge evaluation through any OpenAI-compatible chat-completions endpoint.

Two models answer the same questions; a judge model is asked which answer is better with
MT-Bench's pairwise prompt, once in each order (a verdict that flips with the order is a
tie); the result is model A's wins, losses, ties and win rate with a Wilson interval::

    from sketchtune_jax.eval.judge import JudgeClient, JudgeStore, ModelAnswerer, Side, read_questions, run_judge

    questions = read_questions("questions.jsonl", limit=100)
    sides = {"a": Side("sketch", codebooks="run/codebooks.safetensors"), "b": Side("sketch")}
    answerers = {k: ModelAnswerer(s, max_new_tokens=256) for k, s in sides.items()}
    with JudgeClient("https://api.openai.com/v1", "gpt-4o", api_key=key) as client:
        summary = run_judge(questions, answerers, client, JudgeStore("judged", identity={...}))

Modules: `prompts` (questions, the judge prompt, verdicts), `client` (HTTP with retries),
`store` (the output directory and its cache), `stats` (counts and intervals), `run` (the
loop), `cli` (the ``sketchtune eval judge`` flags).
"""

from sketchtune_jax.eval.judge.client import JudgeClient, JudgeError, JudgeReply, JudgeUnavailable
from sketchtune_jax.eval.judge.prompts import Question, judge_messages, pair_outcome, parse_verdict, read_questions
from sketchtune_jax.eval.judge.run import ModelAnswerer, Side, run_judge
from sketchtune_jax.eval.judge.stats import summarize, wilson_interval
from sketchtune_jax.eval.judge.store import JudgeStore

__all__ = [
    "JudgeClient",
    "JudgeError",
    "JudgeReply",
    "JudgeStore",
    "JudgeUnavailable",
    "ModelAnswerer",
    "Question",
    "Side",
    "judge_messages",
    "pair_outcome",
    "parse_verdict",
    "read_questions",
    "run_judge",
    "summarize",
    "wilson_interval",
]
