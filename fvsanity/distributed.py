"""Sharded sweeps under ``torchrun``: one process per rank, units split over the ranks.

``torchrun --nproc_per_node=N -m fvsanity audit ...`` starts N copies of the command; each
finds its place through the variables PyTorch's launcher sets (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``). :func:`from_env` reads them into a :class:`Shard`;
:func:`sharded` is the context manager a command runs in: it starts a process group only when
there is more than one rank (gloo on CPU, nccl on CUDA), gives each rank its device
(``cuda:LOCAL_RANK`` when CUDA is present, else the CPU with cores / local ranks threads) and
takes the group down again on exit. Without torchrun (or with one rank) a :class:`Shard` is the
single process: every unit is its own, barriers and gathers do nothing.

What is split and how (deterministic, so every rank computes the same split without talking):
``Shard.split(items)`` gives rank r the items r, r + W, r + 2W, ... of a list every rank builds
identically (the audit splits the units still to do, so a resumed run spreads what is left).

Environment (all optional):
    ``FVSANITY_THREADS``: CPU threads per rank [cores / LOCAL_WORLD_SIZE; torchrun's default
        ``OMP_NUM_THREADS=1`` is not taken as a choice].
    ``FVSANITY_DIST_TIMEOUT_S``: how long a rank waits at a barrier (e.g. for the slowest rank's
        last unit) before giving up [86400].

Public API: :class:`Shard`, :func:`from_env`, :func:`sharded`, :func:`render_sharded`,
:class:`DistributedError`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch

from .errors import FVSanityError

__all__ = ["Shard", "from_env", "sharded", "render_sharded", "DistributedError", "SINGLE", "available_devices",
           "check_env"]

#: variables torchrun sets for every worker
ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


class DistributedError(FVSanityError):
    """Launcher variables that do not describe a valid rank, or a process group that cannot start."""


@dataclass(frozen=True)
class Shard:
    """This process's place in a sharded run.

    Attributes:
        rank: 0 .. world_size - 1 (rank 0 writes the shared files and merges).
        world_size: number of processes over all machines.
        local_rank: index on this machine (picks ``cuda:local_rank``).
        local_world_size: processes on this machine (shares the CPU cores).
        grouped: whether a ``torch.distributed`` process group is up (world_size > 1).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    grouped: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes shared files (run.json, the natural pass, the report)."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        """More than one rank."""
        return self.world_size > 1

    def split(self, items: Sequence) -> list:
        """This rank's items: ``items[rank::world_size]`` (every rank must pass the same list)."""
        return list(items)[self.rank :: self.world_size]

    def barrier(self) -> None:
        """Wait for every rank (no-op for one rank)."""
        if self.grouped:
            import torch.distributed as dist

            dist.barrier()

    def all_gather(self, obj) -> list:
        """``[obj of rank 0, obj of rank 1, ...]`` on every rank (pickled; keep it small)."""
        if not self.grouped:
            return [obj]
        import torch.distributed as dist

        got: list = [None] * self.world_size
        dist.all_gather_object(got, obj)
        return got

    def gather(self, obj) -> list | None:
        """``[obj of rank 0, obj of rank 1, ...]`` on rank 0, None on the others (pickled)."""
        if not self.grouped:
            return [obj]
        import torch.distributed as dist

        got: list | None = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, got, dst=0)
        return got

    def device(self, requested=None) -> torch.device:
        """This rank's device. One process: ``requested`` as given (None: ``cuda`` when CUDA is
        present, else ``cpu``), as ``fvsanity.cli.resolve_device``. Several ranks: a bare ``cuda``
        or None becomes ``cuda:local_rank`` (None without CUDA: ``cpu``).

        Raises:
            DistributedError: an unknown device name, CUDA asked for without CUDA, or a GPU index
                this machine lacks.
        """
        cuda = torch.cuda.is_available()
        if requested is None:
            if not cuda:
                return torch.device("cpu")
            return torch.device("cuda", self.local_rank) if self.active else torch.device("cuda")
        try:
            dev = torch.device(requested)
        except RuntimeError as e:
            raise DistributedError(f"unknown --device {str(requested)!r}; valid: cpu, cuda, cuda:N") from e
        if dev.type == "cuda" and not cuda:
            raise DistributedError(f"--device {str(requested)!r} requested but CUDA is not available; valid here: cpu")
        if dev.type not in ("cpu", "cuda") and not _backend_available(dev.type):
            raise DistributedError(f"--device {str(requested)!r} is not available with this PyTorch build on this "
                                   f"machine; valid here: {', '.join(available_devices())}")
        if self.active and dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", self.local_rank)
        if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DistributedError(
                f"{self.tag() or 'this process'} wants cuda:{dev.index} but this machine has "
                f"{torch.cuda.device_count()} GPU(s); valid: cuda:0..cuda:{torch.cuda.device_count() - 1}"
                + (" (use --nproc_per_node <= the GPU count)" if self.active else ""))
        return dev

    def tag(self) -> str:
        """``"rank r/W"`` for messages ('' for one process)."""
        return f"rank {self.rank}/{self.world_size}" if self.active else ""


#: the single process (no launcher)
SINGLE = Shard()


def _backend_available(kind: str) -> bool:
    """Whether this PyTorch build and machine can run on a device of type ``kind`` (mps, xpu; no
    other accelerator types are supported)."""
    if kind == "mps":
        mps = getattr(torch.backends, "mps", None)
        return bool(mps is not None and mps.is_available())
    if kind == "xpu":
        xpu = getattr(torch, "xpu", None)
        return bool(xpu is not None and xpu.is_available())
    return False


def available_devices() -> list[str]:
    """The ``--device`` values this machine can run: ``cpu``, ``cuda``/``cuda:N`` per GPU,
    ``mps``, ``xpu`` (only those present)."""
    out = ["cpu"]
    if torch.cuda.is_available():
        out += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    out += [k for k in ("mps", "xpu") if _backend_available(k)]
    return out


def render_sharded(shard: Shard, lm, units: Sequence, seeds, settings=None, **kw):
    """:func:`fvsanity.generate.render` with the units split over the ranks; the pieces are
    gathered on rank 0 into one :class:`~fvsanity.generate.FVResult` with rows in the order of
    ``units``, equal to one process's (each FV depends only on its unit and seed). Returns it on
    rank 0 and None on the others. ``settings["seconds"]``: the slowest rank's. ``units``: resolved
    Units or specs (every rank passes the same list); ``seeds``, ``settings``, ``kw``: as ``render``.
    """
    from .generate import FVResult, render

    units = list(units)
    mine = shard.split(range(len(units)))
    part = render(lm, [units[i] for i in mine], seeds, settings, **kw) if mine else None
    if not shard.active:
        return part
    parts = shard.gather((mine, part))
    if parts is None:
        return None
    rows: dict[int, tuple] = {}
    for idx, res in parts:
        for k, i in enumerate(idx):
            rows[i] = (res, k)
    first = next(res for _, res in parts if res is not None)
    order = [rows[i] for i in range(len(units))]

    def stack(get):
        return torch.stack([get(res)[k] for res, k in order])

    settings_d = dict(first.settings)
    settings_d["seconds"] = max(res.settings.get("seconds", 0.0) for _, res in parts if res is not None)
    return FVResult(
        images=stack(lambda r: r.images), traces=stack(lambda r: r.traces), final=stack(lambda r: r.final),
        activations=[res.activations[k] for res, k in order] if all(res.activations for res, _ in order) else [],
        units=[res.units[k] for res, k in order], seeds=list(first.seeds), settings=settings_d,
        checkpoints={c: stack(lambda r, c=c: r.checkpoints[c]) for c in first.checkpoints},
        objectives=[res.objectives[k] for res, k in order] if first.objectives else [],
    )


#: fvsanity's own variables read here: name -> (lowest valid value, what it sets)
FVSANITY_VARS = {"FVSANITY_THREADS": (1, "CPU threads per rank"),
                 "FVSANITY_DIST_TIMEOUT_S": (1, "seconds a rank waits at a barrier")}


def _int_env(name: str, env) -> int | None:
    v = env.get(name)
    if v is None or v.strip() == "":
        return None
    if name in FVSANITY_VARS:
        lo, what = FVSANITY_VARS[name]
        try:
            n = int(v)
        except ValueError:
            n = None
        if n is None or n < lo:
            raise DistributedError(f"{name}={v!r} is not valid; valid: a whole number >= {lo} ({what}), or unset")
        return n
    try:
        return int(v)
    except ValueError:
        raise DistributedError(f"environment variable {name}={v!r} must be an integer (set by torchrun)") from None


def check_env(env=None) -> None:
    """Refuse an ``FVSANITY_THREADS`` / ``FVSANITY_DIST_TIMEOUT_S`` that is not a whole number >= 1
    (they are read only under torchrun; a command checks them in every run, so a typo is never
    silently ignored).

    Raises:
        DistributedError: one line naming the variable and its valid values.
    """
    env = os.environ if env is None else env
    for name in FVSANITY_VARS:
        _int_env(name, env)


def from_env(env=None) -> Shard:
    """The :class:`Shard` torchrun's variables describe (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``LOCAL_WORLD_SIZE``); :data:`SINGLE` when they are absent. Starts nothing.

    Raises:
        DistributedError: a variable that is not an integer, or a rank outside 0..WORLD_SIZE-1.
    """
    env = os.environ if env is None else env
    world = _int_env("WORLD_SIZE", env)
    rank = _int_env("RANK", env)
    if world is None and rank is None:
        return SINGLE
    if world is None or rank is None:
        raise DistributedError("RANK and WORLD_SIZE must be set together (torchrun sets both)")
    if world < 1 or not 0 <= rank < world:
        raise DistributedError(f"RANK={rank} out of range for WORLD_SIZE={world}; valid: 0..{world - 1}")
    local = _int_env("LOCAL_RANK", env)
    local = rank if local is None else local
    lws = _int_env("LOCAL_WORLD_SIZE", env)
    lws = world if lws is None else lws
    if lws < 1 or not 0 <= local < lws:
        raise DistributedError(f"LOCAL_RANK={local} out of range for LOCAL_WORLD_SIZE={lws}; valid: 0..{lws - 1}")
    return Shard(rank, world, local, lws, False)


def _cpu_threads(shard: Shard, env) -> int:
    v = _int_env("FVSANITY_THREADS", env)  # refused unless a whole number >= 1
    if v is not None:
        return v
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, shard.local_world_size))


@contextmanager
def sharded(device=None, env=None) -> Iterator[Shard]:
    """Run as the rank torchrun's variables say: ``with sharded(args.device) as shard:``, then
    ``shard.device(args.device)`` is this rank's device.

    With more than one rank: sets this rank's CUDA device (``device``: None or ``cuda`` ->
    ``cuda:LOCAL_RANK``) or CPU threads, starts the process group (nccl on CUDA, gloo on CPU)
    unless one is already up, and destroys the group it started on exit (threads restored too).
    With one rank: the shard of one process, and nothing changes.

    Raises:
        DistributedError: bad launcher variables, or a process group that cannot start.
    """
    env = os.environ if env is None else env
    shard = from_env(env)
    if not shard.active:
        yield shard
        return
    import torch.distributed as dist

    if not dist.is_available():
        raise DistributedError("this PyTorch build has no torch.distributed; run without torchrun")
    dev = shard.device(device)
    threads = torch.get_num_threads()
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    else:
        torch.set_num_threads(_cpu_threads(shard, env))
    started = False
    if not dist.is_initialized():
        timeout = timedelta(seconds=_int_env("FVSANITY_DIST_TIMEOUT_S", env) or 86400)
        try:
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=timeout)
        except (RuntimeError, ValueError) as e:
            raise DistributedError(f"cannot start the process group of rank {shard.rank}/{shard.world_size}: "
                                   f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
        started = True
    ok = False
    try:
        yield Shard(shard.rank, shard.world_size, shard.local_rank, shard.local_world_size, True)
        ok = True
    finally:
        if started and dist.is_initialized():
            if ok:  # every rank done before any tears down: gloo aborts a rank whose peer is gone mid-send
                dist.barrier()
            dist.destroy_process_group()
        if dev.type != "cuda":
            torch.set_num_threads(threads)
