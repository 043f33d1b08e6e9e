"""benchmarks/scaling_model.py: the synchronous step's model as before, DiLoCo's outer sync, --check."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location(
    "scaling_model", Path(__file__).resolve().parent.parent / "benchmarks" / "scaling_model.py")
sm = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(sm)

P = 124_475_904
GBIT1 = 1e9 / 8 * 0.94             # payload bytes/s of 1 Gbit/s after TCP's headers
T_C = 8192 * (6 * P + 12 * 12 * 1024 * 768) / (32 * 80 * (6 * P + 12 * 12 * 256 * 768))


def test_the_synchronous_step_table_is_unchanged():
    # benchmarks/README.md's table (issue 16), printed by the model before DiLoCo was added
    assert round(T_C, 2) == 3.55
    for hosts, gbit, fp32, bf16 in [(4, 1, 8.38, 5.22), (4, 10, 3.59, 3.59), (16, 1, 9.97, 6.02)]:
        assert round(sm.step_time(T_C, hosts, gbit, "fp32", threads=32), 2) == fp32
        assert round(sm.step_time(T_C, hosts, gbit, "bf16", threads=32), 2) == bf16


def test_step_bytes_count_a_reduce_scatter_and_an_allgather():
    assert sm.step_bytes(4, "fp32") == pytest.approx(2 * 3 / 4 * P * 4, rel=1e-15)
    assert sm.step_bytes(4, "bf16") == pytest.approx(2 * 3 / 4 * P * 2, rel=1e-15)
    # ZeRO-1: gradient parts on the wire format, then fp32 parameters
    assert sm.step_bytes(16, "bf16", zero=True) == pytest.approx(15 / 16 * P * (2 + 4), rel=1e-15)
    assert sm.step_bytes(1, "fp32") == 0


def test_blocking_diloco_adds_one_sync_per_h_steps():
    net = 2 * 3 / 4 * P * 4 / GBIT1 + 2 * 3 * 50e-6
    # 23 fp32 reads and writes per parameter (diloco.py's NumPy passes); 32 cores x 30 GB/s exceed
    # the socket's 100 GB/s
    update = P * 23 * 4 / 100e9
    t = sm.diloco_step(T_C, 4, 1.0, "fp32", 10, cores=32)
    assert t == pytest.approx(T_C + (net + update) / 10, rel=1e-12)
    # one core streams at 30 GB/s, below the socket's bandwidth
    net1, cpu1 = sm.diloco_sync(2, 1.0, "fp32", cores=1)
    assert cpu1 == pytest.approx(P * 92 / 30e9, rel=1e-12)


def test_bf16_halves_the_sync_bytes_and_costs_the_conversion():
    net32, cpu32 = sm.diloco_sync(16, 10.0, "fp32", cores=32, latency_s=0.0)
    net16, cpu16 = sm.diloco_sync(16, 10.0, "bf16", cores=32, latency_s=0.0)
    assert net16 == pytest.approx(net32 / 2, rel=1e-12)
    assert cpu16 - cpu32 == pytest.approx(P * 5.8e-9 / 32, rel=1e-9)


def test_one_host_syncs_nothing_across_hosts():
    net, cpu = sm.diloco_sync(1, 1.0, "fp32", cores=32)
    assert net == 0 and cpu > 0


def test_overlap_hides_the_network_only_behind_the_next_inner_steps():
    _, cpu = sm.diloco_sync(4, 1.0, "fp32", cores=32)
    # 10 x 3.55 s of inner steps cover the 6.4 s sync: only the CPU part shows
    assert sm.diloco_step(T_C, 4, 1.0, "fp32", 10, 32, overlap=True) == pytest.approx(T_C + cpu / 10)
    # 0.1 s inner steps, H = 2: 0.2 s of the 6.4 s is hidden, the rest shows
    net, cpu = sm.diloco_sync(4, 1.0, "fp32", cores=32)
    t = sm.diloco_step(0.1, 4, 1.0, "fp32", 2, 32, overlap=True)
    assert t == pytest.approx(0.1 + (net - 0.2 + cpu) / 2, rel=1e-12)
    # a link never idle during inner steps hides nothing
    assert sm.diloco_step(T_C, 4, 1.0, "fp32", 10, 32, overlap=True, idle=0.0) == pytest.approx(
        sm.diloco_step(T_C, 4, 1.0, "fp32", 10, 32))


def test_longer_cycles_approach_the_compute_time():
    steps = [sm.diloco_step(T_C, 16, 1.0, "fp32", h, 32) for h in (1, 10, 50, 200, 10_000)]
    assert all(a > b for a, b in zip(steps, steps[1:], strict=False))
    assert steps[-1] - T_C < 1e-3


def _one_host_row(ms: float) -> dict:
    return {"case": "one host", "micro": 1, "wire": "fp32", "ms_per_step": ms,
            "split": {"forward": 0.5, "backward": 0.43, "optim": 0.05}}


def test_check_compares_diloco_rows_over_their_timed_steps(tmp_path, capsys):
    t_c_ms, h = 6413.0, 3
    net, cpu = sm.diloco_sync(2, 1.0, "fp32", cores=1)
    sync_ms = 1000 * (net + cpu)
    # 1 warmup step (9 losses, 8 timed): timed steps 2..9, of which 3, 6 and 9 run the outer sync
    step_ms = [t_c_ms + (sync_ms if s % h == 0 else 0.0) for s in range(2, 10)]
    rows = [_one_host_row(t_c_ms),
            {"case": "2 hosts 1gbit", "micro": 1, "wire": "fp32", "ms_per_step": 8093.0, "zero": False},
            {"case": "2 hosts 1gbit", "micro": 1, "wire": "fp32", "sync": "diloco", "inner_steps": h,
             "ms_per_step": t_c_ms, "step_ms": step_ms, "losses": [0.0] * 9, "outer_ms": [sync_ms] * 3}]
    path = tmp_path / "hosts.json"
    path.write_text(json.dumps(rows))
    assert sm.main(["--check", str(path)]) == 0
    out = capsys.readouterr().out
    diloco = [line for line in out.splitlines() if "| 3 |" in line]
    assert len(diloco) == 1
    cells = [c.strip() for c in diloco[0].strip("|").split("|")]
    assert cells[4] == "8 (3)"                      # timed steps (syncs)
    assert cells[7] == "1.00"                       # built to match the model exactly
    assert cells[8] == cells[9] == f"{sync_ms:.0f}"
    # the synchronous row still goes through the step model
    model = 1000 * sm.step_time(6.413, 2, 1.0, "fp32", 1, False, 0.43 / 0.98)
    assert f"| 2 hosts 1gbit | 1 | fp32 | 8093 | {model:.0f} |" in out
    # a run that ends inside the timed steps syncs at its last step too (train.max_steps)
    rows[2]["max_steps"] = 8
    path.write_text(json.dumps(rows))
    assert sm.main(["--check", str(path)]) == 0
    assert "| 8 (4) |" in capsys.readouterr().out


def test_check_names_a_missing_key_in_one_line(tmp_path, capsys):
    path = tmp_path / "hosts.json"
    path.write_text(json.dumps([_one_host_row(6413.0),
                                {"case": "2 hosts 1gbit", "micro": 1, "wire": "fp32", "sync": "diloco",
                                 "step_ms": [6413.0]}]))
    assert sm.main(["--check", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(path) in err and "'inner_steps'" in err


def test_check_refuses_a_file_that_is_not_a_result_list(tmp_path, capsys):
    path = tmp_path / "hosts.json"
    path.write_text('{"configs": []}')
    assert sm.main(["--check", str(path)]) == 2
    assert "expected a JSON list" in capsys.readouterr().err


def test_the_diloco_table_has_every_scheme(capsys):
    assert sm.main(["--hosts", "4", "--rates", "1", "--diloco-h", "10,50"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 4 | 1 | ")]
    assert rows[0].startswith("| 4 | 1 | 8.38 | 42% |")      # the synchronous step's table comes first
    names = [row.split("|")[3].strip() for row in rows[1:]]
    assert names == ["step, replicated", "step, ZeRO-1", "DiLoCo H=10", "DiLoCo H=10, overlapped",
                     "DiLoCo H=50", "DiLoCo H=50, overlapped"]
    assert sm.main(["--hosts", "4", "--rates", "1", "--diloco-h", "none"]) == 0
    assert "DiLoCo" not in capsys.readouterr().out


def test_check_refuses_an_unknown_wire(tmp_path, capsys):
    path = tmp_path / "hosts.json"
    path.write_text(json.dumps([_one_host_row(6413.0),
                                {"case": "2 hosts 1gbit", "micro": 1, "wire": "fp16", "sync": "diloco",
                                 "inner_steps": 4, "step_ms": [6413.0]}]))
    assert sm.main(["--check", str(path)]) == 2
    assert "wire 'fp16' is not fp32 or bf16" in capsys.readouterr().err
