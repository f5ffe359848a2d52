"""Find out when a VM's guest agent (qemu-guest-agent) starts answering, and say so.

The agent is the way into the guest for exec and signals. It comes up late (tens of seconds
after QEMU starts under TCG) or never (images without it), so it is polled in the background
with a growing interval, and its first answer becomes a task event.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from nomad_vm.vm.guest_agent import AgentError, GuestAgent

log = logging.getLogger(__name__)

# Stop looking after this long: an image without an agent should not be pinged forever.
GIVE_UP_AFTER = 600.0
FIRST_INTERVAL = 1.0
MAX_INTERVAL = 15.0
PING_TIMEOUT = 3.0


async def watch_agent(agent: GuestAgent, on_ready: Callable[[GuestAgent, float], None]) -> None:
    """Ping until the agent answers, then hand the connected client to ``on_ready``."""
    started = time.monotonic()
    interval = FIRST_INTERVAL
    while time.monotonic() - started < GIVE_UP_AFTER:
        try:
            await agent.ping(timeout=PING_TIMEOUT)
        except AgentError as exc:
            log.debug("guest agent not answering yet: %s", exc)
            await asyncio.sleep(interval)
            interval = min(interval * 1.5, MAX_INTERVAL)
            continue
        on_ready(agent, time.monotonic() - started)
        return
    await agent.close()
    log.info(
        "no guest agent answered on %s within %.0fs; exec and signals unavailable",
        agent.socket,
        GIVE_UP_AFTER,
    )
