"""Margin heads and the partial-FC head: equal to a plain cross-entropy written out here, also split
across 2 real gloo processes (loss and every gradient), and sampling keeps every positive class."""

from __future__ import annotations

import math
import socket

import pytest
import torch
import torch.nn.functional as F

from facegen.engine.frtrain.heads import PartialFCHead, apply_margin, class_range

B, D, C = 6, 5, 7


def reference(embeddings, weight, labels, margin, m, s):
    """The textbook loss: cos = <x/|x|, w/|w|>, margin on the target, scale, softmax cross-entropy."""
    cos = F.normalize(embeddings) @ F.normalize(weight).T
    target = cos[torch.arange(len(labels)), labels]
    if margin == "arcface":
        theta = torch.acos(target)
        new = torch.where(theta + m < math.pi, torch.cos(theta + m), target - m * math.sin(m))
    else:
        new = target - m
    logits = cos.clone()
    logits[torch.arange(len(labels)), labels] = new
    return F.cross_entropy(s * logits, labels)


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, D, generator=g), torch.randn(C, D, generator=g), torch.randint(0, C, (B,), generator=g)


def test_margins_by_hand():
    cos = torch.tensor([[0.5, 0.2], [0.1, -0.3]])
    out = apply_margin(cos, torch.tensor([0, -1]), "cosface", 0.4, 10.0)
    assert torch.allclose(out, torch.tensor([[1.0, 2.0], [1.0, -3.0]]))
    out = apply_margin(cos, torch.tensor([1, 0]), "arcface", 0.5, 1.0)
    assert math.isclose(out[0, 1].item(), math.cos(math.acos(0.2) + 0.5), abs_tol=1e-6)
    assert math.isclose(out[1, 0].item(), math.cos(math.acos(0.1) + 0.5), abs_tol=1e-6)
    assert out[0, 0].item() == 0.5 and out[1, 1].item() == pytest.approx(-0.3)
    # past θ + m = π the logit keeps falling with θ (cos θ - m·sin m)
    out = apply_margin(torch.tensor([[-0.99]]), torch.tensor([0]), "arcface", 0.5, 1.0)
    assert math.isclose(out.item(), -0.99 - 0.5 * math.sin(0.5), abs_tol=1e-6)


@pytest.mark.parametrize("margin,m", [("arcface", 0.5), ("cosface", 0.35)])
def test_one_rank_full_fc_equals_the_reference_loss_and_gradients(margin, m):
    emb, weight, labels = inputs()
    head = PartialFCHead(C, D, margin=margin, m=m, scale=8.0)
    with torch.no_grad():
        head.weight.copy_(weight)
    x = emb.clone().requires_grad_(True)
    loss = head(x, labels)
    loss.backward()
    x_ref, w_ref = emb.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    expected = reference(x_ref, w_ref, labels, margin, m, 8.0)
    expected.backward()
    assert torch.allclose(loss, expected, atol=1e-5)
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-5)
    assert torch.allclose(head.weight.grad, w_ref.grad, atol=1e-5)


def test_sampling_keeps_every_positive_and_uses_only_the_sample():
    emb, weight, labels = inputs(1)
    head = PartialFCHead(40, D, sample_rate=0.25, scale=8.0, seed=3)  # 10 of 40 centres per step
    labels = torch.tensor([3, 3, 17, 39, 0, 22])
    local = labels.clone()
    index, remapped = head.sample(local)
    assert index.numel() == 10 and set(labels.tolist()) <= set(index.tolist())
    assert torch.equal(index[remapped], labels)
    # the loss is the reference loss over exactly the sampled centres
    head.sampler.manual_seed(99)
    index, _ = head.sample(local)
    head.sampler.manual_seed(99)
    loss = head(emb, labels)
    sub = torch.searchsorted(index, labels)
    assert torch.allclose(loss, reference(emb, head.weight.detach()[index], sub, "arcface", 0.5, 8.0), atol=1e-5)


def test_class_ranges_tile_the_classes():
    for classes, world in [(7, 2), (3, 4), (10, 3)]:
        ranges = [class_range(classes, r, world) for r in range(world)]
        assert [start for start, _ in ranges] == [sum(n for _, n in ranges[:r]) for r in range(world)]
        assert sum(n for _, n in ranges) == classes


def _worker(rank, world, port, margin, queue):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.2:{port}", rank=rank, world_size=world)
    emb, weight, labels = inputs()
    per = B // world
    head = PartialFCHead(C, D, margin=margin, m=0.3, scale=8.0, rank=rank, world_size=world)
    start, count = class_range(C, rank, world)
    with torch.no_grad():
        head.weight.copy_(weight[start:start + count])
    x = emb[rank * per:(rank + 1) * per].clone().requires_grad_(True)
    loss = head(x, labels[rank * per:(rank + 1) * per])
    loss.backward()
    queue.put((rank, loss.item(), x.grad, head.weight.grad))
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("margin", ["arcface"])
def test_two_gloo_ranks_give_the_single_process_loss_and_gradients(margin):
    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.2", 0))
        port = probe.getsockname()[1]
    context = mp.get_context("spawn")
    queue = context.Queue()
    procs = [context.Process(target=_worker, args=(r, 2, port, margin, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    emb, weight, labels = inputs()
    x_ref, w_ref = emb.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    expected = reference(x_ref, w_ref, labels, margin, 0.3, 8.0)
    expected.backward()
    for rank, loss, x_grad, w_grad in results:
        start, count = class_range(C, rank, 2)
        assert loss == pytest.approx(expected.item(), abs=1e-5)
        assert torch.allclose(x_grad, x_ref.grad[rank * 3:(rank + 1) * 3], atol=1e-5)
        assert torch.allclose(w_grad, w_ref.grad[start:start + count], atol=1e-5)
