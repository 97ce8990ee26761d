"""One training step of a PyTorch module beside convtrain's, compared: the loss and every
parameter after the update, within the tolerance of the dtype (written once, so the step-for-step
tests of residual blocks and of per-pass algorithms measure agreement the same way)."""

import numpy as np

from tests.support.numerics import rel_err

TORCH_TOLERANCE = {"float64": 1e-10, "float32": 1e-5}


def assert_torch_step_matches(torch, net, loss, model, reference, criterion, x, y, dtype, step):
    """Take PyTorch's step on (x, y) and check it against convtrain's, whose loss was `loss`
    and whose update `net` has taken already."""
    reference.zero_grad()
    torch_loss = criterion(model(torch.from_numpy(x.copy())), torch.from_numpy(y))
    torch_loss.backward()
    reference.step()
    tolerance = TORCH_TOLERANCE[dtype]
    assert abs(loss - float(torch_loss.detach())) <= tolerance * max(1.0, abs(loss)), step
    state = model.state_dict()
    for name, value in net.state_dict_torch().items():
        assert rel_err(value.astype(np.float64), state[name].numpy().astype(np.float64)) < tolerance, (step, name)
