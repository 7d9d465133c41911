"""Sharded audits on torchrun (gloo, CPU): the same numbers as one process, resume after a killed
rank, ``audit --merge``, and shards that never delete each other's unfinished units."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fvsanity import distributed as D

ROOT = Path(__file__).resolve().parents[1]
UNITS = "layer1.0:3,layer2.1:5,layer3.2:1,layer3.2:7"  # 4 units of the real ResNet-20
ARGS = ["audit", "--model", "cifar10-resnet20", "--units", UNITS, "--steps", "3", "--seeds", "2", "--limit", "120",
        "--top-k", "5", "--n-other", "20", "--n-boot", "10", "--n-perm", "10", "--no-progress", "--device", "cpu"]
TIMING_UNIT = ("seconds", "finished_at")


def _env(**extra) -> dict:
    drop = D.ENV_VARS + ("MASTER_ADDR", "MASTER_PORT", "FVSANITY_TEST_EXIT_AFTER")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(OMP_NUM_THREADS="1", FVSANITY_THREADS="1", FVSANITY_OFFLINE="1", PYTHONPATH=str(ROOT), **extra)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fvsanity(args: list[str], nproc: int = 1, **env) -> subprocess.CompletedProcess:
    """`python -m fvsanity ARGS` (nproc 1) or `torchrun --nproc_per_node=nproc -m fvsanity ARGS`."""
    if nproc == 1:
        cmd = [sys.executable, "-m", "fvsanity"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "fvsanity"]
    return subprocess.run(cmd + args, cwd=ROOT, env=_env(**env), capture_output=True, text=True, timeout=300)


def _audit(out: Path, nproc: int = 1, **env) -> subprocess.CompletedProcess:
    return _fvsanity(ARGS + ["--out", str(out)], nproc, **env)


def _units(out: Path) -> dict[str, tuple[dict, dict]]:
    """{unit id: (unit.json without timing, tensors)} of every finished unit in ``out``."""
    from safetensors.torch import load_file

    res = {}
    for d in sorted((out / "units").iterdir()):
        if d.name.startswith(".") or not (d / "unit.json").is_file():
            continue
        rec = json.loads((d / "unit.json").read_text())
        for k in TIMING_UNIT:
            rec.pop(k)
        res[d.name] = (rec, load_file(str(d / "tensors.safetensors")))
    return res


def _same_units(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for uid in a:
        assert a[uid][0] == b[uid][0], uid  # every number of unit.json (path, verdict, FV objectives, exemplars)
        ta, tb = a[uid][1], b[uid][1]
        assert sorted(ta) == sorted(tb), uid
        for k in ta:
            assert torch.equal(ta[k], tb[k]), (uid, k)  # FV images and layer means, bit for bit


def _audit_json(out: Path) -> dict:
    d = json.loads((out / "audit.json").read_text())
    d.pop("timing")
    d.pop("written_at")
    for u in d["units"]:
        for k in TIMING_UNIT:
            u.pop(k)
    return d


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    from fvsanity.testing import data_root

    if data_root() is None:
        pytest.skip("no CIFAR-10 ResNet-20 data: neither FVSANITY_DATA nor the packaged copy")
    out = tmp_path_factory.mktemp("shard") / "one"
    r = _audit(out, 1)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.mark.slow
def test_torchrun_two_ranks_match_one_process_and_merge(one_process, tmp_path):
    out = tmp_path / "two"
    r = _audit(out, 2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("report:") == 1  # rank 0 reports, once
    _same_units(_units(one_process), _units(out))
    assert _audit_json(out) == _audit_json(one_process)  # rank 0's merge: the one-process report
    assert sorted(json.loads((out / "audit.json").read_text())["timing"]["units_computed_this_call"]) == sorted(
        _units(one_process))  # every rank's units, gathered
    assert not [p for p in (out / "units").iterdir() if p.name.startswith(".")]  # no working folder left

    # `audit --merge` rebuilds the same report from the unit folders alone
    for f in ("audit.json", "report.html", "table.md", "table.tex"):
        (out / f).unlink()
    from fvsanity.cli import main

    assert main(["audit", "--merge", str(out)]) == 0
    assert _audit_json(out) == _audit_json(one_process)
    assert (out / "report.html").read_text().count("layer3.2:7") >= 1
    assert (out / "table.md").read_text() == (one_process / "table.md").read_text()


@pytest.mark.slow
def test_killed_rank_is_redone_on_resume_finished_units_never(one_process, tmp_path):
    out = tmp_path / "killed"
    r = _audit(out, 2, FVSANITY_TEST_EXIT_AFTER="1:1")  # rank 1 dies (os._exit) after its first unit
    assert r.returncode != 0
    assert not (out / "audit.json").exists()  # nobody finalized a subset
    before = {d.name: (d / "unit.json").stat().st_mtime_ns for d in (out / "units").iterdir()
              if not d.name.startswith(".")}
    assert "layer2.1_c5" in before  # rank 1's first unit (todo[1::2] = units 1 and 3) is finished
    assert "layer3.2_c7" not in before  # its second never was
    r = _audit(out, 2)
    assert r.returncode == 0, r.stderr[-3000:]
    after = {d.name: (d / "unit.json").stat().st_mtime_ns for d in (out / "units").iterdir()
             if not d.name.startswith(".")}
    assert {k: after[k] for k in before} == before  # finished units untouched
    computed = json.loads((out / "audit.json").read_text())["timing"]["units_computed_this_call"]
    assert sorted(computed) == sorted(set(after) - set(before))  # exactly the unfinished ones redone
    assert "layer3.2_c7" in computed
    _same_units(_units(one_process), _units(out))
    assert _audit_json(out) == _audit_json(one_process)
    assert not [p for p in (out / "units").iterdir() if p.name.startswith(".")]  # a dead rank's leftovers removed


@pytest.mark.slow
def test_torchrun_visualize_and_check_match_one_process(tmp_path):
    from fvsanity.io import load_tensors

    vis = ["visualize", "--model", "toy-procedural", "--random-weights", "--unit", "block4:0,block4:1,block3:2",
           "--steps", "4", "--seeds", "2", "--no-progress", "--device", "cpu"]
    for name, n in (("v1", 1), ("v2", 2)):
        r = _fvsanity(vis + ["--out", str(tmp_path / name)], n)
        assert r.returncode == 0, r.stderr[-3000:]
    a, b = load_tensors(tmp_path / "v1" / "fv.pt"), load_tensors(tmp_path / "v2" / "fv.pt")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)  # rows in --unit order, bit for bit
    ja, jb = (json.loads((tmp_path / n / "fv.json").read_text()) for n in ("v1", "v2"))
    ja["settings"].pop("seconds"), jb["settings"].pop("seconds")
    assert ja == jb

    chk = ["check", "--model", "toy-procedural", "--random-weights", "--unit", "block4:0,block4:1,block3:2",
           "--steps", "4", "--seeds", "2", "--n-boot", "10", "--n-perm", "10", "--no-progress", "--device", "cpu"]
    for name, n in (("c1", 1), ("c2", 2)):
        r = _fvsanity(chk + ["--out", str(tmp_path / name)], n)
        assert r.returncode == 0, r.stderr[-3000:]
        assert r.stdout.count("wrote ") == 1  # rank 0 writes and reports
    ca, cb = (json.loads((tmp_path / n / "check.json").read_text()) for n in ("c1", "c2"))
    for c in (ca, cb):
        c["settings"]["fv_settings"].pop("seconds")
    assert ca == cb


def test_merge_refuses_units_of_another_run(one_process, tmp_path, capsys):
    from fvsanity.cli import main

    out = tmp_path / "mixed"
    shutil.copytree(one_process, out)
    f = out / "units" / "layer3.2_c1" / "unit.json"
    rec = json.loads(f.read_text())
    rec["run_hash"] = "0123456789ab"  # e.g. a shard run with another --top-k, copied in
    f.write_text(json.dumps(rec))
    before = (out / "audit.json").read_text()
    assert main(["audit", "--merge", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fvsanity: error: --merge") and "layer3.2:1" in err and "0123456789ab" in err
    assert len(err.splitlines()) == 1
    assert (out / "audit.json").read_text() == before  # nothing written

    rec["fv_settings_hash"] = "ffffffffffff"  # FVs of other weights
    f.write_text(json.dumps(rec))
    assert main(["audit", "--merge", str(out)]) == 2
    assert "other settings or another model fingerprint" in capsys.readouterr().err
    assert main(["audit", "--merge", str(tmp_path / "nothing")]) == 2
    assert "no run.json" in capsys.readouterr().err


def test_stale_cleanup_spares_live_and_foreign_owners(tmp_path):
    from fvsanity.auditing import _clean_stale_tmp, _host

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    units = tmp_path / "units"
    live = units / f".layer1.0_c3~{_host()}~{os.getppid()}~abc"  # another live process here (our parent)
    gone = units / f".layer1.0_c4~{_host()}~{dead.pid}~abc"  # a killed rank of this host
    foreign = units / f".layer1.0_c5~other-host.example~{dead.pid}~abc"  # a rank on another machine
    old = units / ".layer1.0_c6.xyz"  # written before owners were recorded
    for p in (live, gone, foreign, old):
        p.mkdir(parents=True)
    removed = _clean_stale_tmp(tmp_path)
    assert sorted(removed) == sorted([gone.name, old.name])
    assert live.is_dir() and foreign.is_dir() and not gone.exists() and not old.exists()


def test_shard_from_env_and_split():
    assert D.from_env({}) == D.SINGLE and not D.SINGLE.active and D.SINGLE.is_main
    s = D.from_env({"RANK": "1", "WORLD_SIZE": "3", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "3"})
    assert (s.rank, s.world_size, s.local_rank, s.local_world_size) == (1, 3, 1, 3)
    assert s.split(list(range(8))) == [1, 4, 7] and not s.is_main
    assert D.Shard(0, 3).split(list(range(8))) + s.split(list(range(8))) + D.Shard(2, 3).split(list(range(8))) \
        == [0, 3, 6, 1, 4, 7, 2, 5]
    assert s.device("cpu") == torch.device("cpu")
    for env, what in (({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x'"), ({"RANK": "2", "WORLD_SIZE": "2"}, "valid: 0..1"),
                      ({"RANK": "0"}, "together")):
        with pytest.raises(D.DistributedError, match=what):
            D.from_env(env)


def test_python_dash_m_fvsanity():
    r = subprocess.run([sys.executable, "-m", "fvsanity", "--version"], cwd=ROOT, env=_env(), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("fvsanity ")


def test_concurrent_natural_passes_on_one_cache_compute_once(tiny, tmp_path, monkeypatch):
    """Two shards asking for the natural pass of one --out at the same time: one computes, the
    other waits on the lock and reads (no half-written file, no second forward pass)."""
    import threading
    import time

    from fvsanity import activations as act
    from fvsanity.compare.pipeline import natural_pass, resolve_units
    from fvsanity.data import from_tensor

    g = torch.Generator().manual_seed(0)
    natural = from_tensor(torch.rand(24, 3, 16, 16, generator=g), torch.arange(24) % 5, [f"c{i}" for i in range(5)])
    real = act.collect_with_responses
    calls = []

    def slow(*a, **k):
        calls.append(threading.get_ident())
        time.sleep(0.5)  # long enough for the other shard to arrive while this one computes
        return real(*a, **k)

    monkeypatch.setattr(act, "collect_with_responses", slow)
    layers = ["relu1", "relu2", "fc"]
    got = {}

    def shard(name, units):
        got[name] = natural_pass(tiny, natural, layers, resolve_units(units, tiny), batch_size=8, cache_dir=tmp_path)

    ts = [threading.Thread(target=shard, args=("a", ["fc:0"])), threading.Thread(target=shard, args=("b", ["fc:3"]))]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert len(calls) == 1  # one forward pass over the images for both shards
    assert sorted([got["a"].reused, got["b"].reused]) == [False, True]
    assert all(torch.equal(got["a"].acts[k], got["b"].acts[k]) for k in layers)
    assert torch.equal(got["b"].responses[:, 0], got["a"].acts["fc"][:, 3])
