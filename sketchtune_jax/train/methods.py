"""Fine-tuning methods in one trainer: sketch (codebooks), LoRA, QLoRA and full fine-tuning.

A `FinetuneMethod` says which variables train, how the model is prepared for it and what
a finished run writes::

    method = FinetuneMethod("lora", lora=LoraSettings(rank=33, alpha=66.0))
    model = method.prepare(loaded.model)                   # adapters added (qwix)
    finetune(model, batches, config, "runs/lora", wrt=method.wrt,
             save_result=method.result_writer(config=loaded.config, tokenizer=loaded.tokenizer))

==========  ==================  ==================  ==========================================
method      model it takes      trains              a finished run writes
==========  ==================  ==================  ==========================================
sketch      a sketched model    `Codebook`          ``codebooks.safetensors``
lora        a dense model       `nnx.LoRAParam`     ``adapter/`` (PEFT format)
qlora       a dense model       `nnx.LoRAParam`     ``adapter/``; with LoftQ also ``base/``
full        a dense model       every `nnx.Param`   ``model/`` (an HF directory)
==========  ==================  ==================  ==========================================
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

from flax import nnx

from sketchtune_jax.layers import Codebook
from sketchtune_jax.settings import SettingError
from sketchtune_jax.train.config import FinetuneSettings
from sketchtune_jax.train.lora import LoraSettings, apply_lora

METHODS = ("sketch", "lora", "qlora", "full")
RESULT_NAMES = {"sketch": "codebooks.safetensors", "lora": "adapter", "qlora": "adapter", "full": "model"}


def has_codebooks(model: nnx.Module) -> bool:
    """Whether ``model`` holds any `Codebook` (i.e. is sketched)."""
    return bool(nnx.to_flat_state(nnx.state(model, Codebook)))


def check_method_fits(name: str, *, sketched: bool, model: str = "this model") -> None:
    """Raise `SettingError` (field ``method``) unless method ``name`` trains a model of this kind:
    sketch a sketched model, every other method a dense one. ``model`` names it in the message."""
    if name == "sketch" and not sketched:
        raise SettingError(
            "method",
            f"sketch needs a sketched model and {model} is dense; make one with "
            "`sketchtune sketch`, or choose lora, qlora or full",
        )
    if name != "sketch" and sketched:
        raise SettingError(
            "method", f"{name} trains a dense model and {model} is sketched; use sketch, or give the dense model"
        )


def default_method(sketched: bool, model: str = "this model") -> str:
    """The method a model is fine-tuned by when none is named: sketch for a sketched model; a dense
    model has no default (`SettingError`), since LoRA, QLoRA and full tuning are different trade-offs."""
    if not sketched:
        raise SettingError(
            "method",
            f"is needed for {model}, a dense model: choose lora, qlora or full "
            "(or sketch it first with `sketchtune sketch` and tune its codebooks)",
        )
    return "sketch"


@dataclasses.dataclass(frozen=True)
class FinetuneMethod:
    """One of `METHODS`; ``lora`` holds the adapter settings of ``lora``/``qlora`` (``qtype`` set for QLoRA)."""

    name: str = "sketch"
    lora: LoraSettings | None = None

    def __post_init__(self):
        if self.name not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.name!r}")
        if self.name in ("lora", "qlora"):
            if self.lora is None:
                raise ValueError(f"method {self.name} needs LoraSettings")
            if (self.lora.qtype is not None) != (self.name == "qlora"):
                raise ValueError("qlora needs LoraSettings.qtype (e.g. 'nf4'); lora needs qtype=None")
        elif self.lora is not None:
            raise ValueError(f"method {self.name} takes no LoraSettings")

    @property
    def wrt(self) -> Any:
        """The NNX filter of the variables this method trains."""
        return {"sketch": Codebook, "lora": nnx.LoRAParam, "qlora": nnx.LoRAParam, "full": nnx.Param}[self.name]

    def check_model(self, model: nnx.Module) -> None:
        """Raise `SettingError` when ``model`` is not the kind this method trains (sketched vs dense)."""
        check_method_fits(self.name, sketched=has_codebooks(model))

    def prepare(self, model: nnx.Module) -> nnx.Module:
        """The model to train: adapters added for lora/qlora (a new model), else ``model`` itself."""
        self.check_model(model)
        if self.lora is not None:
            return apply_lora(model, self.lora)
        return model

    def result_writer(
        self, *, config: Any = None, tokenizer: Any = None, base_model: str | None = None
    ) -> Callable[[nnx.Module, str], str]:
        """``(trained model, out_dir) -> path`` writing what a finished run keeps (see the table above)."""

        def write(model: nnx.Module, out_dir: str) -> str:
            path = os.path.join(out_dir, RESULT_NAMES[self.name])
            if self.name == "sketch":
                from sketchtune_jax.io.codebooks import save_codebooks

                save_codebooks(model, path)
            elif self.lora is not None:
                from sketchtune_jax.train.adapters import save_adapter

                base = base_model
                if self.lora.init == "loftq":
                    # LoftQ changed the base the adapter belongs to; it is written beside it.
                    base = write_loftq_base(model, config, tokenizer, out_dir)
                save_adapter(model, self.lora, path, base_model=base, overwrite=True)
            else:
                if config is None:
                    raise ValueError("full fine-tuning writes an HF directory and needs the model's config")
                from converters import export_hf

                export_hf(model, config, tokenizer, path, overwrite=True)
            return path

        return write


LOFTQ_BASE = "base"


def write_loftq_base(model: nnx.Module, config: Any, tokenizer: Any, out_dir: str) -> str:
    """Write the dequantized base of a LoftQ-initialised QLoRA ``model`` as an HF directory
    ``out_dir/base`` (the model ``export --adapter`` merges the adapter into); returns its path."""
    from converters import export_hf
    from sketchtune_jax.train.lora import dense_base

    if config is None:
        raise ValueError("a LoftQ run writes its base as an HF directory and needs the model's config")
    path = os.path.join(out_dir, LOFTQ_BASE)
    export_hf(dense_base(model), config, tokenizer, path, overwrite=True)
    return path


def method_for(
    job: FinetuneSettings, lora: LoraSettings | None = None, *, sketched: bool, model: str = "this model"
) -> FinetuneMethod:
    """The `FinetuneMethod` a `FinetuneSettings` ``job`` asks for on a (``sketched``) ``model``.

    lora and qlora take their adapter's targets, dropout, init, ... from ``lora`` (defaults when
    None) and rank, alpha and QLoRA base from the job; a rank ``"auto"`` is 1 here until the model
    is known (`with_rank`). An ``init`` other than default needs method qlora.
    """
    lora = lora or LoraSettings()
    if lora.init != "default" and job.method != "qlora":
        raise SettingError("init", f"{lora.init} initialises a QLoRA adapter; add {{method}} qlora", ("method",))
    name = job.method or default_method(sketched, model)
    check_method_fits(name, sketched=sketched, model=model)
    if name not in ("lora", "qlora"):
        return FinetuneMethod(name)
    rank = 1 if job.lora_rank == "auto" else job.lora_rank
    return FinetuneMethod(name, lora=_ranked(lora, rank, job.lora_alpha, job.qlora_qtype if name == "qlora" else None))


def with_rank(method: FinetuneMethod, rank: int, alpha: float | None) -> FinetuneMethod:
    """``method`` with its adapters at ``rank`` (``alpha`` None: 2 x rank)."""
    return FinetuneMethod(method.name, lora=_ranked(method.lora, rank, alpha, method.lora.qtype))


def _ranked(lora: LoraSettings, rank: int, alpha: float | None, qtype: str | None) -> LoraSettings:
    return dataclasses.replace(lora, rank=rank, alpha=2.0 * rank if alpha is None else alpha, qtype=qtype)
