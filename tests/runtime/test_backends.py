import contextlib

import torch
from torch import nn

from physis.runtime.backends import weights_frozen


def test_weights_frozen_folds_the_weights_into_the_graph() -> None:
    """Inside `weights_frozen` a compiled graph holds the weights it was traced with (they became constants);
    without it they stay inputs, and an update shows. `torch.compile(options={"freezing": True})` alone gives
    the second behaviour, which is why compile-bf16 traces its flow loop inside `weights_frozen`."""
    torch.manual_seed(0)
    x = torch.randn(4, 8)
    outs = {}
    for frozen in (True, False):
        layer = nn.Linear(8, 8).eval()
        with torch.inference_mode(), weights_frozen() if frozen else contextlib.nullcontext():
            graph = torch.compile(layer, dynamic=False)
            before = graph(x).clone()
            layer.weight.mul_(2.0)
            outs[frozen] = torch.equal(graph(x), before)
    assert outs == {True: True, False: False}
    assert not torch._inductor.config.freezing  # restored on the way out
