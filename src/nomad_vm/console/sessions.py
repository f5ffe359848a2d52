"""Browser sessions: the login form's token kept in this process's memory, the browser holding
only a random session id in an HttpOnly, SameSite=Strict cookie. The token is never written to
disk, put in a URL, sent back to the browser or logged; a session ends after ``lifetime``
seconds or at logout, and all of them with the process."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass

COOKIE = "nomad_vm_console"


@dataclass(frozen=True)
class Session:
    token: str
    name: str
    expires: float

    def __repr__(self) -> str:  # never show the token
        return f"Session(name={self.name!r})"


class Sessions:
    def __init__(self, lifetime: float = 8 * 3600, clock: object = time.monotonic) -> None:
        self.lifetime = lifetime
        self._clock = clock
        self._sessions: dict[str, Session] = {}

    def _now(self) -> float:
        now = self._clock()  # type: ignore[operator]
        return float(now)

    def create(self, token: str, name: str) -> str:
        self._expire()
        session_id = secrets.token_urlsafe(32)
        self._sessions[session_id] = Session(token, name, self._now() + self.lifetime)
        return session_id

    def get(self, session_id: str | None) -> Session | None:
        if not session_id:
            return None
        session = self._sessions.get(session_id)
        if session is None or session.expires <= self._now():
            self._sessions.pop(session_id, None)
            return None
        return session

    def end(self, session_id: str | None) -> None:
        if session_id:
            self._sessions.pop(session_id, None)

    def _expire(self) -> None:
        now = self._now()
        for key in [k for k, s in self._sessions.items() if s.expires <= now]:
            del self._sessions[key]
