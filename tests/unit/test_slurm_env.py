"""slurm/common.sh's maskdit_env: gloo (the long barriers, CPU runs) gets the interface NCCL is told to use."""
import os
import subprocess

import pytest

from repo import ROOT


@pytest.mark.parametrize("nccl,gloo,expected", [("eth1", None, "eth1"), ("^lo,docker", None, ""),
                                                ("eth1", "ib0", "ib0"), (None, None, "")])
def test_gloo_socket_ifname_follows_nccl_socket_ifname(tmp_path, nccl, gloo, expected):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text("#!/bin/sh\necho node1\n")  # `scontrol show hostnames`: one node
    (fake / "scontrol").chmod(0o755)
    env = {"PATH": f"{fake}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "node1",
           "MASKDIT_ROOT": str(ROOT)}
    env.update({k: v for k, v in (("NCCL_SOCKET_IFNAME", nccl), ("GLOO_SOCKET_IFNAME", gloo)) if v is not None})
    proc = subprocess.run(["bash", "-c", 'source slurm/common.sh && maskdit_env > /dev/null && '
                                         'echo "gloo=${GLOO_SOCKET_IFNAME:-}"'],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == f"gloo={expected}"
