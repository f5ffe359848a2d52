"""A driver-level TaskConfig for unit tests: what Nomad would send, reduced to what they need."""

from __future__ import annotations

from pathlib import Path

from nomad_vm.driver.types import TaskConfig, TaskResources


def unit_task(
    alloc_dir: Path, driver_config: dict[str, object] | None = None, name: str = "t"
) -> TaskConfig:
    return TaskConfig(
        id=f"a/{name}/1",
        name=name,
        alloc_id="a",
        alloc_dir=str(alloc_dir),
        stdout_path="",
        stderr_path="",
        resources=TaskResources(cpu_mhz=100, memory_mb=128),
        driver_config=driver_config,
    )
