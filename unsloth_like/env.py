"""What this machine offers: package versions, host CPU, device, bf16, kernel backends, extras.

``env_report()`` returns the text ``python -m unsloth_like doctor`` prints. Collecting never
raises: a probe that fails is reported as such, because the report is what users paste into bug
reports when something else is broken.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
import sys
from dataclasses import dataclass, field

import torch

from .host import CpuFacts, DequantizeProbe, bitsandbytes_cpu_probe, cpu_facts
from .kernels import _backend

# Distributions every install needs (triton only where it ships wheels: Linux).
REQUIRED_PACKAGES: tuple[str, ...] = (
    "torch",
    *(("triton",) if sys.platform == "linux" else ()),
    "transformers",
    "peft",
    "trl",
    "bitsandbytes",
    "accelerate",
    "datasets",
    "safetensors",
    "tokenizers",
    "sentencepiece",
    "gguf",
    "tqdm",
    "numpy",
)

# (distribution name, what it is for, how to install it).
OPTIONAL_PACKAGES: tuple[tuple[str, str, str], ...] = (
    ("xformers", "memory-efficient attention", "pip install 'unsloth-like[xformers]'"),
    ("flash-attn", "FlashAttention 2 kernels", "pip install flash-attn --no-build-isolation"),
    ("llama-cpp-python", "checking GGUF exports with llama.cpp", "pip install 'unsloth-like[gguf-check]'"),
    ("torchvision", "image processing for vision-language models", "pip install 'unsloth-like[vision]'"),
    ("deepspeed", "DeepSpeed ZeRO-2/3 on several GPUs", "pip install 'unsloth-like[deepspeed]'"),
    ("matplotlib", "the demo's loss curve", "pip install 'unsloth-like[plots]'"),
    ("pytest", "running the test suite", "pip install 'unsloth-like[dev]'"),
    ("nbclient", "running the notebooks headless", "pip install 'unsloth-like[dev]'"),
)


def package_version(distribution: str) -> str | None:
    """Installed version of a distribution, or None when it is not installed."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def is_bfloat16_supported() -> bool:
    """True when the current CUDA device trains in bf16 natively (Ampere or newer).

    Same meaning as Unsloth's helper of this name: it answers "should I train in bf16?", so on a
    CPU-only machine it is False (CPU bf16 works but is slow and not what training should pick).
    """
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


@dataclass
class DeviceInfo:
    name: str
    capability: str
    memory_gib: float


@dataclass
class EnvInfo:
    python: str
    platform: str
    unsloth_like: str
    packages: dict[str, str | None]
    optional: dict[str, str | None]
    torch_cuda: str | None
    torch_hip: str | None
    devices: list[DeviceInfo]
    bf16: bool
    triton_interpreter: bool
    device_backends: dict[str, str]
    backends: dict[str, dict[str, str]]
    cpu: CpuFacts | None = None
    bitsandbytes_cpu: DequantizeProbe | None = None
    gguf_quantisers: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def missing_required(self) -> list[str]:
        return [name for name, version in self.packages.items() if version is None]


def collect_env() -> EnvInfo:
    from . import __version__

    packages = {dist: package_version(dist) for dist in REQUIRED_PACKAGES}
    packages["torch"] = torch.__version__  # the build's own version: +cpu / +cu130 say which build it is
    optional = {dist: package_version(dist) for dist, _, _ in OPTIONAL_PACKAGES}
    devices: list[DeviceInfo] = []
    notes: list[str] = []
    try:
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            devices.append(
                DeviceInfo(props.name, f"{props.major}.{props.minor}", props.total_memory / 2**30)
            )
    except RuntimeError as error:  # a broken driver must not break the report
        notes.append(f"CUDA probe failed: {error}")
    device_types = ["cuda", "cpu"] if devices else ["cpu"]
    backends = {
        device: {name: str(backend) for name, backend in _backend.op_backends(device).items()}
        for device in device_types
    }
    if packages.get("triton", "n/a") is None:
        notes.append("Triton is missing, so every op runs its torch reference.")
    if optional.get("torchvision"):
        problem = _torchvision_problem()
        if problem:
            notes.append(problem)
    probe = bitsandbytes_cpu_probe() if packages.get("bitsandbytes") else None
    return EnvInfo(
        python=platform.python_version(),
        platform=platform.platform(),
        unsloth_like=__version__,
        packages=packages,
        optional=optional,
        torch_cuda=torch.version.cuda,
        torch_hip=getattr(torch.version, "hip", None),
        devices=devices,
        bf16=is_bfloat16_supported(),
        triton_interpreter=_backend.interpreter_enabled(),
        device_backends={device: str(_backend.backend_for_device(device)) for device in device_types},
        backends=backends,
        cpu=_cpu_facts_or_none(notes),
        bitsandbytes_cpu=probe,
        gguf_quantisers=_gguf_quantisers(notes),
        notes=notes,
    )


def _cpu_facts_or_none(notes: list[str]) -> CpuFacts | None:
    try:
        return cpu_facts()
    except Exception as error:  # the report must come out whatever the host
        notes.append(f"CPU probe failed: {error}")
        return None


def _gguf_quantisers(notes: list[str]) -> str | None:
    """Which quantisers a GGUF export runs on this CPU (builds the C ones on first use, ~1 s)."""
    try:
        from .save.gguf import native

        return native.describe()
    except Exception as error:  # the report must come out whatever the host
        notes.append(f"GGUF quantiser probe failed: {error}")
        return None


def _torchvision_problem() -> str | None:
    """Why the installed torchvision cannot run beside this torch (a build for another torch
    fails on its first compiled op), or None."""
    try:
        import torchvision

        boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
        torchvision.ops.nms(boxes, torch.ones(1), 0.5)
    except Exception as error:
        return (f"torchvision {package_version('torchvision')} does not run beside torch {torch.__version__} "
                f"({str(error).splitlines()[0] if str(error) else type(error).__name__}): install the torchvision "
                "built for this torch (same index and release pair, e.g. torch 2.14.1 with torchvision 0.29.1).")
    return None


def format_env(info: EnvInfo) -> str:
    lines = [
        f"unsloth_like {info.unsloth_like}",
        f"python       {info.python} on {info.platform}",
        "",
        "packages:",
    ]
    lines += [f"  {name:<16} {version or 'MISSING'}" for name, version in info.packages.items()]
    lines += ["", "host:"]
    if info.cpu is not None:
        lines.append(f"  cpu              {info.cpu.model}, {info.cpu.cores} cores")
        lines.append(f"  avx512           {'yes' if info.cpu.avx512 else 'no'} (torch CPU capability "
                     f"{info.cpu.torch_capability})")
    if info.bitsandbytes_cpu is not None:
        lines.append(f"  bnb 4-bit (CPU)  {info.bitsandbytes_cpu.describe()}")
    if info.gguf_quantisers is not None:
        lines.append(f"  gguf quantisers  {info.gguf_quantisers}")
    lines += ["", "device:"]
    build = f"CUDA {info.torch_cuda}" if info.torch_cuda else (f"ROCm {info.torch_hip}" if info.torch_hip else "CPU only")
    lines.append(f"  torch build      {build}")
    if info.devices:
        for index, device in enumerate(info.devices):
            lines.append(
                f"  cuda:{index}           {device.name} (compute {device.capability}, {device.memory_gib:.1f} GiB)"
            )
    else:
        lines.append("  accelerator      none (training runs on CPU in fp32)")
    lines.append(f"  bf16 training    {'yes' if info.bf16 else 'no'}")
    if info.packages.get("triton", "n/a") is None:
        triton_mode = "not installed"
    elif info.triton_interpreter:
        triton_mode = "interpreter (TRITON_INTERPRET is set): kernels run in Python on any device"
    else:
        triton_mode = "compiled, for CUDA tensors"
    lines.append(f"  triton           {triton_mode}")
    lines += ["", "kernel backends:"]
    for device, ops in info.backends.items():
        lines.append(f"  {device:<5} {'(default for ' + device + ' tensors)':<32} {info.device_backends[device]}")
        for name, backend in ops.items():
            lines.append(f"  {device:<5} {name:<32} {backend}")
    lines += ["", "optional:"]
    for dist, purpose, install in OPTIONAL_PACKAGES:
        version = info.optional[dist]
        status = version if version else f"missing -> {install}"
        lines.append(f"  {dist:<16} {status}  ({purpose})")
    if info.missing_required or info.notes:
        lines += ["", "problems:"]
        lines += [f"  required package {name} is not installed: pip install {name}" for name in info.missing_required]
        lines += [f"  {note}" for note in info.notes]
    return "\n".join(lines)


def env_report() -> str:
    """The environment report printed by ``python -m unsloth_like doctor``."""
    return format_env(collect_env())
