"""Where task journals live: ``<data_dir>/journal/<sha256 of the task id>.msgpack``.

DestroyTask carries nothing but the task id, and may come to a fresh plugin process for a task
whose StartTask the previous one never answered (it died midway): Nomad then has no handle to
give back. So the journal must be found from the id alone, in the plugin's own state, which no
task can name (the task config's file options are confined to image_paths and the allocation;
the directory is 0700 and each journal 0600). The id is hashed because it contains slashes
and is chosen by Nomad. Each write replaces the file atomically (``files.write_atomically``),
so a reader sees the journal before or after a change, never half of one.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from pathlib import Path

from nomad_vm.driver.journal import TaskJournal
from nomad_vm.errors import HypervisorError
from nomad_vm.files import write_atomically

log = logging.getLogger(__name__)

JOURNAL_DIR = "journal"
SUFFIX = ".msgpack"
_DIGEST_CHARS = 32  # 128 bits of SHA-256: no two task ids meet


class JournalStore:
    def __init__(self, data_dir: Path, directory: str = JOURNAL_DIR) -> None:
        # ``directory``: the installed name's own (nomad_vm.identity), so two names sharing a
        # data_dir never recover or clean up each other's tasks.
        self.directory = data_dir / directory

    def path_for(self, task_id: str) -> Path:
        digest = hashlib.sha256(task_id.encode()).hexdigest()[:_DIGEST_CHARS]
        return self.directory / f"{digest}{SUFFIX}"

    def save(self, journal: TaskJournal, *, durable: bool = True) -> None:
        """Replace the task's journal with ``journal``; HypervisorError when it cannot be
        written (a start must not go on making changes nobody could undo). ``durable=False``
        when what follows cannot outlive a host crash either (processes): no fsync."""
        data = journal.encode()
        path = self.path_for(journal.task_id)
        # ``remove`` drops the directory with its last journal; another task's may do so
        # between our mkdir and our write, hence a second try.
        for attempt in (1, 2):
            try:
                self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
                write_atomically(path, data, durable=durable)
                return
            except FileNotFoundError:
                if attempt == 2:
                    raise HypervisorError(f"cannot write the task journal {path}") from None
            except OSError as exc:
                raise HypervisorError(f"cannot write the task journal {path}: {exc}") from exc

    def load(self, task_id: str) -> TaskJournal | None:
        """The task's journal, None when it has none; HypervisorError when it is unreadable."""
        path = self.path_for(task_id)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise HypervisorError(f"cannot read the task journal {path}: {exc}") from exc
        journal = TaskJournal.decode(data)
        if journal.task_id != task_id:
            raise HypervisorError(f"{path} is the journal of {journal.task_id!r}, not {task_id!r}")
        return journal

    def remove(self, task_id: str) -> None:
        """Forget the task (its host changes are undone); the directory goes with the last."""
        self.path_for(task_id).unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # not empty, or already gone: both fine
            os.rmdir(self.directory)

    def all(self) -> list[TaskJournal]:
        """Every readable journal (unreadable ones are logged and skipped)."""
        found = []
        for path in sorted(self.directory.glob(f"*{SUFFIX}")):
            try:
                found.append(TaskJournal.decode(path.read_bytes()))
            except (OSError, HypervisorError) as exc:
                log.warning("skipping task journal %s: %s", path, exc)
        return found
