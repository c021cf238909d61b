"""``models.<role>.activation_checkpointing``: off / full / selective give the same gradients on FSDP2, and
backward recomputes what each policy says (counted per ATen op while backward runs)."""

from __future__ import annotations

from collections import Counter

import torch
from accelerate.utils.fsdp_utils import fsdp2_prepare_model
from diffusers import WanTransformer3DModel
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

from fv_accel.config import ModelConfig
from fv_accel.models.wan import TINY_WAN_CONFIG, WanModel


class OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def _run(accelerator, mode: str, every: int = 1) -> tuple[dict[str, torch.Tensor], Counter[str]]:
    torch.manual_seed(0)
    cfg = ModelConfig(family="wan", init_from="unused", activation_checkpointing=mode,
                      activation_checkpointing_every=every)
    model = WanModel.from_transformer("student", WanTransformer3DModel(**TINY_WAN_CONFIG), cfg)
    transformer = fsdp2_prepare_model(accelerator, model.transformer)
    transformer.train()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 2, 8, 8, generator=gen)
    text = torch.randn(2, 8, 32, generator=gen)
    out = transformer(hidden_states=x, timestep=torch.tensor([250.0, 750.0]), encoder_hidden_states=text,
                      return_dict=False)[0]
    loss = out.float().square().mean()
    counter = OpCounter()
    with counter:  # CPU autograd runs backward on this thread, inside the mode
        loss.backward()
    grads = {n: p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
             for n, p in transformer.named_parameters()}
    return grads, counter.counts


def test_policies_agree_on_gradients_and_recompute_what_they_say(single_process_dist) -> None:
    accelerator = single_process_dist
    runs = {mode: _run(accelerator, mode) for mode in ("off", "full", "selective")}
    runs["full/2"] = _run(accelerator, "full", every=2)
    runs["selective/2"] = _run(accelerator, "selective", every=2)
    grads_off, ops_off = runs["off"]
    for mode in ("full", "selective", "full/2", "selective/2"):
        grads, _ = runs[mode]
        assert grads.keys() == grads_off.keys()
        for name, grad in grads_off.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-7, msg=f"{mode}: {name}")

    num_layers = TINY_WAN_CONFIG["num_layers"]
    _, ops_full = runs["full"]
    _, ops_sel = runs["selective"]
    # Without checkpointing, backward runs no forward op: the blocks' layer norms (3 per block) only appear
    # when a block is recomputed, i.e. under both full and selective.
    assert ops_off["native_layer_norm"] == 0
    assert ops_full["native_layer_norm"] == ops_sel["native_layer_norm"] == 3 * num_layers
    # Full recomputes every linear of the blocks (extra matmuls in backward); selective saved their outputs
    # and attention's, so its backward runs exactly the matmuls and attention kernels of the no-checkpoint run.
    matmuls = ("mm", "addmm", "bmm")
    attention = "_scaled_dot_product_flash_attention_for_cpu"
    assert sum(ops_full[m] for m in matmuls) > sum(ops_off[m] for m in matmuls)
    assert ops_full[attention] == 2 * num_layers  # self- and cross-attention of each block, recomputed
    assert [ops_sel[m] for m in matmuls] == [ops_off[m] for m in matmuls]
    assert ops_sel[attention] == ops_off[attention] == 0
    # Every 2nd block: only block 0 of the 2 is checkpointed, so backward recomputes half of it.
    assert num_layers == 2
    assert runs["full/2"][1]["native_layer_norm"] == runs["selective/2"][1]["native_layer_norm"] == 3
    assert runs["full/2"][1][attention] == 2
