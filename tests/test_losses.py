"""Loss conventions and the closed-form mixed derivative against autograd."""

import pytest
import torch
import torch.nn.functional as F

from metadistill import distillation_loss, mixed_derivative, validation_loss


def batch(seed=0, b=7, k=5):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, k, generator=g, dtype=torch.float64) * 2
    f = torch.randn(b, k, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, k, (b,), generator=g)
    return z, f, y


def test_lambda1_zero_is_pure_distillation_kl():
    z, f, y = batch()
    t = 2.5
    p = F.softmax(f / t, 1)
    kl = (p * (torch.log(p) - F.log_softmax(z / t, 1))).sum(1).mean()
    torch.testing.assert_close(distillation_loss(z, f, y, 0.0, t), kl)
    torch.testing.assert_close(distillation_loss(z, f, y, 0.0, t, t2_scaling=True), t**2 * kl)


def test_lambda1_one_is_hard_label_cross_entropy():
    z, f, y = batch(1)
    torch.testing.assert_close(distillation_loss(z, f, y, 1.0, 3.0), F.cross_entropy(z, y))
    torch.testing.assert_close(distillation_loss(z, f, y, torch.tensor(1.0, dtype=z.dtype), 3.0),
                               F.cross_entropy(z, y))


def test_lambda1_weights_the_hard_labels():
    z, f, y = batch(2)
    hard, soft = distillation_loss(z, f, y, 1.0, 2.0), distillation_loss(z, f, y, 0.0, 2.0)
    torch.testing.assert_close(distillation_loss(z, f, y, 0.3, 2.0), 0.3 * hard + 0.7 * soft)


def test_validation_loss_temperature():
    z, _, y = batch(3)
    torch.testing.assert_close(validation_loss(z, y, 0.1), F.cross_entropy(z / 0.1, y))


@pytest.mark.parametrize("t2", [False, True])
@pytest.mark.parametrize("lam", [(0.0, 0.3), (0.4, 1.0), (0.9, 7.0)])
def test_mixed_derivative_matches_autograd(t2, lam):
    z, f, y = batch(4)
    z = z.clone().requires_grad_()
    meta = torch.tensor(lam, dtype=torch.float64, requires_grad=True)
    loss = distillation_loss(z, f, y, meta[0], meta[1], t2_scaling=t2)
    (grad_z,) = torch.autograd.grad(loss, z, create_graph=True)
    expected = torch.stack([torch.autograd.grad(grad_z[i, j], meta, retain_graph=True)[0]
                            for i in range(z.shape[0]) for j in range(z.shape[1])]).T.reshape(2, *z.shape)
    got = mixed_derivative(z.detach(), f, y, *lam, t2_scaling=t2)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
