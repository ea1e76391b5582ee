"""The walking skeleton end to end: one effect of each kind through a real daemon."""

from __future__ import annotations

from typing import Any

from effectd.client import EffectState


def test_each_kind_end_to_end(client: Any) -> None:
    sh = client.submit_shell("echo out; echo err >&2; exit 3")
    py = client.submit_python("effectd_test_effects:add", [2, 3])
    sl = client.submit_sleep(0.05)
    r_sh, r_py, r_sl = client.wait_many([sh, py, sl], timeout=20)
    assert (r_sh.state, r_sh.exit_code) == (EffectState.FAILED, 3)
    assert client.output(sh, "stdout") == b"out\n"
    assert client.output(sh, "stderr") == b"err\n"
    assert (r_py.state, r_py.result) == (EffectState.SUCCEEDED, 5)
    assert r_sl.state is EffectState.SUCCEEDED
