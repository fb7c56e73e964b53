"""The SFTMix Mixup loss on final hidden states, computed in chunks so the full logits never exist at once.

For each confident/unconfident pair k, the first N_k = min(N_c, N_u) response-predicting positions of both sequences
are mixed in order (prompts, user turns and padding never are; a multi-turn conversation's positions run across its
assistant turns, so the first N_k may end inside a later turn):

    z_n      = lam_k * h_c[n] + (1 - lam_k) * h_u[n]                      # (D,)
    loss_n   = lam_k * CE(lm_head(z_n), y_c[n]) + (1 - lam_k) * CE(lm_head(z_n), y_u[n])

and the loss is the token-weighted mean (or sum) of loss_n over all mixed positions of the batch.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def mixed_position_masks(
    labels_confident: torch.Tensor, labels_unconfident: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Which positions of each sequence enter the Mixup term.

    Position t predicts `labels[:, t + 1]`, so the masks are over the T - 1 shifted positions.
    Returns `(keep_c, keep_u, n)`: boolean masks (K, T-1) selecting the first n_k response-predicting positions of
    each sequence, and n (K,). Row-major order of `keep_c` and `keep_u` pairs the n-th position of c with that of u.
    """
    is_response_c = labels_confident[:, 1:] != IGNORE_INDEX  # (K, T-1)
    is_response_u = labels_unconfident[:, 1:] != IGNORE_INDEX
    n = torch.minimum(is_response_c.sum(1), is_response_u.sum(1))  # (K,)
    keep_c = is_response_c & (is_response_c.cumsum(1) <= n[:, None])
    keep_u = is_response_u & (is_response_u.cumsum(1) <= n[:, None])
    return keep_c, keep_u, n


def count_mixed_positions(labels: torch.Tensor) -> torch.Tensor:
    """Mixed positions of a paired batch laid out as [c_1, u_1, c_2, u_2, ...] (rows 2k and 2k+1 are pair k)."""
    return mixed_position_masks(labels[0::2], labels[1::2])[2].sum()


class _MixedHeadCrossEntropy(torch.autograd.Function):
    """Sum over positions of lam * CE(z W^T + b, y_c) + (1 - lam) * CE(z W^T + b, y_u), chunk by chunk.

    The gradients are computed in the forward, chunk by chunk, while each chunk's logits exist anyway: the backward
    then costs nothing and nothing of size (positions x vocabulary) is kept for it.
    """

    @staticmethod
    def forward(ctx, z, weight, bias, y_c, y_u, lam, chunk_size):
        # z: (M, D) mixed hidden states; weight: (V, D); bias: (V,) or None; y_c, y_u: (M,); lam: (M,) float32
        needs_z, needs_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        needs_b = bias is not None and ctx.needs_input_grad[2]
        acc = torch.promote_types(z.dtype, torch.float32)  # float32 logits for bf16/fp16 inputs, float64 stays
        grad_z = torch.empty_like(z) if needs_z else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if needs_w else None
        grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if needs_b else None
        total = torch.zeros((), dtype=acc, device=z.device)
        for start in range(0, z.shape[0], chunk_size):
            end = min(start + chunk_size, z.shape[0])
            z_chunk, lam_chunk = z[start:end], lam[start:end]
            logits = (z_chunk @ weight.T).to(acc)  # (m, V): the only buffer of this size, reused in place below
            if bias is not None:
                logits += bias.to(acc)
            rows = torch.arange(end - start, device=z.device)
            logit_c, logit_u = logits[rows, y_c[start:end]], logits[rows, y_u[start:end]]  # (m,)
            shift = logits.amax(dim=-1, keepdim=True)  # (m, 1)
            sum_exp = logits.sub_(shift).exp_().sum(dim=-1, keepdim=True)  # logits now hold exp(logit - max)
            log_norm = (sum_exp.log() + shift).squeeze(1)  # (m,) logsumexp
            total += (log_norm - lam_chunk * logit_c - (1 - lam_chunk) * logit_u).sum()
            if needs_z or needs_w or needs_b:
                # d loss_n / d logits = softmax - lam * onehot(y_c) - (1 - lam) * onehot(y_u), formed in place
                grad_logits = logits.div_(sum_exp)
                grad_logits.index_put_((rows, y_c[start:end]), -lam_chunk, accumulate=True)
                grad_logits.index_put_((rows, y_u[start:end]), lam_chunk - 1, accumulate=True)
                if needs_z:
                    grad_z[start:end] = (grad_logits.to(weight.dtype) @ weight).to(z.dtype)
                if needs_w:
                    grad_w += grad_logits.T @ z_chunk.to(acc)
                if needs_b:
                    grad_b += grad_logits.sum(0)
        ctx.save_for_backward(grad_z, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_z, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        return (
            None if grad_z is None else grad_z * grad_output.to(grad_z.dtype),
            None if grad_w is None else (grad_w * grad_output).to(w_dtype),
            None if grad_b is None else (grad_b * grad_output).to(b_dtype),
            None,
            None,
            None,
            None,
        )


def mixup_loss(
    hidden_confident: torch.Tensor,
    hidden_unconfident: torch.Tensor,
    labels_confident: torch.Tensor,
    labels_unconfident: torch.Tensor,
    lm_head_weight: torch.Tensor,
    lam: torch.Tensor,
    *,
    lm_head_bias: torch.Tensor | None = None,
    chunk_size: int = 256,
    reduction: str = "mean",
) -> torch.Tensor:
    """SFTMix's Mixup loss of K confident/unconfident pairs.

    Args:
        hidden_confident, hidden_unconfident: (K, T, D) final hidden states (the LM head's input), right-padded to T.
        labels_confident, labels_unconfident: (K, T) labels as in the batch, not shifted, -100 outside the response.
        lm_head_weight: (V, D) LM head weight.
        lam: (K,) mixing weights in [0, 1], one per pair.
        lm_head_bias: optional (V,) LM head bias.
        chunk_size: mixed positions whose float32 logits exist at once; the peak memory of the loss is about
            chunk_size x V x 4 bytes (one buffer, reused in place for the softmax and its gradient), whatever the
            number of mixed positions.
        reduction: "mean" over all mixed positions, or "sum" (the caller normalises, e.g. over the global batch).

    Returns:
        A scalar; 0 with a gradient path to the hidden states when no pair has a mixed position.
    """
    if hidden_confident.shape != hidden_unconfident.shape or labels_confident.shape != labels_unconfident.shape:
        raise ValueError("confident and unconfident inputs must have the same shapes (pad both to one length)")
    keep_c, keep_u, n = mixed_position_masks(labels_confident, labels_unconfident)
    return mixup_loss_at(
        hidden_confident[:, :-1][keep_c],  # (M, D), pair-major then position order
        hidden_unconfident[:, :-1][keep_u],
        labels_confident[:, 1:][keep_c],  # (M,)
        labels_unconfident[:, 1:][keep_u],
        n,
        lm_head_weight,
        lam,
        lm_head_bias=lm_head_bias,
        chunk_size=chunk_size,
        reduction=reduction,
    )


def mixup_loss_at(
    hidden_confident: torch.Tensor,
    hidden_unconfident: torch.Tensor,
    targets_confident: torch.Tensor,
    targets_unconfident: torch.Tensor,
    num_mixed: torch.Tensor,
    lm_head_weight: torch.Tensor,
    lam: torch.Tensor,
    *,
    lm_head_bias: torch.Tensor | None = None,
    chunk_size: int = 256,
    reduction: str = "mean",
) -> torch.Tensor:
    """The Mixup loss on positions already selected: `mixup_loss` without the (K, T, D) layout, so a caller holding
    the hidden states in another layout (a padding-free row) gathers only the M mixed positions.

    Args:
        hidden_confident, hidden_unconfident: (M, D) hidden states of the mixed positions, pair-major then position
            order (the n-th row of each is the n-th mixed position of its pair).
        targets_confident, targets_unconfident: (M,) the tokens those positions predict.
        num_mixed: (K,) mixed positions of each pair, summing to M.
        lm_head_weight, lam, lm_head_bias, chunk_size, reduction: as for `mixup_loss`.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    total_mixed = int(num_mixed.sum())
    if total_mixed == 0:
        return (hidden_confident.sum() + hidden_unconfident.sum()) * 0.0
    acc = torch.promote_types(hidden_confident.dtype, torch.float32)
    lam_pos = lam.to(hidden_confident.device, acc).repeat_interleave(num_mixed.to(hidden_confident.device))  # (M,)
    lam_h = lam_pos.to(hidden_confident.dtype)[:, None]
    z = lam_h * hidden_confident + (1 - lam_h) * hidden_unconfident  # (M, D)
    total = _MixedHeadCrossEntropy.apply(
        z, lm_head_weight, lm_head_bias, targets_confident, targets_unconfident, lam_pos, chunk_size
    )
    return total / total_mixed if reduction == "mean" else total


def naive_mixup_loss(
    hidden_confident: torch.Tensor,
    hidden_unconfident: torch.Tensor,
    labels_confident: torch.Tensor,
    labels_unconfident: torch.Tensor,
    lm_head_weight: torch.Tensor,
    lam: torch.Tensor,
    lm_head_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference implementation, pair by pair with full logits: for tests and the memory benchmark only."""
    losses = []
    for k in range(hidden_confident.shape[0]):
        pos_c = (labels_confident[k, 1:] != IGNORE_INDEX).nonzero().flatten()
        pos_u = (labels_unconfident[k, 1:] != IGNORE_INDEX).nonzero().flatten()
        n = min(len(pos_c), len(pos_u))
        if n == 0:
            continue
        pos_c, pos_u = pos_c[:n], pos_u[:n]
        z = lam[k] * hidden_confident[k, pos_c] + (1 - lam[k]) * hidden_unconfident[k, pos_u]
        logits = torch.nn.functional.linear(z, lm_head_weight, lm_head_bias)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        log_probs = logits.log_softmax(-1)
        nll_c = -log_probs.gather(1, labels_confident[k, pos_c + 1][:, None]).squeeze(1)
        nll_u = -log_probs.gather(1, labels_unconfident[k, pos_u + 1][:, None]).squeeze(1)
        losses.append(lam[k] * nll_c + (1 - lam[k]) * nll_u)
    if not losses:
        return hidden_confident.sum() * 0.0
    return torch.cat(losses).mean()
