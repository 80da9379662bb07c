"""BatchNorm over the global batch on CPU processes: 2 gloo processes = 1 process on the whole batch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import free_port
from timm.layers import BatchNormAct2d
from torch import nn

from selfsup.errors import UsageError
from selfsup.ssl.syncbn import (
    AllReduceBatchNorm1d,
    AllReduceBatchNorm2d,
    AllReduceBatchNormAct2d,
    convert_batchnorm,
)


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.Conv2d(4, 4, 1),
        BatchNormAct2d(4),  # timm's (BoTNet)
        nn.Flatten(),
        nn.LazyLinear(5),
        nn.BatchNorm1d(5),
    )
    net(torch.zeros(2, 3, 6, 6))  # materialise the lazy layer
    net.double()  # float64: the comparison is of the statistics' definition, not of rounding
    with torch.no_grad():  # non-trivial affine parameters
        for bn in (net[1], net[3], net[6]):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return net


def _batch() -> torch.Tensor:
    return torch.randn(8, 3, 6, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 + 0.5


def _loss(out: torch.Tensor) -> torch.Tensor:
    return (out * torch.arange(out.shape[1], dtype=out.dtype)).pow(2).sum()


WORKER = """
import sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[4])
from test_syncbn import _batch, _loss, _net
from selfsup.ssl.syncbn import convert_batchnorm
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[2], rank=rank, world_size=2)
torch.set_num_threads(1)
net = convert_batchnorm(_net(), torch.device("cpu"))
_loss(net(_batch()[rank * 4 : (rank + 1) * 4])).backward()
grads = {n: p.grad.clone() for n, p in net.named_parameters()}
for g in grads.values():
    dist.all_reduce(g)  # what DDP does
torch.save({"grads": grads, "state": net.state_dict()}, sys.argv[3])
dist.destroy_process_group()
"""


def test_two_gloo_processes_normalise_with_the_statistics_of_the_whole_batch(tmp_path):
    net = _net()
    _loss(net(_batch())).backward()
    port = str(free_port())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                WORKER,
                str(r),
                port,
                str(tmp_path / f"{r}.pt"),
                str(Path(__file__).parent),
            ],
            env=env,
        )
        for r in range(2)
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    for r in range(2):
        result = torch.load(tmp_path / f"{r}.pt", weights_only=True)
        for name, p in net.named_parameters():
            assert torch.allclose(result["grads"][name], p.grad, rtol=1e-9, atol=1e-12), name
        for key, value in net.state_dict().items():  # running statistics too (unbiased over 8 samples)
            assert torch.allclose(result["state"][key].float(), value.float(), rtol=1e-9, atol=1e-12), key


def test_per_process_statistics_would_fail_that_comparison():
    net, half = _net(), _net()
    _loss(net(_batch())).backward()
    for x in _batch().chunk(2):  # each process normalising with its own half's statistics
        _loss(half(x)).backward()
    assert not torch.allclose(net[0].weight.grad, half[0].weight.grad, rtol=1e-9, atol=1e-12)


def test_cpu_conversion_covers_1d_and_2d_and_refuses_others_before_changing_anything():
    converted = convert_batchnorm(_net(), torch.device("cpu"))
    kinds = {type(m) for m in converted.modules()}
    assert {AllReduceBatchNorm1d, AllReduceBatchNorm2d, AllReduceBatchNormAct2d} <= kinds
    net = nn.Sequential(nn.BatchNorm2d(3), nn.BatchNorm3d(3))
    with pytest.raises(UsageError, match="BatchNorm3d"):
        convert_batchnorm(net, torch.device("cpu"))
    assert type(net[0]) is nn.BatchNorm2d  # untouched
