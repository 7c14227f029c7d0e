"""The multi-node paths as they run, on this machine: two ``torchrun --nnodes 2`` launchers meeting through c10d
rendezvous (one process each), and two plain processes started as ``srun`` starts them (``SLURM_PROCID``,
``SLURM_LOCALID``, ``SLURM_NTASKS``, ``SLURM_JOB_NODELIST``; no ``MASTER_ADDR``), each logging the same losses and
ending with the same weights as one ``--nproc_per_node 2`` launcher (the SLURM run with ``--ddp-static-graph``)."""

import os
import subprocess
import sys

import pytest
from diffclip.training.distributed import first_host
from train_helpers import TORCHRUN, _env, assert_same_run, ddp_args, ddp_reference, free_port

from diffclip.errors import InputError


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    return ddp_reference(tmp_path_factory)


def test_two_torchrun_nodes_match_one_launcher_of_two_processes(ref):
    port = free_port()
    launchers = [subprocess.Popen(
        [str(TORCHRUN), "--nnodes", "2", "--nproc_per_node", "1", "--node-rank", str(node), "--rdzv-backend", "c10d",
         "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "diffclip-nodes",
         *ddp_args(ref["shards"], ref["zs"], ref["logs"], "two_nodes")],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for node in (0, 1)]
    errs = [p.communicate(timeout=400)[1] for p in launchers]
    assert [p.returncode for p in launchers] == [0, 0], [e[-2000:] for e in errs]
    assert "2 process(es) on cpu" in (ref["logs"] / "two_nodes" / "out.log").read_text()
    assert_same_run(ref["logs"] / "two_nodes", ref["run"])


def test_slurm_tasks_without_torchrun_match_one_launcher(ref):
    env = {k: v for k, v in _env().items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    env.update(SLURM_NTASKS="2", SLURM_JOB_NODELIST="localhost", MASTER_PORT=str(free_port()))
    tasks = [subprocess.Popen([sys.executable, *ddp_args(ref["shards"], ref["zs"], ref["logs"], "slurm",
                                                         "--ddp-static-graph")],
                              env={**env, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    errs = [p.communicate(timeout=400)[1] for p in tasks]
    assert [p.returncode for p in tasks] == [0, 0], [e[-2000:] for e in errs]
    log = (ref["logs"] / "slurm" / "out.log").read_text()
    assert "2 process(es) on cpu" in log
    # --ddp-static-graph, carried by this run: DDP's own attribute is logged; the losses equal the run without it
    assert "DistributedDataParallel(static_graph=True)" in log
    assert "DistributedDataParallel(static_graph=False)" in (ref["run"] / "out.log").read_text()
    assert_same_run(ref["logs"] / "slurm", ref["run"])


def test_the_first_host_of_a_compressed_slurm_node_list():
    assert first_host("gpu[01-04]") == "gpu01"
    assert first_host("node[03-05,09],login1") == "node03"
    assert first_host("localhost") == "localhost"
    with pytest.raises(InputError, match="gpu\\[01-"):
        first_host("gpu[01-")
    assert os.environ.get("SLURM_PROCID") is None  # the test process itself is not a SLURM task
