"""The fine-tuning jobs: a model (sketched or dense) and data in, a run directory out (codebooks,
adapter or model, log, checkpoints; resumable), and LoftQ's one-off initialisation of a QLoRA adapter."""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Any

import jax

from sketchtune_jax._utils.fileio import check_output_dir, write_json_atomic
from sketchtune_jax.data.text import is_file_source
from sketchtune_jax.io.sketched_dir import is_sketched_dir
from sketchtune_jax.jobs._common import check_run_dir, load_model
from sketchtune_jax.parallel.distributed import barrier, is_primary
from sketchtune_jax.parallel.sharding import mesh_spec
from sketchtune_jax.settings import SettingError
from sketchtune_jax.train.config import FinetuneSettings, TrainConfig
from sketchtune_jax.train.lora import LoraSettings
from sketchtune_jax.train.methods import FinetuneMethod, check_method_fits, method_for, with_rank


def finetune_to_dir(
    model_ref: str,
    out_dir: str | os.PathLike,
    config: TrainConfig,
    job: FinetuneSettings | None = None,
    *,
    data: str | os.PathLike | None = None,
    text: str | None = None,
    lora: LoraSettings | None = None,
    codebooks: str | None = None,
    adapter: str | None = None,
    dtype: str = "float32",
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    mesh: str | None = None,
) -> dict[str, Any]:
    """Fine-tune ``model_ref`` on instruction records ``data``, or on plain ``text``, as ``job`` says
    (`FinetuneSettings`: method, adapter rank and alpha, QLoRA base, template, ...; the defaults
    when None), with the trainer's ``config``; outputs in ``out_dir``.

    With ``text`` (a text/JSON/JSONL file or ``hf:`` source; ``data`` None) the ``text_range``
    fraction of it is cut into packed windows of ``config.seq_len`` tokens and every token is
    scored (language modelling; `sketchtune_jax.data.batches.text_batches`); ``val_fraction`` holds
    out the last windows. Instruction records score the response tokens only, after a prompt in
    ``template`` (``alpaca``, the paper's, or ``chat``: the tokenizer's own chat template).

    ``adapter`` (methods lora and qlora) starts from that adapter directory, whose settings (rank,
    alpha, quantized base) then replace the job's: e.g. a LoftQ initialisation made once and
    trained several times (`loftq_to_dir`). ``lora`` gives the adapters' other settings (targets,
    dropout, init, ...; `method_for` says how they meet the job's).
    ``job.method`` None means sketch tuning, which only a sketched ``model_ref`` has as its default;
    lora, qlora and full take a dense model (see `sketchtune_jax.train.methods`). ``resume`` continues the
    run found in ``out_dir`` (from its latest checkpoint); ``overwrite`` deletes it first.
    ``mesh`` (e.g. ``"data=2,model=4"``, sketch tuning only) trains on a mesh of all
    devices: batches split over ``data``, projections Megatron-style over ``model``
    (`sketchtune_jax.parallel.sharding.shard_model`); a run resumes on any mesh. ``config.scan_layers``
    (methods sketch and full) runs the decoder layers as one scan. In a run of several
    processes (`sketchtune_jax.parallel.distributed.initialize` first, then this same call in each)
    the mesh spans every process's devices (``data=<all devices>`` when ``mesh`` is None),
    each process transfers only its rows of every batch, and process 0 alone writes.
    Returns the summary also written to ``summary.json``.
    """
    from sketchtune_jax.data.batches import build_batches
    from sketchtune_jax.data.records import load_instruction_data
    from sketchtune_jax.train import finetune, trainable_parameter_count
    from sketchtune_jax.train.lora import auto_rank

    job = job or FinetuneSettings()
    sketched = is_sketched_dir(model_ref)
    method = method_for(job, lora, sketched=sketched, model=model_ref)
    if codebooks and method.name != "sketch":
        raise SettingError("codebooks", "apply to method sketch only")
    if adapter is not None:
        from sketchtune_jax.train.adapters import read_adapter_settings

        start = read_adapter_settings(adapter)
        if method.name not in ("lora", "qlora") or (start.qtype is not None) != (method.name == "qlora"):
            raise SettingError(
                "adapter",
                f"{adapter} is a {'QLoRA' if start.qtype else 'LoRA'} adapter; train it with method "
                f"{'qlora' if start.qtype else 'lora'}, not {method.name}",
            )
        method = FinetuneMethod(method.name, lora=start)
    if config.scan_layers and method.lora is not None:
        # qwix records each adapted module's own path on it, so no two layers are alike.
        raise SettingError("scan_layers", f"applies to methods sketch and full, not {method.name}")
    if (data is None) == (text is None):
        raise SettingError("data", "or {text} is needed, not both: instruction records or plain text", ("text",))
    source = data if text is None else text
    if (text is None or is_file_source(text)) and not Path(source).is_file():
        raise FileNotFoundError(f"{'data' if text is None else 'text'} file not found: {source}")
    if mesh is None and jax.process_count() > 1:
        mesh = f"data={jax.device_count()}"
    device_mesh = _training_mesh(mesh, method.name, config) if mesh is not None else None
    check_run_dir(out_dir, resume=resume, overwrite=overwrite)
    # Every process has looked at out_dir before process 0 changes it.
    barrier("finetune: output checked")
    records = load_instruction_data(data) if text is None else None
    loaded = load_model(model_ref, dtype, codebooks)
    if text is None:
        from sketchtune_jax.data.prompts import check_template

        check_template(job.template, loaded.tokenizer)
    if method.lora is not None and adapter is None and job.lora_rank == "auto":
        method = with_rank(method, auto_rank(loaded.model, method.lora.targets), job.lora_alpha)
    if adapter is None:
        model = method.prepare(loaded.model)
    else:
        from sketchtune_jax.train.adapters import load_adapter

        method.check_model(loaded.model)
        model, _ = load_adapter(loaded.model, adapter, for_training=True)
    put_batch = None
    if device_mesh is not None:
        from sketchtune_jax.parallel.sharding import shard_model

        shard_model(model, device_mesh)
        put_batch = _mesh_put_batch(device_mesh)
    if text is None:
        train, val = build_batches(
            records,
            loaded.tokenizer,
            batch_size=config.batch_size,
            seq_len=config.seq_len,
            val_fraction=job.val_fraction,
            seed=config.seed,
            on_long_prompt="skip",
            pad_multiple=job.pad_multiple,
            template=job.template,
        )
    else:
        from sketchtune_jax.data.batches import text_batches

        train, val = text_batches(
            text,
            loaded.tokenizer,
            batch_size=config.batch_size,
            seq_len=config.seq_len,
            text_range=job.text_range,
            val_fraction=job.val_fraction,
            seed=config.seed,
        )
    if overwrite and is_primary():
        shutil.rmtree(out_dir, ignore_errors=True)
    barrier("finetune: output cleared")
    writer = method.result_writer(config=loaded.config, tokenizer=loaded.tokenizer, base_model=model_ref)
    result = finetune(
        model,
        train,
        config,
        out_dir,
        val_batches=val,
        progress=progress and is_primary(),
        wrt=method.wrt,
        save_result=writer,
        put_batch=put_batch,
    )
    summary = {
        "method": method.name,
        "data": str(source),
        "objective": "instruction" if text is None else "text",
        "step": result.step,
        "loss": result.loss,
        "val_loss": result.val_loss,
        "trainable_params": trainable_parameter_count(model, method.wrt),
        "resumed_from": result.resumed_from,
        "result": result.result_path,
        "log": result.log_path,
    }
    if device_mesh is not None:
        summary["mesh"] = mesh_spec(device_mesh)
    if method.lora is not None:
        summary.update(lora_rank=method.lora.rank, lora_alpha=method.lora.alpha, lora_qtype=method.lora.qtype)
        if method.lora.init == "loftq":
            summary.update(lora_init="loftq", loftq_iters=method.lora.loftq_iters)
    if text is None:
        summary["template"] = job.template
    else:
        summary["text_range"] = list(job.text_range)
    if is_primary():
        write_json_atomic(Path(out_dir) / "summary.json", summary)
    return summary


def loftq_to_dir(
    model_ref: str,
    settings: Any,
    out_dir: str | os.PathLike,
    *,
    dtype: str = "float32",
    overwrite: bool = False,
) -> dict[str, Any]:
    """LoftQ-initialise a QLoRA adapter on ``model_ref`` once: writes ``out_dir/base`` (the quantized
    base, dequantized, as an HF directory) and ``out_dir/adapter`` (the initial adapter, PEFT format).

    ``settings`` is a `LoraSettings` with a ``qtype`` and ``init="loftq"``. Fine-tune from it with
    ``finetune_to_dir(out_dir/base, run, config, FinetuneSettings(method="qlora"), adapter=out_dir/adapter)``.
    Returns the paths and the seconds LoftQ took.
    """
    import time

    from sketchtune_jax.train.adapters import save_adapter
    from sketchtune_jax.train.lora import apply_lora
    from sketchtune_jax.train.methods import LOFTQ_BASE, write_loftq_base

    if settings.init != "loftq" or settings.qtype is None:
        raise SettingError("lora_init", "loftq_to_dir needs QLoRA settings with init='loftq'")
    check_output_dir(out_dir, overwrite=overwrite)
    loaded = load_model(model_ref, dtype)
    check_method_fits("qlora", sketched=is_sketched_dir(model_ref), model=model_ref)
    start = time.perf_counter()
    model = apply_lora(loaded.model, settings)
    seconds = time.perf_counter() - start
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = write_loftq_base(model, loaded.config, loaded.tokenizer, str(out))
    save_adapter(model, settings, out / "adapter", base_model=base, overwrite=True)
    summary = {"base": str(out / LOFTQ_BASE), "adapter": str(out / "adapter"), "loftq_seconds": seconds}
    write_json_atomic(out / "loftq.json", {**summary, "settings": dataclasses.asdict(settings), "source": model_ref})
    return summary


def _training_mesh(spec: str, method: str, config: TrainConfig):
    """The mesh ``spec`` names, after checking that ``method`` and ``config`` can train on it."""
    from sketchtune_jax.parallel.sharding import make_mesh

    if method != "sketch":
        if jax.process_count() > 1:
            raise SettingError("method", f"{method} cannot run over several processes (for now); use sketch")
        raise SettingError("mesh", "is supported for method sketch only (for now)")
    mesh = make_mesh(spec)
    data = mesh.shape["data"]
    if config.batch_size % data:
        raise SettingError(
            "batch_size",
            f"must be divisible by the {data} devices of the data axis of {{mesh}}, got {config.batch_size}",
            ("mesh",),
        )
    return mesh


def _mesh_put_batch(mesh):
    """Numpy batch -> arrays split over ``mesh``'s data axis by their batch dimension
    (dimension 1 of stacked micro-batches ``[A, B, T]``); a short last batch gets filler rows."""
    from sketchtune_jax.data.batches import pad_rows
    from sketchtune_jax.parallel.sharding import shard_batch

    def put(batch):
        dim = batch["input_ids"].ndim - 2
        return shard_batch(pad_rows(batch, mesh.shape["data"], dim=dim), mesh, dim=dim)

    return put
