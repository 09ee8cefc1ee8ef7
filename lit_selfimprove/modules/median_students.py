"""Where SOAR's kept median students live and how a promotion installs one on every rank.

``keep_median_students: disk`` writes each kept trained student to a file of a per-rank folder inside
the run directory (or ``median_students_dir``), not to the system temp folder: a crash leaves them
where the next start of the run (a resume) removes them, and a full disk names the path and its free
space. A promotion broadcasts the chosen student tensor by tensor from the rank that trained it into
the baseline's weights (:func:`~lit_selfimprove.distributed.broadcast_state`), never as one pickle.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from lit_selfimprove.distributed import broadcast_state, world

__all__ = ["StudentFolder", "install_student", "install_targets", "save_student"]

FILE_GLOB = "student_*.pt*"


def _size(num_bytes: int) -> str:
    if num_bytes >= 2**30:
        return f"{num_bytes / 2**30:.2f} GiB"
    return f"{num_bytes / 2**20:.1f} MiB" if num_bytes >= 2**20 else f"{num_bytes} bytes"


class StudentFolder:
    """This rank's folder of kept students (``<root>/rank_<rank>``) for ``keep_median_students: disk``.

    :meth:`prepare` (at the start of a fit) creates it, removes the files a crashed run left there
    and fails at once, naming the folder, when it cannot be written; :meth:`clear` removes the last
    outer step's files; :meth:`remove` removes the folder at the end of training."""

    def __init__(self, root: str | Path, rank: int = 0):
        self.root = Path(root)
        self.path = self.root / f"rank_{rank}"

    @classmethod
    def of_run(cls, trainer, folder: str | Path | None = None) -> StudentFolder:
        """This rank's subfolder of ``folder``, default ``<log dir>/median_students`` (the run directory,
        which a resume reuses; ``trainer.log_dir`` is a collective: call it on every rank)."""
        if folder is None:
            run_dir = (trainer.log_dir or trainer.default_root_dir) if trainer is not None else "."
            folder = Path(run_dir) / "median_students"
        return cls(folder, world()[1])

    def __str__(self) -> str:
        return str(self.path)

    def prepare(self) -> StudentFolder:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            left = self.clear()
            probe = self.path / ".write_test"
            probe.write_bytes(b"0")
            probe.unlink()
        except OSError as err:
            raise RuntimeError(
                f"keep_median_students='disk': cannot write the trained students to {self.path} ({err}). "
                "Set median_students_dir to a writable folder with room for a few students, or keep them "
                "in memory (keep_median_students: true)"
            ) from err
        if left:
            from lightning.pytorch.utilities import rank_zero_info

            rank_zero_info(f"TeacherMetaRL: removed {left} student files an earlier run left in {self.path}")
        return self

    def clear(self) -> int:
        """Remove the student files; returns how many there were."""
        files = list(self.path.glob(FILE_GLOB))
        for file in files:
            file.unlink(missing_ok=True)
        return len(files)

    def remove(self) -> None:
        """Remove the files and the folder (and ``root`` when nothing else is left in it)."""
        if self.path.is_dir():
            self.clear()
            shutil.rmtree(self.path, ignore_errors=True)
        try:
            self.root.rmdir()  # only when empty: other ranks' folders, or the user's files, stay
        except OSError:
            pass


def save_student(state: dict[str, torch.Tensor], path: str | Path) -> None:
    """``torch.save`` of a kept student; a failed write (a full disk gives torch's bare
    ``RuntimeError: [enforce fail at inline_container.cc] unexpected pos``) removes the partial file and
    raises a ``RuntimeError`` naming the path, the student's size and the free space there."""
    try:
        torch.save(state, path)
    except (RuntimeError, OSError) as err:
        Path(path).unlink(missing_ok=True)
        need = sum(t.numel() * t.element_size() for t in state.values())
        try:
            free = _size(shutil.disk_usage(Path(path).parent).free)
        except OSError:
            free = "unknown"
        raise RuntimeError(
            f"keep_median_students='disk': writing a trained student ({_size(need)}) to {path} failed, "
            f"with {free} free on that disk: {err}. Free space there, set median_students_dir to a "
            "disk with room, or keep the students in memory (keep_median_students: true)"
        ) from err


def install_targets(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors an :func:`~lit_selfimprove.modeling.adapter_state` of ``model`` loads into, by name:
    a peft model's trainable parameters (its adapters), else its ``state_dict()`` (which shares the
    weights' storage)."""
    from lit_selfimprove.modeling import is_peft

    if is_peft(model):
        return {n: p for n, p in model.named_parameters() if p.requires_grad}
    return model.state_dict()


def install_student(model: torch.nn.Module, state: dict | str | Path | None, owner: int) -> bool:
    """Load the kept student ``state`` of rank ``owner`` (a CPU state dict, or its file) into ``model``
    in place on every rank, tensor by tensor (a collective under torch.distributed; ``state`` is read
    on ``owner`` only). Returns ``False`` on every rank when ``owner`` has no student (``None``)."""
    if world()[1] != owner:
        state = None
    elif isinstance(state, (str, Path)):  # keep_median_students="disk": mapped, read tensor by tensor
        state = torch.load(state, map_location="cpu", weights_only=True, mmap=True)
    return broadcast_state(state, owner, install_targets(model))
