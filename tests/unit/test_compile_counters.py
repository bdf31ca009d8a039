"""engine.compile's regional compilation, counted by torch._dynamo: no graph break in any block, and at most one
compile of a block graph per distinct kept-token count across the masked and the unmasked phase (so a GPU
check's compiled phase has a bounded compile time). The aot_eager backend traces forward and backward like
inductor without generating kernels, which only the GPU check times."""
import subprocess

import pytest
import torch
from torch._dynamo.utils import counters

from maskdit_ds.config import ModelConfig
from maskdit_ds.diffusion import MaskedEDMLoss
from maskdit_ds.model import Masker, build_denoiser, kept_tokens
from maskdit_ds.model.align import AlignedDenoiser
from maskdit_ds.training.engine import compile_blocks
from repo import ROOT, tool_command

TEACHER_DIM = 8


@pytest.mark.parametrize("aligned", [False, True], ids=["plain", "aligned"])
def test_trunk_compiles_once_per_kept_token_count_without_graph_breaks(aligned):
    """aligned: REPA's projector reads the tokens of encoder block 1 through a tap between the compiled blocks;
    the tap must not break a block's graph or add compiles."""
    torch._dynamo.reset()
    cfg = ModelConfig(name="MaskDiT-T/2", input_size=8, in_channels=4, num_classes=10)
    torch.manual_seed(0)
    net = build_denoiser(cfg)
    if aligned:
        net = AlignedDenoiser(net, depth=1, width=16, teacher_dim=TEACHER_DIM)
    compile_blocks(net, backend="aot_eager")
    loss_fn = MaskedEDMLoss(2, 10, aligned=aligned, align_weight=0.5)
    counters.clear()
    graphs = []
    for ratio in (0.5, 0.5, 0.0, 0.0):  # masked phase, then the unmasked phase (its own engine: same blocks)
        x, y = torch.randn(4, 4, 8, 8), torch.randint(0, 10, (4,))
        target = torch.randn(4, 16, TEACHER_DIM) if aligned else None  # teacher features on the 4 x 4 grid
        loss, _ = loss_fn(net, x, y, Masker("random", 4, ratio), target)
        loss.mean().backward()
        graphs.append(counters["stats"]["unique_graphs"])
    assert dict(counters["graph_break"]) == {}
    kept = {kept_tokens("random", 4, r) for r in (0.5, 0.0)}
    # the encoder width once per kept-token count, the decoder width (always every token) once
    assert graphs[0] == 2 and graphs[-1] <= len(kept) + 1
    assert graphs[1] == graphs[0] and graphs[3] == graphs[2]  # a repeated count compiles nothing
    torch._dynamo.reset()


def test_time_compile_counts_the_graphs_it_times(tmp_path):
    """tools/time_compile.py (the GPU check's compile budget comes from its XL/2 figure) on a tiny trunk: one step
    per ratio compiles the encoder once per kept-token count and the decoder once, and it says so."""
    out = subprocess.run(tool_command("time_compile", "--model", "MaskDiT-T/2", "--input-size", "8", "--batch", "2",
                                      "--backend", "aot_eager", "--cache-dir", tmp_path),
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    assert "mask ratio 0.5: first step" in out.stdout and "2 new graph(s)" in out.stdout
    assert "mask ratio 0.0: first step" in out.stdout and "1 new graph(s)" in out.stdout
    assert "for 3 graphs" in out.stdout and "graph breaks: none" in out.stdout
