"""Which kernel runs where: the one table from platform and chip to kernel backend.

=============================  ==============
lowering platform / chip       kernel backend
=============================  ==============
``tpu``                        ``mosaic_tpu``
``cuda``, compute cap. >= 9.0  ``mosaic_gpu`` (``triton`` until verified, below)
``cuda``, compute cap. < 9.0   ``triton``
``rocm``                       ``triton``
anything else (``cpu``)        ``reference``
=============================  ==============

The automatic choice is made per *lowering* platform with `jax.lax.platform_dependent`,
so ``jax.export(..., platforms=["tpu"])`` on a CPU-only host gets the TPU kernels and a
jit on a CPU never lowers a kernel. For CUDA the chip decides: a CUDA device attached to
this process gives its compute capability; with none (exporting from a CPU host) the
module is lowered for `CROSS_LOWERING_CUDA_CAPABILITY` (Hopper).

The Mosaic GPU kernels (forward, dx, codebook gradient) lower for CUDA and match the ``jnp``
twins in jax 0.10.2's Mosaic GPU interpreter, but none has been compiled on a GPU: until
`bench/gpu_check.sh` has run them against the twins on a Hopper GPU,
`MOSAIC_GPU_AUTOMATIC` is off and sm90+ gets Triton unless ``backend="mosaic_gpu"`` is
asked for. Forced, a training step on it needs Triton only for float32 activations.

Overrides, for tests and benchmarks: ``backend="triton" | "mosaic_gpu" | "mosaic_tpu" |
"reference"`` and ``interpret=True`` (the backend's own interpreter on any host). The older
names stay: ``"pallas"`` is ``"triton"`` compiled, ``"interpret"`` is ``"triton"`` interpreted.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Literal

import jax
from jax import lax

KernelBackend = Literal["triton", "mosaic_gpu", "mosaic_tpu", "reference"]
Backend = Literal["triton", "mosaic_gpu", "mosaic_tpu", "reference", "pallas", "interpret"]
KERNEL_BACKENDS: tuple[str, ...] = ("triton", "mosaic_gpu", "mosaic_tpu", "reference")
_LEGACY = {"pallas": ("triton", False), "interpret": ("triton", True)}

#: Hopper: Mosaic GPU's wgmma kernels need sm90 or newer.
MOSAIC_GPU_MIN_CAPABILITY = (9, 0)
#: Whether sm90+ chips get Mosaic GPU automatically (see the module docstring).
MOSAIC_GPU_AUTOMATIC = False
#: The chip a CUDA module is lowered for when no CUDA device is attached.
CROSS_LOWERING_CUDA_CAPABILITY = (9, 0)


@dataclasses.dataclass(frozen=True)
class Choice:
    """A resolved override: ``backend`` ``None`` means "by lowering platform" (static, hashable)."""

    backend: str | None
    interpret: bool = False


def resolve(backend: str | None, interpret: bool | None = None) -> Choice:
    """The user's ``backend=`` / ``interpret=`` as a `Choice`; errors name the bad value."""
    if backend in _LEGACY:
        name, legacy_interpret = _LEGACY[backend]
        if interpret is not None and interpret != legacy_interpret:
            raise ValueError(f"backend={backend!r} already means interpret={legacy_interpret}, got {interpret=}")
        return Choice(name, legacy_interpret)
    if backend is not None and backend not in KERNEL_BACKENDS:
        raise ValueError(f"backend must be None or one of {KERNEL_BACKENDS + tuple(_LEGACY)}, got {backend!r}")
    if interpret and backend in (None, "reference"):
        raise ValueError(f"interpret=True needs a kernel backend to interpret, got backend={backend!r}")
    return Choice(backend, bool(interpret))


def backend_for(platform: str, compute_capability: tuple[int, int] | None = None) -> KernelBackend:
    """The table above: the kernel backend for a lowering ``platform`` (and CUDA chip)."""
    if platform == "tpu":
        return "mosaic_tpu"
    if platform in ("cuda", "gpu"):
        cc = compute_capability or CROSS_LOWERING_CUDA_CAPABILITY
        hopper = tuple(cc) >= MOSAIC_GPU_MIN_CAPABILITY
        return "mosaic_gpu" if hopper and MOSAIC_GPU_AUTOMATIC else "triton"
    if platform == "rocm":
        return "triton"
    return "reference"


def _capability(device) -> tuple[int, int] | None:
    cc = getattr(device, "compute_capability", None)
    if not cc:
        return None
    major, _, minor = str(cc).partition(".")
    return int(major), int(minor or 0)


def cuda_backend() -> KernelBackend:
    """The CUDA backend for this process: by the attached GPU's compute capability, else
    for `CROSS_LOWERING_CUDA_CAPABILITY`."""
    try:
        gpus = jax.devices("cuda")
    except RuntimeError:
        gpus = []
    return backend_for("cuda", _capability(gpus[0]) if gpus else None)


def _default_platform(device) -> str:
    """The lowering platform of ``device``: ``"cuda"`` for an NVIDIA GPU."""
    if device.platform == "gpu" and "NVIDIA" in device.device_kind.upper():
        return "cuda"
    return device.platform


def default_backend() -> KernelBackend:
    """What ``backend=None`` runs on this process's default device."""
    device = jax.devices()[0]
    return backend_for(_default_platform(device), _capability(device))


def reason_for(platform: str, compute_capability: tuple[int, int] | None = None) -> str:
    """Why `backend_for` picks what it picks, in one line (for ``sketchtune info`` and benches)."""
    backend = backend_for(platform, compute_capability)
    if platform == "tpu":
        return "TPU: Mosaic TPU kernels (W_hat rebuilt tile by tile in VMEM)"
    if platform in ("cuda", "gpu"):
        cc = compute_capability or CROSS_LOWERING_CUDA_CAPABILITY
        chip = f"sm{cc[0]}{cc[1]}"
        if backend == "mosaic_gpu":
            return f"NVIDIA {chip}: Mosaic GPU kernels (Hopper or newer)"
        if tuple(cc) >= MOSAIC_GPU_MIN_CAPABILITY:
            return (
                f"NVIDIA {chip}: Triton kernels; Mosaic GPU is not picked automatically until "
                "bench/gpu_check.sh has verified it (backend='mosaic_gpu' forces it)"
            )
        return f"NVIDIA {chip}: Triton kernels (Mosaic GPU needs sm90 or newer)"
    if platform == "rocm":
        return "ROCm: Triton kernels"
    return (
        f"{platform}: no Pallas kernel runs here; the jnp twin rebuilds W_hat on every call "
        "(generate and eval precompute it once per call, sketchtune_jax.models.inference_view)"
    )


# Peak HBM bandwidth (bytes/s) by device kind, from the vendors' data sheets.
CHIP_BANDWIDTH = {
    "H100 80GB HBM3": 3.35e12,
    "H100": 3.35e12,
    "H200": 4.8e12,
    "A100-SXM4-80GB": 2.04e12,
    "A100": 1.56e12,
    "TPU v4": 1.2e12,
    "TPU v5 lite": 8.19e11,
    "TPU v5e": 8.19e11,
    "TPU v5p": 2.765e12,
    "TPU v5": 2.765e12,
    "TPU v6 lite": 1.64e12,
    "TPU v6e": 1.64e12,
}


def chip_bandwidth(device_kind: str) -> float | None:
    """Peak memory bandwidth in bytes/s of the chip named ``device_kind``: the longest
    `CHIP_BANDWIDTH` key it contains (``None``: an unknown chip, e.g. a CPU)."""
    keys = [k for k in CHIP_BANDWIDTH if k.lower() in device_kind.lower()]
    return CHIP_BANDWIDTH[max(keys, key=len)] if keys else None


def describe() -> dict[str, str | float | None]:
    """The default device, the kernel backend a sketched matmul gets there and why, and the
    chip's peak memory bandwidth (``None`` when unknown): for ``sketchtune info`` and benches."""
    device = jax.devices()[0]
    platform, cc = _default_platform(device), _capability(device)
    return {
        "platform": device.platform,
        "device": device.device_kind,
        "kernel_backend": backend_for(platform, cc),
        "reason": reason_for(platform, cc),
        "chip_bandwidth_bytes_per_s": chip_bandwidth(device.device_kind),
    }


def dispatch(
    choice: Choice,
    kernels: Mapping[str, Callable[[bool], Callable]],
    reference: Callable,
    *args,
):
    """Runs ``reference(*args)`` or ``kernels[name](interpret)(*args)`` as ``choice`` says.

    ``kernels`` maps each kernel backend to a factory taking ``interpret``. With no
    override, only the branch of the platform being lowered for is lowered.
    """
    if choice.backend == "reference":
        return reference(*args)
    if choice.backend is not None:
        return kernels[choice.backend](choice.interpret)(*args)
    return lax.platform_dependent(
        *args,
        tpu=kernels["mosaic_tpu"](False),
        cuda=kernels[cuda_backend()](False),
        rocm=kernels["triton"](False),
        default=reference,
    )
