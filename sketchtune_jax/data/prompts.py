"""Prompt templates of instruction records: ``alpaca`` (the paper's) and ``chat`` (the tokenizer's
own chat template)."""

from __future__ import annotations

from typing import Any

from sketchtune_jax.settings import require

PROMPT_HEADER = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)


TEMPLATES = ("alpaca", "chat")


def format_prompt(instruction: str, input: str = "", *, template: str = "alpaca", tokenizer: Any = None) -> str:
    """The prompt text of one record in ``template`` (no BOS text for alpaca; the tokenizer's BOS id
    is prepended at tokenization when the text does not start with it).

    ``alpaca``: the Alpaca prompt the paper trains and evaluates with; ``### Input:`` appears only
    when ``input`` is non-empty after stripping. ``chat``: the ``tokenizer``'s own chat template
    (from the GGUF or HF files) with the instruction (and input, after a blank line) as one user
    turn, ready for the assistant's reply.
    """
    instruction = instruction.strip()
    input = (input or "").strip()
    if template == "chat":
        check_template(template, tokenizer)
        content = f"{instruction}\n\n{input}" if input else instruction
        return tokenizer.apply_chat_template(  # type: ignore[union-attr]
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )
    check_template(template, tokenizer)
    parts = [PROMPT_HEADER, "", "### Instruction:", instruction, ""]
    if input:
        parts += ["### Input:", input, ""]
    parts += ["### Response:", ""]
    return "\n".join(parts)


def check_template(template: str, tokenizer: Any) -> None:
    """Refuse ``template`` before any work when it cannot be used with ``tokenizer``: an unknown
    name, or ``chat`` for a tokenizer without a chat template."""
    require(template in TEMPLATES, "template", f"must be one of {', '.join(TEMPLATES)}, got {template!r}")
    require(
        template != "chat" or bool(getattr(tokenizer, "chat_template", None)),
        "template",
        "is chat, but this model's tokenizer has no chat template; use alpaca",
    )
