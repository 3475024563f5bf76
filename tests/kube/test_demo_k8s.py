"""``make demo-k8s`` as a test: the process stack started the way ``gpu-fleet up --kube-url``
starts it (manager and binder processes each running their half of the bridge), driven by
kubectl against the emulator - the real path a team takes, end to end.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from _kube import ROOT

from gpu_fleet.kubesim.demo import run_demo

pytestmark = [pytest.mark.asyncio, pytest.mark.slow]


async def test_demo_k8s_runs_a_gang_to_completion(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await run_demo(ROOT, tmp_path, quiet_logs=False) == 0
    out = capsys.readouterr().out
    assert "train-gang-active-3" in out
    assert "fabric domains used: nvl-" in out
    assert "AllSucceeded" in out
    assert "closed: Completed" in out
    assert "the pods of the closed leases are gone" in out
    assert "the GPULease mirrors of the closed leases are gone" in out
    for reason in ("Admitted", "Bound", "Completed"):
        assert f"Normal  {reason}" in out  # the Run's Events
