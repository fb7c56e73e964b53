import pytest
import torch

from sftmix_trl import mixup_loss
from sftmix_trl.sftmix.mixup import count_mixed_positions, mixed_position_masks, naive_mixup_loss


def random_batch(k=8, t=23, d=16, v=50, seed=0, dtype=torch.float64, empty_pairs=(2,)):
    g = torch.Generator().manual_seed(seed)
    h_c = torch.randn(k, t, d, generator=g, dtype=dtype, requires_grad=True)
    h_u = torch.randn(k, t, d, generator=g, dtype=dtype, requires_grad=True)
    labels = []
    for _ in range(2):
        lab = torch.full((k, t), -100)
        for row in range(k):
            start = int(torch.randint(1, t - 2, (1,), generator=g))
            end = int(torch.randint(start + 1, t + 1, (1,), generator=g))
            lab[row, start:end] = torch.randint(0, v, (end - start,), generator=g)
        labels.append(lab)
    for row in empty_pairs:
        labels[0][row] = -100  # a pair whose confident sequence has no response token
    w = torch.randn(v, d, generator=g, dtype=dtype, requires_grad=True)
    b = torch.randn(v, generator=g, dtype=dtype, requires_grad=True)
    lam = torch.distributions.Beta(0.5, 0.5).sample((k,)).to(dtype)
    return h_c, h_u, labels[0], labels[1], w, b, lam


@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
@pytest.mark.parametrize("k", [1, 3, 8])
def test_matches_naive_values_and_gradients(chunk_size, k):
    torch.manual_seed(k)
    h_c, h_u, y_c, y_u, w, b, lam = random_batch(k=k, empty_pairs=(0,) if k > 1 else ())
    fast = mixup_loss(h_c, h_u, y_c, y_u, w, lam, lm_head_bias=b, chunk_size=chunk_size)
    grads_fast = torch.autograd.grad(fast, (h_c, h_u, w, b))
    slow = naive_mixup_loss(h_c, h_u, y_c, y_u, w, lam, b)
    grads_slow = torch.autograd.grad(slow, (h_c, h_u, w, b))
    torch.testing.assert_close(fast, slow)
    for a, e in zip(grads_fast, grads_slow):
        torch.testing.assert_close(a, e)


def test_sum_reduction_is_mean_times_positions():
    h_c, h_u, y_c, y_u, w, _, lam = random_batch()
    n = int(mixed_position_masks(y_c, y_u)[2].sum())
    mean = mixup_loss(h_c, h_u, y_c, y_u, w, lam)
    total = mixup_loss(h_c, h_u, y_c, y_u, w, lam, reduction="sum")
    torch.testing.assert_close(total, mean * n)


def ntp_on_first_positions(h, labels, n, w):
    """Token-mean NTP loss of each sequence restricted to its first n[k] response positions."""
    losses = []
    for k in range(h.shape[0]):
        pos = (labels[k, 1:] != -100).nonzero().flatten()[: int(n[k])]
        logp = (h[k, pos] @ w.T).log_softmax(-1)
        losses.append(-logp.gather(1, labels[k, pos + 1][:, None]).squeeze(1))
    return torch.cat(losses).mean()


@pytest.mark.parametrize("value", [0.0, 1.0])
def test_lambda_extremes_give_ntp_of_one_side(value):
    h_c, h_u, y_c, y_u, w, _, _ = random_batch()
    lam = torch.full((h_c.shape[0],), value, dtype=h_c.dtype)
    n = mixed_position_masks(y_c, y_u)[2]
    loss = mixup_loss(h_c, h_u, y_c, y_u, w, lam, chunk_size=5)
    expected = ntp_on_first_positions(h_c, y_c, n, w) if value == 1.0 else ntp_on_first_positions(h_u, y_u, n, w)
    torch.testing.assert_close(loss, expected)


def test_no_mixed_position_gives_zero_with_gradient_path():
    h_c, h_u, y_c, y_u, w, _, lam = random_batch(k=2, empty_pairs=(0, 1))
    loss = mixup_loss(h_c, h_u, y_c, y_u, w, lam)
    assert loss.item() == 0.0
    loss.backward()
    assert h_c.grad is not None and torch.all(h_c.grad == 0)


def test_prompt_and_padding_never_mixed():
    # Positions outside the response must not receive gradient.
    h_c, h_u, y_c, y_u, w, _, lam = random_batch(k=4)
    mixup_loss(h_c, h_u, y_c, y_u, w, lam).backward()
    keep_c, keep_u, _ = mixed_position_masks(y_c, y_u)
    outside = torch.ones_like(y_c, dtype=torch.bool)
    outside[:, :-1] = ~keep_c
    assert torch.all(h_c.grad[outside] == 0)


def test_count_mixed_positions_on_interleaved_layout():
    _, _, y_c, y_u, _, _, _ = random_batch(k=3)
    interleaved = torch.stack([y_c, y_u], 1).reshape(6, -1)
    assert count_mixed_positions(interleaved) == mixed_position_masks(y_c, y_u)[2].sum()


def test_bfloat16_inputs_close_to_float64():
    h_c, h_u, y_c, y_u, w, _, lam = random_batch(d=32, v=300)
    exact = naive_mixup_loss(h_c, h_u, y_c, y_u, w, lam)
    low = mixup_loss(h_c.bfloat16(), h_u.bfloat16(), y_c, y_u, w.bfloat16(), lam, chunk_size=16)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low.double(), exact, rtol=2e-2, atol=2e-2)
