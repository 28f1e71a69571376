"""Per-token log-probabilities (and entropy, ...) of ``hidden @ weight.T`` without the (N, V)
logits: the statistics TRL's fused LM head asks for (``trl.trainer.utils.add_fused_lm_head``),
computed for the CPU.

TRL's own ``ChunkedLogProbFunction`` folds (4096-token x 32768-vocabulary) tiles, sized for a
GPU's Triton kernel; on a CPU it falls back to torch ops over those tiles, each a 512 MiB fp32
block plus temporaries. Here the tokens are walked in chunks whose fp32 logits fit the same
budget as our fused cross-entropy (``cross_entropy.logits_chunk_rows``: a few tens of MiB, in
cache-friendly pieces), each chunk over the whole vocabulary in one pass; the backward recomputes
each chunk's logits, forms the logits gradient in place and accumulates the hidden / weight / bias
gradients (fp32 accumulators). Measured on a 2-core AVX512 CPU at N=2000, H=512, V=128256 (fp32,
log-probs and entropy, forward + backward): 0.92x TRL's time in 0.12x its peak memory
(``scripts/bench_rl.py --trainers head``, ``benchmarks/README.md``).

The maths is TRL's (its docstring is the contract): logits ``z = softcap * tanh(x * scale /
softcap) / T`` (without softcap: ``x * scale / T``); ``log_probs = z[target] - logsumexp(z)``;
``entropy = logsumexp(z) - sum(p * z)``; ``log_sum_sq_probs = log(sum(p^2))``; ``mean_logits =
mean(z)``; ``is_top1``: the target is the first maximum of ``z``. ``log_probs`` and ``entropy``
are differentiable; the other three are not (as in TRL).
"""

from __future__ import annotations

import torch

from .cross_entropy import logits_chunk_rows

OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def token_log_probs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                    temperature: float = 1.0, softcap: float | None = None, logit_scale: float = 1.0,
                    outputs: tuple[str, ...] = ("log_probs",), chunk_bytes: int | None = None):
    """``(log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1)`` for ``hidden`` (N, H),
    ``weight`` (V, H), ``bias`` (V,) or None and ``targets`` (N,) token ids; the fields not named in
    ``outputs`` are None (``log_probs`` always computed)."""
    unknown = set(outputs) - set(OUTPUTS)
    if unknown:
        raise ValueError(f"token_log_probs outputs must be among {OUTPUTS}, got {sorted(unknown)}.")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"token_log_probs needs hidden (N, H) and weight (V, H), got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}.")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must be (N,) = {tuple(hidden.shape[:1])}, got {tuple(targets.shape)}.")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}.")
    return _TokenLogProbs.apply(hidden, weight, bias, targets, float(temperature),
                                None if softcap is None else float(softcap), float(logit_scale), tuple(outputs),
                                chunk_bytes)


def token_log_probs_reference(hidden, weight, bias, targets, temperature=1.0, softcap=None, logit_scale=1.0,
                              outputs=("log_probs",)):
    """The same through full logits and autograd: the oracle."""
    logits = hidden @ weight.t() + (0 if bias is None else bias)
    z = _transform(logits.to(torch.promote_types(logits.dtype, torch.float32)), temperature, softcap, logit_scale)
    log_z = torch.logsumexp(z, -1)
    log_p = z - log_z.unsqueeze(-1)
    p = log_p.exp()
    values = {"log_probs": log_p.gather(-1, targets.unsqueeze(-1)).squeeze(-1),
              "entropy": log_z - (p * z).sum(-1),
              "log_sum_sq_probs": torch.logsumexp(2 * log_p, -1).detach(),
              "mean_logits": z.mean(-1).detach(),
              "is_top1": z.argmax(-1) == targets}
    return tuple(values[name] if name == "log_probs" or name in outputs else None for name in OUTPUTS)


def _transform(x: torch.Tensor, temperature: float, softcap: float | None, logit_scale: float) -> torch.Tensor:
    y = x * logit_scale
    if softcap is not None:
        y = softcap * torch.tanh(y / softcap)
    return y / temperature


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    device = hidden.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype


class _TokenLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, softcap, logit_scale, outputs, chunk_bytes):
        ctx.set_materialize_grads(False)
        n_rows, vocab = hidden.shape[0], weight.shape[0]
        dtype = _compute_dtype(hidden)
        rows = logits_chunk_rows(n_rows, vocab, hidden.numel() * hidden.element_size(), chunk_bytes)
        want = {name: name in outputs for name in OUTPUTS}
        log_z = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)
        log_probs = torch.empty_like(log_z)
        entropy = torch.empty_like(log_z) if want["entropy"] else None
        log_sum_sq = torch.empty_like(log_z) if want["log_sum_sq_probs"] else None
        mean_logits = torch.empty_like(log_z) if want["mean_logits"] else None
        is_top1 = torch.empty(n_rows, dtype=torch.bool, device=hidden.device) if want["is_top1"] else None
        w = weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        for start in range(0, n_rows, rows):
            end = min(n_rows, start + rows)
            z = _transform(torch.nn.functional.linear(hidden[start:end].to(dtype), w, b).float(),
                           temperature, softcap, logit_scale)
            chunk_targets = targets[start:end]
            if mean_logits is not None:
                mean_logits[start:end] = z.mean(-1)
            if is_top1 is not None:
                is_top1[start:end] = z.argmax(-1) == chunk_targets
            chunk_log_z = torch.logsumexp(z, -1)
            log_z[start:end] = chunk_log_z
            log_probs[start:end] = z.gather(-1, chunk_targets.unsqueeze(-1)).squeeze(-1) - chunk_log_z
            if entropy is not None or log_sum_sq is not None:
                z.sub_(chunk_log_z.unsqueeze(-1))  # log p, in place
                if log_sum_sq is not None:
                    log_sum_sq[start:end] = torch.logsumexp(2 * z, -1)
                if entropy is not None:
                    entropy[start:end] = -(z.exp() * z).sum(-1)  # -sum(p log p)
        ctx.save_for_backward(hidden, weight, bias, targets, log_z, entropy if entropy is not None else log_z)
        ctx.settings = (temperature, softcap, logit_scale, rows, dtype)
        ctx.mark_non_differentiable(*(x for x in (log_sum_sq, mean_logits, is_top1) if x is not None))
        return log_probs, entropy, log_sum_sq, mean_logits, is_top1

    @staticmethod
    def backward(ctx, grad_log_probs, grad_entropy, *_):
        hidden, weight, bias, targets, log_z, entropy = ctx.saved_tensors
        temperature, softcap, logit_scale, rows, dtype = ctx.settings
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        if grad_log_probs is None and grad_entropy is None:
            return (None,) * 9
        grad_h = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
        w = weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        for start in range(0, hidden.shape[0], rows):
            end = min(hidden.shape[0], start + rows)
            h = hidden[start:end].to(dtype)
            y = torch.nn.functional.linear(h, w, b).float() * logit_scale
            t = None
            if softcap is not None:
                t = torch.tanh(y / softcap)
                y = softcap * t
            log_p = y.div_(temperature).sub_(log_z[start:end].unsqueeze(-1))  # z - log Z
            p = log_p.exp()
            grad = torch.zeros_like(p)
            if grad_entropy is not None:  # d entropy / dz_j = -p_j (log p_j + entropy)
                grad -= grad_entropy[start:end].float().unsqueeze(-1) * p * (log_p + entropy[start:end].unsqueeze(-1))
            if grad_log_probs is not None:  # d log p_target / dz_j = 1[j = target] - p_j
                g = grad_log_probs[start:end].float().unsqueeze(-1)
                grad -= g * p
                grad.scatter_add_(-1, targets[start:end].unsqueeze(-1), g)
            grad.mul_(logit_scale / temperature)
            if t is not None:
                grad.mul_(1 - t * t)
            grad = grad.to(dtype)
            if need_h:
                grad_h[start:end] = (grad @ w).to(hidden.dtype)
            if need_w:
                grad_w.addmm_(grad.t().float(), h.float())
            if need_b:
                grad_b += grad.float().sum(0)
        return (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None, None, None, None, None)
