"""Two DDP workers on loopback (gloo) stay identical and match one process
training on the same global batches."""
import os
import signal
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

from hashemb.data import SyntheticCriteo                      # noqa: E402
from hashemb.torch.ddp import build_model, synthetic_batches, train_steps   # noqa: E402

# an odd global batch: shards of 127 and 128 (averaging shard means was wrong there)
ARGS = dict(steps=4, batch=255, lr=0.5, scale=0.001, compression=100.0, seed=3)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_two_workers_match_single_process(tmp_path):
    a = ARGS
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "-m", "hashemb.torch.ddp", "--steps", str(a["steps"]), "--batch-size",
           str(a["batch"]), "--lr", str(a["lr"]), "--scale", str(a["scale"]),
           "--compression", str(a["compression"]), "--seed", str(a["seed"]),
           "--save", str(tmp_path / "rank{rank}.pt")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # its own process group: on a timeout the workers torchrun started are
    # killed too (subprocess.run kills only torchrun, then waits for the
    # pipes the workers still hold, which can hang the whole test run)
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=env, start_new_session=True)
    try:
        _, err = p.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        _, err = p.communicate()
        pytest.fail(f"torchrun with 2 workers did not finish in 300 s: {err[-3000:]}")
    assert p.returncode == 0, err[-3000:]
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


@pytest.mark.parametrize("flag, value", [("--steps", "0"), ("--batch-size", "0"),
                                         ("--lr", "-1"), ("--scale", "2")])
def test_command_line_refuses_bad_numbers_before_starting(flag, value, capsys):
    # (steps 0 and batch 0 failed with an IndexError / ZeroDivisionError
    # after the process group had started)
    from hashemb.torch.ddp import main
    with pytest.raises(SystemExit) as e:
        main([flag, value])
    assert e.value.code == 2 and f"argument {flag}: expected" in capsys.readouterr().err
