"""``NNHandler.load`` constructs the model without the random initial values of the parameters
the checkpoint overwrites (nnhandler.skipped_init), and with them wherever it does not."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from nnh_testing import attach_loaders, make_handler
from torch import nn

from nnhandler import NNHandler
from nnhandler.skipped_init import RANDOM_INITIALISERS, construct, weights_from_checkpoint


class Recorded(nn.Module):
    """Keeps a copy of its parameters as its constructor left them."""

    def __init__(self, hidden: int = 8) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        self.register_buffer("noise", torch.empty(3).normal_(), persistent=False)
        self.as_constructed = {name: p.detach().clone() for name, p in self.named_parameters()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class RecordedWider(Recorded):
    def __init__(self, hidden: int = 8) -> None:
        super().__init__(hidden)
        self.extra = nn.Linear(1, 1)
        self.as_constructed.update({f"extra.{name}": p.detach().clone()
                                    for name, p in self.extra.named_parameters()})


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Embedding(6, 4)
        self.decoder = nn.Linear(4, 6, bias=False)
        self.decoder.weight = self.encoder.weight
        self.as_constructed = self.encoder.weight.detach().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(x)


def test_load_does_not_draw_the_initial_values_the_file_overwrites() -> None:
    handler = make_handler(model_class=Recorded, validation=False)
    handler.train(1, progress_bar=False)
    handler.save("ck.pth")
    assert all(value.abs().sum() > 0 for value in handler.module.as_constructed.values())

    loaded = NNHandler.load("ck.pth")
    module = loaded.module
    assert isinstance(module, Recorded)
    assert all(torch.count_nonzero(value) == 0 for value in module.as_constructed.values())
    for key, value in handler.module.state_dict().items():
        assert torch.equal(module.state_dict()[key], value), key
    assert torch.count_nonzero(module.noise) > 0  # a buffer: drawn as always
    attach_loaders(loaded, n=32)
    loaded.train(1, progress_bar=False)  # and it trains on from the file's weights
    assert loaded.epoch == 2


def test_strict_false_with_a_parameter_the_file_lacks_constructs_the_usual_way() -> None:
    handler = make_handler(model_class=Recorded, validation=False)
    handler.save("ck.pth")
    loaded = NNHandler.load("ck.pth", model_class=RecordedWider, strict=False,
                            skip_optimizer=True)
    module = loaded.module
    assert isinstance(module, RecordedWider)
    # every parameter, the file's ones included, came from a usual construction ...
    assert all(torch.count_nonzero(value) > 0 for value in module.as_constructed.values())
    assert torch.equal(module.extra.weight, module.as_constructed["extra.weight"])
    # ... and the file's values were loaded over it
    for key, value in handler.module.state_dict().items():
        assert torch.equal(module.state_dict()[key], value), key


def test_the_usual_construction_again_runs_in_the_context_it_is_given() -> None:
    @contextlib.contextmanager
    def seeded_five() -> Iterator[None]:
        with torch.random.fork_rng():
            torch.manual_seed(5)
            yield

    with weights_from_checkpoint(frozenset({"weight"})):  # the bias is not in the "file"
        module = construct(nn.Linear, {"in_features": 3, "out_features": 2}, seeded_five)
    torch.manual_seed(5)
    usual = nn.Linear(3, 2)
    assert torch.equal(module.weight, usual.weight) and torch.equal(module.bias, usual.bias)


def test_tied_parameters_are_skipped_when_every_name_is_in_the_file() -> None:
    names = frozenset(Tied().state_dict())
    assert names == {"encoder.weight", "decoder.weight"}
    with weights_from_checkpoint(names):
        module = construct(Tied, {}, torch.random.fork_rng)
    assert torch.count_nonzero(module.as_constructed) == 0
    with weights_from_checkpoint(frozenset({"encoder.weight"})):
        module = construct(Tied, {}, torch.random.fork_rng)
    assert torch.count_nonzero(module.as_constructed) > 0


def test_outside_a_load_nothing_is_skipped() -> None:
    module = construct(Recorded, {}, torch.random.fork_rng)
    assert all(torch.count_nonzero(value) > 0 for value in module.as_constructed.values())
    assert torch.count_nonzero(NNHandler(Recorded, device="cpu").module.net[0].weight) > 0


#: nn.init's random functions that reach RANDOM_INITIALISERS on the parameter (not orthogonal_)
NN_INIT = (nn.init.trunc_normal_, nn.init.xavier_uniform_, nn.init.xavier_normal_,
           nn.init.kaiming_normal_, nn.init.sparse_)


def _initialiser_calls() -> list[tuple[str, Callable[[torch.Tensor], Any]]]:
    calls: list[tuple[str, Callable[[torch.Tensor], Any]]] = []
    named = {f"{getattr(f, '__module__', None) or 'Tensor'}.{f.__name__}": f
             for f in (*RANDOM_INITIALISERS, *NN_INIT)}
    for name, initialiser in sorted(named.items()):
        if initialiser is nn.init.sparse_:
            calls.append((name, lambda t, f=initialiser: f(t, sparsity=0.5)))
        elif initialiser in (torch.Tensor.bernoulli_, torch.Tensor.geometric_):
            calls.append((name, lambda t, f=initialiser: f(t, 0.5)))
        else:
            calls.append((name, initialiser))
    return calls


@pytest.mark.parametrize(("name", "call"), _initialiser_calls(),
                         ids=[name for name, _ in _initialiser_calls()])
def test_every_random_initialiser_fills_a_parameter_with_zeros_and_leaves_tensors(
        name: str, call: Callable[[torch.Tensor], Any]) -> None:
    class Initialised(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.full((4, 5), 7.0))
            self.plain = torch.full((4, 5), 7.0)
            with torch.no_grad():
                call(self.weight)
                call(self.plain)

    with weights_from_checkpoint(frozenset({"weight"})):
        module = construct(Initialised, {}, torch.random.fork_rng)
    assert torch.count_nonzero(module.weight) == 0, name
    assert not torch.equal(module.plain, torch.full((4, 5), 7.0)), name  # drawn as usual
    usual = Initialised()
    assert not torch.equal(usual.weight, torch.full((4, 5), 7.0)), name


class Factorised(nn.Module):
    """Computes with the weight it has just drawn: on zeros the Cholesky fails."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(3, 3))
        nn.init.normal_(self.weight)
        with torch.no_grad():
            gram = self.weight @ self.weight.T
        self.register_buffer("factor", torch.linalg.cholesky(gram), persistent=False)


def test_a_constructor_that_fails_on_the_zeros_is_run_the_usual_way() -> None:
    with weights_from_checkpoint(frozenset({"weight"})):
        module = construct(Factorised, {}, torch.random.fork_rng)
    assert torch.count_nonzero(module.weight) > 0
    assert torch.allclose(module.factor @ module.factor.T,
                          module.weight.detach() @ module.weight.detach().T, atol=1e-4)


def test_orthogonal_init_runs_as_usual_under_a_load() -> None:
    class Orthogonal(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.empty(4, 4))
            nn.init.orthogonal_(self.weight)

    with weights_from_checkpoint(frozenset({"weight"})):
        module = construct(Orthogonal, {}, torch.random.fork_rng)
    product = module.weight.detach() @ module.weight.detach().T
    assert torch.allclose(product, torch.eye(4), atol=1e-5)
