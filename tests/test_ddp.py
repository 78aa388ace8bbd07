"""Two DDP workers on loopback (gloo) stay identical and match one process
training on the same global batches."""
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

from hashemb.data import SyntheticCriteo                      # noqa: E402
from hashemb.torch.ddp import build_model, synthetic_batches, train_steps   # noqa: E402

ARGS = dict(steps=4, batch=256, lr=0.5, scale=0.001, compression=100.0, seed=3)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_two_workers_match_single_process(tmp_path):
    a = ARGS
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "-m", "hashemb.torch.ddp", "--steps", str(a["steps"]), "--batch-size",
           str(a["batch"]), "--lr", str(a["lr"]), "--scale", str(a["scale"]),
           "--compression", str(a["compression"]), "--seed", str(a["seed"]),
           "--save", str(tmp_path / "rank{rank}.pt")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    s0 = torch.load(tmp_path / "rank0.pt")
    s1 = torch.load(tmp_path / "rank1.pt")
    card = SyntheticCriteo(scale=a["scale"], seed=a["seed"]).cardinalities
    single = build_model(card, compression=a["compression"], seed=a["seed"])
    before = single.embedding.weight.detach().clone()
    train_steps(single, synthetic_batches(a["steps"], a["batch"], a["scale"], a["seed"]), a["lr"])
    ref = single.state_dict()
    assert not torch.equal(ref["embedding.weight"], before)      # it did train
    for k, v in s0.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, s1[k]), k                         # replicas identical
            torch.testing.assert_close(v, ref[k], rtol=1e-4, atol=1e-5)
