"""torch_swap.call_with against torch.func.functional_call (the oracle): the same outputs and
gradients bit for bit, tied parameters and shared submodules filled in every slot, buffers
swapped, and the module's own tensors back afterwards, also after an error."""
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from pipetrain.stages.torch_swap import call_with, slots  # noqa: E402


class Tied(nn.Module):
    """An embedding and a head sharing one weight, one block registered under two names, and a buffer."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 6, bias=False)
        self.block = nn.Sequential(nn.Linear(6, 6), nn.Tanh())
        self.head = nn.Linear(6, 6, bias=False)
        self.head.weight = self.embed.weight
        self.again = self.block
        self.register_buffer("shift", torch.full((6,), 0.25))

    def forward(self, x):
        x = self.again(self.block(self.embed(x)))
        return self.head(x) + self.shift


def _other_values(module, seed):
    gen = torch.Generator().manual_seed(seed)
    values = {n: torch.randn(p.shape, generator=gen).requires_grad_() for n, p in module.named_parameters()}
    values.update({n: torch.randn(b.shape, generator=gen) for n, b in module.named_buffers()})
    return values


@pytest.mark.parametrize("make", [lambda: nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 6)), Tied])
def test_outputs_and_gradients_equal_functional_call_bit_for_bit(make):
    torch.manual_seed(0)
    module = make()
    own = {n: p.detach().clone() for n, p in module.state_dict(keep_vars=True).items()}
    x = torch.randn(4, 5 if isinstance(module, nn.Sequential) else 6)
    ours_values, theirs_values = _other_values(module, 1), _other_values(module, 1)

    ours = call_with(module, ours_values, x)
    ours.square().sum().backward()
    # the module's own tensors are back, untouched (checked before functional_call runs: torch
    # 2.13's leaves a submodule registered under two names holding the values it was given)
    for name, tensor in module.state_dict(keep_vars=True).items():
        assert isinstance(tensor, nn.Parameter) or name == "shift", name
        assert torch.equal(tensor.detach(), own[name]), name
    theirs = torch.func.functional_call(module, theirs_values, (x,))
    assert torch.equal(ours, theirs)
    theirs.square().sum().backward()
    for name, value in ours_values.items():
        if value.requires_grad:
            assert torch.equal(value.grad, theirs_values[name].grad), name


def test_a_tied_weight_fills_every_slot_it_has_and_the_originals_come_back():
    module = Tied()
    table = slots(module)
    assert "head.weight" not in table  # the deduplicated name is the first one, as named_parameters gives it
    assert len(table["embed.weight"]) == 2
    assert len(table["block.0.weight"]) == 2  # the block sits under two names
    assert set(table) == {n for n, _ in module.named_parameters()} | {"shift"}
    original = module.embed.weight
    seen = []
    module.register_forward_hook(lambda m, i, o: seen.append((m.embed.weight, m.head.weight)))
    value = torch.zeros(6, 6)
    call_with(module, {"embed.weight": value}, torch.ones(1, 6))
    assert seen[0][0] is value and seen[0][1] is value
    assert module.embed.weight is original and module.head.weight is original


def test_an_error_inside_the_call_restores_the_module_and_an_unknown_name_is_named():
    module = nn.Sequential(nn.Linear(3, 3))
    original = module[0].weight
    with pytest.raises(RuntimeError):
        call_with(module, {"0.weight": torch.zeros(2, 2)}, torch.ones(1, 3))  # wrong shape: matmul fails
    assert module[0].weight is original
    with pytest.raises(KeyError, match="no parameter or buffer '0.wieght'"):
        call_with(module, {"0.wieght": torch.zeros(3, 3)}, torch.ones(1, 3))
    assert module[0].weight is original
