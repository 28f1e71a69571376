"""LoftQ initialisation (Li et al., 2023) on any device, for 16-bit loads.

LoftQ picks the base weight ``Q`` (a 4- or 8-bit quantisation) and the adapter so that
``Q + s·B·A`` approximates the original ``W``: alternately quantise ``W - s·B·A`` and take the
rank-r SVD of ``W - Q``. The base weight is then *replaced* by the dequantised ``Q``, so a model
saved now and reloaded in 4-bit starts exactly where training starts.

PEFT ships the same algorithm, but its implementation moves weights to CUDA unconditionally
(``peft.utils.loftq_utils``), so it cannot run on CPU; and it ignores the LoRA scaling ``s``
(its init is exact only for ``lora_alpha == r``). This one runs where the weights are, divides
``A`` by ``s``, and uses bitsandbytes' quantisers (NF4, blocksize 64, no double quantisation;
or int8 row-wise) with our bit-exact NF4 dequantisation.
"""

from __future__ import annotations

import torch
from torch import nn

from ..kernels.quant import dequantize_nf4

LOFTQ_BITS = (4, 8)


def check_loftq_config(config: dict) -> tuple[int, int]:
    bits, iters = config.get("loftq_bits", 4), config.get("loftq_iter", 1)
    if bits not in LOFTQ_BITS:
        raise ValueError(f"loftq_bits must be one of {LOFTQ_BITS}, got {bits!r}.")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters <= 0:
        raise ValueError(f"loftq_iter must be a positive integer, got {iters!r}.")
    return bits, iters


@torch.no_grad()
def apply_loftq(peft_model, adapter_name: str, loftq_config: dict) -> int:
    """Initialise every LoRA layer of ``adapter_name`` over a plain ``nn.Linear`` with LoftQ;
    returns how many layers were initialised."""
    from peft.tuners.lora import LoraLayer

    bits, iters = check_loftq_config(loftq_config)
    count = 0
    for module in peft_model.modules():
        if not isinstance(module, LoraLayer) or adapter_name not in module.lora_A:
            continue
        base = module.get_base_layer()
        if type(base) is not nn.Linear:
            continue
        lora_a, lora_b = module.lora_A[adapter_name].weight, module.lora_B[adapter_name].weight
        quantized, a, b = loftq_decompose(base.weight, bits, lora_a.shape[0], iters, module.scaling[adapter_name])
        base.weight.data = quantized.to(base.weight.dtype)
        lora_a.data = a.to(lora_a.dtype)
        lora_b.data = b.to(lora_b.dtype)
        count += 1
    return count


def loftq_decompose(weight: torch.Tensor, bits: int, rank: int, iters: int, scaling: float):
    """``(dequantised Q, A, B)`` with ``Q + scaling·B·A ≈ weight`` (all fp32)."""
    target = weight.detach().float()
    residual = target
    for step in range(iters):
        quantized = _quantize_dequantize(residual, bits)
        left, right = _low_rank(target - quantized, rank)
        if step + 1 < iters:
            residual = target - left @ right
    return quantized, right / scaling, left


def _quantize_dequantize(weight: torch.Tensor, bits: int) -> torch.Tensor:
    import bitsandbytes.functional as bnb_f

    if bits == 4:
        packed, state = bnb_f.quantize_4bit(weight.contiguous(), blocksize=64, quant_type="nf4",
                                            compress_statistics=False)
        return dequantize_nf4(packed, state, dtype=torch.float32)
    codes, scales, _ = bnb_f.int8_vectorwise_quant(weight.contiguous())
    return bnb_f.int8_vectorwise_dequant(codes, scales).float()


def _low_rank(matrix: torch.Tensor, rank: int):
    """The best rank-``rank`` factors ``L @ R`` of ``matrix`` (singular values split evenly)."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]
