"""Compile every Triton kernel for a real NVIDIA GPU on a machine that has none.

The test suite proves what the kernels compute through Triton's interpreter
(``TRITON_INTERPRET=1``), but the interpreter runs the kernel body as numpy code: it accepts
programs the compiler refuses (a non-constexpr block size in ``tl.arange``, a dtype the hardware
lacks, a tensor that exceeds the register file) and says nothing about registers or spills. A
GPU session is short and rare, so this module finds such faults on CPU.

``compile_only(arch)`` makes Triton believe the current device is an ``sm_<arch>`` GPU and turns
every kernel launch into a compile: the op's real launch code runs on CPU tensors (same
specialisation of shapes, strides, dtypes and constexprs as on a GPU), Triton's own pipeline
compiles the kernel to a cubin with the bundled ``ptxas``, and the launch itself is skipped. The
outputs of a skipped launch are whatever ``torch.empty`` held: only the compiles are checked.

``launch_matrix()`` drives every op through the shapes and dtypes the models use (Llama-3.1-8B,
Qwen and odd sizes, forward and backward). Run ``python -m unsloth_like.testing.triton_compile
--arch 80 90`` for a report; ``tests/kernels/test_triton_compile.py`` runs it in CI.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import io
import json
import re
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

# Architectures checked by default: T4 (sm_75, Colab's free GPU), A100 (sm_80), H100/H200 (sm_90),
# B200 (sm_100) and RTX 50-series (sm_120).
DEFAULT_ARCHES = (75, 80, 90, 100, 120)
# The widest block the supported models need: rows of hidden sizes up to 8192 (70B-class) and the
# cross-entropy's vocabulary block. Wider blocks (row kernels allow up to 65536) compile, but
# spill registers: reported apart.
MODEL_BLOCK = 8192
_KERNEL_MODULES = ("cross_entropy", "layer_norm", "quant", "rms_norm", "rope", "swiglu")


@dataclass
class CompileRecord:
    """One kernel specialisation compiled for one architecture (or the error it raised)."""

    kernel: str
    arch: int
    case: str
    constexprs: dict
    num_warps: int
    seconds: float
    registers: int | None = None
    spill_store_bytes: int | None = None
    spill_load_bytes: int | None = None
    shared_bytes: int | None = None
    error: str | None = None


class _TargetDriver:
    """What Triton's launch path asks of the active driver, answered for a GPU that is absent."""

    def __init__(self, target):
        self.target = target

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


_PTXAS_LINE = re.compile(r"Used (\d+) registers")
_SPILL_LINE = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def _parse_ptxas_log(log: str) -> tuple[int | None, int | None, int | None]:
    """(registers, spill store bytes, spill load bytes) from ``ptxas -v`` output."""
    registers = _PTXAS_LINE.search(log)
    spills = _SPILL_LINE.search(log)
    return (
        int(registers.group(1)) if registers else None,
        int(spills.group(1)) if spills else None,
        int(spills.group(2)) if spills else None,
    )


class _Recorder:
    """Triton's ``jit_cache_hook``: compiles the specialisation it is shown, then vetoes the launch."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.arch = arch
        self.target = GPUTarget("cuda", arch, 32)
        self.case = ""
        self.records: list[CompileRecord] = []
        self._seen: set[tuple] = set()

    def __call__(self, *, key, fn, compile, **_unused) -> bool:
        import triton
        from triton import knobs
        from triton.compiler import ASTSource

        name = fn.name
        arg_names = fn.jit_function.arg_names
        constexprs = {".".join([arg_names[path[0]], *map(str, path[1:])]): _plain(value)
                      for path, value in compile["constants"].items()}
        identity = (name, str(key))
        if identity in self._seen:  # Triton would reuse its cached binary: nothing new to compile
            return True
        self._seen.add(identity)
        record = CompileRecord(name, self.arch, self.case, constexprs, compile["num_warps"], 0.0)
        options = {k: compile[k] for k in ("num_warps", "num_ctas", "num_stages", "enable_fp_fusion")}
        source = ASTSource(fn.jit_function, compile["signature"], compile["constants"], compile["configs"][0])
        log = io.StringIO()
        start = time.perf_counter()
        try:
            with knobs.nvidia.scope(), knobs.compilation.scope(), contextlib.redirect_stdout(log):
                knobs.nvidia.dump_ptxas_log = True  # ptxas -v: registers and spills
                knobs.compilation.always_compile = True  # a cached binary would skip ptxas and its log
                binary = triton.compile(source, target=self.target, options=options)
            record.shared_bytes = int(binary.metadata.shared)
            record.registers, record.spill_store_bytes, record.spill_load_bytes = _parse_ptxas_log(log.getvalue())
        except Exception as exc:  # recorded, reported, and failed on by the caller
            record.error = "".join(traceback.format_exception_only(type(exc), exc)).strip()[-2000:]
        record.seconds = round(time.perf_counter() - start, 3)
        self.records.append(record)
        return True  # veto: there is no device to launch on


def _plain(value):
    """A constexpr value as JSON can hold it."""
    value = getattr(value, "value", value)
    return value if isinstance(value, (bool, int, float, str, type(None))) else str(value)


@contextlib.contextmanager
def compile_only(arch: int) -> Iterator[_Recorder]:
    """Inside the block, every Triton launch of our ops compiles for ``sm_<arch>`` and runs nothing.

    Our kernel modules are told to pick their Triton path for CPU tensors (their module-level
    ``select_backend`` is swapped for the block, then restored). Of Triton, only the active
    driver and the ``jit_cache_hook`` knob change, and both are restored; nothing else is patched.
    """
    from ..kernels import _backend

    if _backend.interpreter_enabled():
        raise RuntimeError(
            "compile_only needs Triton's compiler, but TRITON_INTERPRET was set when the kernels were "
            "imported; run it in a process without TRITON_INTERPRET."
        )
    if not _backend.triton_available():
        raise RuntimeError("compile_only needs Triton: pip install triton.")
    from triton import knobs
    from triton.runtime.driver import driver

    recorder = _Recorder(arch)
    modules = [importlib.import_module(f"unsloth_like.kernels.{name}") for name in _KERNEL_MODULES]
    saved = [(module, module.select_backend) for module in modules]
    previous_hook = knobs.runtime.jit_cache_hook
    # ``reset_active`` would probe for a real GPU driver and fail on a machine without one, so
    # the previous (usually still unresolved) driver slot is put back as it was.
    previous_driver = driver._active
    driver.set_active(_TargetDriver(recorder.target))
    knobs.runtime.jit_cache_hook = recorder
    for module in modules:
        module.select_backend = lambda *tensors: _backend.Backend.TRITON
    try:
        yield recorder
    finally:
        for module, original in saved:
            module.select_backend = original
        knobs.runtime.jit_cache_hook = previous_hook
        driver._active = previous_driver


# ------------------------------------------------------------------------------------------
# the launch matrix: every op, with the shapes and dtypes the supported models use
# ------------------------------------------------------------------------------------------

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# (name, rows, cols): hidden sizes of Llama-3.1-8B / Qwen2.5-7B / Qwen3-4B / 70B, an odd one,
# the largest single-block row, and head_dim rows (Qwen3's q/k norm).
_ROW_CASES = (("llama-8b", 6, 4096), ("qwen2.5-7b", 5, 3584), ("qwen3-4b", 3, 2560), ("70b", 2, 8192),
              ("odd", 7, 1000), ("max", 2, 65536), ("head_dim", 33, 128))
_VOCABS = (32000, 128256, 151936, 262144)


def _grad(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_(True)


def _backward(*outputs: torch.Tensor) -> None:
    live = [o for o in outputs if o.requires_grad]
    torch.autograd.backward(live, [torch.ones_like(o) for o in live])


def _rms_norm_cases() -> Iterator[tuple[str, Callable[[], None]]]:
    from ..kernels import rms_norm

    for dtype in _DTYPES:
        for name, rows, cols in _ROW_CASES:
            def run(dtype=dtype, rows=rows, cols=cols):
                x, w = _grad(torch.ones(rows, cols, dtype=dtype)), _grad(torch.ones(cols, dtype=dtype))
                _backward(rms_norm(x, w, 1e-6))
            yield f"rms_norm {name} {dtype}", run
    for x_dtype, w_dtype, offset in ((torch.bfloat16, torch.float32, 0.0), (torch.bfloat16, torch.bfloat16, 1.0)):
        def run(x_dtype=x_dtype, w_dtype=w_dtype, offset=offset):
            x, w = _grad(torch.ones(2, 9, 4096, dtype=x_dtype)), _grad(torch.ones(4096, dtype=w_dtype))
            _backward(rms_norm(x, w, 1e-6, offset))
        yield f"rms_norm x {x_dtype} weight {w_dtype} offset {offset}", run


def _layer_norm_cases() -> Iterator[tuple[str, Callable[[], None]]]:
    from ..kernels import layer_norm

    for dtype in _DTYPES:
        for affine in (True, False):
            for cols in (1152, 4096, 1001):
                def run(dtype=dtype, affine=affine, cols=cols):
                    x = _grad(torch.ones(5, cols, dtype=dtype))
                    w = _grad(torch.ones(cols, dtype=dtype)) if affine else None
                    b = _grad(torch.zeros(cols, dtype=dtype)) if affine else None
                    _backward(layer_norm(x, w, b, 1e-5))
                yield f"layer_norm cols {cols} affine {affine} {dtype}", run


def _rope_cases() -> Iterator[tuple[str, Callable[[], None]]]:
    from ..kernels import apply_rope

    # (heads, kv_heads, head_dim, rotary_dim): Llama-3.1-8B, Qwen2.5-7B, an odd head_dim with a
    # partial rotary dimension (Phi-style), Gemma-style 256.
    shapes = ((32, 8, 128, 128), (28, 4, 128, 128), (32, 32, 80, 32), (8, 4, 256, 256))
    for dtype in _DTYPES:
        for heads, kv_heads, head_dim, rotary in shapes:
            for positions in (False, True):
                for inplace in (False, True):
                    def run(dtype=dtype, heads=heads, kv=kv_heads, dim=head_dim, rotary=rotary,
                            positions=positions, inplace=inplace):
                        batch, seq = 2, 17
                        q = torch.ones(batch, seq, heads, dim, dtype=dtype).transpose(1, 2)  # HF's view
                        k = torch.ones(batch, seq, kv, dim, dtype=dtype).transpose(1, 2)
                        if inplace:
                            q, k = q.contiguous(), k.contiguous()
                        else:
                            q, k = _grad(q), _grad(k)
                        table = 64 if positions else seq
                        cos = torch.ones(table if positions else batch, *(() if positions else (seq,)), rotary, dtype=dtype)
                        sin = torch.zeros_like(cos)
                        pos = torch.arange(seq).expand(batch, seq) if positions else None
                        out_q, out_k = apply_rope(q, k, cos, sin, pos, inplace=inplace)
                        if not inplace:
                            _backward(out_q, out_k)
                    yield (f"rope heads {heads}/{kv_heads} dim {head_dim} rotary {rotary} "
                           f"positions {positions} inplace {inplace} {dtype}"), run


def _gated_cases() -> Iterator[tuple[str, Callable[[], None]]]:
    from ..kernels import gated_activation_backward, gated_activation_forward, geglu, swiglu

    for dtype in _DTYPES:
        for cols in (14336, 18944, 1003):
            def run(dtype=dtype, cols=cols):
                gate, up = _grad(torch.ones(3, cols, dtype=dtype)), _grad(torch.ones(3, cols, dtype=dtype))
                _backward(swiglu(gate, up))
                for approximate in ("none", "tanh"):
                    _backward(geglu(gate, up, approximate))
                plain_gate, plain_up = gate.detach(), up.detach()
                for activation in ("silu", "gelu", "gelu_tanh"):
                    gated_activation_forward(plain_gate, plain_up, activation)
                    for need_out in (False, True):
                        gated_activation_backward(torch.ones_like(plain_gate), plain_gate, plain_up, activation, need_out)
            yield f"gated activations cols {cols} {dtype}", run


def _cross_entropy_cases() -> Iterator[tuple[str, Callable[[], None]]]:
    from ..kernels import cross_entropy, fused_linear_cross_entropy

    for dtype in _DTYPES:
        for vocab in _VOCABS:
            def run(dtype=dtype, vocab=vocab):
                labels = torch.tensor([1, -100, 5, 7])
                logits = _grad(torch.zeros(4, vocab, dtype=dtype))
                _backward(cross_entropy(logits, labels))
                _backward(cross_entropy(logits, labels, softcap=30.0, logit_scale=0.5, label_smoothing=0.1))
                _backward(cross_entropy(logits, labels, reduction="none"))
            yield f"cross_entropy vocab {vocab} {dtype}", run
        for trained_head in (False, True):
            def run(dtype=dtype, trained_head=trained_head):
                hidden = _grad(torch.zeros(2, 5, 64, dtype=dtype))
                weight = torch.zeros(128256, 64, dtype=dtype).requires_grad_(trained_head)
                labels = torch.tensor([[1, 2, -100, 4, 5], [6, 7, 8, -100, 9]])
                _backward(fused_linear_cross_entropy(hidden, weight, labels))
                _backward(fused_linear_cross_entropy(hidden, weight, labels, softcap=30.0))
            yield f"fused_linear_cross_entropy lm_head trained {trained_head} {dtype}", run


def _nf4_cases() -> Iterator[tuple[str, Callable[[], None]]]:
    from ..kernels import dequantize_nf4

    try:
        import bitsandbytes.functional as bnbf
    except ImportError:  # the quant extra is absent: its kernel is reported as not covered
        return
    for nested in (False, True):
        for dtype in _DTYPES:
            def run(nested=nested, dtype=dtype):
                weight = torch.linspace(-1, 1, 4096 * 64, dtype=dtype).reshape(64 * 8, 512)
                packed, state = bnbf.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=nested)
                dequantize_nf4(packed, state)
                dequantize_nf4(packed, state, dtype=torch.float32)
            yield f"dequantize_nf4 nested {nested} {dtype}", run


def _model_cases(zoo_cache: str | None = None) -> Iterator[tuple[str, Callable[[], None]]]:
    """The launch sites as the patched models reach them: LoRA and QLoRA steps, then generation.

    Qwen3 brings the q/k norm on head_dim rows, Llama the plain stack; bf16 as on a GPU. The
    step's values are garbage (no kernel runs), its launches are the real ones.
    """
    from ..models.loader import FastLanguageModel
    from .zoo import zoo_model_dir

    for zoo_name in ("llama", "qwen3"):
        for quantized in (False, True):
            def run(zoo_name=zoo_name, quantized=quantized):
                model, tokenizer = FastLanguageModel.from_pretrained(
                    str(zoo_model_dir(zoo_name, zoo_cache)), dtype=torch.bfloat16, load_in_4bit=quantized)
                model = FastLanguageModel.get_peft_model(model, r=8, use_gradient_checkpointing="unsloth")
                FastLanguageModel.for_training(model)  # the fused loss is the training path
                ids = torch.arange(3, 40).reshape(1, -1)
                model(input_ids=ids, labels=ids).loss.backward()
                FastLanguageModel.for_inference(model)
                model.generate(input_ids=ids[:, :5], max_new_tokens=2, do_sample=False)
            yield f"model {zoo_name} {'QLoRA' if quantized else 'LoRA'} bf16 step + generate", run


CASE_FAMILIES = {
    "rms_norm": _rms_norm_cases,
    "layer_norm": _layer_norm_cases,
    "rope": _rope_cases,
    "gated": _gated_cases,
    "cross_entropy": _cross_entropy_cases,
    "nf4": _nf4_cases,
    "models": _model_cases,
}


def launch_matrix(arch: int, families: tuple[str, ...] | None = None,
                  zoo_cache: str | None = None) -> list[CompileRecord]:
    """Compile every launch of the matrix for ``sm_<arch>``; returns one record per specialisation.

    ``zoo_cache``: where the "models" family builds its zoo models (default: the zoo's cache).
    """
    chosen = families or tuple(CASE_FAMILIES)
    unknown = sorted(set(chosen) - set(CASE_FAMILIES))
    if unknown:
        raise ValueError(f"Unknown case families {unknown}; choose from {sorted(CASE_FAMILIES)}.")
    with compile_only(arch) as recorder:
        for family in chosen:
            cases = _model_cases(zoo_cache) if family == "models" else CASE_FAMILIES[family]()
            for case, run in cases:
                recorder.case = case
                run()
    return recorder.records


def kernels_defined() -> list[str]:
    """Names of every ``@triton.jit`` kernel (launched ones, not inlined helpers) in our modules."""
    import triton

    names = []
    for module_name in _KERNEL_MODULES:
        module = importlib.import_module(f"unsloth_like.kernels.{module_name}")
        names += [name for name, value in vars(module).items()
                  if isinstance(value, triton.runtime.JITFunction) and name.endswith("_kernel")]
    return sorted(names)


def summarize(records: list[CompileRecord]) -> list[dict]:
    """Per (kernel, arch): specialisations compiled, failures, most registers, spills, shared memory.

    Spills are given twice: over the blocks models use (``BLOCK`` up to ``MODEL_BLOCK``) and over all.
    """
    table: dict[tuple[str, int], dict] = {}
    for r in records:
        row = table.setdefault((r.kernel, r.arch), {
            "kernel": r.kernel, "arch": r.arch, "specialisations": 0, "failed": 0, "max_registers": 0,
            "max_spill_bytes_model_blocks": 0, "max_spill_bytes": 0, "max_shared_bytes": 0, "compile_seconds": 0.0,
        })
        row["specialisations"] += 1
        row["compile_seconds"] = round(row["compile_seconds"] + r.seconds, 2)
        if r.error:
            row["failed"] += 1
            continue
        row["max_registers"] = max(row["max_registers"], r.registers or 0)
        spilled = (r.spill_store_bytes or 0) + (r.spill_load_bytes or 0)
        row["max_spill_bytes"] = max(row["max_spill_bytes"], spilled)
        if r.constexprs.get("BLOCK", 0) <= MODEL_BLOCK:
            row["max_spill_bytes_model_blocks"] = max(row["max_spill_bytes_model_blocks"], spilled)
        row["max_shared_bytes"] = max(row["max_shared_bytes"], r.shared_bytes or 0)
    return sorted(table.values(), key=lambda row: (row["kernel"], row["arch"]))


def markdown(summary: list[dict]) -> str:
    lines = [f"| kernel | sm | specialisations | failed | max registers | max spill bytes, BLOCK <= {MODEL_BLOCK} "
             "| max spill bytes, any BLOCK | max shared bytes |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {row['kernel']} | {row['arch']} | {row['specialisations']} | {row['failed']} | {row['max_registers']} "
              f"| {row['max_spill_bytes_model_blocks']} | {row['max_spill_bytes']} | {row['max_shared_bytes']} |"
              for row in summary]
    return "\n".join(lines)


def _write_report(path: Path, arches: list[int], summary: list[dict], records: list[CompileRecord]) -> None:
    import triton

    payload = {"date": datetime.date.today().isoformat(), "triton": triton.__version__, "torch": torch.__version__,
               "arches": arches, "model_block": MODEL_BLOCK, "summary": summary,
               "records": [asdict(r) for r in records]}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(report_json(payload))
    partial.replace(path)


def report_json(payload: dict) -> str:
    """The report as JSON with one record a line: readable, and small in a diff."""
    head = json.dumps({k: v for k, v in payload.items() if k != "records"}, indent=1)
    records = ",\n".join("  " + json.dumps(r) for r in payload["records"])
    return f'{head[:-2]},\n "records": [\n{records}\n ]\n}}\n'



def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(DEFAULT_ARCHES),
                        help="CUDA compute capabilities, e.g. 75 (T4) 80 (A100) 90 (H100/H200) 120 (RTX 50)")
    parser.add_argument("--family", nargs="+", choices=sorted(CASE_FAMILIES), help="only these op families")
    parser.add_argument("--json", help="write every record and the summary to this file")
    parser.add_argument("--zoo-cache", help="directory for the zoo models of the 'models' family")
    args = parser.parse_args(argv)
    families = tuple(args.family) if args.family else None
    records = [r for arch in args.arch for r in launch_matrix(arch, families, args.zoo_cache)]
    summary = summarize(records)
    print(markdown(summary))
    for r in records:
        if r.error:
            print(f"\nFAILED {r.kernel} sm_{r.arch} ({r.case}; {r.constexprs}):\n{r.error}", file=sys.stderr)
    if args.json:
        _write_report(Path(args.json), args.arch, summary, records)
    return 1 if any(r.error for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
