"""Per-shard claims: any number of processes on one output folder never work on a shard twice.

A claim is the file `<out>/.claims/<shard>.claim`, created with O_CREAT|O_EXCL (so exactly one
creator wins) and holding its owner (host, pid, start time, a random token) as JSON. While the
owner works, a heartbeat thread touches the file every `heartbeat_s` seconds. A claim is dead when
its file is older than `stale_s` (the owner's host died, hung or lost the shared disk) or, on the
owner's own host, when the owner's process is gone (SIGKILL, OOM: taken over at once, not after
the timeout).

Taking over a dead claim: the taker creates, with O_EXCL, a lock file named after the dead
claim's identity (inode and mtime), so of any number of takers that judged that same file dead
exactly one gets the lock. The winner checks that the claim file is still the one it judged dead
(same inode, mtime and token) and renames its own new claim over it. The claim name is never
absent during a takeover, so a plain claimer (O_EXCL on the claim itself) cannot win alongside;
a late taker finds the lock gone but the claim changed, and gives up. An owner whose heartbeat
finds its file holding another token knows the claim was lost (it stalled past the timeout) and
drops the shard instead of writing it.

Clocks: the age of a claim is its mtime against this host's clock, so hosts sharing a folder must
agree on the time to well within `stale_s` (NTP does).
"""

from __future__ import annotations

import dataclasses
import errno
import fnmatch
import hashlib
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Iterable, Iterator, TypeVar

from t2i_recap.io import UnsafeKeyError, check_key
from t2i_recap.logging_utils import get_logger

log = get_logger(__name__)
T = TypeVar("T")
CLAIMS_DIR = ".claims"


class ClaimLost(RuntimeError):
    """Another process took this claim over (this one stalled past the stale timeout)."""


@dataclasses.dataclass
class ClaimConfig:
    """How processes sharing an output folder claim its shards."""

    heartbeat_s: float = 30.0
    """Seconds between touches of a held claim file."""
    stale_s: float | None = None
    """Age (seconds since the last touch) after which a claim is taken over; default 10x heartbeat_s."""
    poll_s: float = 5.0
    """Seconds between looks at shards that live owners hold, until each is finished or free."""

    def __post_init__(self) -> None:
        if self.heartbeat_s <= 0:
            raise ValueError(f"heartbeat_s must be > 0, got {self.heartbeat_s}")
        if self.stale_s is None:
            self.stale_s = 10 * self.heartbeat_s
        if self.stale_s < 2 * self.heartbeat_s:
            raise ValueError(f"stale_s ({self.stale_s}) must be at least twice heartbeat_s ({self.heartbeat_s}), "
                             "or live claims are taken over between two heartbeats")
        if self.poll_s <= 0:
            raise ValueError(f"poll_s must be > 0, got {self.poll_s}")


# ---------------------------------------------------------------- owners


def _read(path: str) -> str:
    try:
        with open(path) as fh:
            return fh.read().strip()
    except OSError:
        return ""


def node_id() -> str:
    """Host name + boot id + pid namespace: two owners with the same node id can see each other's pids."""
    return "/".join([socket.gethostname(), _read("/proc/sys/kernel/random/boot_id"),
                     os.readlink("/proc/self/ns/pid") if os.path.exists("/proc/self/ns/pid") else ""])


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks) from /proc/PID/stat, or None where /proc has no such file."""
    text = _read(f"/proc/{pid}/stat")
    if not text:
        return None
    fields = text.rpartition(")")[2].split()  # the command name may hold spaces and parentheses
    return fields[0], fields[19]


def pid_alive(pid: int, start: str | None) -> bool:
    """Is process `pid` (started at `start`, if known) running on this node? Zombies and reused pids are not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    stat = _proc_stat(pid)
    if stat is None:
        return True  # no /proc to tell more
    state, started = stat
    return state not in ("Z", "X") and (start is None or started == start)


@dataclasses.dataclass(frozen=True)
class Owner:
    host: str
    node: str
    pid: int
    pid_start: str | None
    started_at: str
    token: str

    @classmethod
    def here(cls) -> "Owner":
        stat = _proc_stat(os.getpid())
        return cls(socket.gethostname(), node_id(), os.getpid(), stat[1] if stat else None,
                   time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), uuid.uuid4().hex)

    @classmethod
    def parse(cls, text: str) -> "Owner | None":
        """The owner in a claim file, or None for an empty or partly written one."""
        try:
            return cls(**json.loads(text))
        except (ValueError, TypeError):
            return None

    def describe(self) -> dict:
        return {"host": self.host, "pid": self.pid, "started_at": self.started_at, "token": self.token}


# ---------------------------------------------------------------- one claim


@dataclasses.dataclass(frozen=True)
class _Seen:
    """A claim file as inspected: enough to tell later whether it is still the same file."""

    ino: int
    mtime_ns: int
    owner: Owner | None


def _inspect(path: Path) -> _Seen | None:
    try:
        st = os.stat(path)
        text = _read(str(path))
    except FileNotFoundError:
        return None
    return _Seen(st.st_ino, st.st_mtime_ns, Owner.parse(text))


class Claim:
    """A held claim on one shard; a daemon thread keeps it fresh until `release()`."""

    def __init__(self, path: Path, owner: Owner, heartbeat_s: float) -> None:
        self.path, self.owner, self.heartbeat_s = path, owner, heartbeat_s
        self.name = path.name[: -len(".claim")]
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"claim-{self.name}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                mine = self.still_mine()
            except OSError as exc:  # a flaky shared disk: keep beating; the stale timeout covers a long outage
                log.warning("heartbeat of claim %s failed: %s", self.path, exc)
                continue
            if not mine:
                log.warning("claim %s was taken over by another process; this one drops the shard", self.path)
                self.lost.set()
                return

    def still_mine(self) -> bool:
        """Check the file still holds this owner's token, and touch it (the heartbeat)."""
        seen = _inspect(self.path)
        if seen is None or seen.owner is None or seen.owner.token != self.owner.token:
            return False
        try:
            os.utime(self.path)
        except FileNotFoundError:
            return False
        return True

    def check(self) -> None:
        """Raise ClaimLost if another process took this claim over; call before making work visible."""
        if self.lost.is_set() or not self.still_mine():
            self.lost.set()
            raise ClaimLost(f"claim {self.path} is held by another process now")

    def release(self) -> None:
        self._stop.set()
        self._thread.join()
        seen = _inspect(self.path)
        if seen is not None and seen.owner is not None and seen.owner.token == self.owner.token:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "Claim":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


# ---------------------------------------------------------------- a folder of claims


class Claims:
    """The claims in `<root>/.claims`; one instance per process and output folder."""

    def __init__(self, root: str | Path, cfg: ClaimConfig | None = None) -> None:
        self.dir = Path(root) / CLAIMS_DIR
        self.cfg = cfg or ClaimConfig()
        self.owner = Owner.here()
        self.finished_elsewhere: list[str] = []
        """Names that `each` skipped because another process finished them meanwhile."""

    def path(self, name: str) -> Path:
        try:
            stem = check_key(name)
        except UnsafeKeyError:  # a shard named by a user's file name: never let it choose the path
            stem = "sha256-" + hashlib.sha256(name.encode()).hexdigest()[:32]
        return self.dir / f"{stem}.claim"

    def try_acquire(self, name: str) -> Claim | None:
        """The claim on `name` if it is free or dead (then taken over), None while a live owner holds it."""
        path = self.path(name)
        for _ in range(10):  # each turn, the file appeared, vanished or changed hands under us
            if self._create(path):
                return Claim(path, self.owner, self.cfg.heartbeat_s)
            seen = _inspect(path)
            if seen is None:
                continue  # released meanwhile: create it again
            why = self.dead_because(seen)
            if why is None:
                return None
            if not self._take_over(path, seen, replace=True):
                return None
            who = seen.owner.describe() if seen.owner else "an unreadable owner"
            log.warning("took over the claim %s of %s: %s", path.name, who, why)
            return Claim(path, self.owner, self.cfg.heartbeat_s)
        return None

    def _data(self) -> bytes:
        return json.dumps(dataclasses.asdict(self.owner), sort_keys=True).encode()

    def _create(self, path: Path) -> bool:
        data = self._data()
        for _ in range(3):
            self.dir.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                return False
            except FileNotFoundError:
                continue  # another process removed the empty folder between mkdir and open
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            return True
        raise OSError(errno.ENOENT, f"cannot create {path}: its folder keeps vanishing")

    def dead_because(self, seen: _Seen) -> str | None:
        """Why the inspected claim is dead, or None while its owner is alive."""
        age = time.time() - seen.mtime_ns / 1e9
        if age > self.cfg.stale_s:
            return f"no heartbeat for {age:.0f} s (stale after {self.cfg.stale_s:g} s)"
        o = seen.owner
        if o is not None and o.node == self.owner.node and not pid_alive(o.pid, o.pid_start):
            return f"its process {o.pid} on this host is gone"
        return None

    def _take_over(self, path: Path, seen: _Seen, replace: bool) -> bool:
        """Put this process's claim in place of the dead claim `seen` (or, without `replace`, remove it).
        False if another process got there first."""
        lock = path.with_name(f".{path.name}.{seen.ino}-{seen.mtime_ns}.takeover")
        if not self._lock(lock):
            return False
        try:
            if _inspect(path) != seen:
                return False  # taken over (or released, or touched by a live owner) since it was judged dead
            if not replace:
                path.unlink()
                return True
            new = path.with_name(f".{path.name}.{self.owner.token}.new")
            with open(new, "wb") as fh:
                fh.write(self._data())
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(new, path)  # atomic: the claim name is never free for a plain claimer meanwhile
            return True
        finally:
            lock.unlink(missing_ok=True)

    def _lock(self, lock: Path) -> bool:
        try:
            os.close(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return True
        except FileExistsError:
            pass
        except FileNotFoundError:  # the folder was pruned: the claim judged dead is gone with it
            return False
        try:  # a taker that died between its two system calls leaves its lock: clear it once stale
            if time.time() - lock.stat().st_mtime > self.cfg.stale_s:
                log.warning("removing the takeover lock %s left by a dead process", lock)
                lock.unlink(missing_ok=True)
        except FileNotFoundError:
            pass
        return False

    def each(self, items: Iterable[T], name: Callable[[T], str], is_done: Callable[[T], bool],
             stop: threading.Event | None = None) -> Iterator[tuple[T, Claim]]:
        """Yield (item, claim) for every unfinished item this process gets to claim, in order.

        Items a live owner holds are passed over and looked at again every `poll_s` until each is
        finished (by anyone) or claimable; so when this returns, every item was finished or
        attempted by someone. The claim is released when the loop body returns or raises.
        `is_done` is asked again after the claim is won: the last owner may have just finished.
        """
        pending = list(items)
        while pending and not (stop is not None and stop.is_set()):
            waiting = []
            for item in pending:
                if stop is not None and stop.is_set():
                    return
                if is_done(item):
                    self.finished_elsewhere.append(name(item))
                    continue
                claim = self.try_acquire(name(item))
                if claim is None:
                    waiting.append(item)
                    continue
                with claim:
                    if is_done(item):
                        self.finished_elsewhere.append(name(item))
                        continue
                    yield item, claim
            pending = waiting
            if pending:
                log.info("%d shards are held by other live processes (%s); looking again in %g s", len(pending),
                         ", ".join(name(i) for i in pending[:5]), self.cfg.poll_s)
                if stop is not None:
                    stop.wait(self.cfg.poll_s)
                else:
                    time.sleep(self.cfg.poll_s)

    def _listed(self, pattern: str) -> list[Path]:
        """The files in the claims folder matching `pattern`; none if another process removed the folder."""
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:  # the last other owner pruned it: nothing left to look at
            return []
        return sorted(self.dir / n for n in names if fnmatch.fnmatchcase(n, pattern))

    def prune(self) -> None:
        """Remove dead claims (a killed owner that had finished its shard) and the folder once it is empty."""
        for path in self._listed(".*.claim.*"):  # a taker's lock or new claim, left by its death
            try:
                if time.time() - path.stat().st_mtime > self.cfg.stale_s:
                    path.unlink(missing_ok=True)
            except FileNotFoundError:
                pass
        for path in self._listed("*.claim"):
            seen = _inspect(path)
            why = self.dead_because(seen) if seen is not None else None
            if why is not None and self._take_over(path, seen, replace=False):
                log.info("removed the dead claim %s: %s", path.name, why)
        try:
            self.dir.rmdir()
        except OSError:
            pass  # other processes' claims (or takeovers) are in it
